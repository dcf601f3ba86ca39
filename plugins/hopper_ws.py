"""Head dims 64 and 128 on Hopper: a warp-specialized Gluon flash-attention kernel (FlashAttention-3's plan).

The Triton kernel is one warpgroup doing everything in turn: it waits for its own loads, and its
softmax stalls the tensor cores. Here a CTA has a producer and 2 or 3 consumers (`gl.warp_specialize`):
- a producer warp that only issues TMA loads: each consumer's Q tile once, then K and V tiles
  into rings of `WsConfig.stages` buffers, each guarded by a ready and an empty mbarrier;
- consumer warpgroups of 64 query rows each (128 or 192 per CTA), sharing every K and V tile; each
  runs FA3's intra-warpgroup overlap: S(j+1) = Q K(j+1)^T and O += P(j) V(j) are in flight
  together while the softmax of S(j+1) runs, P stays in registers (the A operand of the second
  product), and a consumer frees a K or V buffer as soon as its product has retired. The warp
  scheduler interleaves the consumers' softmax and tensor-core work (no explicit ping-pong: Gluon
  exposes no named barriers to order them).
Registers move to the consumers (`setmaxnreg`): the producer keeps 24.

Layouts as `hopper`: the views a 1x1 conv gives, Q^T, K^T, V^T tiles of [D, 64 or 128] pixels via
TMA (rows 16-byte aligned), any output strides. JIT entry `_ws_attn_fwd` (host descriptors), AOT
entry `_ws_attn_aot` (device descriptors in the plugin's scratch output). `plan.hopper_plan`
and `aot.compile_hopper_artifact` choose it for the head dims of `HEAD_DIMS`; `config_for` the variant.

Measured (run 31, H100, attention alone, fp16): d=128, B=4, S=16384: 3.35 ms vs the Triton kernel's
5.22 and cuDNN's 3.56 (on contiguous copies); d=64, B=8: 4.90 vs 5.40 and 4.75 at S=16384, 77.5 vs
85.1 and 75.8 at S=65536.
"""

from __future__ import annotations

from dataclasses import dataclass

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from .hopper import _add_bias, _softmax, descriptor, device_descriptors
from .kernel import LOG2E

HEAD_DIMS = (64, 128)
BLOCK_M = 64  # query rows per consumer warpgroup
NUM_WARPS = 4  # the default partition: consumer 0; the workers are the other consumers (4 warps each) and the producer (1)


@dataclass(frozen=True)
class WsConfig:
    consumers: int = 2  # warpgroups of 64 query rows per CTA
    block_n: int = 64  # keys per K/V tile
    stages: int = 2  # K/V ring depth

    @property
    def maxnreg(self) -> int:
        """The kernel's register cap: (consumers + 1 producer) warpgroups share the 64K registers."""
        return 65536 // (32 * 4 * (self.consumers + 1)) // 8 * 8

    @property
    def consumer_regs(self) -> int:
        """What the consumers get (setmaxnreg) once the producer keeps 24."""
        return (self.maxnreg * (self.consumers + 1) - 24) // self.consumers // 8 * 8



@gluon.jit
def _producer(rt, D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS_Q_BIAS: gl.constexpr,
              EVEN_N: gl.constexpr, WG: gl.constexpr):
    """One warp: every consumer's Q tile, then the K and V tiles into their rings, each as soon as
    every consumer has released the buffer (the partitions share one signature: some arguments unused)."""
    (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, q_row, k_row, v_row, off_m, n_blocks, qk_scale, stride_os,
     stride_od, out_ptr, q_bias_ptr, h, seq_q, seq_kv) = rt
    BLOCK_M: gl.constexpr = q_smem.type.shape[2]
    q_bar, k_ready, k_empty, v_ready, v_empty = bars
    CONSUMERS: gl.constexpr = q_smem.type.shape[0]
    for c in gl.static_range(CONSUMERS):
        mbarrier.expect(q_bar.index(c), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row, off_m + c * BLOCK_M], q_bar.index(c), q_smem.index(c))
    for j in range(n_blocks):
        idx = j % STAGES
        phase = (j // STAGES) & 1
        mbarrier.wait(k_empty.index(idx), phase ^ 1)
        mbarrier.expect(k_ready.index(idx), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [k_row, j * BLOCK_N], k_ready.index(idx), k_bufs.index(idx))
        mbarrier.wait(v_empty.index(idx), phase ^ 1)
        mbarrier.expect(v_ready.index(idx), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [v_row, j * BLOCK_N], v_ready.index(idx), v_bufs.index(idx))


@gluon.jit
def _consumer(rt, D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS_Q_BIAS: gl.constexpr,
              EVEN_N: gl.constexpr, WG: gl.constexpr):
    """Consumer WG's 64 query rows: the whole flash loop, and its rows of the output."""
    (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, q_row, k_row, v_row, off_m, n_blocks, qk_scale, stride_os,
     stride_od, out_ptr, q_bias_ptr, h, seq_q, seq_kv) = rt
    BLOCK_M: gl.constexpr = q_smem.type.shape[2]
    q_bar, k_ready, k_empty, v_ready, v_empty = bars
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q_tile = q_smem.index(WG)
    mbarrier.wait(q_bar.index(WG), 0)
    if HAS_Q_BIAS:
        _add_bias(q_tile, q_bias_ptr + h * D, D, BLOCK_M, 4)
    q_op = q_tile.permute((1, 0))

    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, gl.SliceLayout(1, s_layout))

    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q_op, k_bufs.index(0), s_zero, use_acc=False)
    mbarrier.arrive(k_empty.index(0), count=1)
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, 0, cols, seq_kv, qk_scale, EVEN_N)
    for j in range(1, n_blocks):
        idx = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(k_ready.index(idx), (j // STAGES) & 1)
        s = warpgroup_mma(q_op, k_bufs.index(idx), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc = warpgroup_mma(p_op, v_bufs.index(prev).permute((1, 0)), acc, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
        mbarrier.arrive(k_empty.index(idx), count=1)
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, j * BLOCK_N, cols, seq_kv, qk_scale, EVEN_N)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(v_empty.index(prev), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    last = (n_blocks - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((n_blocks - 1) // STAGES) & 1)
    acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_bufs.index(last).permute((1, 0)), acc)
    mbarrier.arrive(v_empty.index(last), count=1)

    acc = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
    st_layout: gl.constexpr = gl.BlockedLayout([4, 1], [16, 2], [1, 4], [0, 1])  # pixels fastest
    o = gl.convert_layout(acc.to(dtype), st_layout)
    rows = off_m + WG * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, st_layout))
    dcol = gl.arange(0, D, layout=gl.SliceLayout(0, st_layout))
    ptrs = out_ptr + gl.expand_dims(rows, 1) * stride_os + gl.expand_dims(dcol, 0) * stride_od
    gl.store(ptrs, o, mask=gl.expand_dims(rows < seq_q, 1))


@gluon.jit
def _attend_ws(q_desc, k_desc, v_desc, out_ptr, q_bias_ptr, stride_ob, stride_oh, stride_os, stride_od,
               q_batch_rows, k_batch_rows, v_batch_rows, num_heads, seq_q, seq_kv, qk_scale,
               D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
               EVEN_N: gl.constexpr, HAS_Q_BIAS: gl.constexpr, CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    bh = gl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    off_m = gl.program_id(0) * (CONSUMERS * BLOCK_M)
    q_row = b * q_batch_rows + h * D
    k_row = b * k_batch_rows + h * D
    v_row = b * v_batch_rows + h * D
    q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, D, BLOCK_M], q_desc.layout)  # Q^T, one tile per consumer
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, D, BLOCK_N], k_desc.layout)  # K^T ring
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, D, BLOCK_N], v_desc.layout)  # V^T ring
    q_bar = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(CONSUMERS):
        mbarrier.init(q_bar.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=CONSUMERS)  # every consumer releases a buffer
        mbarrier.init(v_empty.index(i), count=CONSUMERS)
    n_blocks = gl.cdiv(seq_kv, BLOCK_N)
    bars = (q_bar, k_ready, k_empty, v_ready, v_empty)
    out_ptr = out_ptr + b * stride_ob + h * stride_oh
    # Runtime values travel in one tuple; constexprs one by one (in a tuple they would become values).
    rt = (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, bars, q_row, k_row, v_row, off_m, n_blocks, qk_scale,
          stride_os, stride_od, out_ptr, q_bias_ptr, h, seq_q, seq_kv)
    if CONSUMERS == 2:
        gl.warp_specialize([(_consumer, (rt, D, BLOCK_N, STAGES, HAS_Q_BIAS, EVEN_N, 0)),
                            (_consumer, (rt, D, BLOCK_N, STAGES, HAS_Q_BIAS, EVEN_N, 1)),
                            (_producer, (rt, D, BLOCK_N, STAGES, HAS_Q_BIAS, EVEN_N, 0))], [4, 1], [CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([(_consumer, (rt, D, BLOCK_N, STAGES, HAS_Q_BIAS, EVEN_N, 0)),
                            (_consumer, (rt, D, BLOCK_N, STAGES, HAS_Q_BIAS, EVEN_N, 1)),
                            (_consumer, (rt, D, BLOCK_N, STAGES, HAS_Q_BIAS, EVEN_N, 2)),
                            (_producer, (rt, D, BLOCK_N, STAGES, HAS_Q_BIAS, EVEN_N, 0))],
                           [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, 24])


@gluon.jit
def _ws_attn_fwd(q_desc, k_desc, v_desc, out_ptr, q_bias_ptr, stride_ob, stride_oh, stride_os, stride_od,
                 q_batch_rows, k_batch_rows, v_batch_rows, num_heads, seq_q, seq_kv, qk_scale,
                 D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 EVEN_N: gl.constexpr, HAS_Q_BIAS: gl.constexpr, CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    """The JIT entry: TMA descriptors made on the host."""
    _attend_ws(q_desc, k_desc, v_desc, out_ptr, q_bias_ptr, stride_ob, stride_oh, stride_os, stride_od,
               q_batch_rows, k_batch_rows, v_batch_rows, num_heads, seq_q, seq_kv, qk_scale,
               D, BLOCK_M, BLOCK_N, STAGES, EVEN_N, HAS_Q_BIAS, CONSUMERS, CONSUMER_REGS)


@gluon.jit
def _ws_attn_aot(Q, K, V, stride_ob, stride_oh, stride_os, stride_od, batch, num_heads, seq_q, seq_kv, Out,
                 QK_SCALE: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, EVEN_N: gl.constexpr, CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    """The AOT entry in TensorRT's argument order (as `hopper._wide_attn_aot`): contiguous (B, H*D, S)
    maps, descriptors made on the device in Triton's global scratch (the plugin's second output)."""
    q_desc, k_desc, v_desc = device_descriptors(Q, K, V, batch * num_heads * D, seq_q, seq_kv, D, BLOCK_M, BLOCK_N)
    _attend_ws(q_desc, k_desc, v_desc, Out, Out, stride_ob, stride_oh, stride_os, stride_od,
               num_heads * D, num_heads * D, num_heads * D, num_heads, seq_q, seq_kv, QK_SCALE,
               D, BLOCK_M, BLOCK_N, STAGES, EVEN_N, False, CONSUMERS, CONSUMER_REGS)


def config_for(head_dim: int, seq_kv: int) -> WsConfig:
    """The variant measured fastest on an H100 (run 31, attention alone, B=8/4, S=4096..65536):
    d=64: two consumers and 128-key tiles, three consumers and 64-key tiles from S=32768 on;
    d=128: two consumers, 128-key tiles, two stages."""
    if head_dim == 64:
        return WsConfig(3, 64, 3) if seq_kv >= 32768 else WsConfig(2, 128, 3)
    return WsConfig(2, 128, 2)


def ws_attention(q, k, v, out, scale: float, q_bias=None, config: WsConfig | None = None) -> None:
    """softmax(scale * (q + q_bias) k^T) v into `out` (any strides), as `hopper.wide_attention`;
    head dims `HEAD_DIMS`. The caller checked `hopper.unsupported`."""
    import triton

    b, h, s_q, d = q.shape
    c = config or config_for(d, k.shape[2])
    (qd, qr), (kd, kr), (vd, vr) = (descriptor(t, d, cols) for t, cols in ((q, BLOCK_M), (k, c.block_n), (v, c.block_n)))
    _ws_attn_fwd[(triton.cdiv(s_q, c.consumers * BLOCK_M), b * h)](
        qd, kd, vd, out, out if q_bias is None else q_bias, *out.stride(), qr, kr, vr, h, s_q, k.shape[2],
        scale * LOG2E, D=d, BLOCK_M=BLOCK_M, BLOCK_N=c.block_n, STAGES=c.stages, EVEN_N=k.shape[2] % c.block_n == 0,
        HAS_Q_BIAS=q_bias is not None, CONSUMERS=c.consumers, CONSUMER_REGS=c.consumer_regs, num_warps=NUM_WARPS,
        maxnreg=c.maxnreg)


def compile_for_hopper(dtype=None, even_n: bool = True, q_bias: bool = False, head_dim: int = 64,
                       config: WsConfig | None = None):
    """The kernel compiled for sm_90 without a GPU (tests: it builds, fits shared memory)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    c = config or config_for(head_dim, 4096)
    dtype = dtype or torch.float16
    t = torch.empty(1, head_dim, 256, dtype=dtype).view(1, 1, head_dim, 256).transpose(2, 3)
    qdesc, kdesc = (mangle_type(descriptor(t, head_dim, cols)[0]) for cols in (BLOCK_M, c.block_n))
    names = _ws_attn_fwd.arg_names
    constexprs = {"D": head_dim, "BLOCK_M": BLOCK_M, "BLOCK_N": c.block_n, "STAGES": c.stages, "EVEN_N": even_n,
                  "HAS_Q_BIAS": q_bias, "CONSUMERS": c.consumers, "CONSUMER_REGS": c.consumer_regs}
    ptr = "*" + mangle_type(t)[1:]
    kinds = {"q_desc": qdesc, "k_desc": kdesc, "v_desc": kdesc, "out_ptr": ptr, "q_bias_ptr": ptr, "qk_scale": "fp32"}
    signature = {n: "constexpr" if n in constexprs else kinds.get(n, "i32") for n in names}
    src = GluonASTSource(_ws_attn_fwd, signature, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": NUM_WARPS, "maxnreg": c.maxnreg})
