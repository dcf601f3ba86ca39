"""The TensorRT side, as far as it can be checked without TensorRT; the rest is marked and skips."""

import json
import re

import pytest

from convattn.errors import InputError
from convattn.exporter.engine import parse_profiles, sidecar, sidecar_path, triton_repository
from convattn.plugins.op import native_attention_applies

NAMES = ["input_0", "input_1"]
EXPORT = [(1, 64, 32, 32), (1, 64, 16, 16)]


def test_profile_defaults_to_the_export_shapes():
    p = parse_profiles(NAMES, EXPORT)
    assert p.shapes["input_0"] == ((1, 64, 32, 32),) * 3


def test_profile_by_name_and_one_shape_for_all():
    p = parse_profiles(NAMES, EXPORT, min_shape="1x64x8x8", max_shape="input_0:8x64x128x128,input_1:8x64x64x64")
    assert p.shapes["input_0"] == ((1, 64, 8, 8), (1, 64, 32, 32), (8, 64, 128, 128))
    assert p.shapes["input_1"] == ((1, 64, 8, 8), (1, 64, 16, 16), (8, 64, 64, 64))
    assert p.to_dict()["input_1"]["max"] == [8, 64, 64, 64]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"min_shape": "4x64x32x32"}, "min <= opt <= max"),
        ({"max_shape": "1x32x64x64"}, "channel count is fixed at 64"),
        ({"max_shape": "1x64x64"}, "rank 4"),
        ({"max_shape": "other:1x64x64x64"}, "expected an input among"),
        ({"max_shape": "1x64xAx64"}, "NAME:BxCxHxW"),
    ],
)
def test_bad_profiles(kwargs, message):
    with pytest.raises(InputError, match=re.escape(message)):
        parse_profiles(NAMES, EXPORT, **kwargs)


def test_sidecar_says_what_serving_needs(tmp_path):
    p = parse_profiles(NAMES[:1], EXPORT[:1])
    aot = sidecar(trt_version="10.13", gpu="H100", compute_capability="9.0", profile=p, plugin_mode="aot",
                  dtype="fp16", model_sha256="ab" * 32, device_memory_bytes=123)
    jit = sidecar(trt_version="10.13", gpu="H100", compute_capability="9.0", profile=p, plugin_mode="jit",
                  dtype="fp16", model_sha256=None)
    assert aot["needs_python_plugin"] is False and jit["needs_python_plugin"] is True
    assert aot["profiles"][0]["input_0"]["opt"] == [1, 64, 32, 32]
    assert {"tensorrt", "gpu", "compute_capability", "convattn", "source_model_sha256"} <= set(aot)
    assert sidecar_path(tmp_path / "out.plan").name == "out.plan.json"
    json.dumps(aot)


def test_triton_repository(tmp_path):
    from conftest import cached

    _, _, exported, fusion = cached(("einsum", "dynamo", 18))
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"plan bytes")
    p = parse_profiles(["input"], [(1, 16, 7, 9)], max_shape="4x16x64x64")
    target = triton_repository(tmp_path / "repo", "m", plan, fusion.model, p)
    text = (target / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in text and "max_batch_size: 0" in text
    assert re.search(r'name: "input"\s+data_type: TYPE_FP32\s+dims: \[ -1, 16, -1, -1 \]', text)
    assert re.search(r'name: "output"\s+data_type: TYPE_FP32', text)
    assert (target / "1" / "model.plan").read_bytes() == b"plan bytes"
    with pytest.raises(InputError, match="--force"):
        triton_repository(tmp_path / "repo", "m", plan, fusion.model, p)
    assert sorted(x.name for x in (tmp_path / "repo").iterdir()) == ["m"]  # no staging left behind


def test_attention_layers_are_read_from_the_engine_information():
    from convattn.exporter.engine import attention_layers

    info = {"Layers": [{"Name": "q_conv", "LayerType": "CaskConvolution"},
                       {"Name": "node_softmax/FlashAttention", "LayerType": "PluginV3"},
                       {"Name": "{ForeignNode[/MatMul...]}", "LayerType": "Myelin", "TacticName": "_gemm_mha_v2"},
                       "out_conv"]}
    assert attention_layers(json.dumps(info)) == ["node_softmax/FlashAttention", "{ForeignNode[/MatMul...]}"]
    assert attention_layers("") == []


def test_tactics_start_with_the_recorded_config():
    from convattn.plugins.plan import _recorded
    from convattn.plugins.kernel import KernelConfig
    from convattn.plugins.plan import tactic_configs

    from convattn.plugins.kernel import candidate_configs

    tactics = tactic_configs(8, "fp16")
    recorded = _recorded()["sm_90/fp16/d8/s16384"]  # tuned on the H100, shipped in configs.json
    assert tactics[0] == KernelConfig(**recorded["config"])
    assert len(set(tactics)) == len(tactics)
    assert set(tactic_configs(64, "fp32")) <= set(candidate_configs(64, 4))  # every fp32 tactic fits fp32


@pytest.mark.parametrize(
    "dtype,head_dim,native", [("fp16", 64, True), ("bf16", 16, True), ("fp16", 8, False), ("fp16", 24, True),
                              ("fp16", 20, False), ("fp32", 64, False), ("fp16", 512, False)])
def test_where_tensorrt_fuses_attention_itself(dtype, head_dim, native):
    assert native_attention_applies(dtype, head_dim) is native


def test_attention_modes_choose_per_block():
    from conftest import cached

    from convattn.exporter.fuse import fuse_attention

    _, _, exported, _ = cached(("cross", "dynamo", 18))  # head_dim 24
    auto16 = fuse_attention(exported.model, attention="auto", dtype="fp16")
    auto32 = fuse_attention(exported.model, attention="auto", dtype="fp32")
    native = fuse_attention(exported.model, attention="native")
    assert [b.path for b in auto16.blocks] == ["native"] and "TensorRT fuses fp16" in auto16.blocks[0].reason
    assert [b.path for b in auto32.blocks] == ["plugin"]
    assert [b.path for b in native.blocks] == ["native"]
    assert "FlashAttention" not in [n.op_type for n in native.model.graph.node]
    assert native.unfused == [] and auto16.fused == []


@pytest.mark.tensorrt
def test_engine_builds_runs_and_matches_pytorch(tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed on this machine")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from convattn.exporter.engine import build_engine, run_engine
    from convattn.exporter.export import export_onnx
    from convattn.exporter.fuse import fuse_attention
    from convattn.exporter.load import demo_model

    model = demo_model()
    exported = export_onnx(model, [(1, 64, 32, 32)])
    fusion = fuse_attention(exported.model)
    profile = parse_profiles(exported.input_names, [(1, 64, 32, 32)], max_shape="2x64x48x48")
    built = build_engine(fusion.model, tmp_path / "m.plan", profile)
    assert built.sidecar["tensorrt"] == trt.__version__
    x = torch.randn(2, 64, 40, 36, device="cuda")
    (out,) = run_engine(built.plan, {exported.input_names[0]: x})
    with torch.no_grad():
        ref = model.cuda().double()(x.double())
    assert (out.double() - ref).abs().max() <= 1e-4


def test_readme_and_serving_readme_carry_the_same_proof_table():
    """The table of what is proven where is written twice (the README, serving/README.md): one text."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tables = [re.search(r"<!-- trt-proof-table.*?\n((?:\|.*\n)+)", (root / name).read_text()).group(1)
              for name in ("README.md", "serving/README.md")]
    assert tables[0] == tables[1] and tables[0].count("\n") >= 8
