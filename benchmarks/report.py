"""Turn a benchmark JSON into the results table (Markdown) and the plot the README shows.

    python benchmarks/report.py benchmarks/results/nvidia-h100-80gb-hbm3.json

Needs matplotlib (not a convattn dependency); runs anywhere, no GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PATHS = ["einsum", "sdpa-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "ours-jit", "ours-aot", "ours-aot-hopper",
         "ours-jit-tf32", "ours-aot-tf32"]
SWEEP_DIMS = (8, 64)  # the plot's S sweeps (B=8, fp16)


def ms(res: dict, path: str) -> float | None:
    v = res.get(path)
    return v["ms"] if v and v["status"] == "ok" else None


def engine_ms(res: dict) -> float | None:
    """The engine path: TensorRT times every tactic (the Triton configs' PTX, the Hopper kernel's) and
    keeps the fastest; here the faster of the two measured AOT launches (exact fp32 for fp32 rows:
    `ours-aot-tf32` is a TF32 engine's)."""
    times = [t for t in (ms(res, "ours-aot"), ms(res, "ours-aot-hopper")) if t]
    return min(times) if times else None
DENSE_FP16_PEAK = 989.4e12  # H100 SXM, dense fp16/bf16 tensor-core FLOP/s (NVIDIA's datasheet)


def block_flops(r: dict) -> float:
    """Attention (Q K^T and P V) plus the four 1x1 convs (q, k, v, out) of one block."""
    b, s, c = r["B"], r["S"], r["C"]
    return 4 * b * s * s * c + 4 * 2 * b * s * c * c


def best_pytorch(res: dict) -> tuple[str, float]:
    ok = {p: ms(res, p) for p in PATHS if not p.startswith("ours") and ms(res, p)}
    name = min(ok, key=ok.get)
    return name, ok[name]


def markdown(doc: dict) -> str:
    meta, rows = doc["meta"], doc["rows"]
    out = [
        f"# Whole ConvMHAttn block (conv + attention + conv) on {meta['gpu']} ({meta['arch']})", "",
        (f"torch {meta['torch']}, triton {meta['triton']}, convattn commit {meta['commit']}. "
         f"Command: `{meta['command']}`"), "",
        ("Median time (triton.testing.do_bench) / peak extra memory (torch.cuda.max_memory_allocated over "
         "inputs and weights). OOM: out of memory; unsupported: PyTorch has no kernel for the shape; -: not run "
         "for this row. All paths in one run on one GPU. C=512 with one head: the Stable Diffusion VAE's "
         "attention. ours-jit: `flash_attention` (on Hopper at head dims 512, and 64/128 from S=4096, a Gluon "
         "kernel); ours-aot: the Triton kernel's PTX as a TensorRT engine embeds it; ours-aot-hopper: the "
         "engine's Hopper tactic (TMA descriptors in the scratch output); engine: the faster of the two, "
         "as TensorRT's tactic timing picks. fp32 rows: exact, and `-tf32`."), "",
        "| dtype | B | C | heads | D | S | " + " | ".join(PATHS) + " | engine | ours vs cuDNN (jit / engine) "
        "| ours vs best PyTorch |",
        "|" + "---|" * (10 + len(PATHS)),
    ]
    for r in rows:
        res = r["results"]
        cells = []
        for p in PATHS:
            v = res.get(p, {"status": "-"})
            cells.append(f"{v['ms']:.3f} ms / {v['peak_extra_bytes'] / 1e6:.0f} MB" if v["status"] == "ok" else v["status"])
        engine, cudnn, jit = engine_ms(res), ms(res, "sdpa-cudnn"), ms(res, "ours-jit")
        vs = f"{cudnn / jit:.2f}x / {cudnn / engine:.2f}x" if cudnn else "-"
        name, best = best_pytorch(res)
        out.append(f"| {r['dtype']} | {r['B']} | {r['C']} | {r['heads']} | {r['head_dim']} | {r['S']} | "
                   + " | ".join(cells) + f" | {engine:.3f} ms | {vs} | {best / jit:.2f}x ({name}) |")
    wide = [r for r in rows if r["head_dim"] > 256]
    if wide:
        out += ["", "Wide heads: fraction of the matmul floor (the block's FLOPs at the dense fp16 peak, "
                f"{DENSE_FP16_PEAK / 1e12:.1f} TFLOP/s) reached:", "",
                "| B | S | FLOPs | floor | ours-jit | engine | fraction (jit / engine) |", "|---|---|---|---|---|---|---|"]
        for r in wide:
            floor_ms = block_flops(r) / DENSE_FP16_PEAK * 1e3
            jit, engine = ms(r["results"], "ours-jit"), engine_ms(r["results"])
            out.append(f"| {r['B']} | {r['S']} | {block_flops(r) / 1e12:.2f} T | {floor_ms:.2f} ms | {jit:.3f} ms | "
                       f"{engine:.3f} ms | {floor_ms / jit:.0%} / {floor_ms / engine:.0%} |")
    return "\n".join(out) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r["dtype"] == "fp16" and r["B"] == 8 and r["head_dim"] in SWEEP_DIMS]
    wide = [r for r in doc["rows"] if r["dtype"] == "fp16" and r["head_dim"] > 256]
    fig, axes = plt.subplots(2, 3 if wide else 2, figsize=(16 if wide else 11, 8))
    for col, d in enumerate(sorted({r["head_dim"] for r in rows})):
        sel = [r for r in rows if r["head_dim"] == d]
        for p in PATHS:
            pts = [(r["S"], r["results"][p]) for r in sel if ms(r["results"], p)]
            if not pts:
                continue
            style = {"marker": "o", "lw": 2.5} if p.startswith("ours") else {"marker": ".", "lw": 1}
            axes[0][col].plot([s for s, _ in pts], [v["ms"] for _, v in pts], label=p, **style)
            axes[1][col].plot([s for s, _ in pts], [v["peak_extra_bytes"] / 1e6 for _, v in pts], label=p, **style)
        c, h = sel[0]["C"], sel[0]["heads"]
        axes[0][col].set_title(f"B=8, C={c}, {h} heads (head_dim {d}), fp16")
        axes[0][col].set_ylabel("median ms (whole block)")
        axes[1][col].set_ylabel("peak extra memory, MB")
        axes[1][col].set_xlabel("S = H*W (missing point: out of memory)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
    if wide:  # the VAE's shapes differ in batch too: bars per shape, not a line over S
        width = 0.8 / len(PATHS)
        for i, p in enumerate(PATHS):
            xs = [j + i * width for j, r in enumerate(wide) if ms(r["results"], p)]
            ok = [r["results"][p] for r in wide if ms(r["results"], p)]
            if not ok:
                continue
            hatch = "//" if p.startswith("ours") else None
            axes[0][2].bar(xs, [v["ms"] for v in ok], width, label=p, hatch=hatch)
            axes[1][2].bar(xs, [v["peak_extra_bytes"] / 1e6 for v in ok], width, label=p, hatch=hatch)
        for ax in (axes[0][2], axes[1][2]):
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(wide))],
                          [f"B={r['B']}, {r['side']}x{r['side']} (S={r['S']})" for r in wide])
            ax.set_yscale("log")
            ax.grid(True, axis="y", which="both", alpha=0.3)
        axes[0][2].set_title("SD VAE attention: C=512, 1 head (head_dim 512), fp16\n(missing bar: no kernel)")
        axes[0][2].set_ylabel("median ms (whole block)")
        axes[1][2].set_ylabel("peak extra memory, MB")
    labels = {}  # every path of every panel, once (the Hopper tactic has no d=8 point)
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    axes[0][0].legend(labels.values(), labels.keys(), fontsize=8)
    fig.suptitle(f"ConvMHAttn block on {doc['meta']['gpu']}, commit {doc['meta']['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    src = Path(sys.argv[1])
    doc = json.loads(src.read_text())
    src.with_suffix(".md").write_text(markdown(doc))
    plot(doc, src.with_suffix(".png"))
    print(src.with_suffix(".md"), src.with_suffix(".png"))


if __name__ == "__main__":
    main()
