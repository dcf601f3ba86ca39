"""Views: each axis of a tensor as the digits ("atoms") of its root tensor's axes, as Reshape and Transpose
move them; `kernel_view` is the view the kernel takes of a root in one of the node's layouts."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...plugins.op import layout_view


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
    """The (B, H, S, D) view the kernel takes of a root tensor given in `layout`: derived from the op's
    own layout table (`op.layout_view`: sizes and strides of a contiguous tensor), not restated. A BHSD
    root of rank > 4, (B, X..., S, D) (windowed attention: (B, heads, windows, S, D)), is read as
    (B, prod(X), S, D): contiguous, its X axes merge into one heads axis (`_merge_heads`)."""
    shape = tuple(int(n) for n in shape)
    if layout == "BHSD" and len(shape) > 4:
        sizes, strides = layout_view((shape[0], math.prod(shape[1:-2]), *shape[-2:]), layout, heads)
    else:
        sizes, strides = layout_view(shape, layout, heads)
    return tuple(strided_axis(shape, n, st) for n, st in zip(sizes, strides))


def strided_axis(shape, size: int, stride: int) -> tuple:
    """The atoms of an axis of `size` steps of `stride` elements over a contiguous root of `shape`: the root
    axes it walks, major first (an axis may cross root axes where it runs on contiguously, as a window
    count spans the X axes of (B, X..., S, D))."""
    if size == 1:
        return ()
    row = [math.prod(shape[i + 1:]) for i in range(len(shape))]  # row-major element strides of the root
    atoms, left = [], size
    for axis in reversed(range(len(shape))):
        if left == 1:
            break
        if stride % row[axis] or stride // row[axis] >= shape[axis]:
            continue
        inner = stride // row[axis]
        span = shape[axis] // inner  # steps that stay inside this root axis
        if shape[axis] % inner or (left > span and left % span):
            raise ValueError(f"an axis of {size} x stride {stride} is no digit run of the root {shape}")
        take = min(left, span)
        atoms.insert(0, Atom(axis, take, inner))
        left //= take
        stride = row[axis] * shape[axis] if left > 1 else stride  # continues into the next root axis up
    if left != 1:
        raise ValueError(f"an axis of {size} x stride {stride} runs past the root {shape}")
    return tuple(a for a in atoms if a.size != 1)
