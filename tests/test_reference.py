import numpy as np
import pytest

from convattn.plugins.op import FlashAttentionAttrs, output_shape
from convattn.plugins.ort_op import session
from convattn.plugins.reference import flash_attention_reference, tiled_attention


def naive(q, k, v, scale):
    s = (q.astype(np.float64) @ k.astype(np.float64).transpose(0, 1, 3, 2)) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v.astype(np.float64)


@pytest.mark.parametrize("s_q,s_kv,d", [(1, 1, 8), (37, 300, 24), (130, 129, 64)])
def test_tiled_matches_float64(s_q, s_kv, d):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, s, d)).astype(np.float32) for s in (s_q, s_kv, s_kv))
    out = tiled_attention(q, k, v, d**-0.5, block_k=64)
    np.testing.assert_allclose(out, naive(q, k, v, d**-0.5), atol=2e-6, rtol=0)


def test_large_logits_stay_finite():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, 50, 8)).astype(np.float32) * 40 for _ in range(3))
    with np.errstate(over="ignore", invalid="ignore"):
        s = (q @ k.transpose(0, 1, 3, 2)).astype(np.float16)
        assert not np.isfinite(np.exp(s).sum())  # the naive fp16 softmax overflows here
    out = tiled_attention(q, k, v, 1.0, block_k=16)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, naive(q, k, v, 1.0), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("layout", ["NCHW", "BHSD", "BHDS"])
def test_layouts_are_views_of_the_same_attention(layout):
    rng = np.random.default_rng(1)
    b, h, d, hh, ww = 2, 3, 8, 5, 7
    maps = [rng.standard_normal((b, h * d, hh, ww)).astype(np.float32) for _ in range(3)]
    bhsd = [m.reshape(b, h, d, hh * ww).transpose(0, 1, 3, 2) for m in maps]
    ref = naive(*bhsd, 0.3)
    as_layout = {"NCHW": lambda m, t: m, "BHSD": lambda m, t: np.ascontiguousarray(t),
                 "BHDS": lambda m, t: np.ascontiguousarray(t.transpose(0, 1, 3, 2))}[layout]
    inputs = [as_layout(m, t) for m, t in zip(maps, bhsd)]
    out_layout = "NCHW" if layout == "NCHW" else layout
    attrs = FlashAttentionAttrs(h, 0.3, layout, layout, layout, out_layout)
    out = flash_attention_reference(*inputs, attrs)
    assert out.shape == output_shape(inputs[0].shape, inputs[2].shape, attrs)
    expected = {"NCHW": ref.transpose(0, 1, 3, 2).reshape(b, h * d, hh, ww), "BHSD": ref,
                "BHDS": ref.transpose(0, 1, 3, 2)}[layout]
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=0)


def test_attrs_reject_nonsense():
    with pytest.raises(ValueError, match="q_layout"):
        FlashAttentionAttrs(2, 0.5, q_layout="NHWC")
    with pytest.raises(ValueError, match="scale"):
        FlashAttentionAttrs(2, float("nan"))
    with pytest.raises(ValueError, match="takes H and W"):
        FlashAttentionAttrs(2, 0.5, q_layout="BHSD", out_layout="NCHW")


@pytest.mark.parametrize("elem", ["FLOAT", "FLOAT16"])
def test_onnxruntime_custom_op_runs_the_node(elem):
    """The node in ONNX Runtime against float64 attention written out here (not the reference the op
    calls); an fp16 node runs through Casts (ORT's Python ops take fp32 only).
    Mutation: a wrong NCHW stride in the layout table fails; so does dropping the output Cast (fp16)."""
    import onnx
    from onnx import TensorProto, helper

    from convattn.plugins.op import DOMAIN, make_node, scratch_shape

    kind = getattr(TensorProto, elem)
    np_type = np.float16 if elem == "FLOAT16" else np.float32
    attrs = FlashAttentionAttrs(2, 0.25)
    node = make_node("qkv", "o", attrs)  # two outputs: the attention output and the scratch, as TensorRT's plugin
    inputs = [helper.make_tensor_value_info(n, kind, ["b", 8, "h", "w"]) for n in "qkv"]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("o", kind, ["b", 8, "h", "w"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    onnx.checker.check_model(model)
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 8, 3, 5)).astype(np_type)
    k, v = (rng.standard_normal((1, 8, 2, 2)).astype(np_type) for _ in range(2))
    (out,) = session(model).run(None, {"q": q, "k": k, "v": v})
    assert session(model).get_outputs()[0].name == "o" and node.output[1] == "o_scratch"
    as_heads = lambda t: t.astype(np.float64).reshape(1, 2, 4, -1).transpose(0, 1, 3, 2)  # noqa: E731
    expected = naive(as_heads(q), as_heads(k), as_heads(v), 0.25).transpose(0, 1, 3, 2).reshape(1, 8, 3, 5)
    assert out.dtype == np_type
    np.testing.assert_allclose(out.astype(np.float64), expected, atol=2e-6 if elem == "FLOAT" else 2e-3, rtol=0)
    assert model.graph.node[0].domain == DOMAIN  # the rewrite for ORT works on a copy


def test_flash_attention_writes_into_a_strided_view_of_the_output_map():
    import torch

    from convattn.plugins import flash_attention

    b, h, d, hh, ww = 2, 2, 8, 3, 5
    q, k, v = (torch.randn(b, h * d, hh, ww) for _ in range(3))
    views = [t.view(b, h, d, hh * ww).transpose(-1, -2) for t in (q, k, v)]  # conv-output views
    out_map = torch.empty(b, h * d, hh, ww)
    result = flash_attention(*views, out=out_map.view(b, h, d, hh * ww).transpose(-1, -2))
    expected = torch.softmax(views[0] @ views[1].transpose(-1, -2) / d**0.5, -1) @ views[2]
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_map, expected.transpose(-1, -2).reshape(b, h * d, hh, ww), atol=1e-5, rtol=0)


def test_flash_attention_without_triton_runs_the_reference_on_cpu(monkeypatch):
    """The one public flash_attention, where Triton is not installed (its module fails to import)."""
    import sys

    import torch

    from convattn.plugins import flash_attention

    monkeypatch.setitem(sys.modules, "convattn.plugins.flash", None)  # `from .flash import` now fails
    q, k, v = (torch.randn(1, 2, s, 8) for s in (5, 7, 7))
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
    torch.testing.assert_close(flash_attention(q, k, v), expected, atol=1e-5, rtol=0)
    # ConvMHAttn's flash mode passes its Q conv's bias: it must work without Triton too.
    bias = torch.randn(2 * 8)
    q_biased = q + bias.view(1, 2, 1, 8)
    expected = torch.softmax(q_biased @ k.transpose(-1, -2) / 8**0.5, -1) @ v
    torch.testing.assert_close(flash_attention(q, k, v, q_bias=bias), expected, atol=1e-5, rtol=0)
    # A GPU tensor needs the kernel: the operator's implementation says what to install (meta stands for a
    # device that is not the CPU; the public call sends meta tensors to the op's fake, which computes nothing).
    from convattn.plugins.torch_op import run

    meta = [t.to("meta") for t in (q, k, v)]
    with pytest.raises(ImportError, match="convattn\\[gpu\\]"):
        run(*meta, torch.empty(1, 2, 5, 8, device="meta"), 8**-0.5, None, None, 0.0, False)
    assert flash_attention(*meta).shape == (1, 2, 5, 8)


def test_the_package_imports_and_runs_where_triton_is_not_installed():
    """Triton is optional (the `gpu` extra): `import convattn.plugins` and a CPU `flash_attention` work in a
    process where `import triton` fails, on the reference. Mutation: the package importing `plan` (which
    imports the Triton kernel module) at import time."""
    import subprocess
    import sys

    script = """
import sys
sys.modules["triton"] = None  # `import triton` fails: not installed
import torch
from convattn.plugins import flash_attention
q, k, v = (torch.randn(1, 2, s, 8) for s in (5, 7, 7))
want = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
assert (flash_attention(q, k, v) - want).abs().max() < 1e-5
assert "triton" not in [m for m in sys.modules if sys.modules[m] is not None]
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-800:]
