"""torch.nn.MultiheadAttention on a feature map's pixels fuses, from both exporters, with need_weights
True and False and either batch order: the packed in_proj's Q, K, V slices are read where they lie
(the sequence-first "SBC" layout, MultiheadAttention's own) or as the (B, heads, S, D) tensors the
export makes, and the fused graph matches float64 PyTorch."""

import numpy as np
import pytest
import torch
from torch import nn

from convattn.exporter.export import export_onnx
from convattn.exporter.fuse import fuse_attention
from convattn.plugins import ort_op
from convattn.plugins.op import is_fused_node


class PixelMHA(nn.Module):
    """(B, C, H, W) -> tokens -> nn.MultiheadAttention (self-attention) -> (B, C, H, W)."""

    def __init__(self, channels: int, heads: int, need_weights: bool, batch_first: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=batch_first)
        self.need_weights = need_weights

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        if not self.attn.batch_first:
            t = t.transpose(0, 1)
        y, _ = self.attn(t, t, t, need_weights=self.need_weights)
        if not self.attn.batch_first:
            y = y.transpose(0, 1)
        return y.transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "need_weights"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_multihead_attention_fuses_and_matches_pytorch(exporter, need_weights, batch_first):
    """Mutations: no "SBC" candidate for 3-D roots (need_weights=True and TorchScript stay unfused: K is only
    ever a transposed view of the (S, B*heads, D) slice); only the deepest root of each operand tried (the
    one-head (B*heads, S, D) reading wins and the (B, heads, S, D) output cannot be written)."""
    torch.manual_seed(0)
    module = PixelMHA(32, 4, need_weights, batch_first).eval()
    exported = export_onnx(module, [(1, 32, 4, 5)], exporter=exporter)
    fusion = fuse_attention(exported.model)
    assert [b.fused for b in fusion.blocks] == [True], [b.reason for b in fusion.blocks]
    assert sum(is_fused_node(n) for n in fusion.model.graph.node) == 1
    # batch 2 at the export's map: TorchScript's MultiheadAttention export fixes the sequence length
    x = np.random.default_rng(3).standard_normal((2, 32, 4, 5)).astype(np.float32)
    [got] = ort_op.run(fusion.model, {exported.input_names[0]: x})
    with torch.no_grad():
        want = module.double()(torch.from_numpy(x).double()).numpy()
    assert np.abs(got - want).max() < 1e-5
