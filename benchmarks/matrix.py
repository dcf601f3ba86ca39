"""Issue 24's benchmark matrix, committed before any optimisation: every row a later run must report
(a row left out of a result counts as failed: `missing`), and the peers' settings. Nothing here runs a
GPU; the runner reads ROWS and PEERS.

Paths of ours: "engine" is the AOT artifact launched with TensorRT's argument list through
`aot.launch_ptx` (no TensorRT runs there), "jit" the Triton/Gluon kernels through `flash_attention`.
Attention-only rows: each peer reads its inputs in the layout it wants (copies not timed), ours reads
the NCHW maps the 1x1 convs write, in place. Block rows (1x1 Q/K/V convs + attention + output conv):
every path pays the copies it needs. Times: median of `triton.testing.do_bench`, three runs, the median
of those reported; ratios from one run; peak memory beside time (torch.cuda.max_memory_allocated over
the inputs)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

C = 512  # channels of every map: heads = C // head_dim


@dataclass(frozen=True)
class Row:
    kind: str  # "attention", "block", "tail" (S not a multiple of 128), "dynamic", "scale"
    dtype: str  # fp16, bf16, fp32 (exact; with "tf32" in `modes` also TF32)
    head_dim: int
    seq: int  # S = H*W
    batch: int
    heads: int

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.dtype}/d{self.head_dim}/h{self.heads}/S{self.seq}/B{self.batch}"


def _rows() -> list[Row]:
    rows = []
    # attention only: d 64/128/256, fp16 and bf16, S 4096..262144 (a 512x512 map), B 1..8
    for d, dt, (s, b) in product((64, 128, 256), ("fp16", "bf16"),
                                 ((4096, 8), (16384, 4), (16384, 8), (65536, 1), (262144, 1))):
        rows.append(Row("attention", dt, d, s, b, C // d))
    # fp32: exact (target <= einsum) and TF32 (target <= SDPA efficient) at the block's shapes
    for d, (s, b) in product((64, 128), ((4096, 4), (16384, 1))):
        rows.append(Row("attention", "fp32", d, s, b, C // d))
    # the block: 1x1 convs + attention + output conv (d512: the Stable Diffusion VAE, target <= 3.8 ms)
    for d, dt, (s, b) in product((64, 128, 256), ("fp16", "bf16"), ((4096, 8), (16384, 4))):
        rows.append(Row("block", dt, d, s, b, C // d))
    rows += [Row("block", dt, 512, s, b, 1) for dt in ("fp16", "bf16") for s, b in ((16384, 4), (4096, 1))]
    rows += [Row("block", "fp32", d, 4096, 4, C // d) for d in (64, 128)]
    # masked last tiles (the Hopper tactic at any S) and a dynamic profile (min 1024, opt 4096, max 16384)
    rows += [Row("tail", "fp16", d, s, 4, C // d) for d in (64, 128) for s in (4097, 16000)]
    rows += [Row("dynamic", "fp16", d, 4096, 4, C // d) for d in (64, 128)]
    # one 1024x1024 map (S = 1,048,576) through the engine path's launcher: time, peak memory, float64 check
    rows += [Row("scale", "fp16", 64, 1 << 20, 1, 8), Row("scale", "fp16", 512, 1 << 20, 1, 1)]
    return rows


ROWS = _rows()
DYNAMIC_PROFILE = {"min": 1024, "opt": 4096, "max": 16384}

# The peers and how each is called (inputs in its own layout; scale d**-0.5; no causal mask, no dropout).
PEERS = {
    "flash-attn-4": {"version": "4.0.0b36", "call": "flash_attn.cute.interface.flash_attn_func(q, k, v, "
                     "softmax_scale=d**-0.5, causal=False)", "layout": "(B, S, H, D) contiguous",
                     "dtypes": ["fp16", "bf16"], "needs": "nvidia-cutlass-dsl 4.8.1 (libs-base, libs-core, libs-cu13), "
                     "apache-tvm-ffi, torch-c-dlpack-ext, quack-kernels; site.addsitedir"},
    "cudnn": {"call": "SDPA under sdpa_kernel(SDPBackend.CUDNN_ATTENTION)", "layout": "(B, H, S, D) contiguous",
              "dtypes": ["fp16", "bf16"]},
    "sdpa-flash": {"call": "SDPA under sdpa_kernel(SDPBackend.FLASH_ATTENTION)", "layout": "(B, H, S, D) contiguous",
                   "dtypes": ["fp16", "bf16"]},
    "sdpa-efficient": {"call": "SDPA under sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION)",
                       "layout": "(B, H, S, D) contiguous", "dtypes": ["fp16", "bf16", "fp32"]},
    "einsum": {"call": "torch.einsum scores, softmax, einsum with V (torch.backends.cuda.matmul.allow_tf32 = False)",
               "layout": "(B, H, S, D) views", "dtypes": ["fp16", "bf16", "fp32"]},
}
OURS = ("engine", "jit")
# What each row must show (issue 24's "done when"), checked by the report on the results
TARGETS = {
    "attention": "engine >= flash-attn-4 (fp16/bf16); fp32 exact <= einsum, TF32 <= SDPA efficient",
    "block": "engine >= 1.1x the best peer block; engine >= jit; d512 fp16 S16384 B4 <= 3.8 ms",
    "tail": "the Hopper tactic runs and matches float64",
    "dynamic": "the Hopper tactic serves the profile",
    "scale": "time and peak memory beside the best peer that fits; float64 reference in tiles (no S x S tensor)",
}


def missing(result_ids) -> list[str]:
    """The matrix rows a result does not report (each counts as failed)."""
    have = set(result_ids)
    return [r.id for r in ROWS if r.id not in have]
