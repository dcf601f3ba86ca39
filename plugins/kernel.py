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
import os
from dataclasses import asdict, dataclass

import triton
import triton.language as tl

from ..errors import PluginError

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
# TF32 operands rounded to nearest (cvt.rna), as cuBLAS rounds them: the tensor cores would otherwise
# drop the low 13 mantissa bits (truncation), 2-6x PyTorch's own TF32 error (run 29, H100). Off in
# Triton's CPU interpreter (no inline PTX there; its dots are fp32 anyway).
ROUND_TF32 = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def _tf32(x, IEEE: tl.constexpr):
    """An fp32 operand of a TF32 product, rounded to TF32 (to nearest); anything else as it is."""
    if ROUND_TF32 and not IEEE and x.dtype == tl.float32:
        x = tl.inline_asm_elementwise("cvt.rna.tf32.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    return x


@triton.jit
def _attn_fwd(
    Q, K, V,
    BIAS,  # the scores' additive bias (op.bias_dims: contiguous (bias_b, bias_h, bias_q, S_kv)), or None
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    num_heads, seq_q, seq_kv,
    bias_b, bias_h, bias_q,  # the bias's batch, head and row sizes (1: broadcast); unused without BIAS
    kv_group,  # query heads per K/V head (grouped-query attention; 1: one K/V head per query head)
    Out,
    Q_BIAS,  # heads*D values added to q (a Q conv's bias), or None (a constexpr: AOT kernels have none)
    QK_SCALE: tl.constexpr,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products, not tf32
    HAS_Q_BIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,  # > 0: the scaled scores soft-capped, softcap * tanh(s / softcap), before the bias
    # Which (s, d) strides are the constant 1, per tensor (the contiguous axis of each layout).
    QS1: tl.constexpr, QD1: tl.constexpr, KS1: tl.constexpr, KD1: tl.constexpr,
    VS1: tl.constexpr, VD1: tl.constexpr, OS1: tl.constexpr, OD1: tl.constexpr,
):
    # An AOT kernel serves every shape of a TensorRT profile, so it cannot be specialised on
    # "S is a multiple of 16" the way Triton's JIT specialises. It tests that at run time
    # (one uniform branch) and runs a body compiled with those alignment hints: 16-byte vector
    # loads along the contiguous axis. Both bodies do the same arithmetic.
    aligned = (_strides_rem(stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                            stride_vb, stride_vh, stride_vs, stride_vd, stride_ob, stride_oh, stride_os, stride_od)
               + _rem(seq_q) + _rem(seq_kv)) == 0
    if aligned:
        _attn_body(Q, K, V, Out, stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                   stride_vb, stride_vh, stride_vs, stride_vd, stride_ob, stride_oh, stride_os, stride_od,
                   num_heads, seq_q, seq_kv, Q_BIAS, BIAS, bias_b, bias_h, bias_q, kv_group,
                   QK_SCALE, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, IEEE, HAS_Q_BIAS, HAS_BIAS, SOFTCAP,
                   QS1, QD1, KS1, KD1, VS1, VD1, OS1, OD1, True)
    else:
        _attn_body(Q, K, V, Out, stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                   stride_vb, stride_vh, stride_vs, stride_vd, stride_ob, stride_oh, stride_os, stride_od,
                   num_heads, seq_q, seq_kv, Q_BIAS, BIAS, bias_b, bias_h, bias_q, kv_group,
                   QK_SCALE, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, IEEE, HAS_Q_BIAS, HAS_BIAS, SOFTCAP,
                   QS1, QD1, KS1, KD1, VS1, VD1, OS1, OD1, False)


@triton.jit
def _rem(x):
    """x % 16, but 0 for a stride of 1 (the contiguous axis needs no alignment)."""
    return (x % 16) * (x != 1)


@triton.jit
def _hint(x, ALIGNED: tl.constexpr, IS_ONE: tl.constexpr):
    """x itself, written so the compiler can prove it a multiple of 16 where the branch knows it
    is one (tl.multiple_of on a scalar argument does not reach the loads' alignment analysis)."""
    if ALIGNED and not IS_ONE:
        x = (x // 16) * 16
    return x


@triton.jit
def _strides_rem(sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod):
    """0 where every stride is a multiple of 16 (or the contiguous axis's 1)."""
    return (_rem(sqb) + _rem(sqh) + _rem(sqs) + _rem(sqd) + _rem(skb) + _rem(skh) + _rem(sks) + _rem(skd)
            + _rem(svb) + _rem(svh) + _rem(svs) + _rem(svd) + _rem(sob) + _rem(soh) + _rem(sos) + _rem(sod))


@triton.jit
def _hint_strides(sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod, ALIGNED: tl.constexpr,
                  QS1: tl.constexpr, QD1: tl.constexpr, KS1: tl.constexpr, KD1: tl.constexpr,
                  VS1: tl.constexpr, VD1: tl.constexpr, OS1: tl.constexpr, OD1: tl.constexpr):
    """The 16 strides `_hint`ed for an aligned body. Batch and head strides are never the constant 1 (the
    launcher passes 0 for size-1 axes)."""
    return (_hint(sqb, ALIGNED, False), _hint(sqh, ALIGNED, False), _hint(sqs, ALIGNED, QS1), _hint(sqd, ALIGNED, QD1),
            _hint(skb, ALIGNED, False), _hint(skh, ALIGNED, False), _hint(sks, ALIGNED, KS1), _hint(skd, ALIGNED, KD1),
            _hint(svb, ALIGNED, False), _hint(svh, ALIGNED, False), _hint(svs, ALIGNED, VS1), _hint(svd, ALIGNED, VD1),
            _hint(sob, ALIGNED, False), _hint(soh, ALIGNED, False), _hint(sos, ALIGNED, OS1), _hint(sod, ALIGNED, OD1))


@triton.jit
def _attn_body(
    Q, K, V, Out,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    num_heads, seq_q, seq_kv, Q_BIAS, BIAS, bias_b, bias_h, bias_q, kv_group,
    QK_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, HAS_Q_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    QS1: tl.constexpr, QD1: tl.constexpr, KS1: tl.constexpr, KD1: tl.constexpr,
    VS1: tl.constexpr, VD1: tl.constexpr, OS1: tl.constexpr, OD1: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    (stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh,
     stride_vs, stride_vd, stride_ob, stride_oh, stride_os, stride_od) = _hint_strides(
        stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh,
        stride_vs, stride_vd, stride_ob, stride_oh, stride_os, stride_od, ALIGNED, QS1, QD1, KS1, KD1, VS1, VD1, OS1, OD1)
    seq_q, seq_kv = _hint(seq_q, ALIGNED, False), _hint(seq_kv, ALIGNED, False)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    h_kv = h // kv_group  # ONNX's grouped-query order: query heads g*h_kv .. g*h_kv + g - 1 share K/V head h_kv
    k_base = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    # Wide heads: grid axis 2 splits the output's head dim into BLOCK_DV slices; each program
    # recomputes the scores for its slice of V (the fp32 accumulator of a whole 512-wide row
    # block would not fit in registers).
    dv0 = 0
    if BLOCK_DV < HEAD_DIM_V:
        dv0 = tl.program_id(2) * BLOCK_DV
        v_base += dv0.to(tl.int64) * stride_vd
        o_base += dv0.to(tl.int64) * stride_od

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    # Masks only where a tile crosses S: a masked load or store cannot be vectorised.
    full_m = (pid_m + 1) * BLOCK_M <= seq_q
    # Except Q's one load: masked but unconditional. Loaded under an `if`, Triton keeps Q as a
    # register operand of the dot instead of in shared memory: 128 registers a thread at D=512,
    # and the kernel spills (ptxas).
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if HAS_Q_BIAS:  # once per program, on the resident tile: no pass over Q, no copy of it
        bias = tl.load(Q_BIAS + h * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
        q = (q.to(tl.float32) + bias.to(tl.float32)[None, :]).to(q.dtype)
    q = _tf32(q, IEEE)
    bias_rows = _bias_rows(BIAS, b, h, offs_m, seq_q, seq_kv, bias_b, bias_h, bias_q, HAS_BIAS)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    n_full = (seq_kv // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        bias = _bias_tile(bias_rows, start_n, seq_kv, BLOCK_N, False, HAS_BIAS)  # issued first: it overlaps the product
        m_i, l_i, acc = _step(q, k_base, v_base, start_n, seq_kv, stride_ks, stride_kd, stride_vs, stride_vd, dv0,
                              m_i, l_i, acc, bias, QK_SCALE, HEAD_DIM, HEAD_DIM_V, BLOCK_D,
                              BLOCK_DV, BLOCK_N, IEEE, False, HAS_BIAS, SOFTCAP)
    if n_full < seq_kv:
        bias = _bias_tile(bias_rows, n_full, seq_kv, BLOCK_N, True, HAS_BIAS)
        m_i, l_i, acc = _step(q, k_base, v_base, n_full, seq_kv, stride_ks, stride_kd, stride_vs, stride_vd, dv0,
                              m_i, l_i, acc, bias, QK_SCALE, HEAD_DIM, HEAD_DIM_V, BLOCK_D,
                              BLOCK_DV, BLOCK_N, IEEE, True, HAS_BIAS, SOFTCAP)
    if HAS_BIAS:  # a row the bias masks whole (every score -inf) has l = 0: zeros, not 0/0
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_i[:, None]
    o_ptrs = o_base + offs_m[:, None] * stride_os + offs_dv[None, :] * stride_od
    dv_in = _dv_in(offs_dv, dv0, HEAD_DIM_V, BLOCK_DV)
    if full_m:
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=dv_in[None, :])
    else:
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m[:, None] < seq_q) & dv_in[None, :])


@triton.jit
def _bias_rows(BIAS, b, h, offs_m, seq_q, seq_kv, bias_b, bias_h, bias_q, HAS_BIAS: tl.constexpr):
    """Pointers to the rows `offs_m` of sample b, head h's bias (op.bias_dims broadcasting); BIAS without one."""
    bias_rows = BIAS
    if HAS_BIAS:
        plane = (bias_q + tl.zeros([], tl.int64)) * seq_kv  # not bias_q.to: the JIT passes a 1 as a constexpr int
        rows = tl.minimum(offs_m, seq_q - 1)  # a last block's rows past S_q read row S_q - 1: no row mask
        bias_rows = (BIAS + (b % bias_b).to(tl.int64) * bias_h * plane + (h % bias_h).to(tl.int64) * plane
                     + rows[:, None].to(tl.int64) * (seq_kv * (bias_q != 1)))
    return bias_rows


@triton.jit
def _bias_tile(bias_rows, start_n, seq_kv, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The bias tile of keys start_n .. start_n + BLOCK_N (0 past S_kv), fp32 times log2(e); None without a bias."""
    bias = None
    if HAS_BIAS:
        cols = start_n + tl.arange(0, BLOCK_N)
        if MASK_N:
            bias = tl.load(bias_rows + cols[None, :], mask=cols[None, :] < seq_kv, other=0.0)
        else:
            bias = tl.load(bias_rows + cols[None, :])
        bias = bias.to(tl.float32) * _LOG2E  # in the exp2 domain, as the scale is
    return bias


@triton.jit
def _dv_in(offs_dv, dv0, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Which of this program's output columns exist. Compile-time wherever it can be (a
    run-time bound would cost the vectorised loads and stores)."""
    if BLOCK_DV >= HEAD_DIM_V:
        return offs_dv < HEAD_DIM_V
    elif HEAD_DIM_V % BLOCK_DV == 0:
        return offs_dv < BLOCK_DV
    else:
        return offs_dv < HEAD_DIM_V - dv0


@triton.jit
def _step(q, k_base, v_base, start_n, seq_kv, stride_ks, stride_kd, stride_vs, stride_vd, dv0, m_i, l_i, acc,
          bias, QK_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
          BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
          MASK_N: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """One key/value tile: scores (plus the bias tile `_bias_tile` loaded), online-softmax update, P V.
    MASK_N only for the last tile."""
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kt_ptrs = k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd  # K^T tile (BLOCK_D, BLOCK_N)
    v_ptrs = v_base + cols[:, None] * stride_vs + offs_dv[None, :] * stride_vd
    dv_in = _dv_in(offs_dv, dv0, HEAD_DIM_V, BLOCK_DV)
    if MASK_N:
        kt = tl.load(kt_ptrs, mask=(cols[None, :] < seq_kv) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        v = tl.load(v_ptrs, mask=(cols[:, None] < seq_kv) & dv_in[None, :], other=0.0)
    else:
        kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        v = tl.load(v_ptrs, mask=dv_in[None, :], other=0.0)
    if IEEE:
        qk = tl.dot(q, kt, input_precision="ieee")
    else:
        qk = tl.dot(q, _tf32(kt, IEEE))
    qk = qk * QK_SCALE
    if SOFTCAP > 0:  # in log2 units: qk = s log2(e); tanh(s / c) = 1 - 2 / (exp(2 s / c) + 1), finite at any s
        qk = (1.0 - 2.0 / (tl.math.exp2(qk * (2.0 / SOFTCAP)) + 1.0)) * (SOFTCAP * _LOG2E)
    if HAS_BIAS:
        qk += bias
    if MASK_N:
        qk = tl.where(cols[None, :] < seq_kv, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = m_new
    if HAS_BIAS:  # every score so far -inf (masked): subtract 0, not -inf (-inf - -inf is NaN)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(_tf32(p.to(v.dtype), IEEE), _tf32(v, IEEE), acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _attn_windows(
    Q, K, V, BIAS,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    num_heads, seq_q, seq_kv, bias_b, bias_h, bias_q, kv_group, batch,
    Out,
    Q_BIAS,
    QK_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, HAS_Q_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    QS1: tl.constexpr, QD1: tl.constexpr, KS1: tl.constexpr, KD1: tl.constexpr,
    VS1: tl.constexpr, VD1: tl.constexpr, OS1: tl.constexpr, OD1: tl.constexpr,
    WINDOWS: tl.constexpr,
):
    """Short sequences (S_kv <= BLOCK_N: one key tile, as Swin's 7x7 windows are), WINDOWS samples per
    program: samples c, c + n, c + 2n, ... with n = `window_stride` a multiple of the bias's batch, so
    every sample of a program reads the same bias rows (Swin's shared (1, H, S, S) table, or its shifted
    windows' (windows, H, S, S) masks), loaded and converted once. Same arithmetic as `_attn_fwd` (one
    `_step`). Strides are tested at run time as there (one uniform branch); S is not."""
    aligned = _strides_rem(stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                           stride_vb, stride_vh, stride_vs, stride_vd, stride_ob, stride_oh, stride_os, stride_od) == 0
    if aligned:
        _windows_body(Q, K, V, Out, stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                      stride_vb, stride_vh, stride_vs, stride_vd, stride_ob, stride_oh, stride_os, stride_od,
                      num_heads, seq_q, seq_kv, Q_BIAS, BIAS, bias_b, bias_h, bias_q, kv_group, batch,
                      QK_SCALE, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, IEEE, HAS_Q_BIAS, HAS_BIAS,
                      SOFTCAP, QS1, QD1, KS1, KD1, VS1, VD1, OS1, OD1, WINDOWS, True)
    else:
        _windows_body(Q, K, V, Out, stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                      stride_vb, stride_vh, stride_vs, stride_vd, stride_ob, stride_oh, stride_os, stride_od,
                      num_heads, seq_q, seq_kv, Q_BIAS, BIAS, bias_b, bias_h, bias_q, kv_group, batch,
                      QK_SCALE, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, IEEE, HAS_Q_BIAS, HAS_BIAS,
                      SOFTCAP, QS1, QD1, KS1, KD1, VS1, VD1, OS1, OD1, WINDOWS, False)


@triton.jit
def _windows_body(
    Q, K, V, Out,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    num_heads, seq_q, seq_kv, Q_BIAS, BIAS, bias_b, bias_h, bias_q, kv_group, batch,
    QK_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, HAS_Q_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    QS1: tl.constexpr, QD1: tl.constexpr, KS1: tl.constexpr, KD1: tl.constexpr,
    VS1: tl.constexpr, VD1: tl.constexpr, OS1: tl.constexpr, OD1: tl.constexpr,
    WINDOWS: tl.constexpr, ALIGNED: tl.constexpr,
):
    (stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh,
     stride_vs, stride_vd, stride_ob, stride_oh, stride_os, stride_od) = _hint_strides(
        stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh,
        stride_vs, stride_vd, stride_ob, stride_oh, stride_os, stride_od, ALIGNED, QS1, QD1, KS1, KD1, VS1, VD1, OS1, OD1)
    pid_m = tl.program_id(0)
    h = tl.program_id(1) % num_heads
    c = tl.program_id(1) // num_heads
    n = tl.cdiv(batch // bias_b, WINDOWS) * bias_b  # window_stride
    h_kv = h // kv_group
    dv0 = 0
    o_dv = Out
    if BLOCK_DV < HEAD_DIM_V:
        dv0 = tl.program_id(2) * BLOCK_DV
        V += dv0.to(tl.int64) * stride_vd
        o_dv += dv0.to(tl.int64) * stride_od
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_in = _dv_in(offs_dv, dv0, HEAD_DIM_V, BLOCK_DV)
    q_bias = None
    if HAS_Q_BIAS:
        q_bias = tl.load(Q_BIAS + h * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0).to(tl.float32)
    # every sample of this program reads bias[c % bias_b]: loaded once, loop-invariant
    bias = _bias_tile(_bias_rows(BIAS, c, h, offs_m, seq_q, seq_kv, bias_b, bias_h, bias_q, HAS_BIAS), 0, seq_kv,
                      BLOCK_N, True, HAS_BIAS)
    for g in range(WINDOWS):
        # no branch: a sample past the batch recomputes the last one and stores nothing, so the loop is
        # straight-line code that the pipeliner may prefetch (num_stages)
        b_out = c + g * n
        b = tl.minimum(b_out, batch - 1)
        q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        if HAS_Q_BIAS:
            q = (q.to(tl.float32) + q_bias[None, :]).to(q.dtype)
        q = _tf32(q, IEEE)
        k_base = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        m_i, l_i, acc = _step(q, k_base, v_base, 0, seq_kv, stride_ks, stride_kd, stride_vs, stride_vd, dv0,
                              m_i, l_i, acc, bias, QK_SCALE, HEAD_DIM, HEAD_DIM_V, BLOCK_D,
                              BLOCK_DV, BLOCK_N, IEEE, True, HAS_BIAS, SOFTCAP)
        if HAS_BIAS:
            l_i = tl.where(l_i == 0.0, 1.0, l_i)
        acc = acc / l_i[:, None]
        o_ptrs = (o_dv + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                  + offs_m[:, None] * stride_os + offs_dv[None, :] * stride_od)
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m[:, None] < seq_q) & dv_in[None, :] & (b_out < batch))


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration: a TensorRT tactic and an AOT variant."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # Register cap. The kernel carries two bodies (aligned and not) and its register count is
    # the larger one's; 128 keeps the hot aligned body at two 8-warp blocks per SM without
    # spilling (ptxas: 150 -> 123 registers for D=64), which the AOT kernel needs to match JIT.
    maxnreg: int | None = None
    # Output head-dim columns per program, for heads too wide for one accumulator (grid axis 2
    # runs cdiv(head_dim_v, block_dv) programs); None: the whole head in one program.
    block_dv: int | None = None
    # Samples per program of the short-sequence kernel `_attn_windows` (S_kv <= block_n: one key tile);
    # None: `_attn_fwd`, one (sample, head) per program.
    windows: int | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("block_dv", "windows") or v is not None}

    def programs_y(self, batch, heads, bias_batch=1, cdiv=lambda a, b: -(-a // b)):
        """Grid y: a program per (sample, head), or per (WINDOWS samples, head) (`window_stride`)."""
        return (window_stride(batch, self.windows, bias_batch, cdiv) if self.windows else batch) * heads

    def dv_block(self, head_dim_v: int) -> int:
        """BLOCK_DV: this config's slice, or the whole (padded) head."""
        return min(self.block_dv, block_dim(head_dim_v)) if self.block_dv else block_dim(head_dim_v)

    def dv_programs(self, head_dim_v: int) -> int:
        """Programs per row block along grid z (head_dim_v is static, even in TensorRT)."""
        return -(-head_dim_v // self.dv_block(head_dim_v))


def window_stride(batch, windows: int, bias_batch=1, cdiv=lambda a, b: -(-a // b)):
    """`_attn_windows`' programs per head: its samples c, c + n, c + 2n, ... share bias[c % bias_batch]
    because n is a multiple of bias_batch (which divides the batch, `op.bias_dims`)."""
    return cdiv(batch // bias_batch, windows) * bias_batch


def block_dim(d: int) -> int:
    """Head dims are padded to a power of two >= 16 (the tensor core's K step)."""
    return max(16, triton.next_power_of_2(d))


# Largest shared-memory allocation of one block, by compute capability (CUDA programming guide).
SMEM_LIMITS = {70: 96 * 1024, 75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024,
               90: 227 * 1024}
SMEM_LIMIT = SMEM_LIMITS[90]


def smem_limit(arch: int | str) -> int:
    """The per-block limit for an arch given as 90 or "sm_90"; unknown ones get the smallest recent one."""
    cc = int(str(arch).removeprefix("sm_").rstrip("a"))
    return SMEM_LIMITS.get(cc, 99 * 1024)


def candidate_configs(head_dim: int, dtype_bytes: int, head_dim_v: int | None = None,
                      smem: int = SMEM_LIMIT) -> list[KernelConfig]:
    """The autotuning space for one head dim, pruned so the tiles fit registers and SMEM.

    Heads wider than 256 (the Stable Diffusion VAE's 512) get their own short list, mostly
    configs that split the output's head dim over programs (block_dv 256 or 128): a whole
    512-wide fp32 accumulator fits the registers of 64 query rows at most, and 64-row programs
    were 1.3-1.7x slower than 128-row ones with block_dv=256 on the H100. Short, because
    TensorRT compiles every tactic while it builds."""
    bd, bdv = block_dim(head_dim), block_dim(head_dim_v or head_dim)
    if max(bd, bdv) > 256:
        configs = [KernelConfig(bm, bn, w, st, None, dv) for bm, bn, w, st, dv in (
            (128, 64, 8, 1, 256), (128, 32, 8, 1, 256), (128, 32, 8, 2, 256), (64, 64, 8, 1, 256), (64, 32, 4, 3, 256),
            (128, 64, 8, 1, 128), (128, 64, 4, 1, 128), (128, 32, 8, 2, 128), (64, 64, 8, 2, 128), (64, 64, 4, 2, 128),
            (64, 64, 8, 1, None), (32, 32, 8, 1, 256), (32, 32, 4, 1, 128), (32, 32, 4, 2, 128))]
    else:
        configs = [
            KernelConfig(bm, bn, w, st, register_cap(bm, bd, w, bn, dtype_bytes))
            for bm, bn, w in ((128, 64, 4), (128, 64, 8), (128, 128, 8), (128, 128, 4), (128, 32, 4), (64, 64, 4),
                              (64, 128, 4), (64, 32, 4), (32, 32, 4), (32, 32, 8))
            for st in (2, 3)
        ]

    def keep(c: KernelConfig) -> bool:
        dv = c.dv_block(bdv)
        acc_regs = c.block_m * dv / (c.num_warps * 32)  # fp32 accumulator per thread
        need = smem_estimate(c, head_dim, dtype_bytes, head_dim_v)
        return acc_regs <= 128 and need <= smem and (dv <= 128 or c.block_m <= 64 or c.block_dv is not None)

    # Nothing fits (fp32 wide heads on a 99 KB GPU): the smallest tiles the tensor-core dot allows.
    return [c for c in configs if keep(c)] or [KernelConfig(16, 16, 4, 1, None, 128 if bdv > 128 else None)]


def smem_estimate(c: KernelConfig, head_dim: int, dtype_bytes: int, head_dim_v: int | None = None) -> int:
    """Shared memory bytes a config takes: Q stays in shared memory; K and V tiles take one buffer
    per pipeline stage (the kernel's two bodies, aligned and not, reuse the same allocation); exact
    fp32 products (FMA dots) also convert the fp32 P tile through shared memory. At least what Triton
    3.6 allocated for every config measured (H200, benchmarks/results/no_opt_in_*.md: fp32 d=8 at
    128x128 took 88 KiB, where the tiles alone are 40)."""
    bd, dv = block_dim(head_dim), c.dv_block(block_dim(head_dim_v or head_dim))
    p_tile = c.block_m * c.block_n * 4 if dtype_bytes == 4 else 0
    return dtype_bytes * (c.block_m * bd + c.num_stages * c.block_n * (bd + dv)) + p_tile


# Dynamic shared memory a kernel may take without an opt-in (cuFuncSetAttribute(
# CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)); whether TensorRT opts an AOT plugin's kernel in is
# not documented, so every node also gets a tactic within it (`no_opt_in_config`).
SMEM_WITHOUT_OPT_IN = 48 * 1024


def no_opt_in_config(head_dim: int, dtype_bytes: int, head_dim_v: int | None = None) -> KernelConfig | None:
    """The largest-tile config within SMEM_WITHOUT_OPT_IN (it needs no scratch either), None where
    none exists: fp32 heads wider than 256 (a 16-row Q tile and a 16-key K tile of 512 fp32 columns
    are 64 KiB)."""
    wide = block_dim(head_dim_v or head_dim) > 128
    small = [KernelConfig(bm, bn, w, st, None, 128 if wide else None)
             for bm, bn, w, st in ((64, 32, 4, 2), (64, 32, 4, 1), (32, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1))]
    fits = [c for c in (*candidate_configs(head_dim, dtype_bytes, head_dim_v), *small)
            if smem_estimate(c, head_dim, dtype_bytes, head_dim_v) <= SMEM_WITHOUT_OPT_IN]
    return max(fits, key=lambda c: (c.block_m, c.block_n, c.num_stages), default=None)


def register_cap(block_m: int, block_d: int, num_warps: int, block_n: int = 64, dtype_bytes: int = 2) -> int | None:
    """128 registers for 16-bit inputs where the fp32 accumulator and the K tile each take
    <= 32 per thread (ptxas reports no spills there for D=8..64); else no cap: bigger tiles,
    and fp32's FMA-pipe dot, would spill."""
    threads = num_warps * 32
    small = block_m * block_d // threads <= 32 and block_n * block_d // threads <= 32
    return 128 if small and dtype_bytes == 2 else None


def default_config(head_dim: int, dtype_bytes: int, head_dim_v: int | None = None,
                   smem: int = SMEM_LIMIT) -> KernelConfig:
    """A safe configuration when no tuned one is recorded: the first preferred shape that fits."""
    bd = block_dim(head_dim)
    fitting = candidate_configs(head_dim, dtype_bytes, head_dim_v, smem)
    preferred = [KernelConfig(bm, bn, w, s, register_cap(bm, bd, w, bn, dtype_bytes))
                 for bm, bn, w, s in ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2))]
    # Wide heads, fastest first on the H100 (8.5, 19.8, 39 ms at B=4, S=16384); the later ones fit
    # the smaller shared memory of sm_80 (163 KB) and sm_86/89 (99 KB).
    preferred[:0] = [KernelConfig(128, 64, 8, 1, None, 256), KernelConfig(64, 64, 8, 1, None, 256),
                     KernelConfig(32, 32, 4, 2, None, 128)]
    for c in preferred:
        if c in fitting:
            return c
    return fitting[-1]


def windows_config(pairs: int, seq_q: int, seq_kv: int, head_dim: int, dtype_bytes: int, sms: int = 132,
                   head_dim_v: int | None = None, shared: int | None = None) -> KernelConfig | None:
    """The short-sequence kernel's config where it serves (S_kv <= 64, heads <= 128 wide), else None.
    `pairs`: batch x heads. Samples per program: 4 where that still leaves >= 2 programs per SM, fewer
    on small batches; 1 for fp32 (FMA-bound: parallelism wins); at most `shared`, the samples that share
    one bias slice (batch // the bias's batch: a program's samples past them would only be recomputed).
    H200, run 44 (Swin's 512 windows x 3 heads of 49 pixels): 7.4 us unbiased, 9.0 biased, where
    `_attn_fwd`'s best configs take 9.4 and 13.0."""
    if seq_kv > 64 or max(block_dim(head_dim), block_dim(head_dim_v or head_dim)) > 128:
        return None
    windows = 1 if dtype_bytes == 4 else 4 if pairs >= 8 * sms else 2 if pairs >= 4 * sms else 1
    if shared is not None:  # no more than the samples that share one bias slice (the rest would be recomputed)
        windows = max(1, min(windows, shared))
    return KernelConfig(min(64, block_dim(seq_q)), block_dim(seq_kv), 4, 2, windows=windows)


def unit_flags(ones) -> dict:
    """The QS1..OD1 constexprs from the names ("qs", "kd", ...) of the strides that are 1."""
    return {f"{t}{a}1".upper(): f"{t}{a}" in ones for t in "qkvo" for a in "sd"}


def qk_scale(scale: float) -> float:
    if not (math.isfinite(scale) and scale > 0):
        raise PluginError(f"scale: expected a finite positive float, got {scale}")
    return scale * LOG2E
