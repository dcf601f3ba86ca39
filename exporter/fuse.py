"""Find every spatial attention subgraph and replace it with one `FlashAttention` node.

Graph in, graph out, ONNX only (onnx-graphsurgeon; no torch). One finder per pattern family
turns a subgraph into a `_Candidate` (Q, K, V operands, each oriented as (batch..., S, D),
the scale, and the attention output); one solver decides whether the candidate can be fused
and how; the driver rewires the solved candidates and runs `cleanup().toposort()` once.

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

import itertools
import math
from dataclasses import dataclass, field, replace

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from .. import external_data
from .graph import dims_at, graph_inputs, recorded_shapes, set_input_dims
from convattn.errors import InputError, ModelError, first_line
from convattn.plugins.op import (CHANNEL_LAYOUTS, DOMAIN, PLUGIN_MODES, FlashAttentionAttrs, aot_attribute,
                                 logical_shape, int32_problem, is_fused_node, native_attention_applies, node_outputs,
                                 op_type_for)

# ---------------------------------------------------------------- views: atoms of a root tensor


@dataclass(frozen=True)
class Atom:
    """One mixed-radix digit of a root axis: index_on_axis // stride % size."""

    axis: int
    size: int
    stride: int


def _norm(atoms) -> tuple:
    """Merge neighbouring digits of the same axis, so equal views compare equal."""
    out: list[Atom] = []
    for a in atoms:
        if out and out[-1].axis == a.axis and out[-1].stride == a.stride * a.size:
            out[-1] = Atom(a.axis, out[-1].size * a.size, a.stride)
        else:
            out.append(a)
    return tuple(out)


def identity_view(shape) -> tuple:
    # Size-1 axes carry no index: they have no atoms.
    return tuple((Atom(i, int(n), 1),) if n != 1 else () for i, n in enumerate(shape))


def reshape_view(view, shape):
    """The view after a row-major Reshape to `shape`, or None if no atom split expresses it."""
    atoms = [a for axis in view for a in axis]
    out = []
    for n in map(int, shape):
        group, prod = [], 1
        while prod < n:
            if not atoms:
                return None
            a = atoms.pop(0)
            if prod * a.size <= n:
                group.append(a)
                prod *= a.size
                continue
            need = n // prod
            if n % prod or a.size % need:
                return None
            group.append(Atom(a.axis, need, a.stride * (a.size // need)))
            atoms.insert(0, Atom(a.axis, a.size // need, a.stride))
            prod *= need
        if prod != n:
            return None
        out.append(tuple(group))
    return None if atoms else tuple(out)


def transpose_view(view, perm):
    return tuple(view[p] for p in perm)


def _same(view, expected) -> bool:
    return len(view) == len(expected) and all(_norm(a) == _norm(b) for a, b in zip(view, expected))


def _same_attention_operand(view, expected) -> bool:
    """(batch..., S, D) `view` vs a 4-D (B, H, S, D) `expected`: batch axes compared flattened."""
    batch = [a for axis in view[:-2] for a in axis]
    return (
        _norm(batch) == _norm(expected[0] + expected[1])
        and _norm(view[-2]) == _norm(expected[2])
        and _norm(view[-1]) == _norm(expected[3])
    )


def kernel_view(shape, layout: str, heads: int):
    """The (B, H, S, D) view the kernel takes of a root tensor given in `layout`. A BHSD root of
    rank > 4, (B, X..., S, D) (windowed attention: (B, heads, windows, S, D)), is read as
    (B, prod(X), S, D): contiguous, its X axes merge into one heads axis (`_merge_heads`)."""
    v = identity_view(shape)
    if layout == "BHSD" and len(shape) > 4:
        return (v[0], tuple(a for axis in v[1:-2] for a in axis), v[-2], v[-1])
    if layout == "NCHW":
        b, c, h, w = shape
        v = reshape_view(v, (b, heads, c // heads, h * w))
        return transpose_view(v, (0, 1, 3, 2))
    if layout == "BSC":
        b, s, c = shape
        return transpose_view(reshape_view(v, (b, s, heads, c // heads)), (0, 2, 1, 3))
    if layout == "SBC":
        s, b, c = shape
        return transpose_view(reshape_view(v, (s, b, heads, c // heads)), (1, 2, 0, 3))
    if layout == "BHDS":
        return transpose_view(v, (0, 1, 3, 2))
    return v


# ---------------------------------------------------------------- reports


@dataclass
class BlockReport:
    """One attention subgraph found in the graph: fused, or not and why."""

    name: str
    pattern: str
    fused: bool  # rewritten into our FlashAttention node
    reason: str = ""
    details: dict = field(default_factory=dict)
    path: str = ""  # "plugin", "native" (left to TensorRT's own fusion) or "unfused"

    def __post_init__(self):
        self.path = self.path or ("plugin" if self.fused else "unfused")

    def to_dict(self) -> dict:
        return {"name": self.name, "pattern": self.pattern, "fused": self.fused, "path": self.path,
                "reason": self.reason, **self.details}


@dataclass
class FusionResult:
    """The fused model, one report per attention subgraph found, and one per Softmax that is not attention
    (so that every Softmax of the graph is accounted for)."""

    model: onnx.ModelProto
    blocks: list[BlockReport]
    notes: list[str] = field(default_factory=list)
    others: list[BlockReport] = field(default_factory=list)  # every other Softmax, path "not attention", why

    @property
    def fused(self) -> list[BlockReport]:
        return [b for b in self.blocks if b.fused]

    @property
    def unfused(self) -> list[BlockReport]:
        """Blocks that neither our node nor TensorRT's own fusion takes, with the reason."""
        return [b for b in self.blocks if b.path == "unfused"]


class _NotFusable(Exception):
    """A subgraph that looks like attention but cannot be fused; the message is the reason."""


# ---------------------------------------------------------------- probing shapes and scalars


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


# ---------------------------------------------------------------- walking back from an operand


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


# ---------------------------------------------------------------- candidates and the solver


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


# ---------------------------------------------------------------- pattern finders


def _swap_last(rank: int) -> tuple:
    return tuple(range(rank - 2)) + (rank - 1, rank - 2)


def _is_zero(t, g: _Graph) -> bool:
    """A tensor that is zero whatever the input data: baddbmm(empty, q, k, beta=0) exports its
    `beta * empty` term as Mul(Expand(0), 0), added to the scores."""
    if isinstance(t, gs.Constant):
        return not np.any(t.values)
    return t.name in g.values and not np.any(g.values[t.name]) and _data_independent(t)


def _scores_producer(t, g: _Graph):
    """Walk back from `t` through Mul/Div by scalars, + 0 and Casts that lose nothing: (producer node,
    factor, static)."""
    factor, static = 1.0, True
    while t.inputs:
        step = _step_back(t.inputs[0], g)
        if step is None:
            return t.inputs[0], factor, static
        t, f, s = step
        factor, static = factor * f, static and s
    return None, factor, static


def _step_back(node, g: _Graph):
    """(input, factor, static) where `node` changes the scores by a scalar factor at most (a Mul/Div by a
    scalar, + 0, a Cast that loses nothing), else None."""
    if node.op == "Cast" and _widens(node, g):  # scores cast up for the softmax: the kernel's fp32 scores
        return node.inputs[0], 1.0, True
    if node.op in ("Add", "Sub") and len(node.inputs) == 2 and _is_zero(node.inputs[1], g):
        return node.inputs[0], 1.0, True
    if node.op == "Add" and len(node.inputs) == 2 and _is_zero(node.inputs[0], g):
        return node.inputs[1], 1.0, True
    return _scalar_operand(node, g)


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


def _selects_everywhere(node, t, g: _Graph) -> bool:
    """A Where that passes `t` at every position whatever the data: its condition is computed from
    shapes and constants and, at the probe, selects `t`'s side everywhere (ONNX's expanded Attention
    zeroes rows whose keys are all masked; with no mask, none is)."""
    cond, x, y = node.inputs
    if t is cond or not _data_independent(cond) or (cond.name not in g.values and not isinstance(cond, gs.Constant)):
        return False
    values = cond.values if isinstance(cond, gs.Constant) else g.values[cond.name]
    return bool(np.all(values)) if t is x else bool(not np.any(values))


def _single_consumer_skip_dropout(t, g: _Graph, bias=()):
    """The node consuming the probabilities, stepping over inference-mode Dropout, Identity, Casts
    to float types, a Where that selects them everywhere (`_selects_everywhere`) and one that zeroes
    the rows the `bias` masks whole (`_zeroes_masked_rows`)."""
    while len(_value_consumers(t)) == 1:
        [node] = _value_consumers(t)
        if node.op == "Dropout" and len(node.inputs) > 2 and node.inputs[2].name:
            return None, t
        passes = (node.op in ("Dropout", "Identity")
                  or node.op == "Cast" and _cast_to(node) in (np.float32, np.float16, ml_dtypes.bfloat16)
                  or node.op == "Where" and (_selects_everywhere(node, t, g) or _zeroes_masked_rows(node, t, bias)))
        if not passes:
            break
        t = node.outputs[0]
    consumers = _value_consumers(t)
    return (consumers[0] if len(consumers) == 1 else None), t


# ---------------------------------------------------------------- a bias on the scores


@dataclass
class _BiasTerm:
    """One term of the scores' additive bias: `tensor` (broadcast against `context`, the scores' shape
    where it is added), times `factor` (the scalars applied to the scores after it); with `fill`, the
    tensor is a condition and the term is `fill` where it equals `fill_when`, else 0 (a Where that
    fills the scores with -inf: the same function, as exp(-inf) = 0 either way). `make` builds the
    tensor in the rewrite instead (a causal mask the model does not materialise)."""

    tensor: gs.Tensor | None
    context: tuple
    factor: float = 1.0
    fill: float | None = None
    fill_when: bool = True
    make: object = None  # (graph, names) -> gs.Tensor
    shape: tuple | None = None  # the made tensor's shape at the probe
    regrouped: bool = False  # `shape` is the tensor's, regrouped to the scores' axes (`_regroup`)


def _regroup(shape, outer, inner) -> tuple:
    """A bias of `shape` added to a reshape (`outer`) of the scores (`inner`), as a bias on the scores
    themselves: each group of axes the reshape merges or splits must be broadcast whole or given whole."""
    shape = (1,) * (len(outer) - len(shape)) + tuple(shape)
    out, i, j = [], 0, 0
    while i < len(outer) and j < len(inner):
        i0, j0, po, pi = i, j, outer[i], inner[j]
        i, j = i + 1, j + 1
        while po != pi:
            if po < pi:
                po, i = po * outer[i], i + 1
            else:
                pi, j = pi * inner[j], j + 1
        part = shape[i0:i]
        if all(n == 1 for n in part):
            out += [1] * (j - j0)
        elif tuple(part) == tuple(outer[i0:i]):
            out += list(inner[j0:j])
        else:
            raise _NotFusable(f"a bias of shape {tuple(shape)} is added to the scores reshaped to {tuple(outer)} "
                              f"across axes it neither broadcasts nor spans whole")
    return tuple(out)


def _same_rows(node, g: _Graph) -> bool:
    """A Reshape of the scores that keeps their last two axes (it splits or merges batch axes only:
    Swin's per-window mask is added on a (B, windows, heads, N, N) view of (B*windows, heads, N, N))."""
    return node.op == "Reshape" and g.shape(node.inputs[0])[-2:] == g.shape(node.outputs[0])[-2:]


def _reaches_scores(t, g: _Graph) -> bool:
    """Whether `t` is scores: a product of two activations, through what `_scores_chain` steps over."""
    producer = _scores_chain(t, g)[0]
    return producer is not None and producer.op in ("MatMul", "Einsum")


def _soft_cap(node, g: _Graph):
    """(softcap c, its input) where `node` is Mul(Tanh(Div(x, c)), c) (ONNX's expanded Attention; Mul by 1/c
    for the Div too), else None."""
    scalar = _scalar_operand(node, g)
    if node.op != "Mul" or scalar is None or not scalar[0].inputs or scalar[0].inputs[0].op != "Tanh":
        return None
    inner = scalar[0].inputs[0].inputs[0]
    if not inner.inputs:
        return None
    divide = _scalar_operand(inner.inputs[0], g)
    c = scalar[1]
    if divide is None or c <= 0 or not math.isclose(divide[1], 1.0 / c, rel_tol=1e-6):
        return None
    return c, divide[0]


def _scores_chain(t, g: _Graph):
    """Walk back from `t` through what `_scores_producer` steps over, a soft cap (`_soft_cap`) and the bias
    terms added to the scores (Add of a tensor, Where filling with -inf, Reshapes of the batch axes between
    them): (producer node, factor, static, [_BiasTerm, outermost first], softcap)."""
    factor, static, terms, softcap, outer_terms = 1.0, True, [], 0.0, 0
    while t.inputs:
        node = t.inputs[0]
        capped = _soft_cap(node, g)
        if capped is not None:
            if softcap or factor != 1.0:
                raise _NotFusable(f"the soft cap ({node.name!r}) is {'applied twice' if softcap else 'scaled after'}: "
                                  "the kernel caps the scaled scores once, before the bias")
            softcap, t, outer_terms = capped[0], capped[1], len(terms)
            continue
        if softcap and len(terms) > outer_terms:
            raise _NotFusable("a bias is added inside the soft cap (before the Tanh): the kernel adds it after")
        step = _step_back(node, g)
        if step is not None:  # a scalar, a zero or a widening Cast
            t, f, s = step
            factor, static = factor * f, static and s
            continue
        if _same_rows(node, g):
            t = node.inputs[0]
            continue
        inner = g.shape(node.inputs[0]) if node.op == "Reshape" else None
        if inner and inner[-1] == g.shape(node.outputs[0])[-1]:  # MONAI: a bias on (B, heads*S, S)
            for term in terms:
                term.shape = _regroup(term.shape or g.shape(term.tensor), term.context, inner)
                term.context, term.regrouped = inner, True
            t = node.inputs[0]
            continue
        context = g.shape(node.outputs[0])
        if node.op == "Add" and len(node.inputs) == 2:
            sides = [i for i, x in enumerate(node.inputs) if _reaches_scores(x, g)]
            if len(sides) == 1:
                terms.append(_BiasTerm(node.inputs[1 - sides[0]], context, factor))
                t = node.inputs[sides[0]]
                continue
        if node.op == "Where" and len(node.inputs) == 3:
            cond = node.inputs[0]
            for keep, fill_at in ((1, 2), (2, 1)):
                fill = g.scalar(node.inputs[fill_at]) if g.is_static(node.inputs[fill_at]) else None
                if fill == -math.inf and _reaches_scores(node.inputs[keep], g) and not _reaches_scores(cond, g):
                    terms.append(_BiasTerm(cond, context, factor, fill=-math.inf, fill_when=fill_at == 1))
                    t = node.inputs[keep]
                    break
            else:
                return node, factor, static, terms, softcap
            continue
        return node, factor, static, terms, softcap
    return None, factor, static, terms, softcap


def _bias_refusal(node, g: _Graph) -> str:
    """Why the scores' Add/Where/Sub at `node` is not a bias the kernel adds."""
    if node.op == "Where":
        fills = [g.scalar(x) for x in node.inputs[1:] if g.is_static(x)]
        fill = next((f for f in fills if f is not None), None)
        if fill is not None:
            return (f"the scores are filled with {fill:g} where masked (Where {node.name!r}), not with -inf: a row "
                    "masked whole then softmaxes to uniform, which an additive bias does not give")
        return f"the scores go through a Where ({node.name!r}) that selects between two computed tensors"
    if node.op == "Sub":
        return f"a tensor is subtracted from the scores (Sub {node.name!r})"
    return f"the scores' Add ({node.name!r}) adds two products of activations, not a bias"


def _zeroes_masked_rows(node, t, terms) -> bool:
    """ONNX's expanded Attention: Where(ReduceMax(bias, last axis) == -inf, 0, probabilities), zeros for a
    row whose every key is masked: what the kernel computes for such a row."""
    if node.op != "Where" or node.inputs[2] is not t or not node.inputs[0].inputs:
        return False
    equal = node.inputs[0].inputs[0]
    if equal.op != "Equal" or not isinstance(node.inputs[1], (gs.Constant, gs.Variable)):
        return False
    biases = {id(term.tensor) for term in terms if term.tensor is not None and term.fill is None}
    for side in equal.inputs:
        reduce = side.inputs[0] if side.inputs else None
        if reduce is not None and reduce.op == "ReduceMax" and id(reduce.inputs[0]) in biases:
            return True
    return False


def _bias_form(shape, context, batch: int, heads: int):
    """(Bb, Hb, Sqb): how the kernel reads a bias term of `shape` added to scores of shape `context`
    whose batch axes are the kernel's (batch, heads) in row-major order (`op.bias_dims`)."""
    rank = len(context)
    if len(shape) > rank:
        raise _NotFusable(f"the bias on the scores has more axes ({shape}) than the scores ({context})")
    shape = (1,) * (rank - len(shape)) + tuple(shape)
    *batch_axes, s_q, s_kv = context
    *bias_axes, b_q, b_kv = shape
    if b_kv != s_kv:
        raise _NotFusable(f"a bias of shape {shape} on scores {context} is the same for every key: it masks or "
                          "shifts whole rows, which the kernel reads only as a (.., S_q, S_kv) bias")
    if b_q not in (1, s_q) or math.prod(batch_axes) != batch * heads:
        raise _NotFusable(f"a bias of shape {shape} does not broadcast over the scores {context} as the kernel's "
                          f"(batch {batch}, heads {heads}) do")
    want = np.broadcast_to(np.arange(math.prod(bias_axes)).reshape(bias_axes), batch_axes).reshape(batch, heads)
    for hb in dict.fromkeys((heads, 1)):
        bb = math.prod(bias_axes) // hb
        if math.prod(bias_axes) % hb or batch % bb:
            continue
        got = (np.arange(batch)[:, None] % bb) * hb + np.arange(heads)[None, :] % hb
        if np.array_equal(got, want):
            return bb, hb, b_q
    raise _NotFusable(f"a bias of shape {shape} on scores {context} varies over the batch in a way the kernel does "
                      "not read (it takes one bias per sample, per window or shared, per head or shared)")


def _plan_bias(cand: _Candidate, attrs: FlashAttentionAttrs, q_root, g: _Graph):
    """[(term, (Bb, Hb, Sqb))] for the candidate's bias terms, checked to combine into one 4-D bias."""
    if not cand.bias:
        return []
    shape = g.shape(q_root)
    if len(shape) > 4:  # windowed: (B, X..., S, D), the X axes merged into heads
        batch, heads = shape[0], math.prod(shape[1:-2])
    else:
        batch, heads = (int(n) for n in logical_shape(shape, attrs.q_layout, attrs.num_heads)[:2])
    plan = [(term, _bias_form(term.shape or g.shape(term.tensor), term.context, batch, heads)) for term in cand.bias]
    for axis, name in enumerate(("batch", "heads", "query")):
        sizes = {form[axis] for _, form in plan if form[axis] != 1}
        if len(sizes) > 1:
            raise _NotFusable(f"the bias terms added to the scores differ in their {name} sizes {sorted(sizes)}")
    return plan


def _combined(forms) -> tuple:
    """(Bb, Hb, Sqb) of the sum of bias terms of these forms (each 1 or the one size `_plan_bias` allows)."""
    return tuple(max(sizes) for sizes in zip(*forms))


def _emit_bias(graph: gs.Graph, names, plan, dtype, name: str):
    """The 4-D (Bb, Hb, Sqb, S_kv) bias the node reads: each term as the kernel's dtype, scaled, reshaped
    (free: contiguous), summed where there are several (then materialised once, as the model did)."""
    total = None
    for i, (term, (bb, hb, b_q)) in enumerate(plan):
        base = f"{name}/bias{i}"
        x = term.make(graph, names) if term.make else term.tensor
        if term.fill is not None:
            fill, zero = (gs.Constant(names(f"{base}/{w}"), np.array(v, dtype)) for w, v in (("fill", term.fill), ("zero", 0)))
            y = gs.Variable(names(f"{base}/filled"), dtype)
            graph.nodes.append(gs.Node("Where", inputs=[x, fill, zero] if term.fill_when else [x, zero, fill], outputs=[y]))
            x = y
        else:
            y = gs.Variable(names(f"{base}/cast"), dtype)
            graph.nodes.append(gs.Node("Cast", attrs={"to": helper.np_dtype_to_tensor_dtype(np.dtype(dtype))},
                                       inputs=[x], outputs=[y]))
            x = y
            if term.factor != 1.0:
                y = gs.Variable(names(f"{base}/scaled"), dtype)
                factor = gs.Constant(names(f"{base}/factor"), np.array(term.factor, dtype))
                graph.nodes.append(gs.Node("Mul", inputs=[x, factor], outputs=[y]))
                x = y
        if term.regrouped:  # its axes are not the scores': its batch from the probe, rows what is left
            parts = [_const(names, x, "batch_heads", [bb, hb, -1]), _shape_slice(graph, names, x, -1, 2**62)]
        else:
            rows = _const(names, x, "rows", [1]) if b_q == 1 else _shape_slice(graph, names, x, -2, -1)
            parts = [_const(names, x, "batch_heads", [-1, hb]), rows, _shape_slice(graph, names, x, -1, 2**62)]
        x = _reshape(graph, names, x, parts, gs.Variable(names(f"{base}/4d"), dtype))
        if total is not None:
            y = gs.Variable(names(f"{name}/bias_sum{i}"), dtype)
            graph.nodes.append(gs.Node("Add", inputs=[total, x], outputs=[y]))
            x = y
        total = x
    return total


def _einsum_terms(node):
    eq = node.attrs.get("equation", "")
    eq = eq.decode() if isinstance(eq, bytes) else eq
    eq = eq.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2 or any(len(set(t)) != len(t) for t in terms + [out]):
        return None
    return terms, out


def _softmax_candidate(softmax, g: _Graph):
    """Einsum or MatMul attention anchored at `softmax`; None if it is not attention at all."""
    producer, factor, static, bias, softcap = _scores_chain(softmax.inputs[0], g)
    if producer is None or producer.op not in ("MatMul", "Einsum", "Add", "Where", "Sub"):
        return None
    rank = len(g.shape(softmax.inputs[0]))
    if producer.op in ("Add", "Where", "Sub"):
        scores = [_scores_producer(i, g)[0] for i in producer.inputs if isinstance(i, gs.Variable)]
        if any(n is not None and n.op in ("MatMul", "Einsum") for n in scores):
            raise _NotFusable(_bias_refusal(producer, g))
        return None
    if g.shape(producer.outputs[0]) != g.shape(softmax.inputs[0]):
        raise _NotFusable(f"the scores {g.shape(producer.outputs[0])} reach the softmax reshaped to "
                          f"{g.shape(softmax.inputs[0])}")
    axis = softmax.attrs.get("axis", -1)
    if axis not in (-1, rank - 1):
        raise _NotFusable(f"the softmax runs over axis {axis}, not over the keys (the last axis of the scores)")
    pv, probs = _single_consumer_skip_dropout(softmax.outputs[0], g, bias)
    if probs in g.graph.outputs or (pv is None and len(_value_consumers(probs)) > 1):
        raise _NotFusable("the attention probabilities are used besides the product with V (a graph output or a "
                          "second consumer); the kernel never forms them")
    if pv is None or pv.op != producer.op:
        raise _NotFusable("the attention probabilities are not consumed by exactly one matching MatMul/Einsum")
    name = softmax.name or softmax.outputs[0].name
    if producer.op == "MatMul":
        if pv.inputs[0] is not probs:
            raise _NotFusable("the probabilities are the right-hand side of the second MatMul")
        q, k = producer.inputs
        return _Candidate(
            name, "matmul-softmax-matmul", _Operand(q, tuple(range(rank))), _Operand(k, _swap_last(rank)),
            _Operand(pv.inputs[1], tuple(range(rank))), pv.outputs[0], tuple(range(rank)), factor, static, bias=bias,
            softcap=softcap,
        )
    cand = _einsum_candidate(name, producer, pv, probs, factor, static)
    (_, _), so = _einsum_terms(producer)
    if bias and so[-1] not in _einsum_terms(pv)[0][1 if pv.inputs[0] is probs else 0]:
        raise _NotFusable(f"a bias is added to Einsum scores {so} whose last axis is not the keys")
    cand.bias, cand.softcap = bias, softcap
    return cand


def _einsum_candidate(name, producer, pv, probs, factor, static):
    terms = _einsum_terms(producer)
    if terms is None:
        raise _NotFusable("an Einsum equation with ellipsis or repeated labels")
    (t0, t1), so = terms
    batch, i, j = list(so[:-2]), so[-2], so[-1]
    contracted = (set(t0) & set(t1)) - set(so)
    if len(contracted) != 1:
        raise _NotFusable(f"the score Einsum {t0},{t1}->{so} does not contract exactly one axis")
    (c,) = contracted
    q_pos = 0 if i in t0 else 1
    tq, tk = (t0, t1) if q_pos == 0 else (t1, t0)
    if set(tq) != set(batch + [i, c]) or set(tk) != set(batch + [j, c]):
        raise _NotFusable(f"the score Einsum {t0},{t1}->{so} is not a batched Q K^T")
    pv_terms = _einsum_terms(pv)
    if pv_terms is None:
        raise _NotFusable("an Einsum equation with ellipsis or repeated labels")
    (p0, p1), o = pv_terms
    p_pos = 0 if pv.inputs[0] is probs else 1
    tp, tv = (p0, p1) if p_pos == 0 else (p1, p0)
    pbatch, pi, pj = list(tp[:-2]), tp[-2], tp[-1]  # the probabilities keep the scores' order
    new = set(tv) - set(tp)
    if len(new) != 1 or set(tv) != set(pbatch + [pj]) | new or set(o) != set(pbatch + [pi]) | new:
        raise _NotFusable(f"the output Einsum {p0},{p1}->{o} is not a batched P V")
    (cv,) = new
    canon_out = pbatch + [pi, cv]
    return _Candidate(
        name, "einsum-softmax-einsum",
        _Operand(producer.inputs[q_pos], tuple(tq.index(x) for x in batch + [i, c])),
        _Operand(producer.inputs[1 - q_pos], tuple(tk.index(x) for x in batch + [j, c])),
        _Operand(pv.inputs[1 - p_pos], tuple(tv.index(x) for x in pbatch + [pj, cv])),
        pv.outputs[0], tuple(canon_out.index(x) for x in o), factor, static,
    )


_LOOKBACK = 8  # nodes searched back from a Softmax for the product of two activations


def _attention_like(softmax, g: _Graph) -> None:
    """A Softmax none of the patterns took: if its input is computed from a MatMul/Einsum/Gemm of
    two activations with as many elements (attention scores), raise _NotFusable naming what stands
    between them, so the block is reported (a relative-position bias, a per-head temperature, talking
    heads...). A product further up, pooled or projected since (a classifier after an attention
    block), is not its scores."""
    frontier, seen = [(softmax.inputs[0], [])], set()
    while frontier:
        t, path = frontier.pop(0)
        if not t.inputs or id(t) in seen or len(path) > _LOOKBACK:
            continue
        seen.add(id(t))
        node = t.inputs[0]
        activations = [i for i in node.inputs if isinstance(i, gs.Variable) and not g.is_static(i)]
        if node.op in ("MatMul", "Einsum", "Gemm") and len(activations) >= 2:
            if math.prod(g.shape(t)) != math.prod(g.shape(softmax.inputs[0])):
                continue  # not its scores (as many elements): a product upstream of a pooling or a classifier
            between = " -> ".join(f"{n.op} {n.name!r}" for n in reversed(path)) or "nothing"
            raise _NotFusable(
                f"attention-like: a Softmax over the product of two activations ({node.op} {node.name!r}) with "
                f"{between} in between; only a scalar scale, a zero bias or inference-mode dropout may stand "
                "there (a learned or per-head scale, a position bias added to the scores, or a mixing of heads "
                "changes the function the kernel computes)")
        frontier += [(i, path + [node]) for i in node.inputs if isinstance(i, gs.Variable)]


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


# ---------------------------------------------------------------- the driver


ATTENTION_PATHS = ("plugin", "native", "auto")


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
    max_dim = PROBE_MAX_DIM
    while True:
        notes: list[str] = []
        values, mode = _probe(model, input_shapes, notes, max_dim)
        g = _Graph(graph, values)
        blocks, rewrites, degenerate, others = _find_blocks(graph, g, attention, dtype)
        # A probe so small that an attention's sequence is 1 (a deep stage at 1x1) cannot tell
        # pixels from channels: probe larger, up to the export shapes.
        if not degenerate or mode != "reduced" or (_probe_shapes(model, input_shapes, mode, max_dim)
                                                    == _probe_shapes(model, input_shapes, mode, 2 * max_dim)):
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
        try:
            if node.op == "Softmax":
                cand = _softmax_candidate(node, g)
            elif node.op == "Attention":
                cand = _attention_op_candidate(node, g)
            else:
                continue
            if cand is None:
                _attention_like(node, g)  # raises _NotFusable where a Softmax reads a product of activations
                if node.op == "Softmax":
                    others.append(BlockReport(node.name or node.outputs[0].name, "softmax", False,
                                              _not_attention(node, g), path="not attention"))
                continue
            degenerate |= any(np.array(g.shape(o.tensor))[list(o.perm)][-2] == 1 for o in (cand.q, cand.k))
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
        blocks.append(BlockReport(cand.name, cand.pattern, True, details=details))
        rewrites.append((cand.name, attrs, (qr, kr, vr), out, bias, cand.prepare))
    return blocks, rewrites, degenerate, others


def _not_attention(softmax, g: _Graph) -> str:
    """Why a Softmax that no pattern took and `_attention_like` passed is not softmax(Q K^T) attention."""
    t = softmax.outputs[0]
    while len(_value_consumers(t)) == 1 and _value_consumers(t)[0].op in ("Dropout", "Identity", "Cast", "Reshape",
                                                                          "Transpose"):
        t = _value_consumers(t)[0].outputs[0]
    made_by = softmax.inputs[0].inputs[0].op if softmax.inputs[0].inputs else "a graph input"
    for node in _value_consumers(t):
        others = [i for i in node.inputs if i is not t and isinstance(i, gs.Variable) and not g.is_static(i)]
        if node.op in ("MatMul", "Einsum", "Gemm") and others:
            return (f"not softmax(Q K^T) attention: a Softmax of one tensor ({made_by}), no product of two activations, "
                    f"then multiplied with another activation ({node.op} {node.name!r}): factorised or linear "
                    "attention (as CoaT's), which the kernel does not compute")
    return (f"not attention: a Softmax of {made_by}, not of a product of two activations (a classifier, a gate, "
            "a weighting)")


class _Names:
    """Fresh tensor names for the nodes a rewrite adds (graph-unique, readable)."""

    def __init__(self, graph: gs.Graph):
        self.used = set(graph.tensors())

    def __call__(self, base: str) -> str:
        name, n = base, 0
        while name in self.used:
            n += 1
            name = f"{base}_{n}"
        self.used.add(name)
        return name


def _shape_slice(graph: gs.Graph, names: _Names, t, start: int, end: int):
    """Shape(t)[start:end], as graph nodes (Shape and Slice: any opset the exporters write)."""
    shape, part = gs.Variable(names(f"{t.name}/shape"), np.int64), gs.Variable(names(f"{t.name}/shape_slice"), np.int64)
    bounds = [gs.Constant(names(f"{t.name}/shape_slice/{k}"), np.array([v], np.int64)) for k, v in (("starts", start), ("ends", end))]
    graph.nodes += [gs.Node("Shape", inputs=[t], outputs=[shape]), gs.Node("Slice", inputs=[shape, *bounds], outputs=[part])]
    return part


def _reshape(graph: gs.Graph, names: _Names, t, parts, out):
    """Reshape `t` to Concat(`parts`) as `out`."""
    target = gs.Variable(names(f"{out.name}/target"), np.int64)
    graph.nodes += [gs.Node("Concat", attrs={"axis": 0}, inputs=parts, outputs=[target]),
                    gs.Node("Reshape", inputs=[t, target], outputs=[out])]
    return out


def _dims(graph: gs.Graph, names: _Names, t, start: int, end: int, known):
    """t's dims [start:end] as a 1-D int64 tensor: a constant where `known` (the graph's shape
    information for them) has them all static, else Shape(t)[start:end]."""
    if known is not None and all(isinstance(n, int) and n >= 0 for n in known):
        return _const(names, t, f"dims_{start}", list(known))
    return _shape_slice(graph, names, t, start, end)


def _merge_heads(graph: gs.Graph, names: _Names, t, head_dim: int):
    """(B, X..., S, D) -> (B, prod(X), S, D): a contiguous tensor's batch axes as one heads axis
    (free: no data moves). B and the merged axis stay dynamic (the window count grows with the
    image); D is written as the constant it must be (the kernel compiles it in, and TensorRT must
    see it at build even where the exporter computed it from shapes, as TorchScript's does)."""
    minus_one = gs.Constant(names(f"{t.name}/merged/minus_one"), np.array([-1], np.int64))
    seq = _dims(graph, names, t, -2, -1, t.shape[-2:-1] if t.shape else None)
    parts = [_shape_slice(graph, names, t, 0, 1), minus_one, seq, _const(names, t, "head_dim", [head_dim])]
    return _reshape(graph, names, t, parts, gs.Variable(names(f"{t.name}/merged"), t.dtype))


def _const(names: _Names, t, what: str, values):
    return gs.Constant(names(f"{t.name}/{what}"), np.array(values, np.int64))


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
