"""The Gluon head_dim-512 kernel without a GPU: which views it takes, and that it builds for sm_90.

Gluon has no CPU interpreter, so its numerics are checked on the H100 (test_kernel_gpu.py)."""

import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton.experimental.gluon", reason="the Hopper kernel needs Triton's Gluon (triton>=3.6)")

from convattn.plugins.hopper import HEAD_DIM, layout_problem  # noqa: E402
from convattn.plugins.kernel import SMEM_LIMITS  # noqa: E402


def conv_views(b, s, d=HEAD_DIM, dtype=torch.float16, maps=1):
    """(B, 1, S, D) views of a (B, maps*D, S) conv output: q/k/v of separate convs, or of one qkv conv."""
    x = torch.randn(b, maps * d, s).to(dtype)
    return [x[:, i * d:(i + 1) * d].view(b, 1, d, s).transpose(-1, -2) for i in range(maps)]


def test_takes_the_vae_conv_views():
    (q,), (k,), (v,) = conv_views(4, 4096), conv_views(4, 1000), conv_views(4, 1000)
    assert layout_problem(q, k, v) is None
    assert layout_problem(*conv_views(2, 64, maps=3)) is None  # q, k, v slices of one qkv conv


def test_refuses_what_it_cannot_read_and_says_why():
    q, = conv_views(2, 1024)
    assert "fp16/bf16" in layout_problem(q.float(), q.float(), q.float())
    n, = conv_views(2, 1024, d=320)
    assert "head_dim one of (64, 128, 256, 512)" in layout_problem(n, n, n)
    tokens = torch.randn(2, 1024, HEAD_DIM).half().unsqueeze(1)  # Linear projections: (B, 1, S, D)
    assert "1x1-conv output view" in layout_problem(tokens, tokens, tokens)
    odd, = conv_views(2, 1001)  # 1001 pixels: rows of 2002 bytes, not 16-byte aligned for TMA
    assert "16-byte aligned" in layout_problem(q, odd, odd)


# The build runs in a child process: conftest turns on Triton's interpreter for the other tests,
# and Gluon kernels do not compile under it.
BUILD = """
import sys, torch
from convattn.plugins.hopper import compile_for_hopper
kernel = compile_for_hopper(getattr(torch, sys.argv[1]), sys.argv[2] == "even", sys.argv[4] == "q_bias", int(sys.argv[5]))
open(sys.argv[3], "w").write(kernel.asm["ptx"])
print(kernel.metadata.shared)
"""


@pytest.mark.parametrize("dtype,even_n,bias,d", [("float16", "even", "q_bias", 512), ("bfloat16", "masked", "none", 512),
                                                ("float16", "masked", "none", 128), ("float16", "masked", "q_bias", 256)])
def test_builds_for_hopper_with_tensor_cores_and_no_spills(dtype, even_n, bias, d, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    ptx = tmp_path / "kernel.ptx"
    built = subprocess.run([sys.executable, "-c", BUILD, dtype, even_n, str(ptx), bias, str(d)], env=env,
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    assert int(built.stdout.split()[-1]) <= SMEM_LIMITS[90]
    assert "wgmma.mma_async" in ptx.read_text()
    from triton.backends.nvidia.compiler import get_ptxas

    report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(ptx), "-o", "/dev/null"],
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert re.search(r"0 bytes spill stores, 0 bytes spill loads", report.stderr), report.stderr


WS_BUILD = """
import sys, torch
from convattn.plugins.hopper_ws import WsConfig, compile_for_hopper
c = WsConfig(*map(int, sys.argv[4].split(",")))
kernel = compile_for_hopper(getattr(torch, sys.argv[1]), False, sys.argv[3] == "q_bias", int(sys.argv[2]), c)
open(sys.argv[5], "w").write(kernel.asm["ptx"])
print(kernel.metadata.shared, kernel.metadata.num_warps)
"""


@pytest.mark.parametrize("d,config", [(64, "2,128,3"), (64, "3,64,3"), (128, "2,128,2")])
def test_warp_specialized_kernel_builds_with_its_partitions_and_no_spills(d, config, tmp_path):
    """The variants `hopper_ws.config_for` picks: they fit shared memory, run 4 warps per consumer plus
    a producer warpgroup, hand registers to the consumers (setmaxnreg) and spill nothing (ptxas)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    ptx = tmp_path / "kernel.ptx"
    built = subprocess.run([sys.executable, "-c", WS_BUILD, "float16", str(d), "q_bias", config, str(ptx)], env=env,
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    shared, warps = map(int, built.stdout.split()[-2:])
    consumers = int(config.split(",")[0])
    assert shared <= SMEM_LIMITS[90] and warps == 4 * (consumers + 1)
    text = ptx.read_text()
    assert "wgmma.mma_async" in text and "setmaxnreg.inc" in text and "cp.async.bulk.tensor" in text
    from triton.backends.nvidia.compiler import get_ptxas

    report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", str(ptx), "-o", "/dev/null"],
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert not re.search(r"[1-9]\d* bytes spill stores", report.stderr), report.stderr
