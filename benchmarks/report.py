"""Turn a benchmark JSON into the results table (Markdown) and the plot the README shows.

    python benchmarks/report.py benchmarks/results/nvidia-h100-80gb-hbm3.json

Needs matplotlib (not a convattn dependency); runs anywhere, no GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PATHS = ["einsum", "sdpa-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "ours-jit", "ours-aot"]


def markdown(doc: dict) -> str:
    meta, rows = doc["meta"], doc["rows"]
    out = [
        f"# Whole ConvMHAttn block (conv + attention + conv) on {meta['gpu']} ({meta['arch']})", "",
        f"torch {meta['torch']}, triton {meta['triton']}, convattn commit {meta['commit']}. "
        f"Command: `{meta['command']}`", "",
        "Median time (triton.testing.do_bench) / peak extra memory (torch.cuda.max_memory_allocated over "
        "inputs and weights). OOM: out of memory. All paths in one run on one GPU.", "",
        "| dtype | B | C | heads | D | S | " + " | ".join(PATHS) + " | ours vs cuDNN |",
        "|" + "---|" * (7 + len(PATHS)),
    ]
    for r in rows:
        res = r["results"]
        cells = [f"{res[p]['ms']:.3f} ms / {res[p]['peak_extra_bytes'] / 1e6:.0f} MB" if res[p]["status"] == "ok"
                 else res[p]["status"] for p in PATHS]
        speedup = res["sdpa-cudnn"]["ms"] / res["ours-jit"]["ms"] if res["sdpa-cudnn"]["status"] == "ok" else float("nan")
        out.append(f"| {r['dtype']} | {r['B']} | {r['C']} | {r['heads']} | {r['head_dim']} | {r['S']} | "
                   + " | ".join(cells) + f" | {speedup:.2f}x |")
    return "\n".join(out) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r["dtype"] == "fp16" and r["B"] == 8]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for col, d in enumerate(sorted({r["head_dim"] for r in rows})):
        sel = [r for r in rows if r["head_dim"] == d]
        for p in PATHS:
            pts = [(r["S"], r["results"][p]) for r in sel if r["results"][p]["status"] == "ok"]
            if not pts:
                continue
            style = dict(marker="o", lw=2.5) if p.startswith("ours") else dict(marker=".", lw=1)
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
    axes[0][0].legend(fontsize=8)
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
