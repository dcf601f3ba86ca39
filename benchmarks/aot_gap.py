"""Why is the AOT launch slower than the JIT kernel? Time, on the attention alone:
JIT; AOT (any shape); AOT compiled as if every shape were a multiple of 16 (what JIT sees).

    python benchmarks/aot_gap.py
"""

import torch
import triton.testing

from convattn.plugins import aot
from convattn.plugins import flash_attention
from convattn.plugins.plan import pick_config

major, minor = torch.cuda.get_device_capability()
print(torch.cuda.get_device_name())
for c, heads, side in ((64, 8, 128), (256, 4, 128)):
    d, b, s = c // heads, 8, side * side
    maps = [torch.randn(b, c, side, side, device="cuda", dtype=torch.float16) for _ in range(4)]
    q, k, v, o = maps
    views = [m.view(b, heads, d, s).transpose(-1, -2) for m in maps]
    cfg = pick_config(q.device, q.dtype, d, s)
    row = {"jit": triton.testing.do_bench(lambda: flash_attention(*views[:3], out=views[3]), return_mode="median")}
    for assume in (False, True):
        aot._ASSUME_ALIGNED_SHAPES = assume
        art = aot.compile_artifact(head_dim=d, num_heads=heads, dtype="fp16", config=cfg, scale=d**-0.5, arch=major * 10 + minor)
        row["aot-aligned-shapes" if assume else "aot"] = triton.testing.do_bench(
            lambda: aot.launch_artifact(art, q, k, v, o), return_mode="median")
    print(f"D={d} S={s} {cfg}: " + "  ".join(f"{k} {v:.3f} ms" for k, v in row.items()), flush=True)
