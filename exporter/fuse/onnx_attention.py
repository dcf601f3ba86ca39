"""The matcher for ONNX's `Attention` op (opset 23 and later), attribute by attribute."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...plugins.op import FlashAttentionAttrs
from .report import _NotFusable
from .probe import _Graph, _dtype
from .edits import _shape_slice
from .solve import _Candidate, _Operand
from .scores import _BiasTerm


_ATTENTION_INPUTS = ("Q", "K", "V", "attn_mask", "past_key", "past_value", "nonpad_kv_seqlen")


_ATTENTION_OUTPUTS = ("Y", "present_key", "present_value", "qk_matmul_output")


def _attention_op_candidate(node, g: _Graph):
    """The ONNX `Attention` op (opset 23 and later), honoured attribute by attribute: fused only where
    the kernel computes exactly that (4-D BHSD, or 3-D with `q_num_heads` = `kv_num_heads` as BSC
    tokens; `scale`; `softcap`; `attn_mask`, boolean or additive, and the position masks (`is_causal`, the
    window sizes, `nonpad_kv_seqlen`: `_position_term`) as the bias on the scores; a
    KV cache (`past_key`/`past_value`, 4-D) as a Concat in front of the node, which makes the present
    outputs); everything else refused with the true reason."""
    inputs = {name: None for name in _ATTENTION_INPUTS}
    inputs.update(zip(_ATTENTION_INPUTS, (t if t.name else None for t in node.inputs)))
    outputs = {name: gs.Variable("") for name in _ATTENTION_OUTPUTS}
    outputs.update(zip(_ATTENTION_OUTPUTS, node.outputs))
    graph_outputs = {t.name for t in g.graph.outputs}
    used = {name for name, t in outputs.items() if t.name and (t.outputs or t.name in graph_outputs)}
    if "qk_matmul_output" in used:
        raise _NotFusable("the Attention op's qk_matmul_output output is used; the kernel computes Y only")
    if (inputs["past_key"] is None) != (inputs["past_value"] is None):
        raise _NotFusable("the Attention op has one of past_key/past_value but not both")
    rank = len(g.shape(node.inputs[0]))
    q_heads, kv_heads = node.attrs.get("q_num_heads"), node.attrs.get("kv_num_heads")
    if rank == 4:
        q_heads, kv_heads = g.shape(node.inputs[0])[1], g.shape(node.inputs[1])[1]
    if q_heads != kv_heads and (rank != 4 or q_heads % kv_heads):
        raise _NotFusable(f"grouped-query attention with 3-D inputs (K and V {kv_heads} heads, Q {q_heads}): the node "
                          "splits every token tensor into one number of heads" if rank == 3 else
                          f"K and V have {kv_heads} heads, which do not divide Q's {q_heads}")
    cache = inputs["past_key"] is not None
    if cache and rank != 4:
        raise _NotFusable("a KV cache (past_key/past_value) with 3-D Q, K, V: the cache is 4-D, the kernel would "
                          "need K and V copied into its layout")
    if cache and not (outputs["present_key"].name and outputs["present_value"].name):
        raise _NotFusable("a KV cache whose present_key/present_value outputs are not named (the probe sees "
                          "no concatenated keys)")
    q = node.inputs[0]
    k, v = (outputs["present_key"], outputs["present_value"]) if cache else (node.inputs[1], node.inputs[2])
    (b, s_q), s_kv = (g.shape(q)[0], g.shape(q)[-2 if rank == 4 else 1]), g.shape(k)[-2 if rank == 4 else 1]
    context = (b, q_heads, s_q, s_kv)
    bias = []
    mask = inputs["attn_mask"]
    if mask is not None:
        if g.shape(mask)[-1] != s_kv:
            raise _NotFusable(f"an attn_mask over {g.shape(mask)[-1]} keys of {s_kv} (ONNX pads it with -inf): pass a "
                              "mask over every key")
        boolean = _dtype(mask, g) == np.bool_
        bias.append(_BiasTerm(mask, context, fill=-math.inf if boolean else None, fill_when=False))
    causal, left, right = (node.attrs.get(a, d) for a, d in (("is_causal", 0), ("left_window_size", -1),
                                                               ("right_window_size", -1)))
    if causal or left >= 0 or right >= 0 or inputs["nonpad_kv_seqlen"] is not None:
        bias.append(_position_term(q, k, inputs["past_key"], inputs["nonpad_kv_seqlen"], bool(causal), left, right,
                                   rank, context, g))
    prepare = [_kv_cache(inputs[p], node.inputs[i], outputs[o])
               for p, i, o in (("past_key", 1, "present_key"), ("past_value", 2, "present_value")) if cache]
    if rank == 3:
        cand = _bsc_attention_candidate(node, g, q_heads)
    else:
        ident = (0, 1, 2, 3)
        ops = [_Operand(t, ident) for t in (q, k, v)]
        cand = _Candidate(node.name or node.outputs[0].name, "onnx-attention", *ops, node.outputs[0], ident,
                          node.attrs.get("scale"))
    cand.bias, cand.prepare, cand.softcap = bias, prepare, float(node.attrs.get("softcap", 0.0))
    if cand.solved is not None:  # 3-D: the pattern fixed the attributes
        cand.solved = (replace(cand.solved[0], softcap=cand.softcap), *cand.solved[1:])
    return cand


def _kv_cache(past, new, present):
    """The rewrite's edit for a KV cache: present = Concat(past, new) along the sequence, as ONNX's
    Attention computes it (the node then reads `present`)."""
    def edit(graph: gs.Graph, names) -> None:
        present.inputs.clear()
        graph.nodes.append(gs.Node("Concat", attrs={"axis": 2}, inputs=[past, new], outputs=[present]))
    return edit


def _position_term(q, k, past, nonpad, causal: bool, left: int, right: int, rank: int, context, g: _Graph):
    """ONNX Attention's masks by position, as one condition made in the graph once per run (ONNX's
    reference, `_apply_causal`/`_apply_sliding_window`/the padding mask): query i attends to key j where
    j <= i + offset (causal), i + offset - left <= j (left >= 0), j <= i + offset + right (right >= 0) and
    j < nonpad_kv_seqlen[b]; offset = the cache's length, nonpad_kv_seqlen[b] - S_q for an external cache,
    else 0. (S_q, S_kv), or (B, 1, S_q, S_kv) where it depends on the batch."""
    axis = 2 if rank == 4 else 1
    per_batch = nonpad is not None

    def make(graph: gs.Graph, names):
        base = names(f"{q.name}/positions")

        def var(what, dtype):
            return gs.Variable(names(f"{base}/{what}"), dtype)

        def node(op, inputs, what, dtype=np.int64, **attrs):
            out = var(what, dtype)
            graph.nodes.append(gs.Node(op, attrs=attrs, inputs=inputs, outputs=[out]))
            return out

        def const(what, value):
            return gs.Constant(names(f"{base}/{what}"), np.array(value, np.int64))

        def length(t, i):  # a 0-D int64: t's dim i
            return node("Squeeze", [_shape_slice(graph, names, t, i, i + 1), const(f"axis{i}", [0])], f"len{i}")

        s_q, s_kv = length(q, axis), length(k, axis)
        rows = node("Unsqueeze", [node("Range", [const("zero", 0), s_q, const("one", 1)], "rows"), const("ax1", [1])],
                    "rows2")  # (S_q, 1)
        cols = node("Range", [const("zero_k", 0), s_kv, const("one_k", 1)], "cols")  # (S_kv,)
        lengths = None
        if nonpad is not None:  # (B, 1, 1, 1) lengths, int64
            lengths = node("Reshape", [node("Cast", [nonpad], "nonpad64", to=onnx.TensorProto.INT64),
                                       const("b111", [-1, 1, 1, 1])], "lengths")
        if past is not None:
            offset = length(past, 2)
        elif lengths is not None:
            offset = node("Sub", [lengths, s_q], "offset")
        else:
            offset = const("no_offset", 0)
        front = node("Add", [rows, offset], "front")  # i + offset: (S_q, 1) or (B, 1, S_q, 1)
        allowed = []
        if causal:
            allowed.append(node("LessOrEqual", [cols, front], "causal", np.bool_))
        if left >= 0:
            allowed.append(node("GreaterOrEqual", [cols, node("Sub", [front, const("left", left)], "lo")], "left_ok",
                                np.bool_))
        if right >= 0:
            allowed.append(node("LessOrEqual", [cols, node("Add", [front, const("right", right)], "hi")], "right_ok",
                                np.bool_))
        if lengths is not None:
            allowed.append(node("Less", [cols, lengths], "unpadded", np.bool_))
        mask = allowed[0]
        for i, more in enumerate(allowed[1:]):
            mask = node("And", [mask, more], f"and{i}", np.bool_)
        return mask

    batch = context[0]
    shape = (batch, 1, context[2], context[3]) if per_batch else (context[2], context[3])
    return _BiasTerm(None, context, fill=-math.inf, fill_when=False, make=make, shape=shape)


def _bsc_attention_candidate(node, g: _Graph, heads: int):
    """3-D Attention: Q (B, S_q, heads*D), K (B, S_kv, heads*D), V (B, S_kv, heads*D_v), Y (B, S_q, heads*D_v):
    the kernel's BSC layout for all four, read and written in place."""
    q, k, v = node.inputs[:3]
    (b, s_q, c), (_, s_kv, c_k), (_, _, c_v) = (g.shape(t) for t in (q, k, v))
    if heads is None or c % heads or c_k % heads or c_v % heads:
        raise _NotFusable(f"a 3-D Attention whose q_num_heads ({heads}) does not split its hidden sizes {c}, {c_k}, {c_v}")
    head_dim, d_v = c // heads, c_v // heads
    if c_k != c:
        raise _NotFusable(f"Q and K head sizes differ ({head_dim} vs {c_k // heads})")
    scale = node.attrs.get("scale") or 1.0 / math.sqrt(head_dim)
    attrs = FlashAttentionAttrs(heads, float(scale), "BSC", "BSC", "BSC", "BSC")
    out = node.outputs[0]
    details = {"q": q.name, "k": k.name, "v": v.name, "output": out.name, "num_heads": int(heads),
               "head_dim": int(head_dim), "head_dim_v": int(d_v), "scale": float(scale), "layouts": ["BSC"] * 4,
               "probe_seq_q": int(s_q), "probe_seq_kv": int(s_kv), "probe_batch": int(b)}
    ident = (0, 1, 2)
    ops = [_Operand(t, ident) for t in (q, k, v)]
    return _Candidate(node.name or out.name, "onnx-attention", *ops, out, ident, scale,
                      solved=(attrs, q, k, v, out, details))
