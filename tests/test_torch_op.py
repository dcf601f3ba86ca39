"""`convattn.plugins.flash_attention` is one PyTorch operator, `convattn::flash_attention`: PyTorch's own
operator checks pass, torch.compile traces a conv-attention block through it with no graph break, and
torch.export keeps it as one node; eager calls give float64's result."""

import math

import pytest
import torch

from convattn.models import ConvMHAttn
from convattn.plugins import flash_attention


def float64_attention(q, k, v, scale, q_bias=None, bias=None):
    q = q.double() + (0 if q_bias is None else q_bias.double().view(1, q.shape[1], 1, q.shape[3]))
    s = (q @ k.double().transpose(-1, -2)) * scale + (0 if bias is None else bias.double())
    return torch.softmax(s, -1) @ v.double()


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, s, 8, generator=g) for s in (20, 24, 24))
    return q, k, v, torch.randn(2 * 8, generator=g), torch.randn(1, 2, 20, 24, generator=g)


def test_an_eager_call_matches_float64():
    q, k, v, q_bias, bias = _problem()
    out = flash_attention(q, k, v, q_bias=q_bias, bias=bias)
    assert (out.double() - float64_attention(q, k, v, 8**-0.5, q_bias, bias)).abs().max() <= 1e-5


@pytest.mark.parametrize("with_biases", [False, True])
def test_pytorchs_operator_checks_pass(with_biases):
    """torch.library.opcheck: the schema (out declared mutated), the fake implementation, and AOT
    dispatch with dynamic shapes. Mutation: `mutates_args=()` (the schema check sees `out` written)."""
    q, k, v, q_bias, bias = _problem(1)
    out = torch.empty(2, 2, 20, 8)
    args = (q, k, v, out, 8**-0.5, q_bias if with_biases else None, bias if with_biases else None, 0.0, False)
    torch.library.opcheck(torch.ops.convattn.flash_attention.default, args)


def test_torch_compile_traces_a_block_through_the_one_op():
    """ConvMHAttn's inference path (1x1 convs as products, the kernel writing into a view of the output
    map) compiles whole (fullgraph: no graph break) and computes what eager computes."""
    torch.manual_seed(0)
    m = ConvMHAttn(16, 16, 2, attention="flash").eval()
    x = torch.randn(2, 16, 4, 5)
    with torch.no_grad():
        want = m(x)
        seen = []

        def backend(gm, inputs):
            seen.extend(str(n.target) for n in gm.graph.nodes)
            return gm

        got = torch.compile(m, backend=backend, fullgraph=True)(x)
    assert any("convattn.flash_attention" in t for t in seen), seen
    assert torch.allclose(got, want, atol=1e-6)


def test_torch_export_keeps_it_as_one_node():
    class Block(torch.nn.Module):
        def forward(self, q, k, v):
            return flash_attention(q, k, v, scale=1 / math.sqrt(q.shape[-1]))

    q, k, v, _, _ = _problem(2)
    program = torch.export.export(Block(), (q, k, v))
    text = str(program.graph)
    assert text.count("convattn.flash_attention") == 1, text
    assert (program.module()(q, k, v).double() - float64_attention(q, k, v, 8**-0.5)).abs().max() <= 1e-5


def test_eager_calls_skip_the_dispatcher_and_meta_tensors_take_the_op(monkeypatch):
    """A module's call with a Parameter (ConvMHAttn's Q bias) is eager: no dispatcher; meta tensors (shape
    propagation) go through the op's fake. Mutation: `type(t) is not torch.Tensor` (every model call
    dispatched)."""
    from convattn.plugins import torch_op

    q, k, v, q_bias, _ = _problem(3)
    called = []
    real = torch_op.run
    monkeypatch.setattr("convattn.plugins.run", lambda *a: called.append(a) or real(*a))
    flash_attention(q, k, v, q_bias=torch.nn.Parameter(q_bias))
    assert len(called) == 1
    out = flash_attention(*(t.to("meta") for t in (q, k, v)))
    assert out.device.type == "meta" and out.shape == (2, 2, 20, 8) and len(called) == 1


def test_the_tf32_switch_is_read_only_for_fp32_and_through_the_api_the_user_set():
    """torch 2.13 refuses to read `allow_tf32` once `fp32_precision` is set: fp16 calls never read it, and
    fp32 calls read the newer setting."""
    from convattn.plugins.op import default_tf32

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        q, k, v, _, _ = _problem(4)
        flash_attention(q.half(), k.half(), v.half())
        assert default_tf32(torch.float32) and not default_tf32(torch.float16)
    finally:
        matmul.fp32_precision = before
