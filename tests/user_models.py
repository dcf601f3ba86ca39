"""Models a user might bring: several blocks, no attention, masked or mis-axed softmax."""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from convattn.models import ConvMHAttn


class TwoBlocks(nn.Module):
    """A small network that *contains* two attention blocks (not a bare ConvMHAttn)."""

    def __init__(self, c=16, heads=2):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.attn1 = ConvMHAttn(c, c, heads)
        self.attn2 = ConvMHAttn(c, c, heads, attention="sdpa")
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.attn1(x)
        x = x + self.attn2(x)
        return self.head(x)


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(x).softmax(dim=1)


class _Einsum(nn.Module):
    def __init__(self, c=8, heads=2):
        super().__init__()
        self.h, self.d = heads, c // heads
        self.q, self.k, self.v = (nn.Conv2d(c, c, 1) for _ in range(3))

    def views(self, x):
        b, _, hh, ww = x.shape
        return [f(x).view(b, self.h, self.d, hh * ww) for f in (self.q, self.k, self.v)]


class MaskedAttention(_Einsum):
    """Spatial attention with an additive mask on the scores (Einsum): the bias input takes it."""

    def forward(self, x):
        q, k, v = self.views(x)
        s = torch.einsum("bhci,bhcj->bhij", q, k) / self.d**0.5
        s = s + torch.triu(torch.full(s.shape[-2:], -1e4), diagonal=1)
        return torch.einsum("bhij,bhcj->bhci", s.softmax(-1), v).reshape(x.shape)


class WrongAxisSoftmax(_Einsum):
    """Softmax over the queries instead of the keys."""

    def forward(self, x):
        q, k, v = self.views(x)
        s = torch.einsum("bhci,bhcj->bhij", q, k) / self.d**0.5
        return torch.einsum("bhij,bhcj->bhci", s.softmax(-2), v).reshape(x.shape)


class InterleavedHeads(_Einsum):
    """Heads taken as channel = d * heads + head (not head * D + d): the NCHW layout would be
    wrong, so the fusion must read the permuted tensor instead."""

    def views(self, x):
        b, _, hh, ww = x.shape
        return [f(x).view(b, self.d, self.h, hh * ww).transpose(1, 2) for f in (self.q, self.k, self.v)]

    def forward(self, x):
        q, k, v = self.views(x)
        p = (torch.einsum("bhci,bhcj->bhij", q, k) * self.d**-0.5).softmax(-1)
        return torch.einsum("bhij,bhcj->bhci", p, v).reshape(x.shape)


class VAEAttention(nn.Module):
    """The Stable Diffusion VAE mid-block attention as diffusers writes it (Attention with
    AttnProcessor): GroupNorm, Linear projections, head_to_batch_dim, baddbmm with the scale
    (beta=0 on an uninitialised tensor), softmax, bmm, batch_to_head_dim, Linear, residual."""

    def __init__(self, c=64, heads=1, groups=8):
        super().__init__()
        self.heads = heads
        self.scale = (c // heads) ** -0.5
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = (nn.Linear(c, c) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(0.0)])

    def head_to_batch_dim(self, t):
        b, s, c = t.shape
        t = t.reshape(b, s, self.heads, c // self.heads).permute(0, 2, 1, 3)
        return t.reshape(b * self.heads, s, c // self.heads)

    def batch_to_head_dim(self, t):
        bh, s, d = t.shape
        t = t.reshape(bh // self.heads, self.heads, s, d).permute(0, 2, 1, 3)
        return t.reshape(bh // self.heads, s, d * self.heads)

    def forward(self, x):
        residual = x
        b, c, h, w = x.shape
        hs = self.group_norm(x).view(b, c, h * w).transpose(1, 2)
        q, k, v = (self.head_to_batch_dim(f(hs)) for f in (self.to_q, self.to_k, self.to_v))
        empty = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device)
        probs = torch.baddbmm(empty, q, k.transpose(-1, -2), beta=0, alpha=self.scale).softmax(dim=-1)
        hs = self.batch_to_head_dim(torch.bmm(probs, v))
        hs = self.to_out[1](self.to_out[0](hs))
        return hs.transpose(-1, -2).reshape(b, c, h, w) + residual


@dataclasses.dataclass
class DecoderOutput:
    """The shape of diffusers' `DecoderOutput` (a dataclass with a `sample` tensor)."""

    sample: torch.Tensor
    commit_loss: torch.Tensor | None = None


class DataclassOutput(nn.Module):
    """A ConvMHAttn block whose forward returns a dataclass, as diffusers' models do."""

    def __init__(self):
        super().__init__()
        self.block = ConvMHAttn(16, 16, 2)

    def forward(self, x):
        return DecoderOutput(sample=self.block(x))


class DictOutput(nn.Module):
    """Two outputs in a dict: the attention map and a pooled summary."""

    def __init__(self):
        super().__init__()
        self.block = ConvMHAttn(16, 16, 2)

    def forward(self, x):
        y = self.block(x)
        return {"features": y, "pooled": y.mean(dim=(2, 3))}


class ZeroOutput(nn.Module):
    """Attention followed by a zero-initialised conv (MONAI's DiffusionModelUNet does this): the output
    is all zeros whatever the attention computes."""

    def __init__(self):
        super().__init__()
        self.block = ConvMHAttn(16, 16, 2)
        self.out = nn.Conv2d(16, 16, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        return self.out(self.block(x))


class TemperatureAttention(nn.Module):
    """Attention scaled by a learned per-head temperature (edgenext's XCA-style), not a scalar."""

    def __init__(self, c=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.temperature = nn.Parameter(torch.rand(heads, 1, 1) + 0.5)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        attn = (q @ k.transpose(-1, -2)) * self.temperature
        return (attn.softmax(-1) @ v).transpose(-1, -2).reshape(b, c, h, w)


class KeyScaledAttention(TemperatureAttention):
    """Scores times a learned factor per head and key (30 keys: a 5x6 map): not the kernel's one scale."""

    def __init__(self, c=16, heads=2, keys=30):
        super().__init__(c, heads)
        self.temperature = nn.Parameter(torch.rand(heads, 1, keys) + 0.5)


class RelativeBiasAttention(nn.Module):
    """A position bias added to the scores after a Reshape (MONAI SABlock with relative positions)."""

    def __init__(self, c=16, heads=2, s=30):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.bias = nn.Parameter(torch.randn(heads * s * s))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        scores = q @ k.transpose(-1, -2) * (c // self.heads) ** -0.5
        s = h * w  # the bias is added to a reshaped view of the scores, as MONAI's SABlock does
        scores = (scores.reshape(b, self.heads * s, s) + self.bias.reshape(1, self.heads * s, s)).reshape(b, self.heads, s, s)
        return (scores.softmax(-1) @ v).transpose(-1, -2).reshape(b, c, h, w)


class TalkingHeads(nn.Module):
    """A 1x1 conv mixing heads between the scores and the softmax (efficientformerv2)."""

    def __init__(self, c=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.talk = nn.Conv2d(heads, heads, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        attn = self.talk(q @ k.transpose(-1, -2) * (c // self.heads) ** -0.5)
        return (attn.softmax(-1) @ v).transpose(-1, -2).reshape(b, c, h, w)


class BatchOne(nn.Module):
    """Attention whose reshapes hard-code batch 1: the TorchScript exporter still marks the batch
    dynamic (the graph then fails at batch 2), as a `.pt2` exported with Dim.AUTO can."""

    def __init__(self):
        super().__init__()
        self.block = ConvMHAttn(16, 16, 2)

    def forward(self, x):
        return self.block(x).reshape(1, 16, -1).reshape(1, 16, x.shape[2], x.shape[3])


class WindowedAttention(nn.Module):
    """timm's nest: attention inside each of T windows of the map, Q, K, V (B, heads, T, N, D) from
    one qkv Linear (unbound from a (3, B, heads, T, N, D) permute), output permuted head-minor."""

    def __init__(self, channels: int = 16, heads: int = 2, window: int = 4):
        super().__init__()
        self.heads, self.window, self.scale = heads, window, (channels // heads) ** -0.5
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.window
        t = x.reshape(b, c, h // n, n, w // n, n).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // n) * (w // n), n * n, c)
        B, T, N, C = t.shape
        q, k, v = self.qkv(t).reshape(B, T, N, 3, self.heads, C // self.heads).permute(3, 0, 4, 1, 2, 5).unbind(0)
        return self.proj(self.attend(q, k, v))

    def attend(self, q, k, v):
        """(B, heads, T, N, D) each -> the (B, T, N, heads*D) tokens the projection reads."""
        B, H, T, N, D = q.shape
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        return (attn @ v).permute(0, 2, 3, 4, 1).reshape(B, T, N, H * D)


class DeepStage(nn.Module):
    """Attention after a 32x downsampling (a backbone's last stage): at a 32x32 probe, one pixel."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(32)
        self.attn = ConvMHAttn(16, 16, 2)

    def forward(self, x):
        return self.attn(self.pool(x))


class WindowedSDPA(WindowedAttention):
    """NesT's fused path: F.scaled_dot_product_attention on the 5-D windows, which the dynamo
    exporter refuses ("only 4D query, key, and value are supported") and TorchScript's exports."""

    def attend(self, q, k, v):
        B, H, T, N, D = q.shape
        return F.scaled_dot_product_attention(q, k, v).permute(0, 2, 3, 4, 1).reshape(B, T, N, H * D)


class TokenCrossAttention(nn.Module):
    """Pixels attending to a (B, S, C_ctx) token input, as a cross-attention UNet block attends to its
    `encoder_hidden_states`: Q from a 1x1 conv of the map (NCHW), K and V from Linear projections of the
    tokens (BSC)."""

    def __init__(self, c=16, ctx=24, heads=2):
        super().__init__()
        self.heads = heads
        self.q = nn.Conv2d(c, c, 1)
        self.k, self.v = nn.Linear(ctx, c), nn.Linear(ctx, c)
        self.out = nn.Conv2d(c, c, 1)

    def forward(self, x, tokens):
        b, c, h, w = x.shape
        d = c // self.heads
        q = self.q(x).view(b, self.heads, d, h * w).transpose(-1, -2)
        k, v = (p(tokens).view(b, -1, self.heads, d).transpose(1, 2) for p in (self.k, self.v))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(-1, -2).reshape(b, c, h, w))


class Sampling(nn.Module):
    """ConvMHAttn whose input is perturbed by fresh noise at every call, in eval too (not dropout)."""

    def __init__(self):
        super().__init__()
        self.attn = ConvMHAttn(16, 16, 2)

    def forward(self, x):
        return self.attn(x + 0.1 * torch.randn_like(x))


class FactorisedAttention(nn.Module):
    """CoaT's factorised attention: softmax of K over the sequence, then Q (K^T V): no Q K^T scores."""

    def __init__(self, c=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w).transpose(-1, -2) for t in self.qkv(x).chunk(3, 1))
        context = k.softmax(dim=2).transpose(-1, -2) @ v  # (B, heads, D, D)
        return self.out((q @ context).transpose(-1, -2).reshape(b, c, h, w))


class AttentionAndClassifier(nn.Module):
    """A ConvMHAttn block, then a pooled classifier whose logits go through a Softmax."""

    def __init__(self, c=16, heads=2, classes=5):
        super().__init__()
        self.attn, self.fc = ConvMHAttn(c, c, heads), nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.attn(x).mean((2, 3))).softmax(-1)


class SwinWindowAttention(nn.Module):
    """Swin's (shifted) window attention, as timm's WindowAttention and SwinTransformerBlock compute it on
    an NCHW map: windows of ws x ws tokens (batch x windows, windows inner), a relative position bias
    gathered from a ((2 ws - 1)^2, heads) table and added to the scores, and with `shift` the -100 mask of
    the shifted windows added on a (B, windows, heads, N, N) view of them."""
    def __init__(self, c=16, heads=2, ws=4, shift=2):
        super().__init__()
        self.c, self.h, self.ws, self.shift = c, heads, ws, shift
        self.qkv = nn.Linear(c, 3*c); self.proj = nn.Linear(c, c)
        n = ws*ws
        self.table = nn.Parameter(torch.randn((2*ws-1)**2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + ws - 1
        self.register_buffer("index", rel[..., 0] * (2*ws-1) + rel[..., 1], persistent=False)
    def mask(self, H, W):
        ws, s = self.ws, self.shift
        img = torch.zeros(1, H, W, 1); cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                img[:, hs, wsl, :] = cnt; cnt += 1
        win = img.view(1, H//ws, ws, W//ws, ws, 1).permute(0,1,3,2,4,5).reshape(-1, ws*ws)
        m = win[:, None, :] - win[:, :, None]
        return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)
    def forward(self, x):
        B, C, H, W = x.shape; ws = self.ws
        t = x.permute(0, 2, 3, 1)
        if self.shift: t = torch.roll(t, (-self.shift, -self.shift), (1, 2))
        t = t.view(B, H//ws, ws, W//ws, ws, C).permute(0,1,3,2,4,5).reshape(-1, ws*ws, C)
        B_, N, _ = t.shape
        q, k, v = self.qkv(t).reshape(B_, N, 3, self.h, C//self.h).permute(2,0,3,1,4).unbind(0)
        attn = (q * (C//self.h)**-0.5) @ k.transpose(-2, -1)
        bias = self.table[self.index.view(-1)].view(N, N, -1).permute(2, 0, 1)
        attn = attn + bias.unsqueeze(0)
        if self.shift:
            m = self.mask(H, W); nW = m.shape[0]
            attn = attn.view(B_ // nW, nW, self.h, N, N) + m.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.h, N, N)
        o = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B_, N, C)
        o = self.proj(o).view(B, H//ws, W//ws, ws, ws, C).permute(0,1,3,2,4,5).reshape(B, H, W, C)
        if self.shift: o = torch.roll(o, (self.shift, self.shift), (1, 2))
        return o.permute(0, 3, 1, 2)

class MaskedFill(nn.Module):
    """Causal attention over pixels by masked_fill (-inf) or an additive -1e4 mask."""

    def __init__(self, c=16, heads=2, fill=float("-inf")):
        super().__init__()
        self.h, self.qkv, self.fill = heads, nn.Conv2d(c, 3 * c, 1), fill

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, 3, self.h, c // self.h, h * w).transpose(-1, -2).unbind(1)
        s = q @ k.transpose(-1, -2) * (c // self.h) ** -0.5
        m = torch.ones(h * w, h * w, dtype=torch.bool).triu(1)
        s = s.masked_fill(m, self.fill) if self.fill is not None else s + m.float() * -1e4
        return (s.softmax(-1) @ v).transpose(-1, -2).reshape(b, c, h, w)
