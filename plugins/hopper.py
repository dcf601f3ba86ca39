"""Head dim 512 on Hopper: a Gluon flash-attention kernel that computes each score once.

Why a second kernel: a 128-row x 512-column fp32 accumulator is the whole register file, so the
Triton kernel splits the head over programs and each one recomputes Q K^T for its slice of V
(1.5x the tensor-core work; 8.5 ms for the SD VAE at B=4, 128x128 on an H100). Triton cannot be
told to do otherwise: it puts every warp of a chained dot along the rows. Gluon can:

- one CTA = 64 query rows and two warpgroups side by side (warps_per_cta [4, 2]);
- S = Q K^T: each warpgroup computes half of the 64 key columns, reading Q and K from shared
  memory (TMA); the row max is one cross-warpgroup reduction;
- P goes through shared memory, so each warpgroup's O += P V sees all 64 keys and owns half of
  the 512 output columns: 64 x 256 fp32 = 128 registers a thread;
- FlashAttention-3's order: Q K^T of the next key block and P V of this one are in flight
  together, and the softmax of the next block runs while P V finishes.
- a Q conv's bias (`q_bias`) is added once to the resident Q tile, sparing a pass over Q.

The same kernel compiles for head dims 64, 128 and 256 (no spills, ptxas), but is slower there
than the Triton kernel (run 29, H100): `plan.hopper_plan` runs the warp-specialized kernel of
`hopper_ws` at 64 and 128, this one (`wide_attention`) at 256 and 512; `plan.jit_plan` says where the
JIT path uses them (`HEAD_DIMS`: where the AOT path offers them as a tactic).

What it takes: sm_90, fp16/bf16, a head_dim of `HEAD_DIMS` for Q, K and V, and the views a 1x1 conv gives
(pixels contiguous, heads stacked in the channels, rows 16-byte aligned) for TMA. Anything else
runs the Triton kernel.

Two entry points share the body (`_attend`): `_wide_attn_fwd` (JIT) takes TMA descriptors made on
the host, 128-byte kernel parameters that TensorRT's AOT interface cannot pass; `_wide_attn_aot`
takes TensorRT's argument list (pointers, int32 extras) and makes the descriptors on the device,
in Triton's global scratch, which the TensorRT plugin provides as its second output
(`aot.compile_hopper_artifact`, `op.scratch_shape`). It serves a node where `aot_problem` says so.
"""

from __future__ import annotations

from functools import cache

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .kernel import LOG2E
from .op import HOPPER_HEAD_DIMS

HEAD_DIM = 512  # the Stable Diffusion VAE's, and the one `plan.jit_plan` sends here
HEAD_DIMS = HOPPER_HEAD_DIMS  # compile without spills; two TMA boxes of D/2 <= 256 rows
BLOCK_M, BLOCK_N, NUM_WARPS = 64, 64, 8
_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


@gluon.jit
def _load(desc, row, col, bar, smem, D: gl.constexpr):
    """A [D, cols] tile as two TMA boxes (a box is at most 256 rows), one barrier."""
    mbarrier.expect(bar, 2 * desc.block_type.nbytes)
    for c in gl.static_range(2):
        tma.async_copy_global_to_shared(desc, [row + c * (D // 2), col], bar, smem.slice(c * (D // 2), D // 2))


@gluon.jit
def _add_bias(q_smem, bias_ptr, D: gl.constexpr, BLOCK_M: gl.constexpr, num_warps: gl.constexpr):
    """Q^T tile [D, BLOCK_M] += bias[:, None] in shared memory, once per CTA: the Q conv's bias,
    which would otherwise cost a pass over Q (a broadcast add, 0.11 ms at 4 x 512 x 128x128)."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    for c in gl.static_range(2):  # half a tile at a time: 32 registers a thread
        part = q_smem.slice(c * (D // 2), D // 2)
        bias = gl.load(bias_ptr + c * (D // 2) + gl.arange(0, D // 2, layout=gl.SliceLayout(1, layout)))
        part.store((part.load(layout).to(gl.float32) + gl.expand_dims(bias.to(gl.float32), 1)).to(q_smem.dtype))
    fence_async_shared()  # the tensor cores read what the threads wrote
    gl.thread_barrier()


@gluon.jit
def _softmax(s, m_i, l_i, col0, cols, seq_kv, qk_scale, EVEN_N: gl.constexpr):
    s = s * qk_scale
    if not EVEN_N:
        s = gl.where(gl.expand_dims(col0 + cols < seq_kv, 0), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s - gl.expand_dims(m_new, 1))
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def _wide_attn_fwd(q_desc, k_desc, v_desc, out_ptr, q_bias_ptr, stride_ob, stride_oh, stride_os, stride_od,
                   q_batch_rows, k_batch_rows, v_batch_rows, num_heads, seq_q, seq_kv, qk_scale,
                   D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, EVEN_N: gl.constexpr,
                   HAS_Q_BIAS: gl.constexpr, num_warps: gl.constexpr):
    """The JIT entry: TMA descriptors made on the host (128-byte kernel parameters)."""
    _attend(q_desc, k_desc, v_desc, out_ptr, q_bias_ptr, stride_ob, stride_oh, stride_os, stride_od,
            q_batch_rows, k_batch_rows, v_batch_rows, num_heads, seq_q, seq_kv, qk_scale,
            D, BLOCK_M, BLOCK_N, EVEN_N, HAS_Q_BIAS, num_warps)


@gluon.jit
def _wide_attn_aot(Q, K, V, stride_ob, stride_oh, stride_os, stride_od, batch, num_heads, seq_q, seq_kv, Out,
                   QK_SCALE: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   EVEN_N: gl.constexpr, num_warps: gl.constexpr):
    """The AOT entry, in TensorRT's argument order (inputs, int32 extras, output): contiguous 1x1-conv
    maps (B, H*D, S) and the descriptors made here, on the device. Triton keeps them in its hidden
    `global_scratch` parameter (one slot per program), which the plugin's second output fills."""
    q_desc, k_desc, v_desc = device_descriptors(Q, K, V, batch * num_heads * D, seq_q, seq_kv, D // 2, BLOCK_M, BLOCK_N)
    _attend(q_desc, k_desc, v_desc, Out, Out, stride_ob, stride_oh, stride_os, stride_od,
            num_heads * D, num_heads * D, num_heads * D, num_heads, seq_q, seq_kv, QK_SCALE,
            D, BLOCK_M, BLOCK_N, EVEN_N, False, num_warps)


@gluon.jit
def device_descriptors(Q, K, V, rows, seq_q, seq_kv, BOX_ROWS: gl.constexpr, Q_COLS: gl.constexpr,
                       KV_COLS: gl.constexpr):
    """TMA descriptors of contiguous (B, H*D, S) maps, [rows, pixel] in boxes of [BOX_ROWS, cols], made
    on the device: the AOT entries' view (Triton keeps them in its global scratch)."""
    tile: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    q_desc = tma.make_tensor_descriptor(Q, [rows, seq_q], [seq_q, 1], [BOX_ROWS, Q_COLS], tile)
    k_desc = tma.make_tensor_descriptor(K, [rows, seq_kv], [seq_kv, 1], [BOX_ROWS, KV_COLS], tile)
    v_desc = tma.make_tensor_descriptor(V, [rows, seq_kv], [seq_kv, 1], [BOX_ROWS, KV_COLS], tile)
    return q_desc, k_desc, v_desc


@gluon.jit
def _attend(q_desc, k_desc, v_desc, out_ptr, q_bias_ptr, stride_ob, stride_oh, stride_os, stride_od,
            q_batch_rows, k_batch_rows, v_batch_rows, num_heads, seq_q, seq_kv, qk_scale,
            D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, EVEN_N: gl.constexpr,
            HAS_Q_BIAS: gl.constexpr, num_warps: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    bh = gl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    off_m = gl.program_id(0) * BLOCK_M
    k_row = b * k_batch_rows + h * D
    v_row = b * v_batch_rows + h * D

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, BLOCK_N // 2, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, D // 2, 16])
    q_smem = gl.allocate_shared_memory(dtype, [D, BLOCK_M], q_desc.layout)  # Q^T, K^T, V^T tiles
    k_smem = gl.allocate_shared_memory(dtype, [D, BLOCK_N], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [D, BLOCK_N], v_desc.layout)
    # One P buffer: P(j+1) is stored only after P(j) V(j) has retired.
    p_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_N], gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dtype))
    bars = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
    bar_q, bar_k, bar_v = bars.index(0), bars.index(1), bars.index(2)
    for i in gl.static_range(3):
        mbarrier.init(bars.index(i), count=1)
    _load(q_desc, b * q_batch_rows + h * D, off_m, bar_q, q_smem, D)
    _load(k_desc, k_row, 0, bar_k, k_smem, D)
    _load(v_desc, v_row, 0, bar_v, v_smem, D)

    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, gl.SliceLayout(1, s_layout))
    n_blocks = gl.cdiv(seq_kv, BLOCK_N)

    # Block 0's scores, then K of block 1 streams in while block 0's softmax runs.
    mbarrier.wait(bar_q, 0)
    if HAS_Q_BIAS:
        _add_bias(q_smem, q_bias_ptr + h * D, D, BLOCK_M, num_warps)
    mbarrier.wait(bar_k, 0)
    s = warpgroup_mma(q_smem.permute((1, 0)), k_smem, s_zero, use_acc=False)
    gl.thread_barrier()  # both warpgroups are done with K
    if n_blocks > 1:
        _load(k_desc, k_row, BLOCK_N, bar_k, k_smem, D)
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, 0, cols, seq_kv, qk_scale, EVEN_N)
    p_smem.store(p.to(dtype))
    fence_async_shared()
    gl.thread_barrier()
    for j in range(n_blocks - 1):
        # S(j+1) = Q K(j+1)^T and O += P(j) V(j), both in flight; wgmma groups retire in order.
        mbarrier.wait(bar_k, (j + 1) & 1)
        s = warpgroup_mma(q_smem.permute((1, 0)), k_smem, s_zero, use_acc=False, is_async=True)
        mbarrier.wait(bar_v, j & 1)
        acc = warpgroup_mma(p_smem, v_smem.permute((1, 0)), acc, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
        gl.thread_barrier()
        if j + 2 < n_blocks:
            _load(k_desc, k_row, (j + 2) * BLOCK_N, bar_k, k_smem, D)
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, (j + 1) * BLOCK_N, cols, seq_kv, qk_scale, EVEN_N)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        gl.thread_barrier()  # both warpgroups are done with V(j) and P(j)
        _load(v_desc, v_row, (j + 1) * BLOCK_N, bar_v, v_smem, D)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        p_smem.store(p.to(dtype))
        fence_async_shared()
        gl.thread_barrier()
    mbarrier.wait(bar_v, (n_blocks - 1) & 1)
    acc = warpgroup_mma(p_smem, v_smem.permute((1, 0)), acc)
    for i in gl.static_range(3):
        mbarrier.invalidate(bars.index(i))

    acc = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
    # Stored with the rows (pixels) fastest, the contiguous axis of an NCHW output.
    st_layout: gl.constexpr = gl.BlockedLayout([4, 1], [16, 2], [1, num_warps], [0, 1])
    o = gl.convert_layout(acc.to(dtype), st_layout)
    rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, st_layout))
    dcol = gl.arange(0, D, layout=gl.SliceLayout(0, st_layout))
    ptrs = out_ptr + b * stride_ob + h * stride_oh + gl.expand_dims(rows, 1) * stride_os + gl.expand_dims(dcol, 0) * stride_od
    gl.store(ptrs, o, mask=gl.expand_dims(rows < seq_q, 1))


AOT_LAYOUTS = ("NCHW", "BHDS")  # Q, K, V of the AOT kernel: contiguous (B, H*D, S) maps, as 1x1 convs write them


def aot_problem(arch: str, dtype: str, head_dim: int, head_dim_v: int, layouts, seq_q, seq_kv) -> str | None:
    """Why the AOT kernel (`aot.compile_hopper_artifact`) cannot serve a TensorRT node; None when it can.
    `seq_q`, `seq_kv`: ints where the network fixes them at build, else None (a TMA descriptor's rows
    must be a multiple of 16 bytes, and a plugin cannot choose its kernel at run time)."""
    if arch != "sm_90":
        return f"needs a Hopper (sm_90) GPU, got {arch}"
    if dtype not in ("fp16", "bf16"):
        return f"fp16/bf16 only, got {dtype}"
    if head_dim not in HEAD_DIMS or head_dim_v != head_dim:
        return f"head_dim one of {HEAD_DIMS} for Q, K and V, got {head_dim} and {head_dim_v}"
    if any(layout not in AOT_LAYOUTS for layout in layouts[:3]):
        return f"Q, K, V layouts among {AOT_LAYOUTS}, got {tuple(layouts[:3])}"
    if seq_q is None or seq_kv is None:
        return "the sequence lengths vary with the profile (TMA needs them fixed at build, rows of 16-byte multiples)"
    if (seq_q * 2) % 16 or (seq_kv * 2) % 16:
        return f"TMA needs 16-byte aligned rows (pixels per map {seq_q}, {seq_kv})"
    return None


def unsupported(q, k, v) -> str | None:
    """Why this kernel cannot take (q, k, v) (B, H, S, D) views; None when it can."""
    from .device import device_arch

    if q.device.type != "cuda" or device_arch(q.device)[0] != "sm_90":
        return "needs a Hopper (sm_90) GPU"
    return layout_problem(q, k, v)


def layout_problem(q, k, v) -> str | None:
    """What in the dtypes, head dims or strides rules the kernel out; None when nothing does."""
    if q.dtype not in _GL_DTYPES:
        return f"fp16/bf16 only, got {q.dtype}"
    if q.shape[3] not in HEAD_DIMS or v.shape[3] != q.shape[3]:
        return f"head_dim one of {HEAD_DIMS} for Q, K and V, got {q.shape[3]} and {v.shape[3]}"
    for name, t in zip("qkv", (q, k, v)):
        rows = t.stride(3)
        heads_stacked = t.shape[1] == 1 or t.stride(1) == t.shape[3] * rows
        if t.stride(2) != 1 or not heads_stacked or (t.shape[0] > 1 and t.stride(0) % rows):
            return f"{name}: not a 1x1-conv output view (strides {t.stride()})"
        if (rows * t.element_size()) % 16 or t.data_ptr() % 16:
            return f"{name}: TMA needs 16-byte aligned rows (pixels per map {rows})"
    return None


@cache
def _tile_layout(dtype, rows: int, cols: int):
    """The shared-memory layout of a [rows, cols] tile, asked once (it is per-launch CPU time)."""
    return gl.NVMMASharedLayout.get_default_for([rows, cols], _GL_DTYPES[dtype])


def descriptor(t, box_rows: int, box_cols: int = BLOCK_M):
    """A 2-D TMA view [row, pixel] of a (B, H, S, D) conv-output view, row = b * batch_rows + h * D + d,
    in boxes of [box_rows, box_cols]; and batch_rows."""
    b, h, s, d = t.shape
    batch_rows = t.stride(0) // t.stride(3) if b > 1 else h * d
    shape = [(b - 1) * batch_rows + h * d, s]
    layout = _tile_layout(t.dtype, box_rows, box_cols)
    return TensorDescriptor(t, shape, [t.stride(3), 1], [box_rows, box_cols], layout), batch_rows


def wide_attention(q, k, v, out, scale: float, q_bias=None) -> None:
    """softmax(scale * (q + q_bias) k^T) v into `out` (any strides); q_bias: H*D contiguous
    values or None. `plan.hopper_plan` runs it at head dims 256 and 512 (`hopper_ws` at 64 and 128).
    The caller checked `unsupported`."""
    b, h, s_q, d = q.shape
    (qd, qr), (kd, kr), (vd, vr) = (descriptor(t, d // 2) for t in (q, k, v))
    _wide_attn_fwd[(triton.cdiv(s_q, BLOCK_M), b * h)](
        qd, kd, vd, out, out if q_bias is None else q_bias, *out.stride(), qr, kr, vr, h, s_q, k.shape[2],
        scale * LOG2E, D=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, EVEN_N=k.shape[2] % BLOCK_N == 0,
        HAS_Q_BIAS=q_bias is not None, num_warps=NUM_WARPS)


def compile_for_hopper(dtype=torch.float16, even_n: bool = True, q_bias: bool = False, head_dim: int = HEAD_DIM):
    """The kernel compiled for sm_90 without a GPU (tests: it builds, fits shared memory)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    t = torch.empty(1, head_dim, 64, dtype=dtype).view(1, 1, head_dim, 64).transpose(2, 3)
    desc = mangle_type(descriptor(t, head_dim // 2)[0])
    names = _wide_attn_fwd.arg_names
    constexprs = {"D": head_dim, "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "EVEN_N": even_n, "HAS_Q_BIAS": q_bias,
                  "num_warps": NUM_WARPS}
    ptr = "*" + mangle_type(t)[1:]
    kinds = {"q_desc": desc, "k_desc": desc, "v_desc": desc, "out_ptr": ptr, "q_bias_ptr": ptr, "qk_scale": "fp32"}
    signature = {n: "constexpr" if n in constexprs else kinds.get(n, "i32") for n in names}
    src = GluonASTSource(_wide_attn_fwd, signature, constexprs={(names.index(n),): c for n, c in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": NUM_WARPS})
