import pytest
import torch

from convattn.models import ConvMHAttn, SeedEinsum, SeedSDPA


def reference(m: ConvMHAttn, x, kv):
    """Spatial attention written out in float64, independent of the module's code."""
    m = m.double()
    b, _, h, w = x.shape
    q = m.q_conv(x.double()).reshape(b, m.num_heads, m.head_dim, -1).transpose(-1, -2)
    k = m.k_conv(kv.double()).reshape(b, m.num_heads, m.head_dim, -1).transpose(-1, -2)
    v = m.v_conv(kv.double()).reshape(b, m.num_heads, m.head_dim, -1).transpose(-1, -2)
    p = torch.softmax(q @ k.transpose(-1, -2) / m.head_dim**0.5, dim=-1)
    return m.out_conv((p @ v).transpose(-1, -2).reshape(b, -1, h, w))


@pytest.mark.parametrize("mode", ["einsum", "sdpa", "flash"])
@pytest.mark.parametrize("kv_hw", [None, (5, 3)])
def test_all_modes_compute_spatial_attention(mode, kv_hw):
    m = ConvMHAttn(16, 24, 3, attention=mode).eval()
    x = torch.randn(2, 16, 7, 9)
    kv = x if kv_hw is None else torch.randn(2, 16, *kv_hw)
    with torch.no_grad():
        out = m(x) if kv_hw is None else m(x, kv)
        ref = reference(m, x, kv)
    assert out.shape == (2, 24, 7, 9)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_sdpa_mode_has_no_dropout_in_eval():
    m = ConvMHAttn(16, 16, 2, attention="sdpa").eval()
    x = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        assert torch.equal(m(x), m(x))


def test_channels_must_divide_by_heads():
    with pytest.raises(ValueError, match="divisible"):
        ConvMHAttn(16, 18, 4)


def test_seed_checkpoints_load_into_convmhattn():
    seed = SeedEinsum(16, 16, 2)
    m = ConvMHAttn(16, 16, 2)
    m.load_state_dict(seed.state_dict())
    x = torch.randn(1, 16, 5, 3)
    with torch.no_grad():
        torch.testing.assert_close(m(x), seed(x, x, x), atol=1e-6, rtol=0)


def test_seed_sdpa_has_both_forum_bugs():
    seed_e, seed_s = SeedEinsum(16, 16, 2).eval(), SeedSDPA(16, 16, 2).eval()
    seed_s.load_state_dict(seed_e.state_dict())
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        a, b = seed_s(x, x, x), seed_s(x, x, x)
        assert (a - b).abs().max() > 0.05  # dropout applied in eval
        torch.manual_seed(0)
        diff = (seed_s(x, x, x) - seed_e(x, x, x)).abs().max()
    assert diff > 0.1  # a different function: attention over channels
