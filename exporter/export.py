"""torch -> ONNX, checked.

The graph is exported in fp32 whatever the target precision: TensorRT takes precision as a
builder flag, and an fp32 graph runs everywhere, ONNX Runtime's CPU kernels included.
Batch, height and width are dynamic by default. The export shapes are recorded in the
model's metadata, so later stages (fusion's shape probe, validation) know them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from convattn.errors import ExportError, InputError, first_line
from convattn.models import ConvMHAttn, FlatOutputs, flatten_outputs

from .. import external_data
from .graph import record_shapes
from .load import eval_mode

EXPORTERS = ("auto", "dynamo", "torchscript")  # auto: dynamo, else TorchScript, said in the warnings
MIN_OPSET = 18


@dataclass
class ExportResult:
    model: onnx.ModelProto
    exporter: str
    input_names: list[str]
    input_shapes: list[tuple[int, ...]]
    warnings: list[str] = field(default_factory=list)


def check_export_options(exporter: str, opset: int) -> None:
    """Bad input (exit 2), said before any work: an exporter we do not know, an opset out of range."""
    if exporter not in EXPORTERS:
        raise InputError(f"--exporter: expected one of {', '.join(EXPORTERS)}, got {exporter!r}")
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise InputError(f"--opset: expected {MIN_OPSET}..{newest} (this onnx {onnx.__version__}), got {opset}")


def _eval_dropout_warning(module: torch.nn.Module, args, first) -> str | None:
    """Two eval-mode forwards on the same input must agree. Where they do not, a third with every dropout
    made the identity (`F.dropout` and SDPA's `dropout_p`) tells dropout applied in eval from any other
    randomness in the forward (sampling, torch.rand), and the warning names what it found."""
    with torch.no_grad():
        second = module(*args)
    diff = _max_diff(first, second)
    if diff == 0.0:
        return None
    said = f"the model is not deterministic in eval mode: two forwards on the same input differ by up to {diff:.3g}. "
    with torch.no_grad(), _no_dropout():
        without = [module(*args), module(*args)]
    if _max_diff(*without) == 0.0:
        return said + (
            "It is dropout applied in eval: F.scaled_dot_product_attention(dropout_p=...) and F.dropout(training=True) "
            "apply it even after module.eval(); pass dropout_p=(self.p if self.training else 0.0). The ONNX graph "
            "has no dropout, so it computes what your module would compute without it")
    return said + ("It is not F.dropout or SDPA's dropout_p (still so with both disabled): the forward draws random "
                   "numbers (sampling, torch.rand/randn, or a dropout called by another name); the ONNX graph fixes "
                   "or draws them its own way, so no check against PyTorch can agree: make the forward "
                   "deterministic for export")


def _max_diff(a, b) -> float:
    return max((x.float() - y.float()).abs().max().item() for (_, x), (_, y) in zip(flatten_outputs(a), flatten_outputs(b)))


@contextlib.contextmanager
def _no_dropout():
    """F.dropout (and the functions built on it) and SDPA's dropout_p as the identity, for one check."""
    import torch.nn.functional as F

    dropout, sdpa = F.dropout, F.scaled_dot_product_attention

    def no_dropout(x, p=0.5, training=True, inplace=False):
        return x

    def sdpa_without(*args, dropout_p=0.0, **kwargs):
        if len(args) > 4:  # (query, key, value, attn_mask, dropout_p, ...) given positionally
            args = (*args[:4], 0.0, *args[5:])
            return sdpa(*args, **kwargs)
        return sdpa(*args, dropout_p=0.0, **kwargs)

    F.dropout, F.scaled_dot_product_attention = no_dropout, sdpa_without
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention = dropout, sdpa


def export_onnx(
    module: torch.nn.Module,
    input_shapes: list[tuple[int, ...]],
    *,
    exporter: str = "auto",
    opset: int = MIN_OPSET,
    dynamic: bool = True,
    data_folder: str | Path | None = None,
) -> ExportResult:
    """Export `module` (eval mode, fp32) to a checked ONNX model.

    Args:
        module: the model; its forward takes one NCHW tensor per entry of `input_shapes`.
        input_shapes: one (B, C, H, W) shape per forward argument.
        exporter: "auto" (the default: dynamo, and TorchScript where dynamo fails, with a warning
            saying why), "dynamo" (torch.export based) or "torchscript".
        opset: ONNX opset, >= 18. Opset 23 lets the dynamo exporter emit the `Attention` op.
        dynamic: batch, height and width dynamic (default) or all static.
        data_folder: where the tensors of a model past protobuf's 2 GiB limit go (ONNX external data,
            `convattn.external_data`); default: a temporary folder removed when the process ends.
    """
    check_export_options(exporter, opset)
    module = eval_mode(module.float())
    arity = _required_inputs(module)
    if len(input_shapes) == 1 and arity > 1:
        input_shapes = list(input_shapes) * arity  # one shape serves every input, as the CLI documents
    gen = torch.Generator().manual_seed(0)
    args = tuple(torch.randn(s, generator=gen) for s in input_shapes)
    with _o_s_attention(module):
        try:
            with torch.no_grad():
                first = module(*args)
        except Exception as e:
            raise InputError(f"the model does not run on inputs of shape {_fmt(input_shapes)}: {e}") from e
        notes = [w for w in [_eval_dropout_warning(module, args, first)] if w]
    if isinstance(module, torch.jit.ScriptModule) and exporter != "torchscript":
        exporter = "torchscript"  # torch.export cannot trace a ScriptModule
        notes.append("a TorchScript model: exported with the TorchScript exporter")
    names = [f"input_{i}" if len(args) > 1 else "input" for i in range(len(args))]
    outputs = _output_specs(first)
    if len(outputs) > 1 or not isinstance(first, torch.Tensor):
        module = FlatOutputs(module)  # dataclasses, dicts, tuples: named tensors, as torch.onnx flattens them
    if exporter == "auto":
        try:
            exporter, model = "dynamo", _export_one(module, args, names, outputs, "dynamo", opset, dynamic, notes)
        except ExportError as e:
            try:
                exporter, model = "torchscript", _export_one(module, args, names, outputs, "torchscript", opset,
                                                             dynamic, notes)
            except ExportError as e2:
                raise ExportError(f"{e}; {e2}") from e2
            notes.append(f"the dynamo exporter failed ({first_line(e)}): exported with the TorchScript exporter")
    else:
        try:
            model = _export_one(module, args, names, outputs, exporter, opset, dynamic, notes)
        except ExportError as e:
            if exporter != "dynamo":
                raise
            raise ExportError(f"{e}; the TorchScript exporter may take it: --exporter torchscript (or auto)") from e
    written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise ExportError(f"asked for opset {opset}, the {exporter} exporter wrote opset {written}: "
                          f"pass an opset it supports (18 always works)")
    record_shapes(model, input_shapes)
    external_data.externalize(model, data_folder)
    try:
        external_data.check_model(model, full_check=True)
    except Exception as e:
        raise ExportError(f"the exported graph fails onnx.checker: {e}") from e
    return ExportResult(model, exporter, [i.name for i in model.graph.input], input_shapes, notes)


def _export_one(module, args, names, outputs, exporter, opset, dynamic, notes) -> onnx.ModelProto:
    """One exporter: dynamic dims, else static ones (said in `notes`); ExportError if neither."""
    shapes = _fmt([tuple(a.shape) for a in args])
    try:
        try:
            return _export(module, args, names, outputs, exporter, opset, dynamic)
        except Exception as e:
            if not dynamic or _interrupted(e):
                raise
            # A model traced or exported with fixed sizes (a static .pt2, say) refuses dynamic
            # dims: export what it supports and say so.
            model = _export(module, args, names, outputs, exporter, opset, False)
            notes.append(f"exported with static shapes {shapes}: the model refuses dynamic batch/height/width "
                         f"({first_line(e)})")
            return model
    except Exception as e:
        if _interrupted(e):  # Ctrl-C inside torch.export surfaces as another exception
            raise KeyboardInterrupt from None
        raise ExportError(f"torch.onnx.export ({exporter}) failed: {first_line(e)}") from e


def _output_specs(first) -> dict[str, int]:
    """{output name: rank} of the model's flattened outputs ("output" when there is one)."""
    flat = flatten_outputs(first)
    if not flat:
        raise InputError("the model returns no tensor")
    if len(flat) == 1:
        return {"output": flat[0][1].dim()}
    return {name: t.dim() for name, t in flat}


_AXIS_NAMES = {1: "sequence", 2: "height", 3: "width"}


def dynamic_axes(rank: int) -> tuple[int, ...]:
    """The axes a dynamic export leaves dynamic, by the input's rank: an NCHW map its batch, height and
    width; a (B, S, C) token input (a cross-attention UNet's `encoder_hidden_states`) its batch and
    sequence; any other input its batch."""
    return {4: (0, 2, 3), 3: (0, 1)}.get(rank, (0,))


def _export(module, args, names, outputs, exporter, opset, dynamic) -> onnx.ModelProto:
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        if exporter == "dynamo":
            shapes = tuple({axis: torch.export.Dim.DYNAMIC for axis in dynamic_axes(a.dim())} for a in args) \
                if dynamic else None
            if shapes and isinstance(module, FlatOutputs):
                shapes = (shapes,)  # its forward(*args) takes the inputs as one tuple
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                input_names=names, output_names=list(outputs), verbose=False,
            )
            return program.model_proto
        axes = {n: {axis: f"{_AXIS_NAMES[axis]}_{i}" if axis else "batch" for axis in dynamic_axes(a.dim())}
                for i, (n, a) in enumerate(zip(names, args))} if dynamic else None
        for i, (name, rank) in enumerate(outputs.items() if axes else ()):
            axes[name] = {0: "batch", **({2: f"height_out{i}", 3: f"width_out{i}"} if rank == 4 else {})}
        with tempfile.TemporaryDirectory(prefix="convattn-export-") as tmp:  # a file: past 2 GiB torch
            path = Path(tmp) / "model.onnx"  # writes external data beside it, loaded here
            torch.onnx.export(
                module, args, str(path), dynamo=False, opset_version=opset, input_names=names,
                training=torch.onnx.TrainingMode.PRESERVE,  # eval set above; a torch.export module refuses train()
                output_names=list(outputs), dynamic_axes=axes,
            )
            return onnx.load(str(path))


@contextlib.contextmanager
def _o_s_attention(module: torch.nn.Module):
    """ConvMHAttn blocks run as SDPA (the same function; PyTorch's CPU SDPA needs no S x S tensor)
    for the eager checks, so a 128x128 export does not take the einsum's tens of GB; the graph is
    exported from the module as given."""
    blocks = [m for m in module.modules() if isinstance(m, ConvMHAttn) and m.attention == "einsum"]
    for m in blocks:
        m.attention = "sdpa"
    try:
        yield
    finally:
        for m in blocks:
            m.attention = "einsum"


def _interrupted(e: BaseException) -> bool:
    """True if a KeyboardInterrupt is anywhere in the exception's chain."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _required_inputs(module) -> int:
    """Number of required positional arguments of `module.forward` (1 when unknown)."""
    import inspect

    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return max(1, sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in params))


def _fmt(shapes) -> str:
    return ", ".join("x".join(map(str, s)) for s in shapes)
