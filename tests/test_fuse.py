"""Fusion on real exports: every pattern, both exporters, checked numerically in ONNX Runtime."""

import numpy as np
import onnx
import pytest
import torch
from conftest import cached, export_fuse, run_ort

from convattn.exporter.fuse import fuse_attention
from convattn.exporter.fuse.views import identity_view, reshape_view
from convattn.models import ConvMHAttn
from convattn.plugins.op import DOMAIN, OP_TYPE


def ops(model):
    return [n.op_type for n in model.graph.node]


def assert_same_function(module, shapes, exported, fusion, atol=2e-5):
    """Fused == unfused in ORT, and == PyTorch, at batch 2 and fresh inputs (dynamic shapes)."""
    names = [i.name for i in exported.model.graph.input]
    xs, fused = run_ort(fusion.model, shapes, names)
    _, unfused = run_ort(exported.model, shapes, names)
    with torch.no_grad():
        expected = module(*map(torch.from_numpy, xs)).numpy()
    np.testing.assert_allclose(fused, unfused, atol=atol, rtol=0)
    np.testing.assert_allclose(fused, expected, atol=atol, rtol=0)


CASES = [
    ("einsum", "dynamo", 18, "einsum-softmax-einsum"),
    ("einsum", "torchscript", 18, "einsum-softmax-einsum"),
    ("seed_einsum", "dynamo", 18, "einsum-softmax-einsum"),
    ("seed_einsum", "torchscript", 18, "einsum-softmax-einsum"),
    ("sdpa", "dynamo", 18, "matmul-softmax-matmul"),
    ("sdpa", "torchscript", 18, "matmul-softmax-matmul"),
    ("sdpa", "dynamo", 23, "onnx-attention"),
    ("cross", "dynamo", 18, "einsum-softmax-einsum"),
    ("cross", "torchscript", 18, "einsum-softmax-einsum"),
    ("cross_sdpa", "torchscript", 18, "matmul-softmax-matmul"),
    ("cross_sdpa", "dynamo", 23, "onnx-attention"),
]


@pytest.mark.parametrize("kind,exporter,opset,pattern", CASES)
def test_pattern_fuses_into_one_node(kind, exporter, opset, pattern):
    module, shapes, exported, fusion = cached((kind, exporter, opset))
    if opset == 23:
        assert "Attention" in ops(exported.model)  # the dynamo exporter's SDPA without dropout
    [block] = fusion.blocks
    assert block.fused and block.pattern == pattern
    assert ops(fusion.model) == ["Conv", "Conv", "Conv", OP_TYPE, "Conv"]  # every Reshape/Transpose absorbed
    assert block.details["layouts"] == ["NCHW"] * 4
    assert_same_function(module, shapes, exported, fusion)


def test_fused_node_is_what_tensorrt_and_onnxruntime_look_up():
    _, _, _, fusion = cached(("einsum", "dynamo", 18))
    [node] = [n for n in fusion.model.graph.node if n.op_type == OP_TYPE]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == DOMAIN
    assert attrs["plugin_namespace"] == b"convattn" and attrs["plugin_version"] == b"1" and attrs["aot"] == 1
    assert attrs["num_heads"] == b"2" and float(attrs["scale"]) == pytest.approx(8**-0.5)
    assert DOMAIN in {o.domain for o in fusion.model.opset_import}


def test_several_blocks_in_one_graph_all_fuse():
    module, shapes, exported, fusion = cached(("two_blocks", "dynamo", 18))
    assert [b.fused for b in fusion.blocks] == [True, True]
    assert ops(fusion.model).count(OP_TYPE) == 2 and "Softmax" not in ops(fusion.model)
    assert_same_function(module, shapes, exported, fusion)


@pytest.mark.parametrize("head_dim", [8, 24, 64])
def test_head_dims_and_odd_cross_attention_sizes(head_dim):
    module = ConvMHAttn(8, 2 * head_dim, 2).eval()
    shapes = [(1, 8, 7, 9), (1, 8, 5, 3)]
    exported, fusion = export_fuse(module, shapes)
    [block] = fusion.blocks
    assert block.fused and block.details["head_dim"] == head_dim
    assert (block.details["probe_seq_q"], block.details["probe_seq_kv"]) == (63, 15)
    assert_same_function(module, shapes, exported, fusion)


def test_static_export_fuses_too():
    from convattn.exporter.export import export_onnx

    module = ConvMHAttn(16, 16, 2).eval()
    exported = export_onnx(module, [(2, 16, 4, 6)], dynamic=False)
    fusion = fuse_attention(exported.model)
    assert [b.fused for b in fusion.blocks] == [True]
    x = np.random.default_rng(0).standard_normal((2, 16, 4, 6)).astype(np.float32)
    from convattn.plugins.ort_op import session

    (out,) = session(fusion.model).run(None, {"input": x})
    with torch.no_grad():
        np.testing.assert_allclose(out, module(torch.from_numpy(x)).numpy(), atol=2e-5, rtol=0)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_seed_sdpa_channel_attention_is_reported_not_fused(exporter):
    _, _, exported, fusion = cached(("seed_sdpa", exporter, 18))
    [block] = fusion.blocks
    assert not block.fused
    assert "attention over channels" in block.reason and "8x8" in block.reason
    assert "Softmax" in ops(fusion.model) and OP_TYPE not in ops(fusion.model)


@pytest.mark.parametrize("name,reason", [("WrongAxisSoftmax", "softmax runs over axis")])
def test_attention_the_kernel_does_not_compute_is_left_alone(name, reason):
    import user_models

    module = getattr(user_models, name)().eval()
    exported, fusion = export_fuse(module, [(1, 8, 4, 5)])
    [block] = fusion.blocks
    assert not block.fused and reason in block.reason
    assert OP_TYPE not in ops(fusion.model)


def test_interleaved_heads_are_not_mistaken_for_nchw():
    import user_models

    module = user_models.InterleavedHeads().eval()
    shapes = [(1, 8, 4, 5)]
    exported, fusion = export_fuse(module, shapes)
    [block] = fusion.blocks
    assert block.fused and "NCHW" not in block.details["layouts"][:3]
    assert_same_function(module, shapes, exported, fusion)


def test_graph_without_attention_has_no_blocks():
    import user_models

    exported, fusion = export_fuse(user_models.NoAttention(), [(1, 4, 3, 3)])
    assert fusion.blocks == [] and ops(fusion.model) == ops(exported.model)


def test_reshape_view_follows_row_major_memory():
    # (B, C, H, W) -> (B, heads, D, H*W): channels split head-major, pixels merged row-major.
    v = reshape_view(identity_view((2, 16, 5, 3)), (2, 2, 8, 15))
    assert [[(a.axis, a.size, a.stride) for a in ax] for ax in v] == [[(0, 2, 1)], [(1, 2, 8)], [(1, 8, 1)], [(2, 5, 1), (3, 3, 1)]]
    assert reshape_view(identity_view((4, 6)), (3, 8)) is None  # 4*6 -> 3*8 splits no atom cleanly


@pytest.mark.parametrize("heads,exporter", [(1, "dynamo"), (2, "dynamo"), (1, "torchscript")])
def test_stable_diffusion_vae_attention_fuses_on_the_linear_outputs(heads, exporter):
    import user_models

    module = user_models.VAEAttention(64, heads).eval()
    shapes = [(1, 64, 6, 5)]
    exported, fusion = export_fuse(module, shapes, exporter)
    [block] = fusion.blocks
    assert block.fused and block.details["layouts"] == ["BSC"] * 4  # Linear outputs read and written in place
    assert block.details["head_dim"] == 64 // heads
    assert "Softmax" not in ops(fusion.model)
    if exporter == "dynamo":  # only the NCHW <-> tokens transposes remain around the node
        assert ops(fusion.model).count("Transpose") == 2
    assert_same_function(module, shapes, exported, fusion, atol=5e-5)


def test_vae_attention_torchscript_multihead_fuses_on_the_heads_as_batch_tensors():
    """TorchScript's export reads shapes of the attention output, so the Linear outputs cannot be read in
    place; the (B*heads, S, D) tensors head_to_batch_dim makes can: one head over a B*heads batch (it was
    reported unfused, "also feeds Shape", while the deepest roots alone were tried)."""
    import user_models

    module = user_models.VAEAttention(64, 2).eval()
    exported, fusion = export_fuse(module, [(1, 64, 6, 5)], "torchscript")
    [block] = fusion.blocks
    assert block.fused and block.details["num_heads"] == 1 and block.details["layouts"] == ["BSC"] * 4
    assert "Softmax" not in ops(fusion.model)
    assert_same_function(module, [(1, 64, 6, 5)], exported, fusion, atol=5e-5)


def test_a_learned_per_head_temperature_moves_onto_q_and_fuses():
    """Scores times a (heads, 1, 1) parameter (edgenext's XCA-style temperature, SwinV2's logit scale):
    `row_scale` moves it onto Q, the block fuses and computes the model's function. Before, it was
    reported "attention-like"."""
    import user_models

    module = user_models.TemperatureAttention().eval()
    exported, fusion = export_fuse(module, [(1, 16, 5, 6)])
    assert [b.fused for b in fusion.blocks] == [True], [b.reason for b in fusion.blocks]
    assert_same_function(module, [(1, 16, 5, 6)], exported, fusion, atol=5e-5)


@pytest.mark.parametrize("model,between", [("KeyScaledAttention", "Mul"), ("TalkingHeads", "Conv")])
def test_attention_the_fuser_does_not_take_is_reported(model, between, tmp_path):
    """Every Softmax over a product of two activations is a block in the report, fused or not, with
    the reason; a model whose attention is all unfusable exits 3 saying so (not "no attention block
    found"). Mutation: `_attention_like` not called: the block vanishes."""
    import torch
    from typer.testing import CliRunner

    import user_models
    from convattn.exporter.cli import app

    module = getattr(user_models, model)().eval()
    _, fusion = export_fuse(module, [(1, 16, 5, 6)])
    [block] = fusion.blocks
    assert not block.fused and "attention-like" in block.reason and between in block.reason
    path = tmp_path / "m.pt"
    torch.save(module, path)
    r = CliRunner().invoke(app, [str(path), "--trust-pickle", "--input-shape", "1x16x5x6", "--fused-onnx",
                                 str(tmp_path / "f.onnx")])
    assert r.exit_code == 3 and "none fusable" in r.output and "no attention block" not in r.output


def test_a_dynamic_batch_that_only_runs_at_1_is_fused_at_the_export_shape_and_said(capfd):
    """The probe runs dynamic dims at >= 2; a graph that claims a dynamic batch but runs at 1 only
    got a raw ONNX Runtime Reshape error (exit 3). Now: fused at the export shapes, with a note
    naming --static, and ONNX Runtime's log line for the failed probe kept off the terminal.
    Mutations: no "exact" probe: ModelError; session log severity 3: its red ERROR line on stderr."""
    import user_models
    from convattn.exporter.export import export_onnx

    exported = export_onnx(user_models.BatchOne().eval(), [(1, 16, 5, 6)], exporter="torchscript")
    assert not exported.model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")  # "dynamic"
    fusion = fuse_attention(exported.model)
    assert [b.fused for b in fusion.blocks] == [True]
    assert any("--static" in n and ">= 2" in n and "written with those dims fixed" in n for n in fusion.notes)
    assert "onnxruntime" not in capfd.readouterr().err
    # written as the one shape it runs at (it aborted at batch 2 when written dynamic). Mutation: no
    # `_fix_input_dims` in fuse_attention.
    assert [d.dim_value for d in fusion.model.graph.input[0].type.tensor_type.shape.dim] == [1, 16, 5, 6]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_windowed_attention_merges_windows_into_the_heads_axis(exporter):
    """timm's nest: Q, K, V (B, heads, windows, S, D) unbound from one qkv projection. Fused as one
    BHSD node over (B, heads x windows, S, D), reshaped in and out from Shape, so the window count
    stays dynamic: the fused graph matches PyTorch at another image size (other window count) and
    batch. Mutation: the output reshaped to the probe's window count (a static target) fails."""
    import user_models
    from convattn.exporter.export import export_onnx

    module = user_models.WindowedAttention().eval()
    exported = export_onnx(module, [(1, 16, 64, 64)], exporter=exporter)
    fusion = fuse_attention(exported.model, exported.input_shapes)  # probed at 32x32: 64 windows
    [block] = fusion.blocks
    assert block.fused and block.details["layouts"] == ["BHSD"] * 4, block.reason
    assert ops(fusion.model).count(OP_TYPE) == 1 and "Softmax" not in ops(fusion.model)
    # sized at the export shape (what the validation's memory check reads): 256 windows of 16 pixels
    assert block.details["merged_axes"] == [2, 256] and block.details["num_heads"] == 512
    assert block.details["seq_q"] == 16 and block.details["batch"] == 1
    if exporter == "dynamo":  # (S, D) static in the graph stay static for the node (TensorRT reads D at build)
        inferred = onnx.shape_inference.infer_shapes(fusion.model, data_prop=True)
        [node] = [n for n in inferred.graph.node if n.op_type == OP_TYPE]
        dims = {v.name: v.type.tensor_type.shape.dim for v in inferred.graph.value_info}
        assert all([d.dim_value for d in dims[i]][2:] == [16, 8] for i in node.input)
    assert_same_function(module, [(1, 16, 16, 16)], exported, fusion)
    assert_same_function(module, [(1, 16, 32, 24)], exported, fusion)  # 48 windows, not the probe's


def test_windowed_attention_with_a_transposed_output_is_reported():
    """The kernel writes (B, heads x windows, S, D); an output that swaps axes is refused by name."""
    import user_models
    from convattn.exporter.export import export_onnx

    class Swapped(user_models.WindowedAttention):
        def attend(self, q, k, v):
            B, H, T, N, D = q.shape
            p = torch.einsum("bhtqd,bhtkd->bhtqk", q * self.scale, k).softmax(-1)
            return torch.einsum("bhtqk,bhtkd->bthqd", p, v).permute(0, 1, 3, 2, 4).reshape(B, T, N, H * D)

    exported = export_onnx(Swapped().eval(), [(1, 16, 16, 16)], exporter="dynamo")
    [block] = fuse_attention(exported.model, exported.input_shapes).blocks
    assert not block.fused and "windowed" in block.reason, block.reason


def test_a_probe_that_shrinks_the_sequence_to_one_pixel_grows():
    """The probe halves large dims to 32; after a 32x downsampling that leaves 1 pixel, where a
    (B, heads, 1, D) attention cannot be told from one over channels: timm's fastvit_sa12 at 256x256
    was reported "attention over channels". The probe grows until the sequence is > 1: fused.
    Mutation: no regrowth: reported unfused."""
    import user_models
    from convattn.exporter.export import export_onnx

    module = user_models.DeepStage().eval()
    exported = export_onnx(module, [(1, 16, 128, 128)])
    fusion = fuse_attention(exported.model, exported.input_shapes)
    [block] = fusion.blocks
    assert block.fused, block.reason
    assert block.details["probe_seq_q"] > 1 and block.details["seq_q"] == 16
    assert_same_function(module, [(1, 16, 64, 96)], exported, fusion)


class ColumnMajorAttention(torch.nn.Module):
    """Pixels taken column-major (pixel = x * H + y: the map transposed before the flatten) for Q, K
    and V, and the output written back row-major without transposing: not the NCHW layout's pixel
    order on the output side, so only a fuser that compares the sequence axes refuses it."""

    def __init__(self, c=16, heads=2):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Conv2d(c, c, 1) for _ in range(3))
        self.heads = heads
        self.out = torch.nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape

        def seq(t):  # (B, heads, S, d), pixel = x * H + y
            return t.transpose(2, 3).reshape(b, self.heads, c // self.heads, h * w).transpose(-1, -2)

        q, k, v = seq(self.q(x)), seq(self.k(x)), seq(self.v(x))
        o = torch.softmax(q @ k.transpose(-1, -2) * (c // self.heads) ** -0.5, -1) @ v
        return self.out(o.transpose(-1, -2).reshape(b, c, h, w))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_column_major_pixel_order_is_never_fused_wrong(exporter):
    """Whatever the fuser decides, the fused graph computes what PyTorch computes (ONNX Runtime vs
    float64 at another batch). Mutation: the sequence-axis comparison dropped from
    `_same_attention_operand` (fused as NCHW: error 0.46 at 8c10fd2)."""
    from convattn.exporter.export import export_onnx
    from convattn.plugins.ort_op import session

    module = ColumnMajorAttention().eval()
    exported = export_onnx(module, [(1, 16, 4, 6)], exporter=exporter)
    fusion = fuse_attention(exported.model, exported.input_shapes)
    x = np.random.default_rng(3).standard_normal((2, 16, 4, 6)).astype(np.float32)
    (got,) = session(fusion.model).run(None, {exported.input_names[0]: x})
    with torch.no_grad():
        want = module.double()(torch.from_numpy(x).double()).numpy()
    assert np.abs(got - want).max() <= 1e-4, [b.reason for b in fusion.blocks]


@pytest.mark.parametrize("model,fused,says", [
    ("AttentionAndClassifier", [True], "not attention: a Softmax of"),
    ("FactorisedAttention", [], "factorised or linear attention"),
])
def test_every_softmax_is_accounted_for(model, fused, says):
    """A Softmax no pattern takes is reported with what it is: a classifier's (beside a fused block), or
    factorised attention (CoaT's: softmax of K alone, then K^T V), which used to read "no attention block
    found". Mutation: such Softmax nodes skipped (`others` empty)."""
    import user_models

    _, fusion = export_fuse(getattr(user_models, model)().eval(), [(1, 16, 5, 6)])
    assert [b.fused for b in fusion.blocks] == fused
    [other] = fusion.others
    assert other.path == "not attention" and says in other.reason


def test_a_model_whose_softmax_is_no_attention_says_so(tmp_path):
    """Exit 3 "no attention block found" now names what the graph's Softmax is."""
    import torch
    from typer.testing import CliRunner

    import user_models
    from convattn.exporter.cli import app

    path = tmp_path / "m.pt"
    torch.save(user_models.FactorisedAttention().eval(), path)
    r = CliRunner().invoke(app, [str(path), "--trust-pickle", "--input-shape", "1x16x5x6", "--fused-onnx",
                                 str(tmp_path / "f.onnx")])
    text = " ".join(r.output.split())
    assert r.exit_code == 3 and "no attention block found" in text and "factorised or linear attention" in text
