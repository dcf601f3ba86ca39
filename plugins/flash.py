"""`flash_attention`: checks, allocation, grid, launch. The JIT path of the kernel."""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import torch
import triton

from ..errors import PluginError
from .device import device_arch
from .kernel import (SMEM_LIMIT, KernelConfig, _attn_fwd, _attn_windows, block_dim, default_config, qk_scale, unit_flags,
                     windows_config)
from .op import bias_dims
from .reference import add_q_bias

CONFIGS_FILE = Path(__file__).with_name("configs.json")
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def seq_bucket(seq: int) -> int:
    """Configs are tuned per power-of-four sequence bucket: 1024, 4096, 16384, ..."""
    return 4 ** max(5, min(9, math.ceil(math.log(max(seq, 1), 4))))


@cache
def _recorded() -> dict:
    return json.loads(CONFIGS_FILE.read_text()) if CONFIGS_FILE.exists() else {}


def config_key(arch: str, dtype: str, head_dim: int, seq_kv: int) -> str:
    return f"{arch}/{dtype}/d{head_dim}/s{seq_bucket(seq_kv)}"


def recorded_config(arch: str, dtype: str, head_dim: int, seq_kv: int) -> KernelConfig | None:
    """The config tuned for this GPU arch, dtype ("fp16", ...), head dim and length, if one is recorded:
    the one lookup the JIT kernel, the AOT artifacts and the TensorRT tactics share."""
    rec = _recorded().get(config_key(arch, dtype, head_dim, seq_kv))
    return KernelConfig(**rec["config"]) if rec else None


def pick_config(device: torch.device, dtype: torch.dtype, head_dim: int, seq_kv: int,
                problem: tuple[int, int, int] | None = None) -> KernelConfig:
    """The recorded (tuned) config for this GPU, dtype, head dim and length, else the default. With
    `problem` (batch x heads, S_q, head_dim_v): the short-sequence kernel where it serves (`windows_config`;
    the JIT path only: the AOT artifacts run `_attn_fwd`)."""
    arch, smem = device_arch(device) if device.type == "cuda" else ("cpu", SMEM_LIMIT)
    if problem is not None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        short = windows_config(problem[0], problem[1], seq_kv, head_dim, dtype.itemsize, sms, problem[2])
        if short is not None:
            return short
    return (recorded_config(arch, _DTYPES[dtype], head_dim, seq_kv)
            or default_config(head_dim, dtype.itemsize, smem=smem))


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


def flash_attention(q, k, v, *, scale=None, out=None, config: KernelConfig | None = None, q_bias=None,
                    tf32: bool | None = None, bias=None, softcap: float = 0.0):
    """softmax(scale * q k^T [+ bias]) v with q (B, H, S_q, D), k (B, H_kv, S_kv, D), v (B, H_kv, S_kv, D_v):
    H_kv dividing H is grouped-query attention (query head h reads K/V head h // (H / H_kv), ONNX's order).

    Any strides: conv-output views are read in place, and `out` (B, H, S_q, D_v) may be a view
    of the output map. fp16, bf16, fp32; fp32 accumulation; O(S) memory. CUDA tensors run the
    Triton kernel (at S_kv <= 64 its short-sequence variant, `kernel.windows_config`), or on Hopper a Gluon
    kernel (`hopper`, `hopper_ws`) where `_hopper_takes` says so (no `config` given); CPU tensors run the Triton kernel when TRITON_INTERPRET=1 (tests), else
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
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise PluginError(f"expected 4-D (B, H, S, D) q, k, v; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if (q.shape[0] != k.shape[0] or q.shape[1] % k.shape[1] or k.shape[:3] != v.shape[:3]
            or q.shape[3] != k.shape[3]):
        raise PluginError(f"shapes do not form an attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise PluginError(f"expected q, k, v of one dtype among fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 1 <= q.shape[3] <= 512 or not 1 <= v.shape[3] <= 512:
        raise PluginError(f"head dims 1..512 supported, got {q.shape[3]} and {v.shape[3]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    shape_o = (*q.shape[:3], v.shape[3])
    if out is None:
        out = torch.empty(shape_o, dtype=q.dtype, device=q.device)
    elif tuple(out.shape) != shape_o or out.dtype != q.dtype:
        raise PluginError(f"out: expected shape {shape_o} and dtype {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    if q.numel() == 0 or k.shape[2] == 0:
        raise PluginError("empty attention: S_q and S_kv must be >= 1")
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
    if config is None and bias is None and not softcap and k.shape[1] == q.shape[1] and q.device.type == "cuda" and _hopper_takes(q, k, v):
        from .hopper import hopper_attention

        hopper_attention(q, k, v, out, scale, q_bias)
        return out
    if q.device.type == "cuda" or _interpreting():
        tf32 = torch.backends.cuda.matmul.allow_tf32 if tf32 is None else tf32
        config = config or pick_config(q.device, q.dtype, q.shape[3], k.shape[2],
                                       (q.shape[0] * q.shape[1], q.shape[2], v.shape[3]))
        launch(q, k, v, out, scale, config, q_bias, tf32, bias, softcap)
        return out
    from .reference import reference_attention_torch

    return reference_attention_torch(add_q_bias(q, q_bias), k, v, scale, out, bias, softcap)


def _hopper_takes(q, k, v) -> bool:
    """Where the JIT path runs a Hopper kernel: head dim 512 (the wide kernel: 5.2 vs 9.2 ms, run 29),
    and 64 or 128 from 4096 keys on (the warp-specialized kernel, measured there: run 31)."""
    d = q.shape[3]
    if not (d == 512 or (d in (64, 128) and k.shape[2] >= 4096)):  # before importing Gluon
        return False
    try:
        from .hopper import unsupported
    except ImportError:  # a Triton without Gluon
        return False
    return unsupported(q, k, v) is None


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"
