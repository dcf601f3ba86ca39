"""`FlashAttention` as an ONNX Runtime custom op (CPU), via onnxruntime-extensions.

The op runs `convattn.plugins.reference.flash_attention_reference`, so a fused graph runs
in ONNX Runtime end to end with the same tiled algorithm the GPU kernel uses.
onnxruntime-extensions registers Python ops only in domain `ai.onnx.contrib`;
`to_ort_domain` moves our nodes there (see `convattn.plugins.op`).
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading

import numpy as np
import onnx

from .. import external_data
from .op import BIAS_OP_TYPE, OP_TYPE, ORT_DOMAIN, FlashAttentionAttrs, is_fused_node, scratch_shape


def to_ort_domain(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose FlashAttention nodes are in ONNX Runtime's custom-op domain.

    ONNX Runtime's Python custom ops take float32 only: a node of an fp16/bf16 graph reads its
    inputs through Casts to fp32 and its outputs go back through Casts, so the graph runs with
    the node's inputs and output rounded as the kernel's are (the kernel accumulates in fp32)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    ours = any(is_fused_node(n) for n in out.graph.node)
    types = _elem_types(out) if ours else {}  # shape inference only where a node needs its input type
    nodes = []
    for node in out.graph.node:
        if is_fused_node(node):
            node.domain = ORT_DOMAIN
            low = types.get(node.input[0], onnx.TensorProto.FLOAT)
            if low != onnx.TensorProto.FLOAT:
                for i, name in enumerate(node.input):
                    nodes.append(onnx.helper.make_node("Cast", [name], [f"{name}/fp32"], to=onnx.TensorProto.FLOAT))
                    node.input[i] = f"{name}/fp32"
                results = list(node.output)
                node.output[:] = [f"{name}/fp32" for name in results]
                nodes += [node, *(onnx.helper.make_node("Cast", [f"{name}/fp32"], [name], to=low) for name in results)]
                continue
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    domains = {o.domain for o in out.opset_import}
    if ORT_DOMAIN not in domains:
        out.opset_import.append(onnx.helper.make_opsetid(ORT_DOMAIN, 1))
    return out


def _elem_types(model: onnx.ModelProto) -> dict:
    """Element type of each tensor whose type the graph or ONNX shape inference knows."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.value_info, *g.output]
             if vi.type.tensor_type.elem_type}  # an output marked untyped (`_run_marked`) says nothing
    types.update({t.name: t.data_type for t in g.initializer})
    return types


@functools.cache
def register() -> str:
    """Register the op once per process; returns the custom-ops library path for SessionOptions."""
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    from .reference import flash_attention_reference

    attr_types = {n: PyCustomOpDef.dt_string for n in FlashAttentionAttrs.__dataclass_fields__}

    # The node's two outputs, as the TensorRT plugin declares them: the attention output and the
    # scratch (`op.scratch_shape`; only the Hopper kernels write it, so here it is zeros).
    @onnx_op(op_type=OP_TYPE, inputs=[PyCustomOpDef.dt_float] * 3, outputs=[PyCustomOpDef.dt_float] * 2,
             attrs=attr_types)
    def _flash_attention(q, k, v, **attrs):
        node = FlashAttentionAttrs.from_attributes(attrs)
        return flash_attention_reference(q, k, v, node), np.zeros(scratch_shape(q.shape, v.shape, node), np.float32)

    @onnx_op(op_type=BIAS_OP_TYPE, inputs=[PyCustomOpDef.dt_float] * 4, outputs=[PyCustomOpDef.dt_float] * 2,
             attrs=attr_types)
    def _flash_attention_bias(q, k, v, bias, **attrs):
        node = FlashAttentionAttrs.from_attributes(attrs)
        return (flash_attention_reference(q, k, v, node, bias=bias),
                np.zeros(scratch_shape(q.shape, v.shape, node), np.float32))

    return get_library_path()


def run(model: onnx.ModelProto, feeds: dict) -> list:
    """The model's outputs for `feeds`, run in ONNX Runtime (CPU). Ctrl-C waits for the run to end:
    a KeyboardInterrupt raised inside a Python custom op would abort the whole process (SIGABRT)."""
    sess = session(model)
    with deferred_interrupt():
        return sess.run(None, feeds)


@contextlib.contextmanager
def deferred_interrupt():
    """SIGINT and SIGTERM held back (recorded) until the block ends, then delivered again to the
    handlers they would have met: an exception raised inside ONNX Runtime's Python op callback
    aborts the whole process (pybind11's error_already_set escapes ONNX Runtime's C++)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = [signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in signals]
    try:
        yield
    finally:
        for sig, handler in zip(signals, previous):
            signal.signal(sig, handler)
    for signum in dict.fromkeys(caught):
        if signum == signal.SIGINT and previous[0] in (signal.SIG_DFL, signal.default_int_handler):
            raise KeyboardInterrupt
        signal.raise_signal(signum)


def session(model: onnx.ModelProto):
    """An ONNX Runtime CPU session that can run `model`, fused or not."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failed run raises with ONNX Runtime's message (the
    # probe tries several shapes; an ERROR line on the terminal for each would be noise)
    options.register_custom_ops_library(register())
    with external_data.readable(to_ort_domain(model)) as source:  # bytes, or a file beside its tensors' data
        return ort.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                    providers=["CPUExecutionProvider"])
