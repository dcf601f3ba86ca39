"""Small graph edits the rewrites share: fresh names, Shape slices, Reshapes to computed targets."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


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
