"""Reference convolutional multi-head attention modules.

`ConvMHAttn` is the block convattn targets: 1x1-conv Q/K/V projections of an NCHW
feature map, attention over the H*W pixels (per head, scale 1/sqrt(head_dim)), and a
1x1-conv output projection. Its three `attention` modes compute the same function, so
a user can check any one of them against the others.

`SeedEinsum` and `SeedSDPA` are the two modules as users post them on the forum (print
statements removed). `SeedEinsum` is correct; `SeedSDPA` is not: it views Q/K/V as
(B, heads, head_dim, H*W), so SDPA treats head_dim as the sequence and attends over
*channels*, and it passes ``dropout_p=0.2``, which SDPA applies even in eval mode. They
are kept verbatim so the tool can diagnose them (see `convattn.exporter.fuse`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_MODES = ("einsum", "sdpa", "flash")


def _check_heads(channels: int, num_heads: int) -> int:
    if num_heads <= 0 or channels % num_heads:
        raise ValueError(
            f"out_channels must be divisible by num_heads: expected a divisor of {channels}, got {num_heads}"
        )
    return channels // num_heads


class ConvMHAttn(nn.Module):
    """Spatial multi-head attention over an NCHW feature map.

    Args:
        in_channels: channels of the query (and key/value) maps.
        out_channels: channels of Q, K, V and of the output; split into `num_heads` heads.
        num_heads: number of heads; must divide `out_channels`.
        attention: "einsum" (explicit scores, O(S^2) memory), "sdpa"
            (`F.scaled_dot_product_attention` on spatial views, no dropout) or "flash"
            (convattn's tiled kernel: the Triton kernel on CUDA, the tiled reference on CPU).
            "flash" is an inference path: no autograd.

    `forward(query, key=None, value=None)`: query (B, C_in, H, W); key/value default to the
    query (self-attention) or are maps of another size (B, C_in, H2, W2) for cross-attention.
    Returns (B, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, num_heads: int, attention: str = "einsum"):
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.num_heads = num_heads
        self.head_dim = _check_heads(out_channels, num_heads)
        self.attention = attention
        self.q_conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.k_conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.v_conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.out_conv = nn.Conv2d(out_channels, out_channels, kernel_size=1)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None):
        key = query if key is None else key
        value = key if value is None else value
        B, _, H, W = query.shape
        h, d = self.num_heads, self.head_dim
        # (B, heads, head_dim, S): a free view of each conv output.
        q = self.q_conv(query).flatten(2).unflatten(1, (h, d))
        k = self.k_conv(key).flatten(2).unflatten(1, (h, d))
        v = self.v_conv(value).flatten(2).unflatten(1, (h, d))
        scale = 1.0 / math.sqrt(d)
        if self.attention == "einsum":
            attn = torch.einsum("bhdi,bhdj->bhij", q, k).mul(scale).softmax(dim=-1)
            out = torch.einsum("bhij,bhdj->bhdi", attn, v)
        elif self.attention == "sdpa":
            # SDPA wants (B, heads, S, head_dim); the fused backends refuse the transposed
            # views ("No available kernel"), hence the copies.
            qs, ks, vs = (t.transpose(-1, -2).contiguous() for t in (q, k, v))
            out = F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(-1, -2)
        else:
            from convattn.plugins import flash_attention

            # conv -> kernel -> conv with no copies: the kernel reads the conv outputs through
            # (B, heads, S, D) views and writes the output map through one.
            out = torch.empty(B, h * d, H, W, dtype=q.dtype, device=q.device)
            flash_attention(
                q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2), scale=scale,
                out=out.view(B, h, d, H * W).transpose(-1, -2),
            )
            return self.out_conv(out)
        return self.out_conv(out.reshape(B, h * d, H, W))


class SeedEinsum(nn.Module):
    """The forum's einsum module, verbatim but for prints: spatial attention, correct."""

    def __init__(self, in_channels, out_channels, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = out_channels // num_heads
        self.q_conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.k_conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.v_conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.out_conv = nn.Conv2d(out_channels, out_channels, kernel_size=1)

    def forward(self, query, key, value):
        B, C, H, W = query.shape
        Q = self.q_conv(query).view(B, self.num_heads, self.head_dim, H * W)
        K = self.k_conv(key).view(B, self.num_heads, self.head_dim, H * W)
        V = self.v_conv(value).view(B, self.num_heads, self.head_dim, H * W)
        attn = torch.einsum("bhci,bhcj->bhij", Q, K) / (self.head_dim**0.5)
        attn = attn.softmax(dim=-1)
        out = torch.einsum("bhij,bhcj->bhci", attn, V).reshape(B, -1, H, W)
        return self.out_conv(out)


class SeedSDPA(nn.Module):
    """The forum's SDPA module, verbatim but for prints. Two bugs, kept on purpose:
    attention over channels (head_dim is the sequence) and dropout 0.2 even in eval."""

    def __init__(self, in_channels, out_channels, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = out_channels // num_heads
        self.q_conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.k_conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.v_conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.out_conv = nn.Conv2d(out_channels, out_channels, kernel_size=1)

    def forward(self, query, key, value):
        B, C, H, W = query.shape
        Q = self.q_conv(query).view(B, self.num_heads, self.head_dim, H * W)
        K = self.k_conv(key).view(B, self.num_heads, self.head_dim, H * W)
        V = self.v_conv(value).view(B, self.num_heads, self.head_dim, H * W)
        out = F.scaled_dot_product_attention(Q, K, V, dropout_p=0.2)
        out = out.reshape(B, -1, H, W)
        return self.out_conv(out)
