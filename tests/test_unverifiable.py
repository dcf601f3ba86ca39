"""What no machine here can verify inside TensorRT, mitigated by design and tested on its own terms:
a tactic within 48 KiB of shared memory and no scratch for every node; sizes the int32 arithmetic
cannot index refused before TensorRT; the PTX's needs written in the sidecar and checked before a
plan is loaded; the scratch output declared the same in ONNX Runtime as in TensorRT."""

import json

import numpy as np
import onnx
import pytest

import trt_harness as h
from convattn.errors import DriverError, ModelError
from convattn.plugins import plan, trt_plugin
from convattn.plugins.kernel import SMEM_WITHOUT_OPT_IN
from convattn.plugins.op import FlashAttentionAttrs, make_node, scratch_shape


@pytest.fixture
def trt(trt_core):
    return trt_core


@pytest.mark.parametrize("dtype,head_dim", [("fp16", 64), ("fp16", 512), ("fp32", 8), ("fp32", 64)])
def test_every_node_has_a_tactic_without_opt_in(trt, dtype, head_dim):
    """Whether TensorRT opts an AOT kernel in to more than 48 KiB of dynamic shared memory is not
    documented: every node's tactics include one that needs neither the opt-in nor the scratch output.
    Checked on what Triton compiles (PTX metadata, through NVIDIA's get_launch_params), not on the
    estimate. The GPU run (benchmarks/results/no_opt_in_*.md) covers every layout x dtype and its cost.
    Mutations: no fallback appended in `tactic_configs` (fp16 d=512's list starts at 64 KiB); the
    fallback taken from a list that includes the Hopper tactic (its entry takes the scratch)."""
    heads = 2
    shapes = [(2, heads * head_dim, 4, 6)] * 3
    node = make_node("qkv", "o", FlashAttentionAttrs(heads, head_dim**-0.5))
    built = h.build_node(trt, h.parse_node(trt, node), [trt.float16 if dtype == "fp16" else trt.float32] * 3,
                         shapes, {}, tactics=[])
    configs = plan.tactic_configs(head_dim, dtype)
    from convattn.plugins.kernel import smem_estimate

    safe = [t for t in built.tactics if t <= len(configs)
            and smem_estimate(configs[t - 1], head_dim, 4 if dtype == "fp32" else 2) <= SMEM_WITHOUT_OPT_IN]
    assert safe, f"no tactic within {SMEM_WITHOUT_OPT_IN} B: {configs}"
    launch = h.build_node(trt, h.parse_node(trt, node), [trt.float16 if dtype == "fp16" else trt.float32] * 3,
                          shapes, {}, tactics=safe[-1:]).launches[safe[-1]]
    assert launch.shared_mem <= SMEM_WITHOUT_OPT_IN
    # needs no scratch: its PTX entry takes exactly the inputs, the int32 extras and the output
    import re

    entry = re.search(rf"\.entry\s+{launch.kernel_name}\s*\((.*?)\)", launch.ptx, re.S).group(1)
    assert len([p for p in entry.split(",") if p.strip()]) == 3 + len(launch.extras) + 1


def test_fp32_heads_wider_than_256_have_no_such_tactic_and_say_so():
    """The one exception, stated in the README: 16 query rows and 16 keys of 512 fp32 columns are 64 KiB."""
    from convattn.plugins.kernel import no_opt_in_config

    assert no_opt_in_config(512, 4) is None and no_opt_in_config(256, 4) is not None


def test_sizes_the_int32_kernels_cannot_index_are_refused_at_fuse_time(monkeypatch):
    """A block whose Q, K, V or output holds >= 2^31 elements at the export shape: one line, exit 3,
    before any file is written. Mutation: no int32 check in `fuse_attention` -> fused."""
    from conftest import cached

    from convattn.exporter import fuse

    _, shapes, exported, _ = cached(("einsum", "dynamo", 18))
    real = fuse._export_sizes

    def huge(model, input_shapes, blocks):  # the export shape of a 2^16 x 2^16 map, batch 1, 16 channels
        real(model, input_shapes, blocks)
        for b in blocks:
            b.details.update(batch=1, seq_q=2**32 // 16, seq_kv=2**32 // 16)

    monkeypatch.setattr(fuse, "_export_sizes", huge)
    with pytest.raises(ModelError, match="more than the 2.31 - 1 the kernels index with int32") as e:
        fuse.fuse_attention(exported.model, shapes)
    assert e.value.exit_code == 3 and "\n" not in str(e.value)


def test_a_profile_whose_largest_shapes_overflow_int32_is_refused_before_tensorrt(trt, tmp_path, monkeypatch):
    """The export shape fits, the profile's max does not (B=2048 x 16 channels x 256 x 256 = 2^31):
    refused before TensorRT is asked, naming --max-shape. Mutation: no `check_int32` in build_engine."""
    from conftest import cached

    from convattn.exporter import engine

    monkeypatch.setattr(engine, "gpu_identity", lambda: ("stand-in", "9.0"))
    fused = cached(("einsum", "dynamo", 18))[3].model
    profile = engine.parse_profiles(["input"], [(1, 16, 7, 9)], max_shape="2048x16x256x256")
    with pytest.raises(ModelError, match="narrow --max-shape"):
        engine.build_engine(fused, tmp_path / "m.plan", profile)
    assert not (tmp_path / "m.plan").exists()
    engine.build_engine(fused, tmp_path / "m.plan", engine.parse_profiles(["input"], [(1, 16, 7, 9)],
                                                                          max_shape="2047x16x256x256"))


def test_the_sidecar_records_what_the_ptx_needs(trt, tmp_path, monkeypatch):
    """An AOT plan carries PTX: the sidecar says its ISA, its target and the oldest driver that loads it,
    from the kernels TensorRT was actually handed (`trt_plugin.emitted_kernels`); a JIT plan carries none.
    Mutation: the sidecar without `ptx` (a server with an old driver learns it from a CUDA error)."""
    from conftest import cached

    from convattn.exporter import engine
    from convattn.plugins.aot import PTX_ISA_DRIVER

    monkeypatch.setattr(engine, "gpu_identity", lambda: ("stand-in", "9.0"))
    fused = cached(("einsum", "dynamo", 18))[3].model
    profile = engine.parse_profiles(["input"], [(1, 16, 7, 9)])
    aot = engine.build_engine(fused, tmp_path / "a.plan", profile).sidecar
    jit = engine.build_engine(fused, tmp_path / "j.plan", profile, plugin_mode="jit").sidecar
    ptx = json.loads(engine.sidecar_path(tmp_path / "a.plan").read_text())["ptx"]
    assert ptx == aot["ptx"] and jit["ptx"] is None
    assert ptx["ptx_isa"] == "8.7" and ptx["targets"] == ["sm_90a"]  # Triton 3.6, pinned
    assert (ptx["min_cuda"], ptx["min_driver"]) == PTX_ISA_DRIVER["8.7"] == ("12.8", "570.26")


@pytest.mark.parametrize("driver,capability,ok", [("12.8", "9.0", True), ("13.0", "9.0", True), ("12.10", "9.0", True),
                                                  ("12.4", "9.0", False),
                                                  ("12.8", "8.9", False)])
def test_a_plan_this_machine_cannot_load_is_one_line_before_tensorrt(driver, capability, ok):
    """`run_engine` checks the sidecar first: PTX ISA 8.7 needs a CUDA 12.8 driver (570.26); a plan for
    sm_90 does not run on an sm_89 GPU. Mutation: the comparison on strings ("12.10" < "12.8")."""
    from convattn.exporter.engine import check_driver

    meta = {"gpu": "NVIDIA H200", "compute_capability": "9.0",
            "ptx": {"ptx_isa": "8.7", "min_cuda": "12.8", "min_driver": "570.26"}}
    if ok:
        check_driver(meta, driver_cuda=driver, capability=capability)
        return
    with pytest.raises(DriverError) as e:
        check_driver(meta, driver_cuda=driver, capability=capability)
    assert e.value.exit_code == 4 and "\n" not in str(e.value)
    assert ("570.26" in str(e.value)) is (driver == "12.4") and ("8.9" in str(e.value)) is (capability == "8.9")


def test_onnxruntime_declares_the_outputs_tensorrt_declares(trt):
    """The node names two outputs, and the ONNX Runtime op returns both: the attention output and a
    scratch of the shape the TensorRT plugin's shape rule gives (evaluated through NVIDIA's code).
    Mutation: the ORT op with one output (ONNX Runtime refuses the node: 'output size 1 not in range')."""
    from onnx import TensorProto, helper

    from convattn.plugins.ort_op import session

    attrs = FlashAttentionAttrs(2, 64**-0.5)
    node = make_node("qkv", "o", attrs)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 128, 3, 5]) for n in "qkv"]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in zip(node.output,
                                                                                                  ([1, 128, 3, 5], [256]))]
    model = helper.make_model(helper.make_graph([node], "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("convattn", 1)])
    onnx.checker.check_model(model)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    feeds = {n: np.random.default_rng(0).standard_normal((1, 128, 3, 5)).astype(np.float32) for n in "qkv"}
    out, scratch = session(model).run(None, feeds)
    built = h.build_node(trt, h.parse_node(trt, node), [trt.float32] * 3, [(1, 128, 3, 5)] * 3, {}, tactics=[])
    assert out.shape == built.output_shapes[0] and scratch.shape == built.output_shapes[1]
    assert scratch.shape == scratch_shape((1, 128, 3, 5), (1, 128, 3, 5), attrs) == (512,)  # d=64, 2 heads, 15 pixels: one 64-row program a head, 256 elements each
