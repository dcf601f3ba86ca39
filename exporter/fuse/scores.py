"""Between the scores and the softmax: scalars, casts, a soft cap and the bias terms a model adds (masks,
position tables, Swin's windowed mask), walked back from the Softmax; the bias planned in the kernel's
(batch, heads) axes and emitted as the node's fourth input."""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from ...plugins.op import FlashAttentionAttrs, logical_shape
from .report import _NotFusable
from .probe import _Graph, _cast_to, _data_independent, _is_zero, _scalar_operand, _value_consumers, _widens
from .edits import _const, _reshape, _shape_slice
from .solve import _Candidate


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



def _relative_table(values: np.ndarray):
    """(rows, cols) of the window over which a (..., S, S) bias depends only on the relative position of
    query and key pixels (bias[.., i, j] = table[.., yi - yj, xi - xj], S = rows * cols; rows 1: a 1-D
    sequence), or None. Swin's relative position bias is one; a shifted window's mask is not."""
    s = values.shape[-1]
    if values.ndim < 2 or values.shape[-2] != s or s < 2 or values.size > 2**24:  # not a table's size
        return None
    planes = values.reshape(-1, s * s)
    for rows in (r for r in range(1, s + 1) if s % r == 0):
        cols = s // rows
        y, x = np.divmod(np.arange(s), cols)
        key = ((y[:, None] - y[None, :] + rows - 1) * (2 * cols - 1) + x[:, None] - x[None, :] + cols - 1).reshape(-1)
        table = np.zeros((planes.shape[0], (2 * rows - 1) * (2 * cols - 1)), planes.dtype)
        table[:, key] = planes
        if np.array_equal(table[:, key], planes):
            return rows, cols
    return None


def _bias_table_note(plan, g: _Graph, dtype) -> str | None:
    """Where a bias term is a relative-position table expanded to (.., S, S) (Swin's, constant at export):
    what passing the table and indexing it in the kernel would save, for the report (issue 23 asks). The
    node reads the expanded bias: made once, shared by every window and sample, its size is the saving."""
    for term, (bb, hb, b_q) in plan:
        t = term.tensor
        if t is None or term.make or term.fill is not None or not g.is_static(t):
            continue
        values = t.values if isinstance(t, gs.Constant) else g.values.get(t.name)
        window = values is not None and _relative_table(np.asarray(values))
        if not window:
            continue
        rows, cols = window
        planes = values.size // values.shape[-1] ** 2
        table, expanded, size = planes * (2 * rows - 1) * (2 * cols - 1), values.size, np.dtype(dtype).itemsize
        return (f"the bias is a relative-position table over a {rows}x{cols} window ({table} values) expanded to "
                f"{bb}x{hb}x{b_q}x{values.shape[-1]} ({expanded} values, {expanded * size / 1024:.1f} KiB, read by "
                f"every window and sample): indexing the table in the kernel would save "
                f"{(expanded - table) * size / 1024:.1f} KiB, so the node reads the expanded bias")
    return None
