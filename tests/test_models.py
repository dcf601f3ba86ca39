import pytest
import torch

from convattn.models import ConvMHAttn, SeedEinsum, SeedSDPA


def reference(m: ConvMHAttn, x, kv, value=None):
    """Spatial attention written out in float64, independent of the module's code."""
    m = m.double()
    value = kv if value is None else value
    b, _, h, w = x.shape
    q = m.q_conv(x.double()).reshape(b, m.num_heads, m.head_dim, -1).transpose(-1, -2)
    k = m.k_conv(kv.double()).reshape(b, m.num_heads, m.head_dim, -1).transpose(-1, -2)
    v = m.v_conv(value.double()).reshape(b, m.num_heads, m.head_dim, -1).transpose(-1, -2)
    p = torch.softmax(q @ k.transpose(-1, -2) / m.head_dim**0.5, dim=-1)
    return m.out_conv((p @ v).transpose(-1, -2).reshape(b, -1, h, w))


@pytest.mark.parametrize("mode", ["einsum", "sdpa", "flash"])
@pytest.mark.parametrize("inputs", ["self", "key map", "key and value maps"])
def test_all_modes_compute_spatial_attention(mode, inputs):
    # Self-attention, one key/value map and separate ones take different projection paths in
    # "flash" mode (one stacked product, two, three), each with the biases folded differently.
    m = ConvMHAttn(16, 24, 3, attention=mode).eval()
    x = torch.randn(2, 16, 7, 9)
    kv = x if inputs == "self" else torch.randn(2, 16, 5, 3)
    value = torch.randn(2, 16, 5, 3) if inputs == "key and value maps" else None
    with torch.no_grad():
        for conv in (m.q_conv, m.k_conv, m.v_conv, m.out_conv):
            conv.bias.normal_()  # large enough that a bias dropped or added twice shows
        out = m(x) if inputs == "self" else m(x, kv, value)
        ref = reference(m, x, kv, value)
    assert out.shape == (2, 24, 7, 9)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_flash_mode_follows_new_weights():
    # Flash mode keeps its stacked weights between calls: loading others must rebuild them.
    m, other = ConvMHAttn(16, 16, 2, attention="flash").eval(), ConvMHAttn(16, 16, 2).eval()
    x = torch.randn(1, 16, 5, 3)
    with torch.no_grad():
        before = m(x)
        m.load_state_dict(other.state_dict())
        m.out_conv.bias.add_(1.0)  # in place, as an optimizer step would
        after = m(x)
        ref = reference(m, x, x)
    assert not torch.allclose(before.double(), ref, atol=1e-3)
    torch.testing.assert_close(after.double(), ref, atol=1e-5, rtol=0)


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
