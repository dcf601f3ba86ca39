"""Autotuning, recorded: the chosen configs are data (plugins/configs.json), so the JIT kernel,
the AOT artifacts and the TensorRT tactics all use the same ones, reproducibly."""

from __future__ import annotations

import json

import torch

from .flash import launch
from .plan import CONFIGS_FILE, config_key
from .kernel import candidate_configs


def tune(head_dim: int, heads: int, dtype: torch.dtype, seq: int, batch: int = 8, configs=None) -> tuple:
    """Time every candidate config on (batch, heads, seq, head_dim) conv-output views.

    Returns (best config, its median ms, {config: ms}). CUDA only."""
    import triton.testing

    gen = torch.Generator(device="cuda").manual_seed(0)
    maps = [torch.randn(batch, heads * head_dim, seq, device="cuda", dtype=dtype, generator=gen) for _ in range(4)]
    q, k, v, o = (m.view(batch, heads, head_dim, seq).transpose(-1, -2) for m in maps)
    timings = {}
    for cfg in configs or candidate_configs(head_dim, dtype.itemsize):
        try:
            launch(q, k, v, o, head_dim**-0.5, cfg)
            timings[cfg] = triton.testing.do_bench(lambda: launch(q, k, v, o, head_dim**-0.5, cfg),
                                                   warmup=5, rep=30, return_mode="median")
        except Exception:  # out of resources for this tile shape: not a candidate here
            continue
    best = min(timings, key=timings.get)
    return best, timings[best], timings


def record(entries: dict, path=CONFIGS_FILE) -> None:
    """Merge {key: {"config": ..., "tuned_at_seq": ..., "ms": ...}} into the configs file."""
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(entries)
    path.write_text(json.dumps(dict(sorted(current.items())), indent=1) + "\n")


__all__ = ["tune", "record", "config_key"]
