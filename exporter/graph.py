"""Facts about the graphs convattn writes, shared by every stage: the export shapes it records in a
model's metadata, its real (non-initializer) inputs, their dims written as constants and the dims
every tensor then has, and the BxCxHxW shape syntax of the CLI."""

from __future__ import annotations

import os
import tempfile

import onnx

from convattn.errors import InputError

SHAPES_METADATA_KEY = "convattn.input_shapes"


def record_shapes(model: onnx.ModelProto, shapes) -> None:
    """Write the export shapes into the model's metadata (later stages probe and validate at them)."""
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        SHAPES_METADATA_KEY: ";".join("x".join(map(str, s)) for s in shapes)})


def recorded_shapes(model: onnx.ModelProto) -> list[tuple[int, ...]] | None:
    for prop in model.metadata_props:
        if prop.key == SHAPES_METADATA_KEY:
            return [tuple(int(n) for n in s.split("x")) for s in prop.value.split(";")]
    return None


def graph_inputs(model: onnx.ModelProto) -> list:
    """The inputs a caller feeds: graph inputs that are not initializers."""
    init = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in init]


def set_input_dims(model: onnx.ModelProto, shapes: dict) -> None:
    """Write inputs' dims as constants (`model` changed in place): `shapes` maps an input name to its
    sizes, None for a dim to leave as it is."""
    for vi in model.graph.input:
        for dim, n in zip(vi.type.tensor_type.shape.dim, shapes.get(vi.name, ())):
            if n is not None:
                dim.Clear()
                dim.dim_value = int(n)


def dims_at(model: onnx.ModelProto, shapes: dict, wanted) -> dict[str, list[int | None]]:
    """Every tensor's dims (None where unknown) with the inputs at `shapes` (`set_input_dims`): ONNX
    shape inference, with data propagation (dims computed through Shape/Slice/Concat), else, where a
    `wanted` tensor is left unknown, ONNX Runtime's symbolic shape inference. Best effort: what neither
    infers is absent or None."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    set_input_dims(m, shapes)

    def dims(inferred):
        return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
                for v in [*inferred.graph.value_info, *inferred.graph.input]}

    found = {}
    try:
        found = dims(onnx.shape_inference.infer_shapes(m, data_prop=True))
    except Exception:  # noqa: BLE001  (inference is best effort)
        pass
    if all(found.get(t) and None not in found[t] for t in wanted):
        return found
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    # Where it cannot infer every shape, ONNX Runtime's tool saves the model (sym_shape_infer_temp.onnx
    # and a <uuid>.data) into the current directory: run it in a temporary one.
    with tempfile.TemporaryDirectory(prefix="convattn-shapes-") as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            return dims(SymbolicShapeInference.infer_shapes(m, auto_merge=True))
        except Exception:  # noqa: BLE001
            return found
        finally:
            os.chdir(cwd)


def parse_shape(text: str, option: str = "--input-shape", rank: int | None = 4) -> tuple[int, ...]:
    """'1x64x32x32' -> (1, 64, 32, 32): positive ints; `rank` of them unless None."""
    try:
        shape = tuple(int(p) for p in text.strip().lower().split("x"))
    except ValueError:
        raise InputError(f"{option}: expected BxCxHxW such as 1x64x32x32, got {text!r}") from None
    if min(shape) < 1 or (rank is not None and len(shape) != rank):
        dims = f"{rank} positive dims BxCxHxW (NCHW)" if rank == 4 else "positive dims"
        raise InputError(f"{option}: expected {dims}, got {text!r}")
    return shape


_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str, option: str) -> int:
    """'12GB', '512MiB', '2e9' -> bytes (a positive number)."""
    import re

    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    try:
        value = float(m.group(1)) * _UNITS[unit] if m else -1
    except (KeyError, ValueError):
        value = -1
    if value <= 0:
        raise InputError(f"{option}: expected a size such as 12GB or 512MiB, got {text!r}")
    return int(value)
