"""Grouped-query attention in the kernel: K and V with fewer heads than Q (query head h reads K/V head
h // (H / H_kv), ONNX's order), read in place with no repeated copy, in the Triton kernel (CPU
interpreter), the reference, the AOT extras TensorRT evaluates, and on the GPU through TensorRT's
argument list. ONNX's own grouped-query Attention cases are in `test_onnx_attention.py`."""

import os

import numpy as np
import pytest
import torch

import trt_harness as h
from convattn.plugins import plan, trt_plugin
from convattn.plugins.kernel import KernelConfig
from convattn.plugins.op import FlashAttentionAttrs, make_node
from convattn.plugins.reference import tiled_attention

B, H, H_KV, S_Q, S_KV, D, D_V = 2, 6, 2, 33, 40, 16, 8


def float64_grouped(q, k, v, scale, bias=None):
    """Written here: each K/V head repeated for its group (torch.repeat_interleave), then attention."""
    k, v = (t.double().repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    s = q.double() @ k.transpose(-1, -2) * scale
    return torch.softmax(s if bias is None else s + bias.double(), -1) @ v


def _inputs(seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=g) for shape in ((B, H, S_Q, D), (B, H_KV, S_KV, D), (B, H_KV, S_KV, D_V)))
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernel in Triton's CPU interpreter")
@pytest.mark.parametrize("biased", [False, True])
def test_the_kernel_shares_each_kv_head_over_its_group(biased):
    """Mutations: K/V indexed by the query head (reads past H_KV: wrong or out of bounds); `h % kv_heads`
    instead of `h // group` (the wrong head of each group: error ~1)."""
    from convattn.plugins import flash_attention

    q, k, v = _inputs()
    bias = torch.randn(1, H, S_Q, S_KV) if biased else None
    out = flash_attention(q, k, v, scale=0.25, config=KernelConfig(16, 16, 4, 1), bias=bias)
    assert (out.double() - float64_grouped(q, k, v, 0.25, bias)).abs().max() <= 1e-5


def test_the_reference_repeats_each_kv_head_for_its_group():
    q, k, v = _inputs(1)
    got = tiled_attention(q.numpy(), k.numpy(), v.numpy(), 0.3, 16)
    assert np.abs(got - float64_grouped(q, k, v, 0.3).numpy()).max() <= 1e-5


@pytest.fixture(params=list(h.WHEELS))
def trt(request, monkeypatch):
    monkeypatch.setattr(trt_plugin, "_arch", lambda: "sm_90")
    with h.tensorrt(request.param) as (core, trtp):
        yield core, trtp, request.param


def _build(core, dtype, env=None):
    trt_plugin.register_plugin()
    attrs = FlashAttentionAttrs(H, D ** -0.5, "BHSD", "BHSD", "BHSD", "BHSD")
    plugin = h.parse_node(core, make_node(["q", "k", "v"], "o", attrs, "aot", name="n"))
    shapes = [("B", H, "S", D), ("B", H_KV, "T", D), ("B", H_KV, "T", D_V)]
    return h.build_node(core, plugin, [dtype] * 3, shapes, env or {"B": B, "S": S_Q, "T": S_KV}, tactics=[1])


def test_the_plugin_passes_the_group_and_offers_no_hopper_tactic(trt):
    """The group (Q heads // K heads, from TensorRT's shape expressions) is the kernel's last int32 extra;
    the grid runs over the query heads; the Hopper tactic (one K/V head per query head) is not offered.
    Mutation: the group computed from the attribute (1: every query head reads K/V head h, out of bounds)."""
    core, _, _ = trt
    built = _build(core, core.float16)
    assert built.launches[1].extras[-1] == H // H_KV
    assert built.launches[1].grid[1] == B * H and built.output_shape == (B, H, S_Q, D_V)
    assert plan.HOPPER_TACTIC not in built.tactics


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_gpu_grouped_kernel_as_tensorrt_launches_it(trt, dtype):
    core, _, _ = trt
    trt_dtype = {"fp32": core.float32, "fp16": core.float16, "bf16": core.bfloat16}[dtype]
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    launch = _build(core, trt_dtype).launches[1]
    q, k, v = _inputs(2, "cuda", torch_dtype)
    out = torch.empty(B, H, S_Q, D_V, device="cuda", dtype=torch_dtype)
    from convattn.plugins.aot import launch_ptx

    launch_ptx(launch.ptx, launch.kernel_name, launch.grid, launch.block, launch.shared_mem, (q, k, v), launch.extras,
               (out,))
    torch.cuda.synchronize()
    want = float64_grouped(q.cpu(), k.cpu(), v.cpu(), D ** -0.5)
    assert (out.double().cpu() - want).abs().max() <= {"fp32": 1e-5, "fp16": 4e-3, "bf16": 3e-2}[dtype]
