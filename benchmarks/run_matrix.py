"""Issue 24's matrix (`matrix.ROWS`) on one GPU, ours and the peers (`matrix.PEERS`) in one process.

    python benchmarks/run_matrix.py --out DIR [--kinds attention,block] [--only REGEX] [--runs 3]
                                    [--peers-site /tmp/peers] [--budget-s 500]

Per row and path: the median of `triton.testing.do_bench` in each of `--runs` runs, the median of those
(`ms`), and each run's (`runs_ms`: ratios come from one run, the last); peak extra memory over the inputs;
the max error against float64 on 128 query rows of every head of sample 0 (no S x S tensor anywhere).
Ours read and write the NCHW maps 1x1 convs make, in place; each peer gets its inputs in the layout it
wants, copied before timing (attention rows) or inside the timed block (block rows).
- "engine": the AOT artifacts of the tactics `plan.engine_tactics` offers that are timed here (tactic 1,
  the Hopper and the short-sequence kernels where offered; TensorRT times every tactic and keeps the
  fastest, so the fastest of these is reported), launched with TensorRT's argument list (`aot.launch_artifact`);
- "jit": `convattn.plugins.flash_attention` (`plan.jit_plan`'s kernel);
- fp32 rows: exact fp32 (ours, einsum with TF32 off) and TF32 (`-tf32`: ours' tf32 artifact and switch).
Block rows: `block_paths` (each path pays its copies inside the timed call), checked against the block in
float64 at sample 0's first 128 output pixels (`block_reference`).
Writes DIR/matrix.json after every row (a cut call keeps what it measured); rows not measured are listed
(`matrix.missing`: each counts as failed). On a machine without CUDA only "jit" and "einsum" run (a smoke
test of the runner itself: tests/test_benchmark_matrix.py)."""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

from convattn.benchmarks.matrix import PEERS, ROWS, Row, missing
from convattn.plugins import flash_attention, plan

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
REF_ROWS = 128  # query rows of sample 0 checked against float64


def maps(row: Row, device):
    """The Q, K, V maps 1x1 convs write: (B, C, S) contiguous, random normal."""
    g = torch.Generator(device=device).manual_seed(row.seq + row.head_dim)
    c = row.heads * row.head_dim
    return [torch.randn(row.batch, c, row.seq, device=device, generator=g).to(DTYPES[row.dtype]) for _ in range(3)]


def views(m, row: Row):
    """(B, H, S, D) views of a (B, C, S) map: what the kernel reads in place."""
    return m.view(row.batch, row.heads, row.head_dim, row.seq).transpose(-1, -2)


def float64_rows(q, k, v):
    """float64 softmax(q k^T / sqrt(D)) v for sample 0's first REF_ROWS queries of every head: (H, r, D)."""
    qs = q[0, :, :REF_ROWS].double()
    s = (qs @ k[0].double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(s, -1) @ v[0].double()


def attention_paths(row: Row, q_map, k_map, v_map):
    """{path: (callable, sampled output of the last call)}: each callable runs the attention once; the
    getter returns sample 0's first REF_ROWS rows of every head as (H, r, D)."""
    q, k, v = (views(m, row) for m in (q_map, k_map, v_map))
    out_map = torch.empty_like(q_map)
    out = views(out_map, row)
    sampled = lambda o: o[0, :, :REF_ROWS]  # noqa: E731 (B, H, S, D) -> (H, r, D)
    paths = {}
    modes = [("", False), ("-tf32", True)] if row.dtype == "fp32" else [("", False)]
    for suffix, tf32 in modes:
        paths["jit" + suffix] = (lambda tf32=tf32: flash_attention(q, k, v, out=out, tf32=tf32), lambda: sampled(out))
    if q.device.type == "cuda":
        for suffix, tf32 in modes:
            arts = _engine_artifacts(row, tf32)
            for name, art, scratch in arts:
                from convattn.plugins.aot import launch_artifact

                paths[f"engine{suffix}[{name}]"] = (
                    lambda art=art, scratch=scratch: launch_artifact(art, q_map, k_map, v_map, out_map, scratch=scratch),
                    lambda: sampled(out))
        contiguous = [t.contiguous() for t in (q, k, v)]
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
                    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}
        for name, backend in backends.items():
            if row.dtype in PEERS[name]["dtypes"]:
                paths[name] = _sdpa(backend, sdpa_kernel, contiguous, sampled)
        if row.dtype in PEERS["flash-attn-4"]["dtypes"] and _fa4() is not None:
            bshd = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
            kept = {}

            def fa4():
                kept["o"] = fa4_attention(*bshd)
            paths["flash-attn-4"] = (fa4, lambda: kept["o"][0, :REF_ROWS].transpose(0, 1))
    kept_e = {}

    def einsum():
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            s = torch.einsum("bhqd,bhkd->bhqk", q, k) * row.head_dim ** -0.5
            kept_e["o"] = torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    paths["einsum"] = (einsum, lambda: sampled(kept_e["o"]))  # B H S^2 scores: out of memory at large S, reported
    return paths


def _sdpa(backend, sdpa_kernel, qkv, sampled):
    kept = {}

    def run():
        with sdpa_kernel(backend):
            kept["o"] = torch.nn.functional.scaled_dot_product_attention(*qkv)
    return run, lambda: sampled(kept["o"])


def _engine_artifacts(row: Row, tf32: bool):
    """(tactic name, artifact, scratch) for tactic 1 and the Hopper / short-sequence tactics where offered."""
    from convattn.plugins.aot import compile_artifact, compile_hopper_artifact
    from convattn.plugins.op import FlashAttentionAttrs, scratch_shape

    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    node = plan.Node(arch, row.dtype, row.head_dim, row.head_dim, ("NCHW",) * 3, row.seq, row.seq)
    found = []
    for tactic in plan.engine_tactics(node):
        if tactic not in (1, plan.HOPPER_TACTIC, plan.WINDOWS_TACTIC):
            continue
        p = plan.engine_plan(node, tactic)
        if p.kernel.startswith("hopper"):
            if tf32:
                continue
            art = compile_hopper_artifact(head_dim=row.head_dim, num_heads=row.heads, dtype=row.dtype,
                                          scale=row.head_dim ** -0.5, layouts=("NCHW",) * 4, seq_kv=row.seq)
        else:
            art = compile_artifact(head_dim=row.head_dim, num_heads=row.heads, dtype=row.dtype, config=p.config,
                                   scale=row.head_dim ** -0.5, arch=major * 10 + minor, tf32=tf32)
        scratch = None
        if art.scratch_bytes:
            shape = (row.batch, row.heads * row.head_dim, row.seq)
            (n,) = scratch_shape(shape, shape, FlashAttentionAttrs(row.heads, art.scale))
            scratch = torch.empty(n, device="cuda", dtype=DTYPES[row.dtype])
        found.append((p.kernel if tactic != 1 else "tactic 1", art, scratch))
    return found


_FA4 = []


def fa4_attention(q, k, v):
    """flash-attn-4 on (B, S, H, D) tensors, as `matrix.PEERS` calls it: the output (B, S, H, D)."""
    o = _fa4()(q, k, v, softmax_scale=q.shape[-1] ** -0.5, causal=False)
    return o[0] if isinstance(o, tuple) else o  # (out, lse) in some releases


def _fa4():
    """flash-attn-4's `flash_attn_func`, or None where it is not installed (`peer_wheels.sh`)."""
    if not _FA4:
        try:
            from flash_attn.cute.interface import flash_attn_func
        except Exception:  # noqa: BLE001 (not installed, or its DSL failed to load: reported as absent)
            flash_attn_func = None
        _FA4.append(flash_attn_func)
    return _FA4[0]


def block_paths(row: Row, m, x):
    """{path: (callable, getter)} for the whole block (1x1 Q/K/V convs, attention, output conv), each path
    paying the copies it needs inside the timed call; the getter returns sample 0's first REF_ROWS output
    pixels as (C, r). Ours: `ConvMHAttn(attention="flash")` (JIT) and the engine's artifacts between cuDNN's
    convs (`attention.block_fn`); peers: einsum, SDPA's backends (`attention.block_fn`) and flash-attn-4."""
    from convattn.benchmarks.attention import block_fn

    kept = {}

    def keep(fn):
        def run():
            kept["o"] = fn()
        return run
    sampled = lambda: kept["o"][0].flatten(1)[:, :REF_ROWS]  # noqa: E731
    paths = {}
    tf32_modes = ((False, ""), (True, "-tf32")) if row.dtype == "fp32" else ((False, ""),)
    for tf32, suffix in tf32_modes:
        paths["jit" + suffix] = (keep(block_fn("ours-jit" + suffix, m, x)), sampled)
    if x.device.type == "cuda":
        for tf32, suffix in tf32_modes:
            for name, art, _ in _engine_artifacts(row, tf32):
                paths[f"engine{suffix}[{name}]"] = (keep(block_fn("ours-aot", m, x, art)), sampled)
        for peer, name in (("cudnn", "sdpa-cudnn"), ("sdpa-flash", "sdpa-flash"), ("sdpa-efficient", "sdpa-efficient")):
            if row.dtype in PEERS[peer]["dtypes"]:
                paths[peer] = (keep(block_fn(name, m, x)), sampled)
        if row.dtype in PEERS["flash-attn-4"]["dtypes"] and _fa4() is not None:
            def fa4_block():
                b, c, hh, ww = x.shape
                qkv = [conv(x).view(b, row.heads, row.head_dim, hh * ww).permute(0, 3, 1, 2).contiguous()
                       for conv in (m.q_conv, m.k_conv, m.v_conv)]  # (B, S, H, D), the layout it reads
                o = fa4_attention(*qkv)
                return m.out_conv(o.permute(0, 2, 3, 1).reshape(b, c, hh, ww))
            paths["flash-attn-4"] = (keep(fa4_block), sampled)
    paths["einsum"] = (keep(block_fn("einsum", m, x)), sampled)
    return paths


def block_reference(m, x):
    """The block in float64 at sample 0's first REF_ROWS output pixels, (C, r): 1x1 convs are per pixel, so
    only those queries' attention rows are computed."""
    x0 = x[:1].double().flatten(2)  # (1, C_in, S)
    conv = lambda c, t: c.weight.double().flatten(1) @ t + c.bias.double()[:, None]  # noqa: E731
    h, d = m.num_heads, m.head_dim
    q, k, v = (conv(c, x0).view(h, d, -1).transpose(-1, -2) for c in (m.q_conv, m.k_conv, m.v_conv))  # (h, S, d)
    o = torch.softmax((q[:, :REF_ROWS] @ k.transpose(-1, -2)) * d ** -0.5, -1) @ v  # (h, r, d)
    return conv(m.out_conv, o.transpose(-1, -2).reshape(h * d, -1))


def time_ms(fn) -> float:
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def measure_row(row: Row, runs: int) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if row.kind == "block":
        from convattn.models import ConvMHAttn

        torch.manual_seed(row.seq + row.head_dim)
        c, side = row.heads * row.head_dim, int(row.seq ** 0.5)
        m = ConvMHAttn(c, c, row.heads).to(device, DTYPES[row.dtype]).eval()
        x = torch.randn(row.batch, c, side, side, device=device).to(DTYPES[row.dtype])
        ref, paths = block_reference(m, x), block_paths(row, m, x)
    else:
        q_map, k_map, v_map = maps(row, device)
        ref = float64_rows(*(views(t, row) for t in (q_map, k_map, v_map)))
        paths = attention_paths(row, q_map, k_map, v_map)
    result = {"id": row.id, "paths": {}}
    for name, (fn, sample) in paths.items():
        entry = result["paths"][name] = {}
        try:
            if device == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                fn()
                entry["max_err"] = (sample().double() - ref).abs().max().item()
                if device == "cuda":
                    torch.cuda.synchronize()
                    entry["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
                entry["runs_ms"] = [time_ms(fn) for _ in range(runs)]
            entry["ms"] = statistics.median(entry["runs_ms"])
        except Exception as e:  # noqa: BLE001 (a peer refusing a shape is a result, not a crash)
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--kinds", default="attention,block", help="row kinds to run (tail, dynamic, scale: not yet)")
    ap.add_argument("--only", default="", help="a regex the row ids must match")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--peers-site", default="/tmp/peers", help="where peer_wheels.sh installed flash-attn-4")
    ap.add_argument("--budget-s", type=float, default=500, help="start no row after this")
    a = ap.parse_args(argv)
    import site

    if Path(a.peers_site).is_dir():
        site.addsitedir(a.peers_site)
    a.out.mkdir(parents=True, exist_ok=True)
    kinds = set(a.kinds.split(","))
    rows = [r for r in ROWS if r.kind in kinds and re.search(a.only, r.id)]
    start, results = time.time(), []
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "commit": _commit(),
            "torch": torch.__version__, "flash-attn-4": _fa4() is not None, "runs": a.runs}
    for row in rows:
        if time.time() - start > a.budget_s:
            break
        results.append(measure_row(row, a.runs))
        (a.out / "matrix.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1) + "\n")
        print(json.dumps(results[-1]), flush=True)
    left = [i for i in missing(r["id"] for r in results) if any(i == r.id for r in rows)]
    print(f"{len(results)} of {len(rows)} rows measured; not measured: {left}")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
