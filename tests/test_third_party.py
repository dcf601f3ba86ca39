"""Real blocks of a third-party library (diffusers 0.42, built from configs with random weights):
what a user exports, through the same pipeline. One small model each, to keep CI short."""

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the test extra installs diffusers")


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
