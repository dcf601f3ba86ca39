"""Candidates (Q, K, V operands oriented (batch..., S, D), the scale, the output) and the one solver that
decides whether a candidate fuses and in which layouts: operand roots walked back, views compared."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from ...plugins.op import CHANNEL_LAYOUTS, FlashAttentionAttrs
from .views import _same, _same_attention_operand, identity_view, kernel_view, reshape_view, transpose_view
from .report import _NotFusable
from .probe import _Graph, _cast_to, _dtype, _scalar_operand


def _back_chain(t, g: _Graph):
    """Candidate roots for operand `t`: [(root, nodes from root to t, factor, static_scale)].

    Walks back through Reshape, Transpose, Identity, inference-mode Dropout, Mul/Div by a scalar,
    Casts to the same type and an Unsqueeze-Expand that broadcasts by 1 (ONNX's expanded Attention
    repeating K/V heads for one group); the deepest root first.
    """
    chain, factor, static = [(t, [], 1.0, True)], 1.0, True
    nodes: list = []
    while t.inputs:
        node = t.inputs[0]
        scalar = _scalar_operand(node, g)
        if node.op in ("Reshape", "Transpose", "Identity", "Dropout") and node.outputs[0] is t:
            if node.op == "Dropout" and len(node.inputs) > 2 and node.inputs[2].name:
                break  # training_mode given: not an identity
            src = node.inputs[0]
        elif node.op == "Expand" and g.shape(node.inputs[0]) == g.shape(t):  # broadcast by 1 (GQA with one group)
            src = node.inputs[0]
        elif node.op == "Unsqueeze" and nodes and nodes[0].op == "Expand":  # ONNX's K/V head expansion, by 1
            src = node.inputs[0]
        elif node.op == "Cast" and _cast_to(node) == _dtype(node.inputs[0], g):
            src = node.inputs[0]
        elif scalar is not None:
            src, f, s = scalar
            factor, static = factor * f, static and s
        else:
            break
        nodes = [node] + nodes
        t = src
        chain.append((t, list(nodes), factor, static))
    return chain[::-1]


def _apply(view, nodes, g: _Graph):
    for node in nodes:
        if node.op in ("Reshape", "Unsqueeze", "Squeeze"):
            view = reshape_view(view, g.shape(node.outputs[0]))
        elif node.op == "Transpose":
            perm = node.attrs.get("perm", list(range(len(view)))[::-1])
            view = transpose_view(view, perm)
        if view is None:
            return None
    return view


@dataclass
class _Operand:
    tensor: gs.Tensor
    perm: tuple  # how the operand's axes map to (batch..., S, D)


@dataclass
class _Candidate:
    name: str
    pattern: str
    q: _Operand
    k: _Operand
    v: _Operand
    out: gs.Tensor
    out_perm: tuple  # out axis i = canonical (batch..., S_q, D_v) axis out_perm[i]
    scale: float | None  # None: the SDPA default 1/sqrt(D)
    scale_static: bool = True
    solved: tuple | None = None  # what `_solve` returns, where the pattern fixes it (3-D Attention)
    bias: list = field(default_factory=list)  # _BiasTerm: what is added to the scores before the softmax
    softcap: float = 0.0  # the scaled scores soft-capped (softcap * tanh(s / softcap)) before the bias
    prepare: list = field(default_factory=list)  # graph edits the rewrite makes first (a KV cache's Concat)


def _operand_options(op: _Operand, g: _Graph):
    """Every (root, layout, heads, factor, static, view) whose view the kernel reads, deepest root first
    (a (B*heads, S, D) tensor reads as one-head BSC, its (B, heads, S, D) reshape as BHSD: which one
    serves depends on the other operands and the output)."""
    found = False
    for root, nodes, factor, static in _back_chain(op.tensor, g):
        shape = g.shape(root)
        view = _apply(identity_view(shape), nodes, g)
        if view is None or len(shape) < 3:
            continue
        view = transpose_view(view, op.perm)
        if len(shape) > 4:  # (B, X..., S, D): the extra batch axes merge into the heads axis
            heads = math.prod(shape[1:-2])
            if _same_attention_operand(view, kernel_view(shape, "BHSD", heads)):
                found = True
                yield root, "BHSD", heads, factor, static, view
            continue
        # Heads of a channel-packed root are the channel-axis digits among the batch axes.
        channel_axis = 1 if len(shape) == 4 else 2
        head_atoms = [a for axis in view[:-2] for a in axis if a.axis == channel_axis]
        packed_heads = math.prod(a.size for a in head_atoms) or 1
        candidates = ((("NCHW", packed_heads), ("BHSD", shape[1]), ("BHDS", shape[1])) if len(shape) == 4
                      else (("BSC", packed_heads), ("SBC", packed_heads)))
        for layout, heads in candidates:
            if layout in CHANNEL_LAYOUTS and shape[channel_axis] % heads:
                continue
            expected = kernel_view(shape, layout, heads)
            if _same_attention_operand(view, expected):
                found = True
                yield root, layout, heads, factor, static, view
                break
            swapped = transpose_view(expected, (0, 1, 3, 2))
            if layout == "NCHW" and shape[1] > heads and _same_attention_operand(view, swapped):  # (one channel a
                # head is no channel attention: a (B, heads, 1, D) decoding query reads so)
                if found:
                    return
                # The deeper root knows better: its axes are channels and pixels. A shallower
                # root would "fuse" this as an attention whose sequence is head_dim.
                d, s = shape[1] // heads, shape[2] * shape[3]
                raise _NotFusable(
                    f"attention over channels, not pixels: the scores are {d}x{d} per head (head_dim x head_dim) "
                    f"and the softmax runs over the {d} channels of a head, with the {s} pixels as features. "
                    "This is what F.scaled_dot_product_attention computes on a (B, heads, head_dim, H*W) view; "
                    "transpose Q, K, V to (B, heads, H*W, head_dim) to attend over pixels. Nothing to gain from "
                    "fusing a head_dim x head_dim attention"
                )
    if not found:
        raise _NotFusable(f"operand {op.tensor.name!r} is not a (B, heads, S, D) view of a 4-D tensor the kernel can read")


def _forward_output(cand: _Candidate, y_shape, layout: str, heads, g: _Graph):
    """Follow single-consumer Reshape/Transpose after the attention output; return the last
    tensor that is exactly the kernel's output `y_shape` in `layout` (NCHW map, BSC tokens)."""
    canon = kernel_view(y_shape, layout, heads)
    out_shape = g.shape(cand.out)
    inv = np.argsort(cand.out_perm)
    batch_shape = [out_shape[i] for i in inv[:-2]]
    view = reshape_view(canon, (*batch_shape, _size(canon[2]), _size(canon[3])))
    if view is None:
        return None
    view = transpose_view(view, cand.out_perm)
    target, t, found = identity_view(y_shape), cand.out, None
    while True:
        if _same(view, target):
            found = t
        consumers = t.outputs
        if len(consumers) != 1 or consumers[0].op not in ("Reshape", "Transpose") or t in g.graph.outputs:
            return found
        node = consumers[0]
        view = _apply(view, [node], g)
        if view is None:
            return found
        t = node.outputs[0]


def _size(atoms) -> int:
    return math.prod(a.size for a in atoms)


def _solve(cand: _Candidate, g: _Graph):
    """(FlashAttentionAttrs, q_root, k_root, v_root, out tensor, details) or _NotFusable."""
    if cand.solved is not None:
        return cand.solved
    q_shape, k_shape, v_shape = (
        tuple(np.array(g.shape(o.tensor))[list(o.perm)]) for o in (cand.q, cand.k, cand.v)
    )
    grouped = (len(q_shape) == 4 and q_shape[0] == k_shape[0] and k_shape[:-2] == v_shape[:-2]
               and k_shape[1] < q_shape[1] and q_shape[1] % k_shape[1] == 0)  # grouped-query: K/V heads shared
    if not (q_shape[:-2] == k_shape[:-2] == v_shape[:-2] or grouped):
        raise _NotFusable(f"Q, K, V batch shapes differ (broadcast): {q_shape}, {k_shape}, {v_shape}")
    if k_shape[-2] != v_shape[-2]:
        raise _NotFusable(f"K and V have different sequence lengths: {k_shape[-2]} vs {v_shape[-2]}")
    options = [list(_operand_options(o, g)) for o in (cand.q, cand.k, cand.v)]
    first = None
    for q, k, v in itertools.product(*options):  # deepest roots first; the first combination that solves
        heads_agree = q[2] == k[2] == v[2] or (grouped and k[2] == v[2] and q[2] % k[2] == 0
                                                 and k[1] not in CHANNEL_LAYOUTS and v[1] not in CHANNEL_LAYOUTS)
        if not heads_agree:
            first = first or _NotFusable(f"Q, K, V split into different numbers of heads: {q[2]}, {k[2]}, {v[2]}")
            continue
        try:
            return _solve_with(cand, q, k, v, (q_shape, k_shape, v_shape), g)
        except _NotFusable as e:
            first = first or e
    raise first


def _solve_with(cand: _Candidate, q, k, v, shapes, g: _Graph):
    """`_solve` for one choice of the operands' roots."""
    q_shape, k_shape, v_shape = shapes
    (qr, ql, qh, qf, qs, q_view), (kr, kl, kh, kf, ks, _), (vr, vl, vh, vf, vs, _) = q, k, v
    head_dim, d_v = q_shape[-1], v_shape[-1]
    if vf != 1.0:
        raise _NotFusable(f"V is scaled by {vf:g} before the attention; the kernel does not scale V")
    scale = (1.0 / math.sqrt(head_dim) if cand.scale is None else cand.scale) * qf * kf
    if not (cand.scale_static and qs and ks):
        # A scale computed from shapes (SDPA's default) is only accepted when it is the default, up to the
        # rounding of its factors in the graph's type (fp16: sqrt(scale) on Q and on K, each rounded).
        rounding = {np.float16: 2**-9, ml_dtypes.bfloat16: 2**-6}.get(_dtype(qr, g), 1e-5)
        if not math.isclose(scale, 1.0 / math.sqrt(head_dim), rel_tol=rounding):
            raise _NotFusable(f"the scale {scale:g} is computed from runtime shapes and is not 1/sqrt(head_dim)")
    out, out_layout = None, None
    q_root = g.shape(qr)
    if ql == "NCHW":  # write the (B, heads*D_v, H, W) map the output conv reads
        out = _forward_output(cand, (q_root[0], qh * d_v, q_root[2], q_root[3]), "NCHW", qh, g)
        out_layout = "NCHW" if out is not None else None
    elif ql in ("BSC", "SBC"):  # write the (B, S_q, heads*D_v) / (S_q, B, ...) tokens the output projection reads
        out = _forward_output(cand, (q_root[0], q_root[1], qh * d_v), ql, qh, g)
        out_layout = ql if out is not None else None
    if out is None and len(q_root) > 4 and len(cand.out_perm) == len(q_root) and _same(q_view, identity_view(q_root)):
        if tuple(cand.out_perm) != tuple(range(len(q_root))):
            raise _NotFusable("the windowed attention's output is transposed; the kernel writes (B, heads, ..., S, D)")
        out, out_layout = cand.out, "BHSD"  # written 4-D, then reshaped to Q's batch axes (_rewrite)
    if out is None:
        rank4 = len(cand.out_perm) == 4
        out_layout = {(0, 1, 2, 3): "BHSD", (0, 1, 3, 2): "BHDS"}.get(tuple(cand.out_perm)) if rank4 else None
        # The output's batch axes are Q's: accept (B, heads, ...) only if Q's are exactly that.
        per_axis = kernel_view(q_root, ql, qh)
        if out_layout is None or not _same(q_view[:2], per_axis[:2]):
            others = sorted({c.op for c in cand.out.outputs if c.op not in ("Reshape", "Transpose")})
            if others:
                raise _NotFusable(f"the attention output also feeds {', '.join(others)} nodes; fusing would keep "
                                  "the unfused computation alive (the TorchScript exporter reads shapes this way)")
            raise _NotFusable("the attention output is not a (B, heads, S, D) tensor, NCHW map or token sequence "
                              "the kernel can write")
        out = cand.out
    attrs = FlashAttentionAttrs(qh, float(scale), ql, kl, vl, out_layout, softcap=float(cand.softcap))
    details = {
        "q": qr.name, "k": kr.name, "v": vr.name, "output": out.name,
        "num_heads": int(qh), "head_dim": int(head_dim), "head_dim_v": int(d_v),
        "scale": float(scale), "layouts": [ql, kl, vl, out_layout],
        "probe_seq_q": int(q_shape[-2]), "probe_seq_kv": int(k_shape[-2]), "probe_batch": int(np.prod(q_shape[:-2]) // qh),
    }
    if len(q_root) > 4:  # windowed: the heads axis the node sees is these axes merged (sizes at the probe)
        details["merged_axes"] = [int(n) for n in q_root[1:-2]]
    return attrs, qr, kr, vr, out, details
