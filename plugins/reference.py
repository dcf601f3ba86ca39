"""Tiled online-softmax attention on the CPU: the algorithm of the GPU kernel, in NumPy.

Keys are visited block by block (FlashAttention-2's loop order). Each block's scores are
(S_q x block_k); a running max `m`, running denominator `l` and un-normalised accumulator
`acc` are rescaled as the max grows, so no S_q x S_kv matrix ever exists and the result is
finite even where exp(scores) overflows. Accumulation is fp32, as in the kernel.
"""

from __future__ import annotations

import numpy as np

from ..errors import PluginError
from .op import FlashAttentionAttrs, bias_dims, layout_view, output_shape

BLOCK_K = 128


def to_bhsd(x: np.ndarray, layout: str, num_heads: int) -> np.ndarray:
    """A (B, heads, S, D) view of `x` given in `layout` (a copy only if `x` is not contiguous)."""
    x = np.ascontiguousarray(x)
    sizes, strides = layout_view(x.shape, layout, num_heads)
    return np.lib.stride_tricks.as_strided(x, sizes, [st * x.itemsize for st in strides], writeable=False)


def from_bhsd(o: np.ndarray, layout: str, out_shape, num_heads: int) -> np.ndarray:
    """A contiguous array of `out_shape` in `layout` holding `o` (B, heads, S_q, D_v)."""
    out = np.empty(out_shape, o.dtype)
    sizes, strides = layout_view(out_shape, layout, num_heads)
    np.lib.stride_tricks.as_strided(out, sizes, [st * out.itemsize for st in strides])[...] = o
    return out


def tiled_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, block_k: int = BLOCK_K,
                    bias: np.ndarray | None = None, softcap: float = 0.0) -> np.ndarray:
    """softmax(scale * q k^T [+ bias]) v for (B, H, S, D) arrays (K and V may have fewer heads: grouped-query),
    one key block at a time. `bias`: 4-D,
    broadcast as `op.bias_dims` says (a windowed batch reads bias[b % Bb]); a row every score of which
    is -inf gives zeros. `softcap` > 0: scores softcap * tanh(scores / softcap) before the bias."""
    if k.shape[2] != v.shape[2] or q.shape[3] != k.shape[3]:
        raise PluginError(f"expected k, v with equal S and q, k with equal D; got q{q.shape} k{k.shape} v{v.shape}")
    q32 = q.astype(np.float32) * np.float32(scale)
    b, h, s_q, _ = q.shape
    if k.shape[1] != h:  # grouped-query: query head i reads K/V head i // (h / h_kv)
        if h % k.shape[1] or k.shape[1] != v.shape[1]:
            raise PluginError(f"{h} query heads do not group over {k.shape[1]} K and {v.shape[1]} V heads")
        k, v = (np.repeat(t, h // t.shape[1], axis=1) for t in (k, v))
    if bias is not None:
        bb = bias_dims(bias.shape, b, h, s_q, k.shape[2])[0]
        bias = bias[np.arange(b) % bb]  # the windowed batch's period, unrolled (here only: a CPU reference)
    m = np.full((b, h, s_q, 1), -np.inf, np.float32)
    l = np.zeros((b, h, s_q, 1), np.float32)
    acc = np.zeros((b, h, s_q, v.shape[3]), np.float32)
    for start in range(0, k.shape[2], block_k):
        kb = k[:, :, start : start + block_k].astype(np.float32)
        vb = v[:, :, start : start + block_k].astype(np.float32)
        s = q32 @ kb.transpose(0, 1, 3, 2)  # (B, H, S_q, block_k)
        if softcap:
            s = np.float32(softcap) * np.tanh(s / np.float32(softcap))
        if bias is not None:
            s = s + bias[..., start : start + block_k].astype(np.float32)
        m_new = np.maximum(m, s.max(axis=-1, keepdims=True))
        m_use = np.where(np.isneginf(m_new), np.float32(0), m_new)  # a row masked so far: no -inf - -inf
        p = np.exp(s - m_use)
        alpha = np.exp(m - m_use)
        l = l * alpha + p.sum(axis=-1, keepdims=True)
        acc = acc * alpha + p @ vb
        m = m_new
    return acc / np.where(l == 0, np.float32(1), l)


def flash_attention_reference(q, k, v, attrs: FlashAttentionAttrs, block_k: int = BLOCK_K, bias=None) -> np.ndarray:
    """Execute one `FlashAttention` (or, with `bias`, `FlashAttentionBias`) node: layouts in, tiled
    attention, layout out (fp32)."""
    o = tiled_attention(
        to_bhsd(q, attrs.q_layout, attrs.num_heads),
        to_bhsd(k, attrs.k_layout, attrs.num_heads),
        to_bhsd(v, attrs.v_layout, attrs.num_heads),
        attrs.scale,
        block_k,
        bias,
        attrs.softcap,
    )
    return from_bhsd(o, attrs.out_layout, output_shape(q.shape, v.shape, attrs), attrs.num_heads)


def reference_attention_torch(q, k, v, scale: float, out=None, bias=None, softcap: float = 0.0):
    """`tiled_attention` on (B, H, S, D) CPU torch tensors of any strides; writes into `out`
    (any strides) if given. The CPU path of `flash.jit_attention` (and of `torch_op.run` where no Triton
    is installed)."""
    import torch

    arrays = [t.detach().float().numpy() for t in (q, k, v)]
    bias = None if bias is None else bias.detach().float().numpy()
    o = torch.from_numpy(tiled_attention(*arrays, scale, bias=bias, softcap=softcap))
    if out is None:
        return o.to(q.dtype)
    out.copy_(o)
    return out


def add_q_bias(q, q_bias):
    """q + q_bias (H*D values, a Q conv's bias) as a new (B, H, S, D) tensor; q when None.
    Shared by `flash.jit_attention` and `torch_op.run`'s no-Triton path for every path but the Hopper
    kernel, which adds the bias to its resident Q tile instead."""
    if q_bias is None:
        return q
    return q + q_bias.reshape(1, q.shape[1], 1, q.shape[3]).to(q.dtype)
