"""The kernel plan: which kernel serves an attention problem, with which config. The one place that
choice is made: the JIT path (`flash.jit_attention`), TensorRT's tactics and their JIT enqueue
(`trt_plugin`) and the AOT artifacts (`aot`) ask here; the kernels' modules say only what each can
compute (`hopper.aot_problem`, `hopper.unsupported`, `kernel.windows_config`).

Kernels (`Plan.kernel`):
- "triton": `kernel._attn_fwd`, every problem; its config tuned per GPU, dtype, head dim and length
  (`plugins/configs.json`, `recorded_config`), else `kernel.default_config`;
- "windows": `kernel._attn_windows`, S_kv <= 64 (windowed attention), `kernel.windows_config`;
- "hopper_ws", "hopper_wide": the Gluon kernels (`hopper_ws` at head dims 64 and 128 with its
  `config_for`; `hopper` at 256 and 512), fp16/bf16 on sm_90, no bias, soft cap or grouped K/V heads,
  1x1-conv output views (TMA).

The JIT path (`jit_plan`) takes the Hopper kernels where they were measured faster (head dim 512, and
64 or 128 from 4096 keys on: runs 29, 31), the short-sequence kernel at S_kv <= 64, else the Triton
kernel. The engine (`engine_tactics`) offers every Triton config as tactics 1..N, and `HOPPER_TACTIC`
and `WINDOWS_TACTIC` where those kernels can serve the node; TensorRT times them and keeps the fastest.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..errors import PluginError
from .kernel import (SMEM_LIMIT, SMEM_WITHOUT_OPT_IN, KernelConfig, candidate_configs, default_config, no_opt_in_config,
                     smem_estimate, smem_limit, windows_config)

CONFIGS_FILE = Path(__file__).with_name("configs.json")
HOPPER_TACTIC = 1000  # beside the Triton configs' 1..N
WINDOWS_TACTIC = 1001
# the JIT path's Hopper kernels: where each was measured faster than the Triton kernel
JIT_HOPPER_WIDE = (512,)  # run 29: 5.2 vs 9.2 ms
JIT_HOPPER_WS, JIT_HOPPER_WS_MIN_KEYS = (64, 128), 4096  # run 31


@dataclass(frozen=True)
class Plan:
    kernel: str  # "triton", "windows", "hopper_ws", "hopper_wide"
    config: KernelConfig | None = None  # the Triton kernels' launch config
    hopper: object | None = None  # "hopper_ws": its `hopper_ws.WsConfig`


def dtype_name(dtype) -> str:
    """"fp16", "bf16" or "fp32" for a torch dtype."""
    import torch

    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    if dtype not in names:
        raise PluginError(f"expected fp16, bf16 or fp32, got {dtype}")
    return names[dtype]


# ------------------------------------------------------------------ the tuned configs


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


def pick_config(device, dtype, head_dim: int, seq_kv: int, problem: tuple | None = None) -> KernelConfig:
    """The Triton kernels' config for a torch device and dtype: the recorded (tuned) one, else the default.
    With `problem` (batch, heads, S_q, head_dim_v, the bias's batch or 1): the short-sequence kernel's where
    it serves (`windows_config`)."""
    from .device import device_arch, device_sms

    arch, smem = device_arch(device) if device.type == "cuda" else ("cpu", SMEM_LIMIT)
    if problem is not None:
        sms = device_sms(device) if device.type == "cuda" else 132
        batch, heads, seq_q, head_dim_v, bias_batch = problem
        short = windows_config(batch * heads, seq_q, seq_kv, head_dim, dtype.itemsize, sms, head_dim_v,
                               shared=batch // bias_batch)
        if short is not None:
            return short
    return recorded_config(arch, dtype_name(dtype), head_dim, seq_kv) or default_config(head_dim, dtype.itemsize, smem=smem)


# ------------------------------------------------------------------ the JIT path


def hopper_plan(head_dim: int, seq_kv: int) -> Plan:
    """The Hopper kernel for a head dim: the warp-specialized one (64, 128) with its measured variant, else
    the wide one (256, 512). Needs Triton's Gluon."""
    from . import hopper_ws

    if head_dim in hopper_ws.HEAD_DIMS:
        return Plan("hopper_ws", hopper=hopper_ws.config_for(head_dim, seq_kv))
    return Plan("hopper_wide")


def jit_plan(q, k, v, *, bias=None, softcap: float = 0.0, config: KernelConfig | None = None) -> Plan:
    """What `flash.jit_attention` runs for (B, H, S, D) views: `config`'s kernel where one is given;
    on CUDA a Hopper kernel where it was measured faster and `hopper.unsupported` allows it; else the
    short-sequence kernel (S_kv <= 64) or `_attn_fwd` with `pick_config`'s config."""
    if config is not None:
        return Plan("windows" if config.windows else "triton", config)
    d, s_kv = q.shape[3], k.shape[2]
    if (q.device.type == "cuda" and bias is None and not softcap and k.shape[1] == q.shape[1]
            and (d in JIT_HOPPER_WIDE or (d in JIT_HOPPER_WS and s_kv >= JIT_HOPPER_WS_MIN_KEYS))):
        try:
            from .hopper import unsupported
        except ImportError:  # a Triton without Gluon
            unsupported = None
        if unsupported is not None and unsupported(q, k, v) is None:
            return hopper_plan(d, s_kv)
    config = pick_config(q.device, q.dtype, d, s_kv, (q.shape[0], q.shape[1], q.shape[2], v.shape[3],
                                                      1 if bias is None else bias.shape[0]))
    return Plan("windows" if config.windows else "triton", config)


# ------------------------------------------------------------------ the engine (TensorRT tactics)


@cache
def tactic_configs(head_dim: int, dtype: str, arch: str = "sm_90", head_dim_v: int | None = None) -> tuple[KernelConfig, ...]:
    """Tactic i (1-based: TensorRT reserves 0) runs config i-1: the recorded (tuned) config
    first, then the rest of the tuning space, so TensorRT's own timing can pick among them.
    Cached: the JIT `impl` looks its tactic up at every enqueue."""
    nbytes = 4 if dtype == "fp32" else 2
    # A profile admits many lengths: the config tuned for the longest recorded one leads.
    first = next((c for c in (recorded_config(arch, dtype, head_dim, s) for s in (16384, 4096, 1024)) if c), None)
    first = first or default_config(head_dim, nbytes, head_dim_v, smem=smem_limit(arch))
    configs = [first, *(c for c in candidate_configs(head_dim, nbytes, head_dim_v, smem=smem_limit(arch)) if c != first)]
    # A tactic within 48 KiB of shared memory, if the list has none: an engine still builds where
    # TensorRT does not opt a kernel in to more (not documented either way).
    safe = no_opt_in_config(head_dim, nbytes, head_dim_v)
    if safe is not None and not any(smem_estimate(c, head_dim, nbytes, head_dim_v) <= SMEM_WITHOUT_OPT_IN for c in configs):
        configs.append(safe)
    return tuple(configs)


def tactic_config(head_dim: int, dtype: str, arch: str, tactic: int, head_dim_v: int | None = None) -> KernelConfig:
    """The config of a Triton tactic TensorRT chose (0, its default, is the first one); bf16 shares fp16's
    list (one AutoTuneCombination serves both 16-bit types)."""
    return tactic_configs(head_dim, "fp32" if dtype == "fp32" else "fp16", arch, head_dim_v)[max(tactic, 1) - 1]


@dataclass(frozen=True)
class Node:
    """What an engine's node fixes at build: arch, dtype, head dims, layouts; lengths where the network
    fixes them (None where they vary with the profile); whether it has a bias, a soft cap, grouped heads."""

    arch: str
    dtype: str
    head_dim: int
    head_dim_v: int
    layouts: tuple
    seq_q: int | None
    seq_kv: int | None
    bias: bool = False
    softcap: float = 0.0
    grouped: bool = False


def hopper_problem(node: Node) -> str | None:
    """Why the Hopper AOT kernel cannot serve this node; None when it can."""
    if node.bias:
        return "the Hopper kernels take no bias"
    if node.softcap:
        return "the Hopper kernels have no softcap"
    if node.grouped:
        return "the Hopper kernels take no grouped K/V heads"
    try:
        from .hopper import aot_problem
    except ImportError:  # a Triton without Gluon
        return "needs Triton's Gluon"
    return aot_problem(node.arch, node.dtype, node.head_dim, node.head_dim_v, node.layouts, node.seq_q, node.seq_kv)


def windows_tactic_config(node: Node) -> KernelConfig | None:
    """The short-sequence kernel's config for a node whose S_kv is fixed at build and <= 64, else None.
    Samples per program as for a large batch (`kernel.windows_config`): windowed attention runs many
    windows, and TensorRT keeps `_attn_fwd` where this is slower."""
    if not node.seq_kv:
        return None
    return windows_config(1 << 20, node.seq_q or 64, node.seq_kv, node.head_dim, 4 if node.dtype == "fp32" else 2,
                          head_dim_v=node.head_dim_v)


def engine_tactics(node: Node) -> list[int]:
    """The tactics a node offers TensorRT: the Triton configs 1..N, then the Hopper and the short-sequence
    kernels where they can serve it."""
    tactics = list(range(1, len(tactic_configs(node.head_dim, node.dtype, node.arch, node.head_dim_v)) + 1))
    if hopper_problem(node) is None:
        tactics.append(HOPPER_TACTIC)
    if windows_tactic_config(node) is not None:
        tactics.append(WINDOWS_TACTIC)
    return tactics


@cache
def engine_plan(node: Node, tactic: int) -> Plan:
    """What a tactic TensorRT chose runs (aot_impl compiles it, the JIT enqueue launches it; cached: the
    enqueue asks at every call)."""
    if tactic == HOPPER_TACTIC:
        problem = hopper_problem(node)
        if problem:  # TensorRT asks only for tactics autotune offered
            raise PluginError(f"tactic {tactic} (the Hopper kernel) cannot serve this node: {problem}")
        return hopper_plan(node.head_dim, node.seq_kv)
    if tactic == WINDOWS_TACTIC:
        config = windows_tactic_config(node)
        if config is None:
            raise PluginError(f"tactic {tactic} (the short-sequence kernel) cannot serve this node: S_kv is not "
                              "fixed at build or is longer than 64")
        return Plan("windows", config)
    return Plan("triton", tactic_config(node.head_dim, node.dtype, node.arch, tactic, node.head_dim_v))
