"""Where the bias tile goes in the compiled kernel (CPU only: Triton compiles for sm_90 without a GPU).

    python -m convattn.benchmarks.bias_ir

For each config, the biased kernel's TTGIR: how the bias tile reaches the scores' (MMA) layout in each of
the kernel's bodies (aligned main loop, masked last tile, unaligned): `async_copy` into shared memory then
`local_load` as MMA (pipelined), or a register load then `convert_layout` (a round trip through shared
memory with barriers, not pipelined). And the shared memory and PTX instruction counts with and without
the bias. Issue 23's 10% target is missed at Swin's shapes; this says where to look."""

from __future__ import annotations

import re

import triton

from convattn.plugins import aot
from convattn.plugins.kernel import KernelConfig

CONFIGS = [KernelConfig(64, 64, 4, 2, 128), KernelConfig(128, 64, 4, 3, 128), KernelConfig(128, 32, 4, 3, 128)]


def compiled(config, bias: bool, head_dim=32):
    kept = {}
    original = triton.compile

    def spy(src, target=None, options=None):
        kept["c"] = original(src, target=target, options=options)
        return kept["c"]

    triton.compile = spy
    try:
        art = aot.compile_artifact.__wrapped__(head_dim=head_dim, num_heads=3, dtype="fp16", config=config,
                                               scale=head_dim ** -0.5, layouts=("BHSD",) * 4, bias=bias)
    finally:
        triton.compile = original
    return art, kept["c"].asm["ttgir"]


def main() -> None:
    print("| config | bias | shared bytes | bias tiles pipelined (async_copy) | bias tiles converted (load + convert_layout) "
          "| convert_layout total | st.shared | ld.global |")
    print("|---|---|---|---|---|---|---|---|")
    for c in CONFIGS:
        for bias in (False, True):
            art, ir = compiled(c, bias)
            lines = ir.splitlines()
            piped = sum("async_copy_global_to_local %bias" in line for line in lines)
            converted = sum(bool(re.search(r"convert_layout %bias\w* : tensor<\d+x\d+xf16, #blocked", line)) for line in lines)
            stores, loads = art.ptx.count("st.shared"), art.ptx.count("ld.global")
            print(f"| {c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages} | {bias} | {art.shared_mem} | {piped} | {converted} "
                  f"| {ir.count('ttg.convert_layout')} | {stores} | {loads} |")


if __name__ == "__main__":
    main()
