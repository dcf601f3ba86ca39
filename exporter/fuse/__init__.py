"""Find every spatial attention subgraph and replace it with one `FlashAttention` node.

Graph in, graph out, ONNX only (onnx-graphsurgeon; no torch). One matcher per attention family
(`MATCHERS`: `matmul` for attention written out, `onnx_attention` for ONNX's op) turns a subgraph into
a `_Candidate` (Q, K, V operands, each oriented as (batch..., S, D), the scale, the bias on the scores,
the attention output); one solver (`solve`) decides whether the candidate can be fused and how, on the
views of `views`; the bias is planned in the kernel's axes (`scores`); the driver here rewires the
solved candidates and runs `cleanup().toposort()` once. Modules, lowest first: views, report, probe,
edits, solve, scores, matmul, onnx_attention; one pass before matching (`row_scale`).

How we prove a rewrite computes the same function. Every Reshape/Transpose between a
conv output and the attention matmuls is followed symbolically: each tensor is a *view* of
its root tensor, i.e. each of its axes is a list of "atoms" (a digit of one root axis:
axis, size, stride), and Reshape/Transpose act on the atom lists exactly as they act on
row-major memory. An operand is fused only when its view equals, atom for atom, the view
the kernel takes of the root under one of the node's layouts (`convattn.plugins.op`).
Concrete shapes come from one ONNX Runtime run of the graph at the probe shapes (dynamic
dimensions of size 1 are probed at 2, so a size-1 axis seen by the probe is static). A
subgraph that does not match is left alone and reported with the reason: never rewrite a
subgraph into a function it does not compute.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ... import external_data
from ..graph import dims_at, graph_inputs, recorded_shapes, set_input_dims
from ...errors import InputError, ModelError
from ...plugins.op import (DOMAIN, PLUGIN_MODES, aot_attribute, logical_shape, int32_problem, is_fused_node,
                           native_attention_applies, node_outputs, op_type_for)
from .report import BlockReport, FusionResult, _NotFusable
from .probe import PROBE_MAX_DIM, _Graph, _dtype, _probe, _probe_shapes
from .edits import _Names, _const, _dims, _merge_heads, _reshape, _shape_slice
from .solve import _solve
from .scores import _bias_table_note, _combined, _emit_bias, _plan_bias
from .row_scale import move_row_scales
from .matmul import _attention_like, _not_attention, _softmax_candidate
from .onnx_attention import _attention_op_candidate


ATTENTION_PATHS = ("plugin", "native", "auto")
# One matcher per attention family, by the node it starts from: (node, probed graph) -> a `_Candidate`, None
# where the node is not attention, or `_NotFusable` with the reason. Everything after is shared: the solver
# (`solve`), the bias (`scores`), the rewrite below.
MATCHERS = {
    "Softmax": _softmax_candidate,  # written-out attention: MatMul or Einsum scores, Softmax, product with V
    "Attention": _attention_op_candidate,  # ONNX's Attention op (opset 23 and later)
}


def fuse_attention(model: onnx.ModelProto, input_shapes=None, *, attention: str = "plugin",
                   dtype: str = "fp32", plugin_mode: str = "aot", tf32: bool = False) -> FusionResult:
    """Replace each spatial attention subgraph of `model` with one FlashAttention node.

    Args:
        model: an exported (unfused) ONNX model.
        input_shapes: concrete shapes of the graph inputs used to probe the graph. Defaults to
            the shapes the exporter recorded in the model's metadata, or the static input dims.
        attention: "plugin" (default: every fusable block becomes our node), "native" (leave
            every block to TensorRT's own attention fusion) or "auto" (our node exactly where
            TensorRT's fusion does not apply: `native_attention_applies(dtype, head_dim)`).
        dtype: the engine precision "auto" decides for. Defaults to fp32.
        plugin_mode: "aot" (default) or "jit": the nodes' `aot` attribute, which decides the
            implementation TensorRT's ONNX parser asks for (`set_plugin_mode`).
        tf32: the nodes' `tf32` attribute: fp32 engines may run the attention's products on TF32
            tensor cores (and `build_engine` then leaves TensorRT's TF32 on); default exact fp32.

    Returns:
        FusionResult: the fused model (checked by onnx.checker) and a report per subgraph.
    """
    if attention not in ATTENTION_PATHS:
        raise InputError(f"--attention: expected one of {ATTENTION_PATHS}, got {attention!r}")
    if plugin_mode not in PLUGIN_MODES:
        raise InputError(f"--plugin-mode: expected one of {PLUGIN_MODES}, got {plugin_mode!r}")
    graph = gs.import_onnx(model)
    probed = model
    if move_row_scales(graph):  # SwinV2's per-head scale onto Q: the probe runs the graph that is matched
        probed = gs.export_onnx(graph)
        onnx.helper.set_model_props(probed, {p.key: p.value for p in model.metadata_props})
    max_dim = PROBE_MAX_DIM
    while True:
        notes: list[str] = []
        values, mode = _probe(probed, input_shapes, notes, max_dim)
        g = _Graph(graph, values)
        blocks, rewrites, degenerate, others = _find_blocks(graph, g, attention, dtype)
        # A probe so small that an attention's sequence or head dim is 1 (a deep stage at 1x1; XCA's tokens)
        # pixels from channels (its stride is anything): probe larger, up to the export shapes.
        if not degenerate or mode != "reduced" or (_probe_shapes(probed, input_shapes, mode, max_dim)
                                                    == _probe_shapes(probed, input_shapes, mode, 2 * max_dim)):
            break
        max_dim *= 2
    _rewrite(graph, g, rewrites, plugin_mode, tf32)
    graph.cleanup().toposort()
    fused = gs.export_onnx(graph)
    if mode == "exact only":  # dynamic in name only: written as the one shape it runs at, not a lie
        set_input_dims(fused, {name: shape for name, (shape, _) in _probe_shapes(model, input_shapes, "exact").items()})
    onnx.helper.set_model_props(fused, {**{p.key: p.value for p in model.metadata_props}, TF32_KEY: str(int(tf32))})
    external_data.check_model(fused)
    _export_sizes(model, input_shapes or recorded_shapes(model), blocks)
    for b in blocks:
        d = b.details
        problem = b.fused and "seq_q" in d and int32_problem(d["batch"], d["num_heads"], d["seq_q"], d["seq_kv"],
                                                             d["head_dim"], d["head_dim_v"])
        if problem:
            raise ModelError(f"block {b.name}: at the export shape {problem}: export a smaller batch or map")
    return FusionResult(fused, blocks, notes, others)


def _rewrite(graph: gs.Graph, g: _Graph, rewrites, plugin_mode: str, tf32: bool) -> None:
    """Each solved block's output now comes from one FlashAttention node; a windowed block's
    (B, X..., S, D) operands are merged to 4-D in front of it and its output split back after."""
    names, merged = _Names(graph), {}
    for name, attrs, inputs, out, bias, prepare in rewrites:
        for edit in prepare:
            edit(graph, names)
        out.inputs.clear()  # detach the old producer; cleanup() drops what no longer feeds an output
        q_root = inputs[0]
        for t in inputs:
            if len(g.shape(t)) > 4 and t.name not in merged:
                merged[t.name] = _merge_heads(graph, names, t, int(g.shape(t)[-1]))
        inputs = [merged.get(t.name, t) for t in inputs]
        if bias:
            inputs.append(_emit_bias(graph, names, bias, _dtype(q_root, g), name))
        y = gs.Variable(names(f"{name}/FlashAttention_output"), out.dtype) if len(g.shape(out)) > 4 else out
        # every output named (TensorRT 10.16+ requires it), as `op.node_outputs` names them
        scratch = gs.Variable(names(node_outputs(y.name)[1]), out.dtype)
        graph.nodes.append(
            gs.Node(op_type_for(len(inputs)), _node_name(name), replace(attrs, tf32=tf32).onnx_attributes(plugin_mode),
                    inputs, [y, scratch], domain=DOMAIN)
        )
        if y is not out:  # back to Q's (B, X..., S, D_v)
            seq = _dims(graph, names, y, 2, 3, out.shape[-2:-1] if out.shape else None)
            parts = [_shape_slice(graph, names, q_root, 0, -2), seq, _const(names, y, "head_dim", [g.shape(out)[-1]])]
            _reshape(graph, names, y, parts, out)


def _find_blocks(graph: gs.Graph, g: _Graph, attention: str, dtype: str):
    """(block reports, rewrites, whether a candidate's sequence was 1 at the probe, the reports of the
    Softmax nodes that are not attention) for every Softmax/Attention node of `graph`; nothing is
    changed yet."""
    blocks, rewrites, degenerate, others = [], [], False, []
    for node in list(graph.nodes):
        if node.op not in MATCHERS:
            continue
        try:
            cand = MATCHERS[node.op](node, g)
            if cand is None:
                _attention_like(node, g)  # raises _NotFusable where a Softmax reads a product of activations
                if node.op == "Softmax":
                    others.append(BlockReport(node.name or node.outputs[0].name, "softmax", False,
                                              _not_attention(node, g), path="not attention"))
                continue
            # a sequence or head dim of 1 at the probe: its axis's stride is anything, layouts look alike
            degenerate |= any(1 in np.array(g.shape(o.tensor))[list(o.perm)][-2:] for o in (cand.q, cand.k))
            attrs, qr, kr, vr, out, details = _solve(cand, g)
            bias = _plan_bias(cand, attrs, qr, g)
        except _NotFusable as e:
            blocks.append(BlockReport(node.name or node.outputs[0].name, _pattern_of(node), False, str(e)))
            continue
        native = attention == "native" or (attention == "auto" and native_attention_applies(dtype, details["head_dim"]))
        if native:
            why = ("--attention native" if attention == "native" else
                   f"TensorRT fuses {dtype} attention with head_dim {details['head_dim']} itself")
            blocks.append(BlockReport(cand.name, cand.pattern, False, f"left to TensorRT's own fusion: {why}",
                                      details, path="native"))
            continue
        if bias:
            details["bias"] = [int(n) for n in (*_combined(form for _, form in bias), details["probe_seq_kv"])]
            table = _bias_table_note(bias, g, _dtype(qr, g))
            if table:
                details["bias_table"] = table
        blocks.append(BlockReport(cand.name, cand.pattern, True, details=details))
        rewrites.append((cand.name, attrs, (qr, kr, vr), out, bias, cand.prepare))
    return blocks, rewrites, degenerate, others


def _export_sizes(model: onnx.ModelProto, input_shapes, blocks) -> None:
    """Each fused block's (batch, S_q, S_kv) at the export shapes (the probe may have run smaller):
    the shapes of its Q and K roots in the unfused graph, with the inputs set to those shapes, from
    ONNX shape inference, else (a window count computed through Shape/Concat) ONNX Runtime's
    symbolic shape inference. Sizes it cannot infer stay the probe's."""
    fused = [b for b in blocks if b.fused]
    if not input_shapes or not fused:
        return
    shapes = {vi.name: shape for vi, shape in zip(graph_inputs(model), input_shapes)}
    dims = dims_at(model, shapes, [t for b in fused for t in (b.details["q"], b.details["k"])])
    for b in fused:
        q, k = dims.get(b.details["q"]), dims.get(b.details["k"])
        if not q or not k or None in q or None in k:
            continue
        heads, (ql, kl) = b.details["num_heads"], b.details["layouts"][:2]
        # A merged (B, X..., S, D) root: B and S are its first and second-to-last axes, as in BHSD.
        batch, _, s_q, _ = logical_shape(q, ql, heads) if len(q) <= 4 else (q[0], 0, q[-2], 0)
        s_kv = logical_shape(k, kl, heads)[2] if len(k) <= 4 else k[-2]
        b.details.update(batch=int(batch), seq_q=int(s_q), seq_kv=int(s_kv))
        if len(q) > 4:  # the window count grows with the image
            b.details.update(num_heads=math.prod(q[1:-2]), merged_axes=[int(n) for n in q[1:-2]])


def set_plugin_mode(model: onnx.ModelProto, plugin_mode: str) -> onnx.ModelProto:
    """A copy of `model` whose FlashAttention nodes ask TensorRT for `plugin_mode` ("aot" or "jit"):
    onnx-tensorrt turns the node's `aot` attribute into STRICT_AOT/STRICT_JIT, over any network flag."""
    value = aot_attribute(plugin_mode)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if is_fused_node(node):
            kept = [a for a in node.attribute if a.name != "aot"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("aot", value)])
    return out


TF32_KEY = "convattn.tf32"  # model metadata: "1" where fp32 may run on TF32 (also with no node of ours)


def uses_tf32(model: onnx.ModelProto) -> bool:
    """Whether the fused graph was made with `tf32=True` (its nodes say so too; the engine then
    keeps TensorRT's TF32 for its own layers)."""
    return any(p.key == TF32_KEY and p.value == "1" for p in model.metadata_props)


def plugin_modes(model: onnx.ModelProto) -> set[str]:
    """The implementations the FlashAttention nodes of `model` ask TensorRT for."""
    return {("aot" if onnx.helper.get_attribute_value(a) else "jit")
            for node in model.graph.node if is_fused_node(node)
            for a in node.attribute if a.name == "aot"}


def _node_name(block: str) -> str:
    """The FlashAttention node that replaces the attention block named `block`."""
    return f"{block}/FlashAttention"


def _pattern_of(node) -> str:
    return "onnx-attention" if node.op == "Attention" else "softmax"
