"""Validation that cannot pass while checking nothing: per-block parity, the precision rule,
constant outputs, models whose outputs are not one tensor."""

import numpy as np
import onnx
import pytest

import user_models
from conftest import export_fuse
from convattn.exporter.validate import Comparison, ValidationReport, validate


def _validate(module, shapes, **kwargs):
    exported, fusion = export_fuse(module.eval(), shapes)
    return exported, fusion, validate(module, exported.model, fusion.model, exported.input_shapes,
                                      blocks=fusion.blocks, seed=0, **kwargs)


def _scaled(model, factor):
    """A copy of a fused graph whose FlashAttention nodes' scale is off by `factor`."""
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    for node in broken.graph.node:
        for a in node.attribute:
            if a.name == "scale":
                a.s = repr(float(a.s) * factor).encode()
    return broken


def test_a_wrong_block_fails_its_own_check():
    """A 1.5x scale error in one fused node: the block's row fails (in deep random-weight models the
    end-to-end error of such a node stayed within tolerance). Mutation: no per-block rows."""
    from convattn.models import ConvMHAttn

    module = ConvMHAttn(16, 16, 2).eval()
    exported, fusion = export_fuse(module, [(1, 16, 7, 9)])
    broken = _scaled(fusion.model, 1.5)
    report = validate(module, exported.model, broken, exported.input_shapes, blocks=fusion.blocks, seed=0)
    [row] = [c for c in report.comparisons if c.path.startswith("block ")]
    assert not row.passed and row.max_rel > 1e-2 and not report.passed


def test_validate_with_its_defaults_checks_every_fused_block():
    """Called as a library with no `blocks`, `validate` still checks each fused node against the same
    tensor of the unfused graph, as the CLI does: a block whose error the output projection hides
    (its weights scaled to 1e-7) fails. Mutation: no default blocks (the broken graph passes)."""
    import torch

    from convattn.models import ConvMHAttn

    module = ConvMHAttn(16, 16, 2).eval()
    with torch.no_grad():
        module.out_conv.weight.mul_(1e-7)
    exported, fusion = export_fuse(module, [(1, 16, 7, 9)])
    broken = _scaled(fusion.model, 1.5)
    assert validate(module, exported.model, fusion.model, exported.input_shapes, seed=0).passed
    report = validate(module, exported.model, broken, exported.input_shapes, seed=0)
    assert [c.passed for c in report.comparisons if c.path.startswith("block ")] == [False] and not report.passed
    assert all(c.passed for c in report.comparisons if not c.path.startswith("block "))  # end to end it hides


def test_validate_refuses_an_unknown_dtype_with_a_convattn_error():
    from convattn.errors import ConvattnError
    from convattn.models import ConvMHAttn

    module = ConvMHAttn(16, 16, 2).eval()
    exported, fusion = export_fuse(module, [(1, 16, 7, 9)])
    with pytest.raises(ConvattnError, match="dtype: expected one of fp32, fp16, bf16, got 'fp8'"):
        validate(module, exported.model, fusion.model, exported.input_shapes, dtype="fp8")


def test_a_pass_needs_a_check_in_the_requested_precision():
    rows = [Comparison("onnxruntime fused", "fp32", 0.0, 0.0, 1e-5)]
    assert ValidationReport("fp32", 0, [], rows, []).passed
    assert not ValidationReport("fp16", 0, [], rows, []).passed
    assert not ValidationReport("fp32", 0, [], [], []).passed


@pytest.mark.parametrize("model,outputs", [("DataclassOutput", ["output"]),
                                           ("DictOutput", ["output.features", "output.pooled"])])
def test_models_returning_dataclasses_and_dicts(model, outputs):
    """diffusers returns dataclasses: flattened and named as torch.onnx flattens them, every output
    compared. Mutation: comparing only the first output."""
    exported, fusion, report = _validate(getattr(user_models, model)(), [(1, 16, 5, 6)])
    assert [o.name for o in exported.model.graph.output] == outputs
    assert report.passed and [b.fused for b in fusion.blocks] == [True]


def test_a_constant_output_is_flagged_and_the_blocks_still_checked():
    _, _, report = _validate(user_models.ZeroOutput(), [(1, 16, 5, 6)])
    assert any("(near) constant" in n for n in report.notes)
    assert [c.path for c in report.comparisons if c.path.startswith("block ")]
    assert all(np.isfinite(c.max_abs) for c in report.comparisons)
