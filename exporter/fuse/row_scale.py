"""A pass before matching: a factor on the scores that is the same for every key (SwinV2's learned
logit scale per head, a temperature per head or per query) moved onto Q, where the kernel's one scale
leaves the function exact: (Q K^T) * f = (Q * f) K^T when f's last axis is 1. The moved product is the
model's own Mul (or Div) on Q's rows, made once per run; the matcher then sees plain attention."""

from __future__ import annotations

import onnx_graphsurgeon as gs

# What may stand between the factor and the Softmax it feeds (the bias terms, Swin's window reshapes)
_TO_SOFTMAX = ("Add", "Where", "Reshape", "Cast", "Mul", "Div", "Sub")
_LOOKAHEAD = 8


def move_row_scales(graph: gs.Graph) -> int:
    """Rewrite every MatMul -> Mul/Div by such a constant -> ... -> Softmax so that the constant scales
    the MatMul's left operand instead; the number of factors moved."""
    moved = 0
    for node in list(graph.nodes):
        const = _row_factor(node, graph)
        if const is None:
            continue
        scores, matmul = node.inputs[1 - node.inputs.index(const)], None
        matmul = scores.inputs[0]
        q = matmul.inputs[0]
        scaled = gs.Variable(f"{q.name}/row_scaled", dtype=q.dtype, shape=q.shape)
        graph.nodes.append(gs.Node(node.op, name=f"{node.name}/on_q", inputs=[q, const], outputs=[scaled]))
        matmul.inputs[0] = scaled
        out = node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        matmul.outputs[0] = out  # the scores keep the factor's output name: its consumers are unchanged
        moved += 1
    if moved:
        graph.cleanup().toposort()
    return moved


def _row_factor(node, graph: gs.Graph):
    """The constant of `node` when it multiplies (or divides) a MatMul's scores by a factor constant over
    the keys that broadcasts over the left operand without growing it, and the scores reach a Softmax."""
    if node.op not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    sides = [0, 1] if node.op == "Mul" else [1]  # Div: only scores / f
    const = next((node.inputs[i] for i in sides if isinstance(node.inputs[i], gs.Constant)), None)
    if const is None or const.values.size <= 1 or const.values.ndim == 0 or const.values.shape[-1] != 1:
        return None  # scalars are the kernel's scale already; a factor per key is not moved
    scores = node.inputs[1 - node.inputs.index(const)]
    if not scores.inputs or scores.inputs[0].op != "MatMul" or len(scores.outputs) != 1 or scores in graph.outputs:
        return None
    q = scores.inputs[0].inputs[0]
    if q.shape is None or scores.shape is None or len(q.shape) != len(scores.shape) or const.values.ndim > len(q.shape):
        return None
    for i, n in enumerate(const.values.shape[:-1], start=len(q.shape) - const.values.ndim):
        if n != 1 and not (q.shape[i] == scores.shape[i] == n):  # it would broadcast Q up, or its size is unknown
            return None
    return const if _reaches_softmax(node.outputs[0]) else None


def _reaches_softmax(t) -> bool:
    frontier = [(t, 0)]
    while frontier:
        t, depth = frontier.pop()
        for consumer in t.outputs:
            if consumer.op == "Softmax":
                return True
            if consumer.op in _TO_SOFTMAX and depth < _LOOKAHEAD:
                frontier += [(o, depth + 1) for o in consumer.outputs]
    return False
