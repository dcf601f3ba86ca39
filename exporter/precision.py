"""Precision lives in the graph: an fp32 graph typed in fp16 or bf16, its inputs and outputs kept fp32.

TensorRT 11 builds strongly typed networks only (its BuilderFlag.FP16/BF16 are gone; on 10.x strong
typing is a creation flag): an engine computes in the types its ONNX graph carries. So `--dtype`
types the graph: every float tensor becomes fp16/bf16, a Cast after each graph input and before
each output keeps the interface fp32 (what a server feeds), and the FlashAttention nodes read and
write the low-precision tensors. Inputs the ONNX spec types as float32 whatever the data (Resize's
scales) stay fp32.

Why not ModelOpt AutoCast, NVIDIA's migration path: its `[onnx]` extra replaces ONNX Runtime's CPU
package with onnxruntime-gpu and pulls CuPy, and on a fused graph it stops, because it asks
TensorRT for the custom op's types. This pass runs on the fused graph and needs nothing but onnx.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from convattn.errors import InputError

from .. import external_data

PRECISIONS = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
_NUMPY = {TensorProto.FLOAT16: np.float16, TensorProto.BFLOAT16: ml_dtypes.bfloat16}
PRECISION_KEY = "convattn.precision"
# (op_type, input index) the ONNX spec types as float32 whatever the data type.
_FP32_INPUTS = {("Resize", 2), ("Upsample", 1)}


def cast_graph(model: onnx.ModelProto, dtype: str) -> onnx.ModelProto:
    """A copy of `model` computing in `dtype` ("fp32": unchanged; "fp16", "bf16") with fp32 IO."""
    if dtype == "fp32":
        return model
    if dtype not in PRECISIONS:
        raise InputError(f"--dtype: expected fp32, fp16 or bf16, got {dtype!r}")
    target = PRECISIONS[dtype]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    keep = {node.input[i] for node in g.node for op, i in _FP32_INPUTS if node.op_type == op and len(node.input) > i}
    where = external_data.folder(model)
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT and init.name not in keep:
            init.CopyFrom(_cast_tensor(init, target, where))
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(_cast_tensor(a.t, target, where))
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = target
    for vi in g.value_info:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT and vi.name not in keep:
            vi.type.tensor_type.elem_type = target
    casts = []
    for vi in g.input:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT and vi.name not in keep:
            cast_name = f"{vi.name}/{dtype}"
            for node in g.node:
                node.input[:] = [cast_name if i == vi.name else i for i in node.input]
            casts.append(onnx.helper.make_node("Cast", [vi.name], [cast_name], name=f"{vi.name}/cast_{dtype}", to=target))
    tail = []
    for vi in g.output:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            inner = f"{vi.name}/{dtype}"
            for node in g.node:
                node.output[:] = [inner if o == vi.name else o for o in node.output]
                node.input[:] = [inner if i == vi.name else i for i in node.input]
            tail.append(onnx.helper.make_node("Cast", [inner], [vi.name], name=f"{vi.name}/cast_fp32",
                                              to=TensorProto.FLOAT))
    nodes = casts + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    onnx.helper.set_model_props(out, {**{p.key: p.value for p in out.metadata_props}, PRECISION_KEY: dtype})
    external_data.externalize(out)  # the cast tensors of an external model go to a data file of their own
    external_data.check_model(out)
    return out


def graph_precision(model: onnx.ModelProto) -> str:
    """The precision `cast_graph` typed `model` in ("fp32" when it did not)."""
    return next((p.value for p in model.metadata_props if p.key == PRECISION_KEY), "fp32")


def _cast_tensor(t: onnx.TensorProto, target: int, data_folder=None) -> onnx.TensorProto:
    values = numpy_helper.to_array(t, base_dir=str(data_folder) if data_folder else "")
    return numpy_helper.from_array(values.astype(_NUMPY[target]), t.name)
