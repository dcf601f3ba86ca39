"""Where a block's time goes: the torch profiler over a few whole blocks, per GPU kernel.

    python benchmarks/profile_block.py --out DIR

For the rows whose targets are missed (issue 15): the d=512 VAE block (ours JIT), d=64 at S=65536 and
d=128 at S=16384 (ours JIT and cuDNN SDPA). Writes profile_<commit>.md: per path, each kernel's
CUDA time per block and its share, and the attention kernel's achieved tensor-core rate (the
4 * B * H * S_q * S_kv * D FLOPs of its two products over its time).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from convattn.models import ConvMHAttn

ROWS = [(4, 512, 1, 128, "flash"), (8, 256, 4, 256, "flash"), (8, 256, 4, 256, "cudnn"), (4, 512, 4, 128, "flash"),
        (4, 512, 4, 128, "cudnn")]
REPS = 5


def run(m, x, path):
    if path == "cudnn":
        m.attention = "sdpa"
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return m(x)
    m.attention = "flash"
    return m(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    commit = os.environ.get("CONVATTN_COMMIT", "unknown")
    lines = [f"# Kernel time per block on {torch.cuda.get_device_name()} (torch profiler, {REPS} blocks, commit {commit})", ""]
    for b, c, heads, side, path in ROWS:
        torch.manual_seed(0)
        m = ConvMHAttn(c, c, heads).cuda().half().eval()
        x = torch.randn(b, c, side, side, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            for _ in range(3):
                run(m, x, path)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(REPS):
                    run(m, x, path)
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        total = sum(e.device_time_total for e in events)
        s, d = side * side, c // heads
        flops = 4 * b * heads * s * s * d
        lines += [f"## B={b} C={c} heads={heads} D={d} S={s}, {path}: {total / REPS / 1e3:.3f} ms of GPU time per block", "",
                  "| kernel | ms per block | share | TFLOP/s (attention's 2 products) |", "|---|---|---|---|"]
        for e in sorted(events, key=lambda e: -e.device_time_total)[:6]:
            ms = e.device_time_total / REPS / 1e3
            rate = flops / (ms * 1e-3) / 1e12
            name = e.key.replace("|", "/")[:90]
            lines.append(f"| `{name}` | {ms:.3f} | {e.device_time_total / total:.0%} | {rate:.0f} |")
        lines.append("")
        print("\n".join(lines[-9:]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"profile_{commit}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
