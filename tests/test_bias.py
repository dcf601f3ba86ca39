"""The scores' additive bias (`FlashAttentionBias`): the kernel (Triton's CPU interpreter), the NumPy
reference and the ONNX Runtime op against float64 PyTorch; the fusion of every bias form a model brings
(relative position tables, Swin's shifted-window mask, masked_fill -inf, additive masks, MONAI's bias on
a reshaped view) end to end; the refusals; the TensorRT plugin through NVIDIA's `tensorrt.plugin`."""

import os
import sys

import numpy as np
import pytest
import torch

import trt_harness as h
from convattn.plugins import plan, trt_plugin
from convattn.plugins.kernel import KernelConfig
from convattn.plugins.op import BIAS_OP_TYPE, FlashAttentionAttrs, bias_dims, is_fused_node, make_node
from convattn.plugins.reference import tiled_attention

INF = float("inf")
# (B, H, S_q, S_kv, D, bias shape): shared, per head, per sample, per window (Bb divides B: batch
# b reads bias[b % Bb], as Swin's windows inner in the batch x windows axis), one row for every query.
FORMS = {"shared": (2, 3, 40, 37, 16, (1, 1, 40, 37)), "per_head": (2, 3, 33, 50, 8, (1, 3, 33, 50)),
         "per_sample": (3, 2, 17, 17, 32, (3, 2, 17, 17)), "windows": (6, 2, 20, 20, 8, (3, 2, 20, 20)),
         "one_row": (2, 2, 17, 50, 16, (2, 1, 1, 50))}


def float64_attention(q, k, v, bias, scale):
    """softmax(scale q k^T + bias[b % Bb]) v in float64, written here; a row masked whole gives zeros."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale + bias.double()[torch.arange(q.shape[0]) % bias.shape[0]]
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(m), 0, m))
    return (p / p.sum(-1, keepdim=True).clamp_min(1e-300)) @ v.double()


def _problem(form, seed=0, masked=True):
    b, hh, s_q, s_kv, d, shape = FORMS[form]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, hh, s, d, generator=g) for s in (s_q, s_kv, s_kv))
    bias = torch.randn(shape, generator=g) * 3
    if masked:
        bias[..., 1::5] = -INF  # masked keys
        if shape[2] > 1:
            bias[0, 0, 3, :] = -INF  # a query row masked whole
    return q, k, v, bias


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernel in Triton's CPU interpreter")
@pytest.mark.parametrize("config", [KernelConfig(16, 16, 4, 1), KernelConfig(32, 32, 4, 1)], ids=["16", "32"])
@pytest.mark.parametrize("form", list(FORMS))
def test_the_kernel_adds_the_bias_tile_by_tile(form, config):
    """The Triton kernel with a bias of every form the fuser emits, -inf keys and a row masked whole,
    against float64. Mutations: the bias tile not added (error ~3); `b % bias_b` as `b` (the windows
    form reads past its 3 biases: wrong rows); no guard for a row masked whole (NaN)."""
    q, k, v, bias = _problem(form)
    from convattn.plugins import flash_attention

    out = flash_attention(q, k, v, bias=bias, config=config)
    want = float64_attention(q, k, v, bias, q.shape[-1] ** -0.5)
    assert not torch.isnan(out).any()
    assert (out.double() - want).abs().max() <= 1e-5


@pytest.mark.parametrize("form", list(FORMS))
def test_the_reference_and_the_onnx_runtime_op_add_it_too(form):
    """The tiled NumPy reference (the ONNX Runtime op's body), through a FlashAttentionBias node in ONNX
    Runtime. Mutation: the op registered without its bias input (the node does not run)."""
    q, k, v, bias = _problem(form, seed=1)
    want = float64_attention(q, k, v, bias, 0.3).numpy()
    got = tiled_attention(q.numpy(), k.numpy(), v.numpy(), 0.3, 16, bias.numpy())
    assert np.abs(got - want).max() <= 1e-5
    from onnx import TensorProto, helper

    from convattn.plugins import ort_op

    attrs = FlashAttentionAttrs(q.shape[1], 0.3, "BHSD", "BHSD", "BHSD", "BHSD")
    node = make_node(["q", "k", "v", "bias"], "o", attrs)
    assert node.op_type == BIAS_OP_TYPE
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(t.shape)) for n, t in zip("qkv", (q, k, v))]
    io.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, list(bias.shape)))
    graph = helper.make_graph([node], "g", io, [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("convattn", 1)])
    out = ort_op.run(model, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "bias": bias.numpy()})[0]
    assert np.abs(out - want).max() <= 1e-5


@pytest.mark.parametrize("shape,problem", [((2, 2, 4, 7), "last dim"), ((2, 2, 3, 6), "S_q dim"),
                                           ((2, 3, 4, 6), "heads dim"), ((4, 2, 4, 6), "divide the batch"),
                                           ((2, 4, 6), "4-D")])
def test_a_bias_the_kernel_cannot_read_is_refused(shape, problem):
    """`op.bias_dims`, the one shape rule: (B=6, H=2, S_q=4, S_kv=6). Mutation: no batch check (a
    bias of 4 for a batch of 6 would read bias[b % 4], not what the model broadcast)."""
    with pytest.raises(ValueError, match=problem):
        bias_dims(shape, 6, 2, 4, 6)
    assert bias_dims((3, 1, 1, 6), 6, 2, 4, 6) == (3, 1, 1)


def _models():
    sys.path.insert(0, os.path.dirname(__file__))
    import user_models

    return user_models


def export_onnx(*args, **kwargs):  # imported here: the GPU machine's image has no onnx-graphsurgeon
    from convattn.exporter.export import export_onnx

    return export_onnx(*args, **kwargs)


def fuse_attention(*args, **kwargs):
    from convattn.exporter.fuse import fuse_attention

    return fuse_attention(*args, **kwargs)


# model, input shape, export dynamic: every bias form a model brings, through both exporters
MODELS = {
    "swin": (lambda u: u.SwinWindowAttention(shift=0), (2, 16, 8, 8), True, [1, 2, 16, 16]),
    "swin_shifted": (lambda u: u.SwinWindowAttention(), (2, 16, 8, 8), False, [4, 2, 16, 16]),
    "masked_fill": (lambda u: u.MaskedFill(), (2, 16, 4, 4), True, [1, 1, 16, 16]),
    "additive_mask": (lambda u: u.MaskedFill(fill=None), (2, 16, 4, 4), True, [1, 1, 16, 16]),
    "einsum_mask": (lambda u: u.MaskedAttention(), (2, 8, 4, 4), True, [1, 1, 16, 16]),
    "monai_reshaped": (lambda u: u.RelativeBiasAttention(), (2, 16, 5, 6), False, [1, 2, 30, 30]),
}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", list(MODELS))
def test_biased_attention_fuses_and_computes_the_model(name, exporter):
    """Fused into one FlashAttentionBias node that reads the bias the model materialises (no S x S copy
    beyond it), matching float64 PyTorch in ONNX Runtime, at another batch where the export is dynamic.
    Mutations: the outer scale not applied to an inner bias term; Swin's windowed mask read as per sample
    (Bb = B: the bias check refuses it, or the output is wrong)."""
    make, shape, dynamic, bias_shape = MODELS[name]
    torch.manual_seed(0)
    module = make(_models()).eval()
    fusion = fuse_attention(export_onnx(module, [shape], exporter=exporter, dynamic=dynamic).model)
    [block] = fusion.blocks
    assert block.fused, block.reason
    assert block.details["bias"] == bias_shape
    assert [n.op_type for n in fusion.model.graph.node if is_fused_node(n)] == [BIAS_OP_TYPE]
    assert "Softmax" not in [n.op_type for n in fusion.model.graph.node]
    x = torch.randn((3 if dynamic else shape[0], *shape[1:]))
    want = module.double()(x.double()).detach().numpy()
    from convattn.plugins import ort_op

    [got] = ort_op.run(fusion.model, {fusion.model.graph.input[0].name: x.numpy()})[:1]
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("fill,reason", [(-1e4, "filled with -10000"), (-100.0, "filled with -100")])
def test_a_finite_masked_fill_is_refused_with_why(fill, reason):
    """masked_fill with a finite value replaces scores (a row masked whole softmaxes to uniform); adding
    it as a bias would not give that. Mutation: any Where fill taken as a bias (fused wrong on such rows)."""
    module = _models().MaskedFill(fill=fill).eval()
    fusion = fuse_attention(export_onnx(module, [(1, 16, 4, 4)]).model)
    [block] = fusion.blocks
    assert not block.fused and reason in block.reason


def test_a_bias_per_sample_broadcast_over_windows_is_refused():
    """A bias of shape (B, 1, heads, N, N) on Swin's (B, windows, heads, N, N) view: batch x windows index
    n reads bias[n // windows], which the kernel's bias[n % Bb] is not. Mutation: `_bias_form` accepting
    the first (Bb, Hb) whose sizes fit without comparing the index (fused wrong)."""
    import torch.nn as nn

    class PerSample(nn.Module):
        def forward(self, q):  # q (B*4, 2, 9, 8): 4 windows per sample
            s = (q @ q.transpose(-1, -2)).view(-1, 4, 2, 9, 9)
            s = s + q.view(-1, 4, 2, 9, 8)[:, :1, :, :, :1].transpose(-1, -2)  # (B, 1, 2, 1, 9)
            s = s + q.view(-1, 4, 2, 9, 8)[:, :1, :, :, 1:2]  # (B, 1, 2, 9, 1): over queries
            return s.view(-1, 2, 9, 9).softmax(-1) @ q

    fusion = fuse_attention(export_onnx(PerSample().eval(), [(8, 2, 9, 8)], dynamic=False).model)
    [block] = fusion.blocks
    assert not block.fused and "bias" in block.reason


# ------------------------------------------------------------------ the TensorRT plugin

VERSIONS = list(h.WHEELS)


@pytest.fixture(params=VERSIONS)
def trt(request, monkeypatch):
    monkeypatch.setattr(trt_plugin, "_arch", lambda: "sm_90")
    with h.tensorrt(request.param) as (core, trtp):
        yield core, trtp, request.param


def _bias_node(plugin_mode="aot", head_dim=8, layout="BHSD"):
    attrs = FlashAttentionAttrs(2, head_dim ** -0.5, layout, layout, layout, layout)
    return make_node(["q", "k", "v", "bias"], "o", attrs, plugin_mode, name="n")


def test_the_bias_plugin_is_found_and_builds(trt):
    """onnx-tensorrt finds `FlashAttentionBias` by op_type, version and namespace; the builder sees four
    inputs of one dtype and the bias's dims in the AOT extras, evaluated at the run shape (windows: Bb=3
    of B=6). Mutation: the bias combination with five types (TensorRT finds no format for six tensors)."""
    core, _, _ = trt
    assert trt_plugin.register_plugin()
    assert core.get_plugin_registry().get_creator(BIAS_OP_TYPE, "1", "convattn") is not None
    plugin = h.parse_node(core, _bias_node())
    shapes = [("B", 2, "S", 8), ("B", 2, "T", 8), ("B", 2, "T", 8), ("W", 2, "S", "T")]
    env = {"B": 6, "S": 20, "T": 24, "W": 3}
    built = h.build_node(core, plugin, [core.float16] * 4, shapes, env, tactics=[1])
    assert built.output_shape == (6, 2, 20, 8)
    launch = built.launches[1]
    assert launch.extras[-4:] == [3, 2, 20, 1]  # bias_b, bias_h, bias_q, then the K/V group
    assert launch.grid[1] == 12
    assert "HOPPER" not in str(built.tactics) and plan.HOPPER_TACTIC not in built.tactics


def test_the_bias_plugin_offers_no_hopper_tactic(trt):
    """The Hopper kernels take no bias: at head dim 64 (where the unbiased node gets the Hopper tactic)
    the biased node gets Triton tactics only. Mutation: `_combinations` ignoring `bias`."""
    core, _, _ = trt
    trt_plugin.register_plugin()
    shapes = [(2, 2, 96, 64), (2, 2, 56, 64), (2, 2, 56, 64), (1, 2, 96, 56)]
    plugin = h.parse_node(core, _bias_node(head_dim=64))
    built = h.build_node(core, plugin, [core.float16] * 4, shapes, None, tactics=[])
    assert built.tactics and plan.HOPPER_TACTIC not in built.tactics


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("form", list(FORMS))
def test_gpu_the_aot_bias_kernel_as_tensorrt_launches_it(trt, form, dtype):
    """The biased PTX TensorRT gets, launched with its grid, block and extras, against float64."""
    core, _, _ = trt
    trt_plugin.register_plugin()
    b, hh, s_q, s_kv, d, shape = FORMS[form]
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    trt_dtype = {"fp32": core.float32, "fp16": core.float16, "bf16": core.bfloat16}[dtype]
    attrs = FlashAttentionAttrs(hh, d ** -0.5, "BHSD", "BHSD", "BHSD", "BHSD")
    plugin = h.parse_node(core, make_node(["q", "k", "v", "bias"], "o", attrs, "aot", name="n"))
    built = h.build_node(core, plugin, [trt_dtype] * 4, [(b, hh, s_q, d), (b, hh, s_kv, d), (b, hh, s_kv, d), shape],
                         {}, tactics=[1])
    q, k, v, bias = (t.to(torch_dtype).cuda() for t in _problem(form, seed=3))
    out = torch.empty(b, hh, s_q, d, dtype=torch_dtype, device="cuda")
    from convattn.plugins.aot import launch_ptx

    launch = built.launches[1]
    launch_ptx(launch.ptx, launch.kernel_name, launch.grid, launch.block, launch.shared_mem, (q, k, v, bias),
               launch.extras, (out,))
    torch.cuda.synchronize()
    want = float64_attention(q.cpu(), k.cpu(), v.cpu(), bias.cpu(), d ** -0.5)
    assert (out.double().cpu() - want).abs().max() <= {"fp32": 1e-5, "fp16": 4e-3, "bf16": 3e-2}[dtype]


def float64_softcapped(q, k, v, bias, scale, softcap):
    """ONNX Attention's order, written here: the scaled scores capped (softcap * tanh(s / softcap)), then the bias."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = softcap * torch.tanh(s / softcap) + bias.double()[torch.arange(q.shape[0]) % bias.shape[0]]
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(m), 0, m))  # a row masked whole: zeros
    return (p / p.sum(-1, keepdim=True).clamp_min(1e-300)) @ v.double()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernel in Triton's CPU interpreter")
@pytest.mark.parametrize("softcap", [1.5, 30.0])
def test_the_kernel_soft_caps_the_scores_before_the_bias(softcap):
    """Large scores (x4) so the cap bites. Mutations: the cap after the bias (a -inf key then gets
    -softcap: probability leaks to it); tanh(s) without dividing by the cap (error ~0.5)."""
    from convattn.plugins import flash_attention

    q, k, v, bias = _problem("per_head", seed=4)
    q, k = q * 4, k * 4
    out = flash_attention(q, k, v, bias=bias, config=KernelConfig(16, 16, 4, 1), softcap=softcap)
    assert (out.double() - float64_softcapped(q, k, v, bias, q.shape[-1] ** -0.5, softcap)).abs().max() <= 1e-5
    got = tiled_attention(q.numpy(), k.numpy(), v.numpy(), q.shape[-1] ** -0.5, 16, bias.numpy(), softcap)
    assert np.abs(got - float64_softcapped(q, k, v, bias, q.shape[-1] ** -0.5, softcap).numpy()).max() <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_gpu_the_aot_softcap_kernel_as_tensorrt_launches_it(trt, dtype):
    """A soft-capped, biased node's PTX (the cap compiled in) with TensorRT's argument list, against float64."""
    core, _, _ = trt
    trt_plugin.register_plugin()
    b, hh, s_q, s_kv, d, shape = FORMS["per_head"]
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    trt_dtype = {"fp32": core.float32, "fp16": core.float16, "bf16": core.bfloat16}[dtype]
    attrs = FlashAttentionAttrs(hh, d ** -0.5, "BHSD", "BHSD", "BHSD", "BHSD", softcap=2.0)
    plugin = h.parse_node(core, make_node(["q", "k", "v", "bias"], "o", attrs, "aot", name="n"))
    built = h.build_node(core, plugin, [trt_dtype] * 4, [(b, hh, s_q, d), (b, hh, s_kv, d), (b, hh, s_kv, d), shape],
                         {}, tactics=[1])
    q, k, v, bias = _problem("per_head", seed=5)
    q, k, v, bias = (t.to(torch_dtype).cuda() for t in (q * 4, k * 4, v, bias))
    out = torch.empty(b, hh, s_q, d, dtype=torch_dtype, device="cuda")
    from convattn.plugins.aot import launch_ptx

    launch = built.launches[1]
    launch_ptx(launch.ptx, launch.kernel_name, launch.grid, launch.block, launch.shared_mem, (q, k, v, bias),
               launch.extras, (out,))
    torch.cuda.synchronize()
    want = float64_softcapped(q.cpu(), k.cpu(), v.cpu(), bias.cpu(), d ** -0.5, 2.0)
    assert (out.double().cpu() - want).abs().max() <= {"fp32": 1e-5, "fp16": 4e-3, "bf16": 3e-2}[dtype]


def test_a_scale_after_the_bias_scales_the_bias_too():
    """(q k^T + bias) * 0.5: the kernel's scale is 0.5 and its bias 0.5 x the model's. Mutation: the term's
    factor not applied in `_emit_bias` (the bias twice too large)."""
    import torch.nn as nn

    class ScaledAfter(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.randn(2, 12, 12) * 3)

        def forward(self, q):  # q (B, 2, 12, 8)
            return torch.softmax((q @ q.transpose(-1, -2) + self.bias) * 0.5, -1) @ q

    module = ScaledAfter().eval()
    fusion = fuse_attention(export_onnx(module, [(2, 2, 12, 8)], dynamic=False).model)
    [block] = fusion.blocks
    assert block.fused and block.details["scale"] == 0.5
    from convattn.plugins import ort_op

    x = torch.randn(2, 2, 12, 8)
    [got] = ort_op.run(fusion.model, {fusion.model.graph.input[0].name: x.numpy()})[:1]
    assert np.abs(got - module.double()(x.double()).detach().numpy()).max() <= 1e-5


def test_a_relative_position_table_is_recognised_by_its_values():
    """Swin's bias, table[h, yi - yj, xi - xj] over a 7x7 window, is found as a table of 2 x 13 x 13 values
    (what the report says indexing in the kernel would save); a 1-D relative bias (ALiBi/T5-like) too; a
    shifted window's mask and a random bias are not tables. Mutation: the x offset dropped from the key
    (the 7x7 table is then not found)."""
    from convattn.exporter.fuse.scores import _relative_table

    g = np.random.default_rng(0)
    table = g.standard_normal((2, 13, 13))
    y, x = np.divmod(np.arange(49), 7)
    swin = table[:, y[:, None] - y[None, :] + 6, x[:, None] - x[None, :] + 6]
    assert _relative_table(swin) == (7, 7)
    assert _relative_table(swin[None]) == (7, 7)
    line = g.standard_normal(2 * 40 - 1)
    i = np.arange(40)
    assert _relative_table(line[i[:, None] - i[None, :] + 39]) == (1, 40)
    mask = np.zeros((49, 49))
    mask[:21, 21:] = mask[21:, :21] = -100.0  # regions of a shifted window
    assert _relative_table(mask) is None
    assert _relative_table(g.standard_normal((3, 49, 49))) is None


@pytest.mark.parametrize("case,offered", [("window_7x7", True), ("longer_than_64", False), ("dynamic_length", False)])
def test_the_short_sequence_tactic_serves_fixed_short_windows_only(trt, case, offered):
    """S_kv fixed at build and <= 64 (Swin's 7x7 windows, batch x windows dynamic): the short-sequence
    kernel is a tactic beside the Triton configs, with the batch among its extras and a grid of
    `kernel.window_stride` programs per head at the run shape (6 windows, bias of 3 shifted-window masks:
    4 samples per program, stride 3 -> 6 programs). Mutations: the grid's stride ignoring the bias's
    batch (2 x 2 = 4 programs); the tactic offered for a dynamic S."""
    from convattn.plugins.kernel import window_stride

    core, _, _ = trt
    trt_plugin.register_plugin()
    s = {"window_7x7": 49, "longer_than_64": 65, "dynamic_length": "S"}[case]
    shapes = [("B", 2, s, 8), ("B", 2, s, 8), ("B", 2, s, 8), ("W", 2, s, s)]
    env = {"B": 6, "W": 3, "S": 49}
    built = h.build_node(core, h.parse_node(core, _bias_node()), [core.float16] * 4, shapes, env,
                         tactics=[plan.WINDOWS_TACTIC] if offered else [])
    assert (plan.WINDOWS_TACTIC in built.tactics) is offered and 1 in built.tactics
    if offered:
        launch = built.launches[plan.WINDOWS_TACTIC]
        assert launch.grid == (1, window_stride(6, 4, 3) * 2, 1) == (1, 6, 1)
        assert launch.extras[-5:] == [3, 2, 49, 1, 6]  # bias_b, bias_h, bias_q, the K/V group, the batch
        assert "_attn_windows" in launch.ptx


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("bias_batch", [1, 64, None], ids=["shared", "shifted", "unbiased"])
def test_gpu_the_aot_short_sequence_kernel_is_the_jit_kernel(dtype, bias_batch):
    """The short-sequence kernel's AOT PTX, launched with TensorRT's argument list, computes bit for bit
    what the JIT kernel computes (Swin's 7x7 windows, 2 images' 128 windows), within tolerance of float64."""
    from convattn.plugins import flash_attention
    from convattn.plugins.aot import compile_artifact, launch_artifact
    from convattn.plugins.kernel import windows_config

    dt = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    g = torch.Generator().manual_seed(bias_batch or 0)
    q, k, v = (torch.randn(128, 3, 49, 32, generator=g).to("cuda", dt) for _ in range(3))
    bias = None if bias_batch is None else (torch.randn(bias_batch, 3, 49, 49, generator=g) * 2).to("cuda", dt)
    config = windows_config(1 << 20, 49, 49, 32, dt.itemsize)
    art = compile_artifact(head_dim=32, num_heads=3, dtype=dtype, config=config, scale=32**-0.5,
                           layouts=("BHSD",) * 4, bias=bias is not None)
    aot, jit = torch.full_like(q, float("nan")), torch.full_like(q, float("nan"))
    launch_artifact(art, q, k, v, aot, bias=bias)
    flash_attention(q, k, v, out=jit, bias=bias, config=config)
    torch.cuda.synchronize()
    assert torch.equal(aot, jit)
    want = float64_attention(q.cpu(), k.cpu(), v.cpu(), torch.zeros(1, 3, 49, 49) if bias is None else bias.cpu(),
                             32**-0.5)
    assert (aot.cpu().double() - want).abs().max() <= (1e-5 if dtype == "fp32" else 4e-3)
