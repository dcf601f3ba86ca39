"""The probe (one ONNX Runtime run of the unfused graph at small shapes) and the facts read from it: shapes,
scalars, dtypes, what depends on data."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from ..graph import graph_inputs, recorded_shapes
from ...errors import ModelError, first_line


# Dynamic dims above this are probed smaller (halved while even): the probe runs the unfused graph,
# whose S x S scores at a 128x128 export would take tens of GB. A graph dynamic in a dim computes
# the same views at any size; one that is not runs at the export shape (the fallback).
PROBE_MAX_DIM = 32


def _probe_shapes(model: onnx.ModelProto, input_shapes, mode: str = "reduced", max_dim: int = PROBE_MAX_DIM):
    """{input: (shape, dtype)}. Dynamic dims: "reduced" (>= 2, halved while above `max_dim` and
    even), "at_least_2" (the export size, >= 2), "exact" (the export size)."""
    inputs = graph_inputs(model)
    if input_shapes is None:
        input_shapes = recorded_shapes(model)
    shapes = {}
    for n, inp in enumerate(inputs):
        dims = inp.type.tensor_type.shape.dim
        given = input_shapes[n] if input_shapes and n < len(input_shapes) else None
        if given is not None and len(given) != len(dims):
            raise ModelError(f"input {inp.name!r}: expected a shape of rank {len(dims)}, got {given}")
        shape = []
        for i, d in enumerate(dims):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            elif given is None:
                raise ModelError(
                    f"input {inp.name!r} has a dynamic dimension {i} and no probe shape: pass input_shapes"
                )
            else:
                size = int(given[i]) if mode == "exact" else max(int(given[i]), 2)  # 1 would hide the dim
                while mode == "reduced" and size > max_dim and size % 2 == 0:
                    size //= 2
                shape.append(size)
        shapes[inp.name] = (shape, onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type))
    return shapes


def _probe(model: onnx.ModelProto, input_shapes, notes: list, max_dim: int = PROBE_MAX_DIM):
    """(every intermediate tensor of one ONNX Runtime run at the probe shapes, the mode that ran):
    reduced first, then the export shapes (dynamic dims >= 2), then exactly the export shapes, said
    in `notes`: a graph that claims dynamic dims it does not have (a batch that only runs at 1)."""
    tried, errors = [], []
    for mode in ("reduced", "at_least_2", "exact"):
        shapes = _probe_shapes(model, input_shapes, mode, max_dim)
        if shapes in tried:
            continue
        tried.append(shapes)
        try:
            values = _probe_at(model, shapes)
        except ModelError as e:
            errors.append(e)
            continue
        if mode == "exact" and errors:
            notes.append(f"the graph marks dims dynamic but does not run with them >= 2 ({errors[-1]}); it was "
                         "fused at the export shapes and is written with those dims fixed (it serves that shape "
                         "only): export with --static to say so")
            return values, "exact only"
        return values, mode
    raise errors[1] if len(errors) > 1 else errors[0]  # the export shapes' error, not the reduced one


def _probe_at(model: onnx.ModelProto, shapes: dict) -> dict[str, np.ndarray]:
    from convattn.plugins.ort_op import run

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in known:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
                known.add(name)
    rng = np.random.default_rng(0)
    feeds = {name: _probe_input(rng, shape, dtype) for name, (shape, dtype) in shapes.items()}
    try:
        values = run(probe, feeds)
    except Exception as e:  # ORT's own exception types vary by version
        if any(dtype == ml_dtypes.bfloat16 for _, dtype in shapes.values()):
            raise ModelError("the graph computes in bf16, which ONNX Runtime's CPU kernels (fusion's shape probe) "
                             "do not run: fuse the fp32 graph and type it with --dtype bf16 (`precision.cast_graph`). "
                             f"ONNX Runtime: {first_line(e)}") from e
        probed = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, (shape, _) in shapes.items())
        raise ModelError(f"the exported graph does not run in ONNX Runtime at the probe shapes ({probed}; a dynamic "
                         f"dim is probed at >= 2, batch included): a graph that only runs at the export shape "
                         f"exports with --static. ONNX Runtime: {first_line(e)}") from e
    out = dict(zip([o.name for o in probe.graph.output], values))
    out.update(feeds)
    return out


def _probe_input(rng, shape, dtype) -> np.ndarray:
    """Random normals for a float input; ones for an integer or boolean one (a sequence length, a
    timestep, a token id, a mask: 1 is valid for each, where random normals cast to int are not)."""
    if np.issubdtype(np.dtype(dtype), np.integer) or np.dtype(dtype) == np.bool_:
        return np.ones(shape, dtype)
    return rng.standard_normal(shape).astype(dtype)


class _Graph:
    """The gs graph plus the probe's concrete values."""

    def __init__(self, graph: gs.Graph, values: dict[str, np.ndarray]):
        self.graph, self.values = graph, values

    def shape(self, t) -> tuple:
        if isinstance(t, gs.Constant):
            return tuple(t.values.shape)
        return tuple(self.values[t.name].shape)

    def scalar(self, t) -> float | None:
        """The value of a one-element tensor that does not depend on the input data."""
        if isinstance(t, gs.Constant):
            return float(t.values.reshape(-1)[0]) if t.values.size == 1 else None
        if t.name not in self.values or self.values[t.name].size != 1 or not _data_independent(t):
            return None
        return float(self.values[t.name].reshape(-1)[0])

    def is_static(self, t) -> bool:
        """Computed from constants alone (not from shapes, not from data): the same at every shape."""
        return _data_independent(t, shapes=False)


def _data_independent(t, seen=None, shapes: bool = True) -> bool:
    """True if `t` is computed from constants and (with `shapes`) tensor shapes only, never from values."""
    seen = set() if seen is None else seen
    if isinstance(t, gs.Constant) or id(t) in seen:
        return True
    seen.add(id(t))
    if not t.inputs:
        return False  # a graph input
    node = t.inputs[0]
    if node.op in ("Shape", "Size"):
        return shapes
    if node.op == "Constant":
        return True
    return all(_data_independent(i, seen, shapes) for i in node.inputs if i is not None and i.name)


def _scalar_operand(node, g: _Graph):
    """For Mul/Div by a one-element tensor: (other input, factor, static?), else None."""
    if node.op not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    for pos in (1, 0) if node.op == "Mul" else (1,):
        value = g.scalar(node.inputs[pos])
        if value is not None and value != 0:
            factor = value if node.op == "Mul" else 1.0 / value
            return node.inputs[1 - pos], factor, g.is_static(node.inputs[pos])
    return None


def _is_zero(t, g: _Graph) -> bool:
    """A tensor that is zero whatever the input data: baddbmm(empty, q, k, beta=0) exports its
    `beta * empty` term as Mul(Expand(0), 0), added to the scores."""
    if isinstance(t, gs.Constant):
        return not np.any(t.values)
    return t.name in g.values and not np.any(g.values[t.name]) and _data_independent(t)


def _dtype(t, g: _Graph):
    """The element type of `t` (numpy), from the probe."""
    return (t.values if isinstance(t, gs.Constant) else g.values[t.name]).dtype.type


def _cast_to(node):
    """The numpy type a Cast node casts to."""
    return helper.tensor_dtype_to_np_dtype(node.attrs["to"]).type


_WIDER = {np.float16: np.float32, ml_dtypes.bfloat16: np.float32}


def _widens(node, g: _Graph) -> bool:
    """A Cast that keeps every value: to its input's own type, or fp16/bf16 up to fp32."""
    src, dst = _dtype(node.inputs[0], g), _cast_to(node)
    return dst == src or _WIDER.get(src) == dst


def _value_consumers(t) -> list:
    """The nodes that read `t`'s values (a Shape reads its shape, CastLike's second input its type)."""
    return [n for n in t.outputs if n.op not in ("Shape", "Size") and not (n.op == "CastLike" and n.inputs[1] is t)]
