"""The matcher for attention written out: MatMul or Einsum scores, Softmax, MatMul or Einsum with V; and
what a Softmax that is not such attention is."""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from .report import _NotFusable
from .probe import _Graph, _value_consumers
from .solve import _Candidate, _Operand
from .scores import _bias_refusal, _scores_chain, _scores_producer, _single_consumer_skip_dropout


def _swap_last(rank: int) -> tuple:
    return tuple(range(rank - 2)) + (rank - 1, rank - 2)


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
