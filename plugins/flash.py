"""`jit_attention`: checks, allocation, grid, launch. The JIT path of the kernels, which the public
`convattn.plugins.flash_attention` (the `convattn::flash_attention` operator) runs."""

from __future__ import annotations

import math

import torch
import triton

from ..errors import PluginError
from .kernel import KernelConfig, _attn_fwd, _attn_windows, block_dim, qk_scale, unit_flags
from .op import attention_output_shape, bias_dims, default_tf32
from .plan import Plan, jit_plan
from .reference import add_q_bias


def _strides(t) -> list[int]:
    """Strides as the kernel takes them: 0 for a size-1 batch/head axis (never read), so a
    batch or head stride is never the constant 1 that Triton would compile in."""
    st = [0 if t.shape[i] == 1 else t.stride(i) for i in range(2)] + [t.stride(2), t.stride(3)]
    if 1 in st[:2]:
        raise PluginError(f"unsupported layout: a batch or head axis with stride 1 (strides {t.stride()})")
    return st


def launch(q, k, v, out, scale: float, config: KernelConfig, q_bias=None, tf32: bool = False, bias=None,
           softcap: float = 0.0) -> None:
    b, h, s_q, d = q.shape
    s_kv, d_v = k.shape[2], v.shape[3]
    dims = bias_dims(tuple(bias.shape), b, h, s_q, s_kv) if bias is not None else (1, 1, 1)
    grid = (triton.cdiv(s_q, config.block_m), config.programs_y(b, h, dims[0]), config.dv_programs(d_v))
    if config.windows and s_kv > config.block_n:
        raise PluginError(f"config {config}: the windows kernel takes S_kv <= block_n, got S_kv = {s_kv}")
    kernel, extra = (_attn_windows, {"WINDOWS": config.windows}) if config.windows else (_attn_fwd, {})
    kernel[grid](
        q, k, v, bias, *_strides(q), *_strides(k), *_strides(v), *_strides(out), h, s_q, s_kv, *dims, h // k.shape[1],
        *([b] if config.windows else []), out, q_bias, **extra,
        QK_SCALE=qk_scale(scale), HEAD_DIM=d, HEAD_DIM_V=d_v, BLOCK_D=block_dim(d), BLOCK_DV=config.dv_block(d_v),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, IEEE=q.dtype == torch.float32 and not tf32, HAS_Q_BIAS=q_bias is not None,
        HAS_BIAS=bias is not None, SOFTCAP=float(softcap),
        **unit_flags({f"{n}{a}" for n, t in zip("qkvo", (q, k, v, out)) for a, i in (("s", 2), ("d", 3)) if t.stride(i) == 1}),
        num_warps=config.num_warps, num_stages=config.num_stages,
        **({"maxnreg": config.maxnreg} if config.maxnreg else {}),
    )


def jit_attention(q, k, v, *, scale=None, out=None, config: KernelConfig | None = None, q_bias=None,
                  tf32: bool | None = None, bias=None, softcap: float = 0.0):
    """softmax(scale * q k^T [+ bias]) v with q (B, H, S_q, D), k (B, H_kv, S_kv, D), v (B, H_kv, S_kv, D_v):
    H_kv dividing H is grouped-query attention (query head h reads K/V head h // (H / H_kv), ONNX's order).

    Any strides: conv-output views are read in place, and `out` (B, H, S_q, D_v) may be a view
    of the output map. fp16, bf16, fp32; fp32 accumulation; O(S) memory. CUDA tensors run the
    kernel `plan.jit_plan` chooses: the Triton kernel (at S_kv <= 64 its short-sequence variant), or on
    Hopper a Gluon kernel (`hopper`, `hopper_ws`) where it was measured faster (no `config` given); CPU tensors run the Triton kernel when TRITON_INTERPRET=1 (tests), else
    the tiled NumPy reference.

    `q_bias` (H*D values, a Q conv's bias) is added to q first, by both kernels to their resident
    Q tile: no pass over Q and no copy of it (the CPU reference adds it to a copy).

    `bias`: an additive bias on the scores, broadcast as `op.bias_dims` says (a contiguous 4-D tensor
    (Bb, Hb, 1 or S_q, S_kv)), read tile by tile; the Triton kernel only (the Hopper kernels take none).
    `softcap` > 0: the scaled scores become softcap * tanh(scores / softcap) before the bias (ONNX's
    Attention; the Triton kernel only).

    `tf32` (fp32 inputs): both products on TF32 tensor cores; None follows PyTorch's own switch,
    `torch.backends.cuda.matmul.allow_tf32` (off by default: exact fp32).
    """
    shape_o = attention_output_shape(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if out is None:
        out = torch.empty(shape_o, dtype=q.dtype, device=q.device)
    elif tuple(out.shape) != shape_o or out.dtype != q.dtype:
        raise PluginError(f"out: expected shape {shape_o} and dtype {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    if q_bias is not None:
        if q_bias.numel() != q.shape[1] * q.shape[3] or q_bias.device != q.device:
            raise PluginError(f"q_bias: expected {q.shape[1] * q.shape[3]} values (heads x head_dim) on {q.device}, "
                             f"got {tuple(q_bias.shape)} on {q_bias.device}")
        q_bias = q_bias.reshape(-1).contiguous()
    if bias is not None:
        bias_dims(tuple(bias.shape), q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if bias.dtype != q.dtype or bias.device != q.device or not bias.is_contiguous():
            raise PluginError(f"bias: expected a contiguous {q.dtype} tensor on {q.device}, got {bias.dtype} on "
                             f"{bias.device}, strides {bias.stride()}")
    if q.device.type == "cuda" or _interpreting():
        run_plan(jit_plan(q, k, v, bias=bias, softcap=softcap, config=config), q, k, v, out, scale, q_bias, tf32, bias,
                 softcap)
        return out
    from .reference import reference_attention_torch

    return reference_attention_torch(add_q_bias(q, q_bias), k, v, scale, out, bias, softcap)


def run_plan(plan: Plan, q, k, v, out, scale: float, q_bias=None, tf32: bool | None = None, bias=None,
             softcap: float = 0.0) -> None:
    """Launch what `plan` says (`plan.jit_plan`, or a TensorRT tactic's `plan.engine_plan`) on checked views."""
    if plan.kernel == "hopper_ws":
        from .hopper_ws import ws_attention

        ws_attention(q, k, v, out, scale, q_bias, plan.hopper)
    elif plan.kernel == "hopper_wide":
        from .hopper import wide_attention

        wide_attention(q, k, v, out, scale, q_bias)
    else:
        tf32 = default_tf32(q.dtype) if tf32 is None else tf32
        launch(q, k, v, out, scale, plan.config, q_bias, tf32, bias, softcap)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"
