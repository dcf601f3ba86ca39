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
        if self.attention == "flash":
            return self._flash(query, key, value)
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
        else:
            # SDPA wants (B, heads, S, head_dim); the fused backends refuse the transposed
            # views ("No available kernel"), hence the copies.
            qs, ks, vs = (t.transpose(-1, -2).contiguous() for t in (q, k, v))
            out = F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(-1, -2)
        return self.out_conv(out.reshape(B, h * d, H, W))

    def _flash(self, query, key, value):
        """The inference path: the 1x1 convs as matrix products, attention by convattn's kernel.

        A 1x1 conv of an NCHW map is W (C_out x C_in) @ x (C_in x H*W) per image. Measured on
        an H100 (fp16, C=512, 4 x 128x128): cuDNN's conv is that product (0.06 ms) plus a
        separate bias add (0.11 ms), and `torch.matmul` copies both operands around it. So the
        products run through `bmm`, Q, K and V of self-attention come out of one, and no bias
        gets a pass of its own (`_flash_weights`). The kernel reads the products through
        (B, heads, S, D) views and writes the output map through one: no other copies.
        """
        from convattn.plugins import flash_attention

        B, _, H, W = query.shape
        h, d = self.num_heads, self.head_dim
        c = h * d
        w_qkv, w_out, tail = self._flash_weights()
        if key is query and value is query:
            products = [(query, w_qkv)]
        elif value is key:
            products = [(query, w_qkv[:c]), (key, w_qkv[c:])]
        else:
            products = [(query, w_qkv[:c]), (key, w_qkv[c:2 * c]), (value, w_qkv[2 * c:])]
        qkv = [t for x, weight in products for t in _bmm(weight, x.flatten(2)).split(c, dim=1)]
        q, k, v = (t.unflatten(1, (h, d)).transpose(-1, -2) for t in qkv)
        attn = q.new_empty(B, c + len(tail), H * W)  # the output map, then rows [1, 0, ...]
        attn[:, c:] = tail[:, None]
        flash_attention(q, k, v, scale=1.0 / math.sqrt(d), out=attn[:, :c].view(B, h, d, H * W).transpose(-1, -2),
                        q_bias=self.q_conv.bias)
        return _bmm(w_out, attn).unflatten(2, (H, W))

    def _flash_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stacked Q/K/V weights, [W_out | b | 0] and the rows appended to the attention
        output ([1, 0, ...]), so that b = b_out + W_out b_v rides in the output product.

        Q's bias goes to the kernel (`q_bias`). K's is dropped: it shifts every score of a row
        by q . b_k, which softmax cancels. V's adds b_v to every output row (the weights sum to
        1), so it moves into the output bias. Built once per weight version (a load, an
        optimizer step or `.to()` rebuilds them): at small maps the launches are the cost.
        """
        convs = (self.q_conv, self.k_conv, self.v_conv, self.out_conv)
        if torch.compiler.is_compiling():  # traced: built in the graph (no data pointers to key a cache by)
            return self._stacked_weights()
        params = [p for conv in convs for p in (conv.weight, conv.bias) if p is not None]
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        cached = getattr(self, "_flash_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = self._flash_cache = (key, *self._stacked_weights())
        return cached[1:]

    def _stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w_qkv = torch.cat([_matrix(conv) for conv in (self.q_conv, self.k_conv, self.v_conv)])
        w_out = _matrix(self.out_conv)
        bias = self.out_conv.bias
        if self.v_conv.bias is not None:
            bias = w_out @ self.v_conv.bias + (0 if bias is None else bias)
        # 8 rows keep the appended matrix's rows 16-byte aligned for fp16 GEMMs.
        tail = torch.zeros(8, dtype=w_out.dtype, device=w_out.device)
        tail[0] = 1
        w_out = F.pad(w_out, (0, len(tail)))
        if bias is not None:
            w_out[:, -len(tail)] = bias
        return w_qkv, w_out, tail


def _matrix(conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 conv's weight as the (C_out, C_in) matrix it multiplies each pixel's channels by."""
    return conv.weight.flatten(1)


def _bmm(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight @ x[b] for each image. `torch.matmul` would fold the batch into a transposed
    copy of x and copy the result back (two extra passes); `bmm` on the expanded weight does not."""
    return torch.bmm(weight.expand(x.shape[0], *weight.shape), x)


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
