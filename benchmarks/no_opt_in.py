"""What the no-opt-in tactic costs: every node's tactic list holds a Triton config within 48 KiB of
shared memory and no scratch (`kernel.no_opt_in_config`), so an engine builds even where TensorRT does
not opt an AOT kernel in to more shared memory. On the GPU, through the engine path's launcher
(`aot.launch_ptx` with TensorRT's argument list): each layout x dtype (head dim 64) and each head dim
(fp16, NCHW) against float64, and its time beside tactic 1 (the tuned config).

    python benchmarks/no_opt_in.py --out DIR      (GPU; writes DIR/no_opt_in_<commit>.md)
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import torch
import triton.testing

from convattn.plugins.aot import compile_artifact, launch_artifact
from convattn.plugins.kernel import SMEM_WITHOUT_OPT_IN, no_opt_in_config
from convattn.plugins.op import LAYOUTS, FlashAttentionAttrs, bhsd_view, output_shape
from convattn.plugins.plan import tactic_config

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TOL = {"fp16": 4e-3, "bf16": 3e-2, "fp32": 1e-5}


def shapes(layout, b, heads, d, s):
    return {"NCHW": (b, heads * d, 64, s // 64), "BHSD": (b, heads, s, d), "BHDS": (b, heads, d, s),
            "BSC": (b, s, heads * d)}[layout]


def row(layout, dtype, d, b=2, heads=2, s=4096):
    torch.manual_seed(0)
    shape = shapes(layout, b, heads, d, s)
    q, k, v = (torch.randn(shape, device="cuda").to(DTYPES[dtype]) for _ in range(3))
    attrs = FlashAttentionAttrs(heads, d**-0.5, layout, layout, layout, layout)
    views = [bhsd_view(t, layout, heads).double() for t in (q, k, v)]
    ref = torch.softmax(views[0] @ views[1].transpose(-1, -2) * d**-0.5, -1) @ views[2]
    nbytes = 4 if dtype == "fp32" else 2
    out = {}
    for name, config in (("tactic 1", tactic_config(d, dtype, "sm_90", 1)), ("no opt-in", no_opt_in_config(d, nbytes))):
        art = compile_artifact(head_dim=d, num_heads=heads, dtype=dtype, config=config, scale=d**-0.5, arch=90,
                               layouts=(layout,) * 4)
        o = torch.full(output_shape(q.shape, v.shape, attrs), float("nan"), device="cuda", dtype=q.dtype)
        launch_artifact(art, q, k, v, o)
        torch.cuda.synchronize()
        err = float((bhsd_view(o, layout, heads).double() - ref).abs().max())
        ms = triton.testing.do_bench(lambda: launch_artifact(art, q, k, v, o), warmup=25, rep=100)
        out[name] = (config, art.shared_mem, err, ms)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    commit = os.environ.get("CONVATTN_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                                 capture_output=True, text=True).stdout.strip()
    lines = [f"# The no-opt-in tactic (<= {SMEM_WITHOUT_OPT_IN // 1024} KiB shared memory, no scratch) vs tactic 1",
             "", f"commit {commit}, {torch.cuda.get_device_name()}, `python benchmarks/no_opt_in.py`; B=2, 2 heads, "
             "S=4096 (self-attention), median of triton.testing.do_bench, the engine path's launcher "
             "(`aot.launch_artifact` -> `launch_ptx`, TensorRT's argument list). Error: max |out - float64|.", "",
             "| layout | dtype | head dim | tactic 1: config, smem, ms | no opt-in: config, smem, ms | cost | error (tactic 1 / no opt-in) | ok |",
             "|---|---|---|---|---|---|---|---|"]
    cases = [(layout, dtype, 64) for layout in LAYOUTS for dtype in DTYPES] + \
            [("NCHW", "fp16", d) for d in (8, 128, 256, 512)] + [("NCHW", "fp32", d) for d in (8, 128, 256)]
    ok_all = True
    for layout, dtype, d in cases:
        r = row(layout, dtype, d)
        (c1, m1, e1, t1), (c2, m2, e2, t2) = r["tactic 1"], r["no opt-in"]
        ok = m2 <= SMEM_WITHOUT_OPT_IN and e1 <= TOL[dtype] and e2 <= TOL[dtype]
        ok_all &= ok
        fmt = lambda c: f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}" + (f" dv{c.block_dv}" if c.block_dv else "")  # noqa: E731
        lines.append(f"| {layout} | {dtype} | {d} | {fmt(c1)}, {m1 // 1024} KiB, {t1:.3f} | {fmt(c2)}, {m2 // 1024} KiB, "
                     f"{t2:.3f} | {t2 / t1:.2f}x | {e1:.1e} / {e2:.1e} | {'yes' if ok else 'NO'} |")
        print(lines[-1], flush=True)
    lines += ["", "fp32 at head dims above 256 has no such tactic: a 16-row Q tile and a 16-key K tile of 512 fp32 "
              "columns alone take 64 KiB (the smallest config is 68 KiB, compiled on the CPU)."]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"no_opt_in_{commit}.md").write_text("\n".join(lines) + "\n")
    raise SystemExit(0 if ok_all else 1)


if __name__ == "__main__":
    main()
