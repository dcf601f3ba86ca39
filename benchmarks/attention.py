"""Whole-block benchmark: conv + attention + conv, every attention path, one run, one GPU.

    python benchmarks/attention.py --out DIR [--tune] [--quick]

Paths: einsum; SDPA with each backend (math, flash, efficient, cuDNN; the contiguous copies
SDPA needs are part of the block); ours JIT (`ConvMHAttn(attention="flash")`: its 1x1 convs as
`bmm` products, then `flash_attention` reading them in place: the Triton kernel, or at head_dim 512
on Hopper the Gluon kernel of `plugins/hopper.py`); ours AOT (cuDNN convs around the Triton
kernel's PTX TensorRT would embed, launched through the CUDA driver API: the engine path); on
Hopper, fp16/bf16 rows at head dims 64..512 also run the engine's other tactic, the Hopper kernel's
AOT PTX with its descriptors in the scratch output (`ours-aot-hopper`: TensorRT times both and keeps
the faster); fp32 rows also run both with TF32 (`-tf32`: PyTorch's switch for the JIT block, the
`tf32` artifact for AOT). On Hopper the JIT block runs the Gluon kernels where `flash_attention`
dispatches them (d=512; d=64 and 128 from S=4096 on, the warp-specialized kernel).
Shapes: d=8 and 64 at S=1024..65536, d=32 and d=128, the VAE's d=512, fp32 exact vs TF32. Median time from
triton.testing.do_bench, peak extra memory from torch.cuda.max_memory_allocated over the
inputs and weights. Writes <gpu>.json (raw), <gpu>.md (table) and, with --tune, configs.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel


from convattn.models import ConvMHAttn
from convattn.plugins import plan as plan_mod
from convattn.plugins.aot import compile_artifact, compile_hopper_artifact, launch_artifact
from convattn.plugins.op import scratch_shape
from convattn.plugins.plan import config_key, pick_config
from convattn.plugins.hopper import aot_problem
from convattn.plugins.tune import tune

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# The Stable Diffusion VAE's mid-block attention (C=512, one head): issue 6's target shapes.
VAE_SHAPES = [(4, 128), (1, 64)]
BACKENDS = {"sdpa-math": SDPBackend.MATH, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}


def block_fn(name, m: ConvMHAttn, x, art=None):
    """A zero-argument callable running the whole block one way."""
    if name == "einsum":
        m.attention = "einsum"
        return lambda: m(x)
    if name in BACKENDS:
        m.attention = "sdpa"

        def run():
            with sdpa_kernel(BACKENDS[name]):
                return m(x)
        return run
    if name in ("ours-jit", "ours-jit-tf32"):
        m.attention = "flash"
        tf32 = name.endswith("tf32")  # the block as PyTorch runs it with TF32 allowed: convs and kernel

        def jit():
            previous = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                return m(x)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = previous
        return jit

    scratch = None
    if art.scratch_bytes:  # the engine's buffer for the plugin's second output: allocated once, as TensorRT's
        from convattn.plugins.op import FlashAttentionAttrs

        q_shape = (x.shape[0], m.q_conv.out_channels, *x.shape[2:])
        (n,) = scratch_shape(q_shape, q_shape, FlashAttentionAttrs(m.num_heads, art.scale))
        scratch = torch.empty(n, device=x.device, dtype=x.dtype)

    def aot():
        q, k, v = m.q_conv(x), m.k_conv(x), m.v_conv(x)
        out = torch.empty_like(q)
        launch_artifact(art, q, k, v, out, scratch=scratch)
        return m.out_conv(out)
    return aot


def measure(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        with torch.no_grad():
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            ms = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
    except torch.OutOfMemoryError:
        return {"status": "OOM"}
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        return {"status": "unsupported" if "No available kernel" in msg or "kernel" in msg.lower() else "error",
                "error": msg[:200]}
    return {"status": "ok", "ms": ms, "peak_extra_bytes": peak}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tune", action="store_true", help="tune configs first and record them")
    ap.add_argument("--quick", action="store_true", help="S <= 4096 only")
    ap.add_argument("--tune-only", action="store_true", help="tune, write configs.json, stop")
    ap.add_argument("--tune-dims", default="8,64", help="head dims to tune")
    ap.add_argument("--tune-seqs", default="4096,16384", help="sequence lengths to tune at")
    ap.add_argument("--tune-dtypes", default="fp16,bf16", help="dtypes to tune (others keep their defaults)")
    ap.add_argument("--record", action="store_true", help="merge the tuned configs into plugins/configs.json")
    ap.add_argument("--budget-s", type=float, default=520, help="stop starting new rows after this")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    gpu = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    meta = {"gpu": gpu, "arch": arch, "torch": torch.__version__, "triton": triton.__version__,
            "commit": _commit(), "command": " ".join(sys.argv),
            }
    tuned = {}
    if args.tune:
        seqs = [int(x) for x in args.tune_seqs.split(",")]
        for d in (int(x) for x in args.tune_dims.split(",")):
            heads = 64 // d if d <= 8 else max(1, 256 // d)
            for dname in args.tune_dtypes.split(","):
                dt = DTYPES[dname]
                for seq in seqs:
                    # Wide heads are tuned at the shapes of the Stable Diffusion VAE's targets.
                    batch = 8 if d <= 256 else (4 if seq >= 16384 else 1)
                    best, ms, timings = tune(d, heads, dt, seq, batch=batch)
                    for cfg, t in sorted(timings.items(), key=lambda kv: kv[1]):
                        print(f"  d={d} {dname} S={seq} B={batch}: {t:.3f} ms {cfg}", flush=True)
                    buckets = (1024, 4096) if seq <= 4096 else (16384, 65536, 262144)
                    if len(seqs) == 1:
                        buckets = (1024, 4096, 16384, 65536, 262144)
                    for s in buckets:
                        tuned[config_key(arch, dname, d, s)] = {"config": best.to_dict(), "tuned_at_seq": seq, "tuned_at_batch": batch, "ms": ms}
                    print(f"tuned d={d} {dname} S={seq}: {best} {ms:.3f} ms", flush=True)
        (args.out / "configs.json").write_text(json.dumps(tuned, indent=1) + "\n")
        if args.record:
            from convattn.plugins.tune import record

            record(tuned)
        if args.tune_only:
            return
        plan_mod._recorded.cache_clear()
        recorded = {**plan_mod._recorded(), **tuned}
        plan_mod._recorded = lambda: recorded  # use what was just tuned
    rows = []
    small = [(b, c, h, side) for c, h in ((64, 8), (256, 4)) for b, side in ((8, 32), (8, 64), (8, 128), (8, 256))]
    shapes = [("fp16", *r) for r in (*small, (1, 256, 4, 512))]
    shapes += [("fp16", b, 512, 1, side) for b, side in VAE_SHAPES]
    shapes += [("bf16", *r) for r in small]
    shapes += [("fp16", 4, 512, 4, 128), ("fp16", 8, 256, 8, 64), ("fp16", 8, 256, 8, 128)]  # d=128, d=32
    shapes += [("fp32", 8, 64, 8, 64), ("fp32", 4, 512, 4, 64)]  # exact vs TF32
    for dname, b, c, heads, side in shapes:
        if args.quick and side > 64 and c != 512:
            continue
        if time.time() - start > args.budget_s:
            print("time budget reached: stopping", flush=True)
            break
        dt = DTYPES[dname]
        torch.manual_seed(0)
        m = ConvMHAttn(c, c, heads).cuda().to(dt).eval()
        x = torch.randn(b, c, side, side, device="cuda", dtype=dt)
        d, s = c // heads, side * side
        cfg = pick_config(x.device, dt, d, s)
        arts = {tf32: compile_artifact(head_dim=d, num_heads=heads, dtype=dname, config=cfg, scale=d**-0.5,
                                       arch=major * 10 + minor, tf32=tf32) for tf32 in ((False, True) if dname == "fp32" else (False,))}
        row = {"dtype": dname, "B": b, "C": c, "heads": heads, "head_dim": d, "side": side, "S": s,
               "config": cfg.to_dict(), "results": {}}
        ours = ("ours-jit", "ours-aot") + (("ours-jit-tf32", "ours-aot-tf32") if dname == "fp32" else ())
        if aot_problem(arch, dname, d, d, ("NCHW",) * 3, s, s) is None:
            arts["hopper"] = compile_hopper_artifact(head_dim=d, num_heads=heads, dtype=dname, scale=d**-0.5,
                                                     layouts=("NCHW",) * 4, seq_kv=s)
            ours += ("ours-aot-hopper",)
        for name in ("einsum", *BACKENDS, *ours):
            art = arts["hopper"] if name == "ours-aot-hopper" else arts[name.endswith("tf32")]
            row["results"][name] = measure(block_fn(name, m, x, art))
        rows.append(row)
        print(_line(row), flush=True)
        (args.out / f"{_slug(gpu)}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (args.out / f"{_slug(gpu)}.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def _line(row):
    r = row["results"]
    return f"{row['dtype']} B{row['B']} C{row['C']} h{row['heads']} S={row['S']}: " + " ".join(
        f"{k}={v['ms']:.3f}" if v["status"] == "ok" else f"{k}={v['status']}" for k, v in r.items())


def markdown(meta, rows) -> str:
    names = list(dict.fromkeys(n for row in rows for n in row["results"]))  # every path, first seen first
    out = [f"# Whole ConvMHAttn block on {meta['gpu']} ({meta['arch']})", "",
           f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}. Command: `{meta['command']}`", "",
           "Median ms (triton.testing.do_bench) / peak extra memory. OOM: out of memory; unsupported: no kernel.", "",
           "| dtype | B | C | heads | D | S | " + " | ".join(names) + " |",
           "|" + "---|" * (6 + len(names))]
    for row in rows:
        cells = []
        for n in names:
            v = row["results"].get(n, {"status": "-"})
            cells.append(f"{v['ms']:.3f} ms / {v['peak_extra_bytes'] / 1e6:.0f} MB" if v["status"] == "ok" else v["status"])
        out.append(f"| {row['dtype']} | {row['B']} | {row['C']} | {row['heads']} | {row['head_dim']} | {row['S']} | "
                   + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-").lower()


def _commit() -> str:
    """The commit measured: $CONVATTN_COMMIT (the device's copy of the tree has no .git), else git."""
    import os

    if os.environ.get("CONVATTN_COMMIT"):
        return os.environ["CONVATTN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
