"""The short-sequence kernel (`kernel._attn_windows`: S_kv <= 64, one key tile, several samples per
program sharing one bias tile, as Swin's 7x7 windows): against float64 in Triton's CPU interpreter, in
every form the main kernel serves (biases of each broadcast, grouped-query K/V, a Q conv's bias, softcap,
strided views, fp32, a batch the samples per program do not divide); where the JIT path takes it."""

import os

import pytest
import torch

from convattn.errors import PluginError
from convattn.plugins.kernel import KernelConfig, windows_config

# Triton's CPU interpreter here; on the device machine the same tests run the compiled kernel
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
interpreted = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the kernel in Triton's CPU interpreter or on a GPU")


def float64_attention(q, k, v, scale, bias=None, q_bias=None, softcap=0.0):
    """softmax(cap(scale (q + q_bias) k^T) + bias[b % Bb]) v in float64, K/V heads repeated for GQA;
    written here, not taken from the package."""
    q, k, v = q.double(), k.double(), v.double()
    if q_bias is not None:
        q = q + q_bias.double().view(1, q.shape[1], 1, q.shape[3])
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.double()[torch.arange(q.shape[0]) % bias.shape[0]]
    return torch.softmax(s, -1) @ v


# (B, H, H_kv, S_q, S_kv, D, bias shape or None, samples per program)
CASES = {
    "swin_shared_table": (8, 3, 3, 49, 49, 32, (1, 3, 49, 49), 4),
    "shifted_window_masks": (8, 2, 2, 20, 20, 16, (2, 2, 20, 20), 3),  # 4 images: 3 per program, bias[b % 2]
    "batch_not_divided": (7, 2, 2, 20, 20, 16, (1, 2, 20, 20), 3),
    "per_sample_bias": (5, 2, 2, 30, 30, 8, (5, 2, 30, 30), 2),
    "one_row_bias": (4, 2, 2, 17, 50, 16, (4, 1, 1, 50), 2),
    "no_bias": (5, 2, 2, 49, 49, 32, None, 2),
    "grouped_query": (4, 4, 2, 33, 40, 24, (1, 4, 33, 40), 2),
    "rows_past_one_block": (2, 2, 2, 70, 40, 16, (1, 2, 70, 40), 2),  # two row blocks of 64
}


@interpreted
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "bshd_view"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_short_sequence_kernel_matches_float64(case, strided):
    """Mutations: a window stride that is not a multiple of the bias's batch (samples of one program
    read another's mask: shifted_window_masks fails), the bias tile not added, the last row block's rows
    unmasked."""
    from convattn.plugins import flash_attention

    b, h, h_kv, s_q, s_kv, d, bias_shape, windows = CASES[case]
    g = torch.Generator().manual_seed(len(case))
    q, k, v = (torch.randn(b, hh, s, d, generator=g).to(DEVICE) for hh, s in ((h, s_q), (h_kv, s_kv), (h_kv, s_kv)))
    if strided:  # a (B, S, H, D) buffer seen as (B, H, S, D): the token layout's views
        q = torch.empty(b, s_q, h, d, device=DEVICE).transpose(1, 2).copy_(q)
    bias = None if bias_shape is None else (torch.randn(bias_shape, generator=g) * 3).to(DEVICE)
    config = KernelConfig(64, 64, 4, 1, windows=windows)
    out = flash_attention(q, k, v, bias=bias, config=config)
    assert (out.double() - float64_attention(q, k, v, d**-0.5, bias)).abs().max() <= 1e-5
    if DEVICE == "cuda" and case != "grouped_query":  # fp16 too: within twice SDPA's own error
        half = [t.half() for t in (q, k, v)]
        hb = None if bias is None else bias.half()
        ref = float64_attention(*half, d**-0.5, hb)
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            *half, attn_mask=None if hb is None else hb[torch.arange(b, device=DEVICE) % hb.shape[0]])
        got = flash_attention(*half, bias=hb, config=config)
        assert (got.double() - ref).abs().max() <= 2 * (sdpa.double() - ref).abs().max() + 1e-4


@interpreted
def test_it_adds_a_q_bias_and_soft_caps_as_the_main_kernel_does():
    from convattn.plugins import flash_attention

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(6, 2, 25, 16, generator=g).to(DEVICE) for _ in range(3))
    q_bias, bias = torch.randn(2 * 16, generator=g).to(DEVICE), torch.randn(1, 2, 25, 25, generator=g).to(DEVICE)
    out = flash_attention(q, k, v, bias=bias, q_bias=q_bias, softcap=2.0, config=KernelConfig(32, 32, 4, 1, windows=4))
    want = float64_attention(q, k, v, 16**-0.5, bias, q_bias, softcap=2.0)
    assert (out.double() - want).abs().max() <= 1e-5


def test_the_jit_path_takes_it_for_short_sequences_only():
    """Swin's 7x7 windows (512 x 3 pairs, 49 pixels) get 4 samples per program; fp32 and small batches
    one; 65 keys, or heads wider than 128, the main kernel."""
    assert windows_config(1536, 49, 49, 32, 2) == KernelConfig(64, 64, 4, 2, windows=4)
    assert windows_config(1536, 49, 49, 32, 4).windows == 1
    assert windows_config(6, 49, 49, 32, 2).windows == 1
    assert windows_config(1536, 16, 16, 32, 2) == KernelConfig(16, 16, 4, 2, windows=4)
    assert windows_config(1536, 49, 65, 32, 2) is None
    assert windows_config(1536, 49, 49, 256, 2) is None
    from convattn.plugins.plan import pick_config

    cpu = torch.device("cpu")
    assert pick_config(cpu, torch.float16, 32, 49, (512, 3, 49, 32, 1)).windows == 4
    assert pick_config(cpu, torch.float16, 32, 49).windows is None  # no problem given: `_attn_fwd`'s tuned config


def test_a_windows_config_serves_only_what_it_can():
    from convattn.plugins import flash_attention

    q = torch.randn(2, 2, 80, 16)
    if os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(PluginError, match="S_kv <= block_n"):
            flash_attention(q, q, q, config=KernelConfig(64, 64, 4, 1, windows=2))

@interpreted
def test_the_main_kernel_takes_a_one_row_bias_too():
    """A (B, 1, 1, S_kv) bias past the short kernel's 64 keys: `_attn_fwd`. On the GPU the JIT passes
    bias_h = bias_q = 1 as constexpr ints, which once failed to compile there (never in the interpreter)."""
    from convattn.plugins import flash_attention

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, s, 16, generator=g).to(DEVICE) for s in (33, 80, 80))
    bias = (torch.randn(2, 1, 1, 80, generator=g) * 3).to(DEVICE)
    out = flash_attention(q, k, v, bias=bias)
    assert (out.double() - float64_attention(q, k, v, 16**-0.5, bias)).abs().max() <= 1e-5


def test_no_more_samples_a_program_than_share_one_bias_slice():
    """Swin's shifted-window masks on one image: every window has its own mask (bias batch = windows), so a
    program takes one sample (4 would recompute the last 3 times). Mutation: `shared` ignored."""
    assert windows_config(64 * 24, 49, 49, 32, 2, shared=1).windows == 1
    assert windows_config(64 * 24, 49, 49, 32, 2, shared=2).windows == 2
    assert windows_config(64 * 24, 49, 49, 32, 2, shared=8).windows == 4
    from convattn.plugins.plan import pick_config

    cpu = torch.device("cpu")
    assert pick_config(cpu, torch.float16, 32, 49, (64, 24, 49, 32, 64)).windows == 1  # 64 windows, 64 masks
    assert pick_config(cpu, torch.float16, 32, 49, (512, 3, 49, 32, 64)).windows == 4  # 8 images


def test_a_biased_short_sequence_grid_needs_the_bias_batch():
    """Its programs per head depend on the bias's batch (`window_stride`): no silent default of 1, which
    would launch too few programs (samples never written)."""
    from convattn.plugins.aot import AotArtifact

    art = AotArtifact(kernel_name="_attn_windows", ptx="", cubin=b"", shared_mem=0, num_warps=4, threads_per_block=128,
                      config=KernelConfig(64, 64, 4, 2, windows=4), arch="sm_90", layouts=("BHSD",) * 4, head_dim=32,
                      head_dim_v=32, num_heads=3, dtype="fp16", scale=0.1, scalar_arg_names=[], ptx_isa="8.7",
                      min_driver="570", triton_version="3.6.0", hidden_params_removed=2, bias=True)
    with pytest.raises(PluginError, match="needs the bias's batch"):
        art.grid(8, 3, 49)
    assert art.grid(8, 3, 49, bias_batch=8) == (1, 8 * 3, 1)  # one sample a program: 8 masks for 8 samples
    assert art.grid(8, 3, 49, bias_batch=1) == (1, 2 * 3, 1)
