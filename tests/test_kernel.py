"""The Triton kernel on the CPU (TRITON_INTERPRET=1, set by conftest) and its AOT artifact."""

import os
import re

import pytest
import torch

triton = pytest.importorskip("triton", reason="the kernel tests need triton (pip install -e '.[test]')")

from convattn.plugins.aot import PTX_ISA_DRIVER  # noqa: E402
from convattn.plugins.op import layout_strides  # noqa: E402
from convattn.plugins import flash_attention  # noqa: E402
from convattn.plugins.kernel import KernelConfig, candidate_configs  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernel in Triton's CPU interpreter"
)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
# Triton 3.6's interpreter multiplies bf16 tl.dot operands as raw uint16 bits (numpy has no
# bf16): a 16x16 bf16 dot is off by ~1e10 there. bf16 is covered by the GPU tests instead.


def conv_views(b, h, d, s, dtype):
    """(B, heads, S, D) views of a (B, heads*D, S) conv-output map: strides (., ., 1, S)."""
    return torch.randn(b, h * d, s, dtype=torch.float32).to(dtype).view(b, h, d, s).transpose(-1, -2)


def reference(q, k, v, scale):
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, -1)
    return p @ v.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("s_q,s_kv,d", [(37, 53, 8), (20, 9, 24), (65, 130, 64), (1, 1, 8)])
def test_kernel_matches_float64_on_conv_output_views(dtype, s_q, s_kv, d):
    torch.manual_seed(s_q * 1000 + s_kv)
    q, k, v = conv_views(2, 3, d, s_q, dtype), conv_views(2, 3, d, s_kv, dtype), conv_views(2, 3, d, s_kv, dtype)
    out_map = torch.full((2, 3 * d, s_q), float("nan"), dtype=dtype)
    out = out_map.view(2, 3, d, s_q).transpose(-1, -2)
    result = flash_attention(q, k, v, out=out, config=KernelConfig(16, 16, 4, 1))
    assert result.data_ptr() == out_map.data_ptr()  # written in place, no copy
    err = (out_map.view(2, 3, d, s_q).transpose(-1, -2).double() - reference(q, k, v, d**-0.5)).abs().max()
    assert err <= TOL[dtype], err


def test_contiguous_inputs_and_other_scale():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, s, 40) for s in (33, 17, 17))
    out = flash_attention(q, k, v, scale=0.05, config=KernelConfig(16, 16, 4, 1))
    assert (out.double() - reference(q, k, v, 0.05)).abs().max() <= 1e-5


def test_large_logits_stay_finite_in_fp16():
    torch.manual_seed(0)
    q, k, v = (conv_views(1, 1, 16, 40, torch.float16) * 8 for _ in range(3))
    scores = q @ k.transpose(-1, -2)
    assert not torch.isfinite(torch.exp(scores)).all()  # a softmax without the running max overflows
    out = flash_attention(q, k, v, scale=1.0, config=KernelConfig(16, 16, 4, 1))
    ref = reference(q, k, v, 1.0)
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() / ref.abs().max() <= 2e-3


def test_q_bias_is_added_by_the_kernel_to_every_query(monkeypatch):
    """The Triton kernel adds a Q conv's bias to its resident Q tile: no copy of q (add_q_bias is the
    CPU reference's copy). Mutations: q = add_q_bias(q, q_bias) before the launch; a bias indexed by
    d alone (not head*D + d)."""
    from convattn.plugins import flash

    def no_copy(*args):
        raise AssertionError("q was copied to add its bias")

    monkeypatch.setattr(flash, "add_q_bias", no_copy)
    torch.manual_seed(0)
    q, k, v = (conv_views(2, 3, 8, s, torch.float32) for s in (20, 9, 9))
    bias = torch.randn(3 * 8)  # a Q conv's bias: heads x head_dim
    out = flash_attention(q, k, v, q_bias=bias, config=KernelConfig(16, 16, 4, 1))
    ref = reference(q + bias.view(1, 3, 1, 8), k, v, 8**-0.5)
    assert (out.double() - ref).abs().max() <= 1e-5
    assert (out.double() - reference(q, k, v, 8**-0.5)).abs().max() > 1e-2  # the bias matters here


def test_bad_arguments_are_refused():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="do not form an attention"):
        flash_attention(q, torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="one dtype"):
        flash_attention(q, q.half(), q)
    with pytest.raises(ValueError, match="out: expected"):
        flash_attention(q, q, q, out=torch.empty(1, 2, 4, 9))
    with pytest.raises(ValueError, match="q_bias: expected 16 values"):
        flash_attention(q, q, q, q_bias=torch.zeros(8))


def compile_in_subprocess(tmp_path, *args):
    """AOT compilation needs the real compiler, not the interpreter this process runs in."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "convattn.plugins.aot", "--out", str(tmp_path), *map(str, args)],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    meta = json.loads(open(out).read())
    return meta, open(out.replace(".json", ".ptx")).read()


@pytest.mark.parametrize("arch", [80, 89, 90])
def test_aot_artifact_without_gpu(tmp_path, arch):
    meta, ptx = compile_in_subprocess(tmp_path, "--head-dim", 8, "--heads", 8, "--dtype", "fp16", "--arch", arch,
                                      "--config", "64,64,4,2")
    assert meta["kernel_name"] == "_attn_fwd" and meta["threads_per_block"] == 32 * 4
    entry = re.search(r"\.entry\s+_attn_fwd\s*\((.*?)\)", ptx, re.S).group(1)
    params = [p for p in entry.split(",") if p.strip()]
    # TensorRT's argument list: 3 input pointers, the int32 extras, 1 output pointer, nothing else.
    n_scalars = len(meta["scalar_arg_names"])
    assert len(params) == 3 + n_scalars + 1 == len(meta["arg_order"])
    assert [".u64" in p for p in params] == [True] * 3 + [False] * n_scalars + [True]
    assert meta["hidden_params_removed"] == 2  # Triton >= 3.3 appends global and profile scratch
    assert f".target sm_{arch}{'a' if arch == 90 else ''}" in ptx
    assert meta["ptx_isa"] in PTX_ISA_DRIVER and meta["min_driver"] == PTX_ISA_DRIVER[meta["ptx_isa"]][1]
    assert meta["arg_order"][:3] == ["Q", "K", "V"] and meta["arg_order"][-1] == "Out"
    assert meta["triton_version"].startswith("3.6")  # pinned: its PTX ISA 8.7 loads on driver >= 570


def test_aot_scalar_args_are_the_layout_strides():
    from convattn.plugins.aot import AotArtifact

    art = AotArtifact(
        kernel_name="_attn_fwd", ptx="", cubin=b"", shared_mem=0, num_warps=4, threads_per_block=128,
        config=KernelConfig(32, 32, 4, 1), arch="sm_90", layouts=("NCHW",) * 4, head_dim=24, head_dim_v=24,
        num_heads=2, dtype="fp32", scale=0.2, ptx_isa="8.7", min_driver="", triton_version="",
        hidden_params_removed=2,
        scalar_arg_names=[f"stride_{t}{a}" for t in "qkvo" for a in "bhd"] + ["num_heads", "seq_q", "seq_kv"],
    )
    q_shape, kv_shape = (3, 48, 7, 9), (3, 48, 5, 3)
    args = dict(zip(art.scalar_arg_names, art.scalar_args(q_shape, kv_shape, kv_shape)))
    q = torch.empty(q_shape).view(3, 2, 24, 63).transpose(-1, -2)  # what the JIT path receives
    k = torch.empty(kv_shape).view(3, 2, 24, 15).transpose(-1, -2)
    assert (args["stride_qb"], args["stride_qh"], args["stride_qd"]) == (q.stride(0), q.stride(1), q.stride(3))
    assert (args["stride_kb"], args["stride_kh"], args["stride_kd"]) == (k.stride(0), k.stride(1), k.stride(3))
    assert (args["stride_ob"], args["stride_oh"], args["stride_od"]) == (q.stride(0), q.stride(1), q.stride(3))
    assert (args["seq_q"], args["seq_kv"], args["num_heads"]) == (63, 15, 2)
    assert art.grid(3, 2, 63) == (2, 6, 1)
    assert layout_strides((3, 2, 63, 24), "BHSD", 2) == torch.empty(3, 2, 63, 24).stride()


def test_config_space_is_pruned_for_large_heads():
    small, large = candidate_configs(8, 2), candidate_configs(512, 2)
    assert len(small) > len(large) >= 1
    for dtype_bytes in (2, 4):  # every tactic of a 512-wide head fits the registers and SMEM
        for c in candidate_configs(512, dtype_bytes):
            assert c.block_m * c.dv_block(512) / (c.num_warps * 32) <= 128  # fp32 accumulator per thread
            assert dtype_bytes * (c.block_m * 512 + c.num_stages * c.block_n * (512 + c.dv_block(512))) <= 227 * 1024
    # Wide heads offer head-dim splits: 2 programs of 256 columns, or 3 of 128 for a 320-wide head.
    assert any(c.block_dv == 256 and c.dv_programs(512) == 2 for c in large)
    assert KernelConfig(128, 64, 8, 1, None, 128).dv_programs(320) == 3
    assert all(c.block_dv is None for c in small)


@pytest.mark.parametrize("arch", [80, 86, 90])
def test_untuned_gpus_get_a_config_their_shared_memory_holds(arch):
    """No recorded config for this GPU: the default and every tactic fit its per-block limit
    (sm_86's 99 KB cannot hold the H100's 224 KB head-split tiles)."""
    from convattn.plugins.kernel import block_dim, default_config, smem_limit
    from convattn.plugins.plan import tactic_configs

    for d, nbytes in ((512, 2), (512, 4), (320, 2), (64, 2), (8, 4)):
        for c in [default_config(d, nbytes, smem=smem_limit(arch)),
                  *tactic_configs(d, "fp32" if nbytes == 4 else "fp16", f"sm_{arch}")]:
            bd = block_dim(d)
            assert nbytes * (c.block_m * bd + c.num_stages * c.block_n * (bd + c.dv_block(d))) <= smem_limit(arch)


@pytest.mark.parametrize("config", [KernelConfig(16, 16, 4, 1), KernelConfig(16, 16, 4, 1, None, 128)],
                         ids=["whole-head", "split-dv128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("d", [320, 512])
def test_large_heads_on_linear_token_views(dtype, d, config):
    """The Stable Diffusion VAE's single 512-wide head (and 320): (B, S, C) Linear outputs read
    as (B, 1, S, D) views, d contiguous; the output written into a (B, S, C) tensor in place.
    Split: each program writes 128 of the head's columns (320: the third program only 64)."""
    torch.manual_seed(d)
    b, s_q, s_kv = 2, 9, 13
    tokens = [torch.randn(b, s, d).to(dtype) for s in (s_q, s_kv, s_kv)]
    q, k, v = (t.view(b, t.shape[1], 1, d).transpose(1, 2) for t in tokens)
    out_tokens = torch.full((b, s_q, d), float("nan"), dtype=dtype)
    flash_attention(q, k, v, out=out_tokens.view(b, s_q, 1, d).transpose(1, 2), config=config)
    ref = reference(q, k, v, d**-0.5).transpose(1, 2).reshape(b, s_q, d)
    assert (out_tokens.double() - ref).abs().max() <= TOL[dtype]


def test_split_head_with_a_different_value_width():
    """D_v != D with a split: scores over 40 dims, 200 output columns in 64-wide slices."""
    torch.manual_seed(3)
    q, k = conv_views(1, 2, 40, 11, torch.float32), conv_views(1, 2, 40, 17, torch.float32)
    v = conv_views(1, 2, 200, 17, torch.float32)
    out = flash_attention(q, k, v, config=KernelConfig(16, 16, 4, 1, None, 64))
    assert (out.double() - reference(q, k, v, 40**-0.5)).abs().max() <= TOL[torch.float32]


def test_aot_artifact_for_token_layout_and_large_head(tmp_path):
    meta, ptx = compile_in_subprocess(tmp_path, "--head-dim", 512, "--heads", 1, "--dtype", "fp16",
                                      "--layouts", "BSC,BSC,BSC,BSC", "--config", "128,64,8,1,0,256")
    assert meta["layouts"] == ["BSC"] * 4 and meta["hidden_params_removed"] == 2
    assert meta["config"]["block_dv"] == 256 and meta["config"]["maxnreg"] is None  # 2 programs per row block
    assert meta["shared_mem"] <= 227 * 1024
    assert "stride_qd" not in meta["scalar_arg_names"]  # d is the contiguous axis: compiled in as 1


def test_fp32_products_follow_pytorchs_tf32_switch(monkeypatch):
    """fp32 runs exact by default, on TF32 tensor cores where PyTorch's own switch
    (torch.backends.cuda.matmul.allow_tf32) allows it, and as the `tf32` argument says.
    Mutation: IEEE from the dtype alone."""
    from convattn.plugins import flash

    seen = []

    class Spy:
        def __init__(self, real):
            self.real = real

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.append(kwargs["IEEE"])
                return self.real[grid](*args, **kwargs)
            return run

    for kernel in ("_attn_fwd", "_attn_windows"):  # 16 keys: the short-sequence kernel
        monkeypatch.setattr(flash, kernel, Spy(getattr(flash, kernel)))
    q = torch.randn(1, 2, 16, 8)
    flash.jit_attention(q, q, q)
    # torch serves allow_tf32 through __getattr__/__setattr__: set and restore it through them
    # (monkeypatch's undo would delattr it, which pytest >= 9 reports as a teardown error).
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        flash.jit_attention(q, q, q)
        flash.jit_attention(q, q, q, tf32=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert seen == [True, False, True]
