"""Real blocks of third-party libraries (diffusers 0.42, MONAI 1.6, timm 1.0; built from configs with
random weights): what a user exports, through the same pipeline. One small model or block each, to
keep CI short. The test extra installs all three: a missing one fails the import, it is not skipped."""

import json

import pytest
import torch

import diffusers


class VAEMidAttention(torch.nn.Module):
    """diffusers' Stable Diffusion VAE attention (the mid block's `Attention`, AttnProcessor2_0: SDPA)."""

    def __init__(self, c=64):
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.attn = Attention(c, heads=1, dim_head=c, rescale_output_factor=1.0, eps=1e-6, norm_num_groups=32,
                              residual_connection=True, bias=True, upcast_softmax=True,
                              _from_deprecated_attn_block=True)

    def forward(self, x):
        return self.attn(x)


def test_diffusers_vae_attention_fuses_and_validates():
    from conftest import export_fuse

    from convattn.exporter.validate import validate

    torch.manual_seed(0)
    module = VAEMidAttention().eval()
    exported, fusion = export_fuse(module, [(1, 64, 8, 8)])
    [block] = fusion.blocks
    assert block.fused and block.details["layouts"] == ["BSC"] * 4 and block.details["head_dim"] == 64
    report = validate(module, exported.model, fusion.model, exported.input_shapes, blocks=fusion.blocks, seed=0)
    assert report.passed and any(c.path.startswith("block ") for c in report.comparisons)


def test_pickled_autoencoder_kl_through_the_cli(tmp_path):
    """A pickled AutoencoderKL returns a DecoderOutput dataclass: at 5b1ec6e an AttributeError
    traceback and exit 1; now both attention blocks fuse and the flattened output validates."""
    from typer.testing import CliRunner

    from convattn.exporter.cli import app

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(32,), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=8, sample_size=16).eval()
    path, report = tmp_path / "vae.pt", tmp_path / "r.json"
    torch.save(vae, path)
    r = CliRunner().invoke(app, [str(path), "--trust-pickle", "--input-shape", "1x3x16x16", "--fused-onnx",
                                 str(tmp_path / "f.onnx"), "--report", str(report)])
    assert r.exit_code == 0, r.output
    doc = json.loads(report.read_text())
    assert [b["fused"] for b in doc["blocks"]] == [True, True]
    assert doc["validation"]["passed"] and not any("static shapes" in w for w in doc["warnings"])


def test_monai_spatial_attention_block_fuses_and_validates():
    """MONAI's SpatialAttentionBlock (its diffusion UNet's and autoencoder's attention): NCHW map,
    GroupNorm, SABlock on the H*W tokens with 4 heads of 8."""
    from conftest import export_fuse
    from monai.networks.blocks.spatialattention import SpatialAttentionBlock

    from convattn.exporter.validate import validate

    torch.manual_seed(0)
    module = SpatialAttentionBlock(spatial_dims=2, num_channels=32, num_head_channels=8, norm_num_groups=8).eval()
    exported, fusion = export_fuse(module, [(1, 32, 8, 8)])
    [block] = fusion.blocks
    assert block.fused and block.details["num_heads"] == 4 and block.details["head_dim"] == 8
    report = validate(module, exported.model, fusion.model, exported.input_shapes, blocks=fusion.blocks, seed=0)
    assert report.passed and any(c.path.startswith("block ") for c in report.comparisons)


class _TokensOf(torch.nn.Module):
    """A token block (B, H*W, C) applied to an NCHW map."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        b, c, h, w = x.shape
        return self.block(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)


def test_monai_relative_position_attention_is_reported_not_fused():
    """MONAI's SABlock with decomposed relative positions adds a bias to the scores after a
    Reshape: at 5b1ec6e it vanished from the report. It is listed, unfused, with what stands between."""
    from conftest import export_fuse
    from monai.networks.blocks.selfattention import SABlock

    torch.manual_seed(0)
    block = SABlock(hidden_size=32, num_heads=4, rel_pos_embedding="decomposed", input_size=(8, 8))
    _, fusion = export_fuse(_TokensOf(block).eval(), [(1, 32, 8, 8)])
    [report] = fusion.blocks
    assert not report.fused and "attention-like" in report.reason and "Add" in report.reason, report.reason


def test_timm_nest_windowed_attention_fuses_every_level():
    """timm's NesT: attention inside windows, Q/K/V (B, heads, windows, S, D). At 5b1ec6e reported
    "not a (B, heads, S, D) view of a 4-D tensor"; now each level fuses as one node with the windows
    merged into the heads axis, and validates end to end and per block (TorchScript exporter: the
    dynamo exporter refuses 5-D SDPA, and says which exporter to use)."""
    from conftest import export_fuse

    from convattn.errors import ExportError
    from convattn.exporter.export import export_onnx
    from convattn.exporter.validate import validate

    from timm.models.nest import Nest  # torchvision: see conftest

    torch.manual_seed(0)
    module = Nest(img_size=32, in_chans=3, patch_size=2, num_levels=3, embed_dims=(16, 32, 64), num_heads=(1, 2, 4),
                  depths=(1, 1, 1), num_classes=10).eval()
    exported, fusion = export_fuse(module, [(1, 3, 32, 32)], exporter="torchscript")
    assert [b.fused for b in fusion.blocks] == [True] * 3, [b.reason for b in fusion.blocks]
    assert [b.details["merged_axes"] for b in fusion.blocks] == [[1, 16], [2, 4], [4, 1]]
    report = validate(module, exported.model, fusion.model, exported.input_shapes, blocks=fusion.blocks, seed=0)
    assert report.passed and sum(c.path.startswith("block ") for c in report.comparisons) == 3
    with pytest.raises(ExportError, match="--exporter torchscript"):
        export_onnx(module, [(1, 3, 32, 32)], exporter="dynamo")


def test_timm_nest_saved_as_pt2_exports_as_saved(tmp_path):
    """A torch.export program refuses train(); the TorchScript exporter (NesT's 5-D SDPA needs it) set the
    module's mode, so a NesT .pt2 exited 3 with "Calling train() is not supported yet". Now it exports as
    the user saved it, every level fuses and the run passes. Mutation: the TorchScript export without
    `training=PRESERVE` (exit 3 again)."""
    import json

    from typer.testing import CliRunner

    from convattn.exporter.cli import app

    from timm.models.nest import Nest  # torchvision: see conftest

    torch.manual_seed(0)
    module = Nest(img_size=32, in_chans=3, patch_size=2, num_levels=3, embed_dims=(16, 32, 64), num_heads=(1, 2, 4),
                  depths=(1, 1, 1), num_classes=10).eval()
    path = tmp_path / "nest.pt2"
    torch.export.save(torch.export.export(module, (torch.randn(1, 3, 32, 32),)), path)
    r = CliRunner().invoke(app, [str(path), "--fused-onnx", str(tmp_path / "f.onnx"), "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert [b["fused"] for b in json.loads((tmp_path / "r.json").read_text())["blocks"]] == [True] * 3


def test_timm_swin_fuses_every_window_attention_with_its_bias():
    """timm's SwinTransformer (relative position table per head, shifted windows with the -100 mask on a
    (B, windows, heads, N, N) view): every block fuses as one FlashAttentionBias node, and the model
    validates end to end and per block. Before the bias input none fused ("a mask or bias is added")."""
    from conftest import export_fuse

    from convattn.exporter.validate import validate
    from convattn.plugins.op import BIAS_OP_TYPE

    from timm.models.swin_transformer import SwinTransformer  # torchvision: see conftest

    torch.manual_seed(0)
    module = SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                             num_classes=5).eval()
    exported, fusion = export_fuse(module, [(1, 3, 32, 32)])
    assert len(fusion.blocks) == 4 and all(b.fused for b in fusion.blocks), [b.reason for b in fusion.blocks]
    assert [b.details["bias"][0] for b in fusion.blocks] == [1, 16, 1, 4]  # shared table; 16 then 4 windows masked
    # The report says what indexing the table in the kernel would save (exported constant: found by its values)
    assert [b.details["bias_table"].split(" values)")[0].split("window (")[1] for b in fusion.blocks] == [
        "98", "98", "196", "196"]  # 2 and 4 heads of (2 * 4 - 1)^2 relative positions
    assert sum(n.op_type == BIAS_OP_TYPE for n in fusion.model.graph.node) == 4
    result = validate(module, exported.model, fusion.model, exported.input_shapes, blocks=fusion.blocks, seed=0)
    assert result.passed, result


def test_timm_swinv2_fuses_every_window_attention_with_its_per_head_scale():
    """timm's SwinTransformerV2 (cosine attention: normalised Q and K, a learned logit scale per head on the
    scores, a bias from the continuous position MLP, shifted windows): the per-head scale moves onto Q
    (`fuse.row_scale`), every block fuses and the model validates end to end and per block. Before, none
    fused ("a learned or per-head scale"). Mutation: the factor left off Q (validation fails)."""
    from conftest import export_fuse

    from convattn.exporter.validate import validate

    from timm.models.swin_transformer_v2 import SwinTransformerV2

    torch.manual_seed(0)
    module = SwinTransformerV2(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                               num_classes=5).eval()
    with torch.no_grad():  # logit scales apart per head (timm starts them all at log(10))
        for blk in (b for stage in module.layers for b in stage.blocks):
            blk.attn.logit_scale.copy_(torch.rand_like(blk.attn.logit_scale) * 3)
    exported, fusion = export_fuse(module, [(1, 3, 32, 32)])
    assert len(fusion.blocks) == 4 and all(b.fused for b in fusion.blocks), [b.reason for b in fusion.blocks]
    result = validate(module, exported.model, fusion.model, exported.input_shapes, blocks=fusion.blocks, seed=0)
    assert result.passed, result


def test_timm_edgenext_cross_covariance_attention_fuses_and_validates():
    """EdgeNeXt's XCA: attention over each head's channels (the tokens are the contracted axis, D = H*W),
    with a learned temperature per head (moved onto Q). At the reduced probe the last stage's map is 1x1:
    D = 1, where BHSD and BHDS views look alike; the fuser probes larger (as for a sequence of 1) and
    every block fuses as BHSD and validates. Mutation: only a sequence of 1 counted as degenerate (the
    last block fused as NCHW: 0.12 off the unfused graph, validation fails)."""
    import timm

    from conftest import export_fuse
    from convattn.exporter.validate import validate

    torch.manual_seed(0)
    module = timm.create_model("edgenext_xx_small", pretrained=False, num_classes=10).eval()
    exported, fusion = export_fuse(module, [(1, 3, 256, 256)])
    assert [b.fused for b in fusion.blocks] == [True] * 3, [b.reason for b in fusion.blocks]
    assert [b.details["layouts"][0] for b in fusion.blocks] == ["BHSD"] * 3
    result = validate(module, exported.model, fusion.model, exported.input_shapes, blocks=fusion.blocks, seed=0)
    assert result.passed, result


def test_monai_swin_unetr_fuses_every_window_attention():
    """MONAI's SwinUNETR (2-D here; 3-D at 64^3 fused 8 of 8 too, 73 s): its WindowAttention with the
    relative position bias and the shifted-window mask, every block fused and validated."""
    from conftest import export_fuse
    from monai.networks.nets import SwinUNETR

    from convattn.exporter.validate import validate

    torch.manual_seed(0)
    module = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=2, depths=(2, 2, 2, 2),
                       num_heads=(3, 6, 12, 24)).eval()
    exported, fusion = export_fuse(module, [(1, 1, 64, 64)])
    assert len(fusion.blocks) == 8 and all(b.fused for b in fusion.blocks), [b.reason for b in fusion.blocks]
    result = validate(module, exported.model, fusion.model, exported.input_shapes, blocks=fusion.blocks, seed=0)
    assert result.passed, result
