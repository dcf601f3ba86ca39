"""The flash-attention forward kernel (Triton) and its configurations.

FlashAttention-2's loop order (Dao, 2023; Triton's fused-attention tutorial): one program per
(BLOCK_M queries, batch*head); keys and values stream through in BLOCK_N tiles; a running
row max and row sum rescale an fp32 accumulator, so nothing of size S_q x S_kv exists and no
workspace is needed. Every tensor is addressed through four strides, so the views a 1x1 conv
output gives, `conv(x).view(B, H, D, S).transpose(-1, -2)`, are read and written in place.

The argument order is the one TensorRT's AOT plugin path passes: input pointers, then int32
scalars, then the output pointer. The softmax scale is a compile-time constant (TensorRT's
extra arguments are int32 only), folded with log2(e) so the kernel uses exp2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _attn_fwd(
    Q, K, V,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    num_heads, seq_q, seq_kv,
    Out,
    QK_SCALE: tl.constexpr,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products, not tf32
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(
        q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
        mask=(offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(0, seq_kv, BLOCK_N):
        cols = start_n + offs_n
        kt = tl.load(  # K^T tile (BLOCK_D, BLOCK_N)
            k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd,
            mask=(cols[None, :] < seq_kv) & (offs_d[:, None] < HEAD_DIM), other=0.0,
        )
        if IEEE:
            qk = tl.dot(q, kt, input_precision="ieee")
        else:
            qk = tl.dot(q, kt)
        qk = tl.where(cols[None, :] < seq_kv, qk * QK_SCALE, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + cols[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
            mask=(cols[:, None] < seq_kv) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0,
        )
        if IEEE:
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(
        o_base + offs_m[:, None] * stride_os + offs_dv[None, :] * stride_od,
        acc.to(Out.dtype.element_ty),
        mask=(offs_m[:, None] < seq_q) & (offs_dv[None, :] < HEAD_DIM_V),
    )


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration: a TensorRT tactic and an AOT variant."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def to_dict(self) -> dict:
        return asdict(self)


def block_dim(d: int) -> int:
    """Head dims are padded to a power of two >= 16 (the tensor core's K step)."""
    return max(16, triton.next_power_of_2(d))


def candidate_configs(head_dim: int, dtype_bytes: int) -> list[KernelConfig]:
    """The autotuning space for one head dim, pruned so the tiles fit registers and SMEM."""
    bd = block_dim(head_dim)
    configs = [
        KernelConfig(bm, bn, w, s)
        for bm in (64, 128)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3, 4)
    ]

    def keep(c: KernelConfig) -> bool:
        acc_regs = c.block_m * bd * 4 / (c.num_warps * 32 * 4)  # fp32 accumulator per thread
        smem = c.num_stages * c.block_n * bd * 2 * dtype_bytes + c.block_m * bd * dtype_bytes
        return acc_regs <= 128 and smem <= 200_000 and not (c.block_m == 128 and c.num_warps == 4 and bd >= 128)

    return [c for c in configs if keep(c)] or [KernelConfig(32, 32, 4, 1)]


def default_config(head_dim: int, dtype_bytes: int) -> KernelConfig:
    """A safe configuration when no tuned one is recorded."""
    bd = block_dim(head_dim)
    if bd <= 64:
        return KernelConfig(128, 64, 4, 3)
    if bd <= 128:
        return KernelConfig(128, 64, 8, 3)
    if bd <= 256:
        return KernelConfig(64, 32, 8, 2)
    return KernelConfig(32, 32, 8, 2)


def qk_scale(scale: float) -> float:
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a finite positive float, got {scale}")
    return scale * LOG2E
