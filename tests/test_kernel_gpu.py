"""The kernel on a real GPU: JIT and AOT-launched PTX vs float64 and vs PyTorch. Marked `gpu`."""

import pytest
import torch

pytestmark = pytest.mark.gpu

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def conv_views(b, h, d, s, dtype, scale=1.0):
    m = (torch.randn(b, h * d, s, device="cuda") * scale).to(dtype)
    return m, m.view(b, h, d, s).transpose(-1, -2)


def ref64(q, k, v, scale):
    return torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, -1) @ v.double()


def sdpa_error(q, k, v, scale, ref):
    """PyTorch's own error in this dtype (SDPA, default backend), the yardstick."""
    out = torch.nn.functional.scaled_dot_product_attention(*(t.contiguous() for t in (q, k, v)), scale=scale)
    return (out.double() - ref).abs().max().item()


CASES = [(dt, d) for d in (8, 24, 40, 64, 80, 128, 256, 512) for dt in ("fp16",)]
CASES += [(dt, d) for d in (8, 64, 512) for dt in ("bf16", "fp32")]


@pytest.mark.parametrize("dtype,d", CASES)
@pytest.mark.parametrize("s_q,s_kv", [(1024, 1024), (4097, 777)])
def test_jit_kernel_vs_float64_and_pytorch(dtype, d, s_q, s_kv):
    from convattn.plugins.flash import flash_attention

    torch.manual_seed(d * 7 + s_q)
    dt, b, h = DTYPES[dtype], 2, max(1, 256 // d)
    (_, q), (_, k), (_, v) = conv_views(b, h, d, s_q, dt), conv_views(b, h, d, s_kv, dt), conv_views(b, h, d, s_kv, dt)
    out_map = torch.full((b, h * d, s_q), float("nan"), device="cuda", dtype=dt)
    flash_attention(q, k, v, out=out_map.view(b, h, d, s_q).transpose(-1, -2))
    ref = ref64(q, k, v, d**-0.5)
    err = (out_map.view(b, h, d, s_q).transpose(-1, -2).double() - ref).abs().max().item()
    assert torch.isfinite(out_map).all()
    if dt == torch.float32:
        assert err <= 1e-5, err
    else:  # FlashAttention's rule: at most ~2x PyTorch's own low-precision error
        assert err <= 2 * sdpa_error(q, k, v, d**-0.5, ref) + 1e-4, err


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_large_logits_stay_finite(dtype):
    from convattn.plugins.flash import flash_attention

    dt = DTYPES[dtype]
    (_, q), (_, k), (_, v) = (conv_views(2, 4, 64, 2048, dt, scale=20.0) for _ in range(3))
    out = flash_attention(q, k, v, scale=1.0)
    ref = ref64(q, k, v, 1.0)
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() <= 2 * sdpa_error(q, k, v, 1.0, ref) + 1e-2


@pytest.mark.parametrize("dtype,d,heads", [("fp16", 8, 8), ("bf16", 64, 4), ("fp32", 24, 2), ("fp16", 512, 1)])
def test_aot_launch_is_bit_identical_to_jit(dtype, d, heads):
    from convattn.plugins.aot import compile_artifact, launch_artifact
    from convattn.plugins.flash import flash_attention, pick_config

    dt = DTYPES[dtype]
    major, minor = torch.cuda.get_device_capability()
    b, hh, ww, hk, wk = 2, 37, 29, 21, 13  # odd sizes: masked tails everywhere
    q_map, k_map, v_map = (torch.randn(b, heads * d, *s, device="cuda").to(dt) for s in ((hh, ww), (hk, wk), (hk, wk)))
    config = pick_config(q_map.device, dt, d, hk * wk)
    art = compile_artifact(head_dim=d, num_heads=heads, dtype=dtype, config=config, scale=d**-0.5,
                           arch=major * 10 + minor)
    aot = torch.full((b, heads * d, hh, ww), float("nan"), device="cuda", dtype=dt)
    launch_artifact(art, q_map, k_map, v_map, aot)
    torch.cuda.synchronize()
    views = [m.view(b, heads, d, -1).transpose(-1, -2) for m in (q_map, k_map, v_map)]
    jit = torch.full_like(aot, float("nan"))
    flash_attention(*views, out=jit.view(b, heads, d, -1).transpose(-1, -2), config=config)
    assert torch.equal(aot, jit)
    ref = ref64(*views, d**-0.5).transpose(-1, -2).reshape(aot.shape)
    assert (aot.double() - ref).abs().max() <= (1e-5 if dt == torch.float32 else 2e-2)


def test_module_flash_mode_matches_einsum_on_cuda():
    from convattn.models import ConvMHAttn

    m = ConvMHAttn(64, 64, 8).cuda().eval()
    x, kv = torch.randn(2, 64, 33, 31, device="cuda"), torch.randn(2, 64, 17, 19, device="cuda")
    with torch.no_grad():
        outs = {}
        for mode in ("einsum", "flash"):
            m.attention = mode
            outs[mode] = m(x, kv).double()
        m.attention = "einsum"
        ref = m.double()(x.double(), kv.double())
    err = {k: (v - ref).abs().max().item() for k, v in outs.items()}
    # cuDNN runs the fp32 1x1 convs in TF32 by default, in both paths alike.
    assert err["flash"] <= 2 * err["einsum"] + 1e-6, err
