"""The TensorRT plugin, run through NVIDIA's own `tensorrt.plugin` (bindings 11.4 and 10.16) over a
stand-in of the compiled core, driven as onnx-tensorrt and the builder drive it (`trt_harness`).

Each defect TensorRT's own code found is a test here; the mutation each was checked against is in
its docstring. What only a machine with TensorRT can show is listed in the README."""

import re
import sys

import numpy as np
import onnx
import pytest
import torch

import trt_harness as h
from convattn.errors import EngineBuildError
from convattn.plugins import plan, trt_plugin
from convattn.plugins.op import LAYOUTS, OP_TYPE, FlashAttentionAttrs, make_node

VERSIONS = list(h.WHEELS)
# Symbolic input shapes per layout (strings: dynamic dims), the env they are evaluated at, and the
# concrete shapes. heads 2, head_dim 8 (D_v 8), S_q = 5*7 = 35 (or 35), S_kv = 4*6 = 24.
HEADS, D = 2, 8
SHAPES = {
    "NCHW": ([("B", 16, "H", "W"), ("B", 16, "H2", "W2")], {"B": 3, "H": 5, "W": 7, "H2": 4, "W2": 6}),
    "BHSD": ([("B", 2, "S", 8), ("B", 2, "S2", 8)], {"B": 3, "S": 35, "S2": 24}),
    "BHDS": ([("B", 2, 8, "S"), ("B", 2, 8, "S2")], {"B": 3, "S": 35, "S2": 24}),
    "BSC": ([("B", "S", 16), ("B", "S2", 16)], {"B": 3, "S": 35, "S2": 24}),
    "SBC": ([("S", "B", 16), ("S2", "B", 16)], {"B": 3, "S": 35, "S2": 24}),
}
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@pytest.fixture(params=VERSIONS)
def trt(request, monkeypatch):
    """(core, tensorrt.plugin, version) with our plugin registered; the GPU query is what cannot run here."""
    monkeypatch.setattr(trt_plugin, "_arch", lambda: "sm_90")
    with h.tensorrt(request.param) as (core, trtp):
        yield core, trtp, request.param


def node(layout="NCHW", out_layout=None, plugin_mode="aot", heads=HEADS, scale=D**-0.5, tf32=False):
    out_layout = out_layout or layout
    attrs = FlashAttentionAttrs(heads, scale, layout, layout, layout, out_layout, tf32)
    return make_node("qkv", "o", attrs, plugin_mode, name="n")


def concrete(shape, env):
    return tuple(d if isinstance(d, int) else env[d] for d in shape)


def test_plugin_registers_with_aot_and_jit(trt):
    """Mutations: `_autotune(...) -> list`, `_aot` without a return annotation: both refused by
    NVIDIA's decorators (ValueError) before any engine is built."""
    core, trtp, _ = trt
    assert trt_plugin.register_plugin() is True
    assert core.get_plugin_registry().get_creator(OP_TYPE, "1", "convattn") is not None
    # TensorRT 10's register decorator calls issubclass() on every annotation, which Python >= 3.12
    # refuses for generic aliases (NDArray[...]); this Python (3.11) allows it, so check it here.
    import inspect

    plugin_def = sys.modules["tensorrt.plugin._lib"].QDP_REGISTRY[trt_plugin.PLUGIN_ID]
    assert all(inspect.isclass(p.annotation) for p in inspect.signature(plugin_def.register_func).parameters.values())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shape_rule_on_tensorrt_expressions(trt, layout):
    """Output shapes: symbolic through NVIDIA's ShapeExpr (no reflected operators: `h * d_v` with an
    int on the left is a TypeError), evaluated, against the CPU reference's actual output shape.
    Mutations: `h * d_v` in op.output_shape fails NCHW and BSC; H and W swapped in it fails NCHW (the
    expected shapes are written out here: the reference allocates with the rule under test)."""
    core, _, _ = trt
    trt_plugin.register_plugin()
    (q_shape, kv_shape), env = SHAPES[layout]
    plugin = h.parse_node(core, node(layout))
    built = h.build_node(core, plugin, [core.float32] * 3, [q_shape, kv_shape, kv_shape], env, tactics=[])
    from convattn.plugins.reference import flash_attention_reference

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(concrete(s, env)).astype(np.float32) for s in (q_shape, kv_shape, kv_shape)]
    out = flash_attention_reference(*arrays, FlashAttentionAttrs(HEADS, 0.3, layout, layout, layout, layout))
    assert built.output_shape == out.shape
    # B=3, heads 2 x D 8 = 16 channels, H=5, W=7 (S = 35), written out independently of op.output_shape
    assert built.output_shape == {"NCHW": (3, 16, 5, 7), "BHSD": (3, 2, 35, 8), "BHDS": (3, 2, 8, 35),
                                  "BSC": (3, 35, 16), "SBC": (35, 3, 16)}[layout]
    assert built.output_dtypes == [core.float32] * 2  # the output and the scratch
    assert built.output_shapes[1] == (1,)  # head dim 8: no kernel of ours needs scratch


@pytest.mark.parametrize("layout", ["NCHW", "BHDS"])
def test_scratch_output_covers_every_program_of_the_hopper_kernel(trt, layout):
    """The second output, on TensorRT's expressions: 512 bytes (256 fp16 elements) per 64 query rows
    per batch x head, dynamic sizes included; the kernel's own need (its PTX: 384 B a program) fits.
    Mutation: cdiv(S, 64) as S // 64 fails (S = 35 x 3 = 105 rows: 2 blocks, not 1)."""
    core, _, _ = trt
    trt_plugin.register_plugin()
    shapes = {"NCHW": [("B", 128, "H", "W")] * 3, "BHDS": [("B", 2, 64, "S")] * 3}[layout]
    env = {"B": 3, "H": 15, "W": 7, "S": 105}
    built = h.build_node(core, h.parse_node(core, node(layout)), [core.float16] * 3, shapes, env, tactics=[])
    assert built.output_dtypes == [core.float16] * 2
    assert built.output_shapes[1] == (2 * 3 * HEADS * 256,)


def test_string_attributes_arrive_with_a_nul_and_work(trt):
    """onnx-tensorrt passes STRING attributes as chars counting the NUL; `tensorrt.plugin` keeps it.
    Mutation: drop the rstrip in FlashAttentionAttrs.from_attributes: 'NCHW\\x00' is refused."""
    core, _, _ = trt
    trt_plugin.register_plugin()
    fields = h.load_fields(core, core.get_plugin_registry().get_creator(OP_TYPE, "1", "convattn").field_names, node())
    layout_field = next(f for f in fields if f.name == "q_layout")
    assert layout_field.data.tobytes() == b"NCHW\0" and layout_field.type == core.PluginFieldType.CHAR
    assert {f.name for f in fields} == {"num_heads", "scale", "q_layout", "k_layout", "v_layout", "out_layout", "tf32",
                                        "softcap"}
    plugin = h.parse_node(core, node())
    assert plugin.attrs["q_layout"] == "NCHW\0"  # what NVIDIA's create_plugin hands us
    (q_shape, kv_shape), env = SHAPES["NCHW"]
    h.build_node(core, plugin, [core.float16] * 3, [q_shape, kv_shape, kv_shape], env, tactics=[1])


@pytest.mark.parametrize("plugin_mode", ["aot", "jit"])
@pytest.mark.parametrize("prefer", ["aot", "jit", None])
def test_the_nodes_aot_attribute_decides_the_implementation(trt, plugin_mode, prefer):
    """The node's `aot` wins over the network's PREFER_* flag. Mutation: a fixed `aot: 1` in
    onnx_attributes makes every --plugin-mode jit node STRICT_AOT."""
    core, _, _ = trt
    trt_plugin.register_plugin()
    plugin = h.parse_node(core, node(plugin_mode=plugin_mode), prefer=prefer)
    assert isinstance(plugin, core.IPluginV3QuickAOTBuild) is (plugin_mode == "aot")
    assert isinstance(plugin, core.IPluginV3QuickRuntime) is (plugin_mode == "jit")


def _expected_extras(layout, shapes, names):
    """The int32 extras, from torch's own strides of the views the JIT path takes (written out here,
    independently of the layout table)."""
    q_shape, kv_shape = shapes
    out_shape = {"NCHW": q_shape, "BSC": q_shape}.get(layout, q_shape)

    def view(shape):
        t = torch.empty(shape)
        if layout == "NCHW":
            b, c, y, x = shape
            return t.view(b, HEADS, c // HEADS, y * x).transpose(-1, -2)
        if layout == "BSC":
            b, s, c = shape
            return t.view(b, s, HEADS, c // HEADS).transpose(1, 2)
        if layout == "SBC":
            s, b, c = shape
            return t.view(s, b, HEADS, c // HEADS).permute(1, 2, 0, 3)
        return t.transpose(-1, -2) if layout == "BHDS" else t

    views = dict(zip("qkvo", (view(q_shape), view(kv_shape), view(kv_shape), view(out_shape))))
    values = {f"stride_{t}{a}": views[t].stride(i) for t in "qkvo" for i, a in enumerate("bhsd")}
    values.update(num_heads=HEADS, seq_q=views["q"].shape[2], seq_kv=views["k"].shape[2],
                  kv_group=views["q"].shape[1] // views["k"].shape[1])
    return [values[n] for n in names]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_aot_launch_for_every_layout_and_dtype(trt, layout, dtype):
    """get_launch_params + get_kernel through NVIDIA's AOT plugin class: the PTX entry takes exactly
    inputs, int32 extras, output; the extras equal torch's strides of the kernel's views.
    Mutation: BHDS's d-stride D instead of S (the bug of 5b1ec6e) fails BHDS."""
    core, _, version = trt
    trt_plugin.register_plugin()
    (q_shape, kv_shape), env = SHAPES[layout]
    trt_dtype = {"fp32": core.float32, "fp16": core.float16, "bf16": core.bfloat16}[dtype]
    plugin = h.parse_node(core, node(layout))
    built = h.build_node(core, plugin, [trt_dtype] * 3, [q_shape, kv_shape, kv_shape], env, tactics=[1])
    assert built.mode == "aot" and len(built.tactics) >= 2
    launch = built.launches[1]
    entry = re.search(rf"\.entry\s+{launch.kernel_name}\s*\((.*?)\)", launch.ptx, re.S).group(1)
    params = [p.strip() for p in entry.split(",") if p.strip()]
    assert [".u64" in p for p in params] == [True] * 3 + [False] * len(launch.extras) + [True]
    from convattn.plugins.aot import compile_artifact

    art = compile_artifact(head_dim=D, head_dim_v=D, num_heads=HEADS, dtype=dtype,
                           config=plan.tactic_config(D, dtype, "sm_90", 1), scale=float(plugin.attrs["scale"].rstrip("\0")),
                           arch=90, layouts=(layout,) * 4)
    shapes = (concrete(q_shape, env), concrete(kv_shape, env))
    assert launch.extras == _expected_extras(layout, shapes, art.scalar_arg_names)
    assert launch.grid == (-(-shapes_seq(layout, shapes[0]) // art.config.block_m), env["B"] * HEADS, 1)
    assert launch.block == (art.threads_per_block, 1, 1) and launch.shared_mem == art.shared_mem


def shapes_seq(layout, shape):
    return {"NCHW": lambda: shape[2] * shape[3], "BSC": lambda: shape[1], "SBC": lambda: shape[0], "BHSD": lambda: shape[2],
            "BHDS": lambda: shape[3]}[layout]()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_aot_argument_list_replayed_through_the_kernel(monkeypatch, layout):
    """What an engine would compute: the kernel run (Triton's interpreter) with exactly the grid and
    the int32 extras TensorRT received, the unit strides and constants compiled in, against float64.
    Mutation: BHDS's d-stride D instead of S: error 1.5 (5b1ec6e)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("replays in Triton's CPU interpreter (the GPU test launches the PTX instead)")
    monkeypatch.setattr(trt_plugin, "_arch", lambda: "sm_90")
    with h.tensorrt(VERSIONS[0]) as (core, _):
        trt_plugin.register_plugin()
        _replay(core, layout)


def _replay(core, layout):
    (q_shape, kv_shape), env = SHAPES[layout]
    plugin = h.parse_node(core, node(layout))
    launch = h.build_node(core, plugin, [core.float32] * 3, [q_shape, kv_shape, kv_shape], env, tactics=[1]).launches[1]
    from convattn.plugins.aot import compile_artifact
    from convattn.plugins.kernel import _attn_fwd

    art = compile_artifact(head_dim=D, head_dim_v=D, num_heads=HEADS, dtype="fp32",
                           config=plan.tactic_config(D, "fp32", "sm_90", 1), scale=float(plugin.attrs["scale"].rstrip("\0")),
                           arch=90, layouts=(layout,) * 4)
    torch.manual_seed(0)
    q, k, v = (torch.randn(concrete(s, env)) for s in (q_shape, kv_shape, kv_shape))
    out = torch.full(q.shape, float("nan"))
    kwargs = {**dict(zip(art.scalar_arg_names, launch.extras)), **art.constants}
    _attn_fwd[launch.grid](q, k, v, Out=out, num_warps=art.num_warps, **kwargs)
    ref = _reference(q.double(), k.double(), v.double(), layout, float(plugin.attrs["scale"].rstrip("\0")))
    assert (out.double() - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("version", VERSIONS)
def test_aot_bhsd_heads_are_the_tensors_axis_not_the_attribute(monkeypatch, version):
    """A windowed block reaches the node as (B, heads x windows, S, D) with the window count
    dynamic (the fuser merges the axes): the AOT grid and the kernel's num_heads must come from Q's
    axis 1, which the attribute (the probe's count, 3 here) does not know. Replayed through the
    kernel against float64. Mutation: grid and num_heads from the attribute fail (rows unwritten)."""
    import os

    monkeypatch.setattr(trt_plugin, "_arch", lambda: "sm_90")
    shape, env = ("B", "T", "S", 8), {"B": 2, "T": 5, "S": 9}
    with h.tensorrt(version) as (core, _):
        trt_plugin.register_plugin()
        plugin = h.parse_node(core, node("BHSD", heads=3))
        launch = h.build_node(core, plugin, [core.float32] * 3, [shape] * 3, env, tactics=[1]).launches[1]
        from convattn.plugins.aot import compile_artifact
        from convattn.plugins.kernel import _attn_fwd

        art = compile_artifact(head_dim=D, head_dim_v=D, num_heads=3, dtype="fp32", arch=90, layouts=("BHSD",) * 4,
                               config=plan.tactic_config(D, "fp32", "sm_90", 1), scale=D**-0.5)
    assert launch.grid[1] == 2 * 5 and dict(zip(art.scalar_arg_names, launch.extras))["num_heads"] == 5
    if os.environ.get("TRITON_INTERPRET") != "1":
        return  # the GPU run covers the launch itself
    torch.manual_seed(0)
    q, k, v = (torch.randn(concrete(shape, env)) for _ in range(3))
    out = torch.full(q.shape, float("nan"))
    _attn_fwd[launch.grid](q, k, v, Out=out, num_warps=art.num_warps,
                           **dict(zip(art.scalar_arg_names, launch.extras)), **art.constants)
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) * D**-0.5, -1) @ v.double()
    assert (out.double() - ref).abs().max() <= 1e-5


def _reference(q, k, v, layout, scale):
    """float64 attention in `layout`, written out independently of the layout table."""
    def to_bhsd(t):
        if layout == "NCHW":
            b, c, y, x = t.shape
            return t.reshape(b, HEADS, c // HEADS, y * x).transpose(-1, -2)
        if layout == "BSC":
            b, s, c = t.shape
            return t.reshape(b, s, HEADS, c // HEADS).transpose(1, 2)
        if layout == "SBC":
            s, b, c = t.shape
            return t.reshape(s, b, HEADS, c // HEADS).permute(1, 2, 0, 3)
        return t.transpose(-1, -2) if layout == "BHDS" else t

    o = torch.softmax(to_bhsd(q) @ to_bhsd(k).transpose(-1, -2) * scale, -1) @ to_bhsd(v)
    if layout == "NCHW":
        return o.transpose(-1, -2).reshape(q.shape)
    if layout == "BSC":
        return o.transpose(1, 2).reshape(q.shape)
    if layout == "SBC":
        return o.permute(2, 0, 1, 3).reshape(q.shape)
    return o.transpose(-1, -2) if layout == "BHDS" else o


def test_jit_tensors_of_every_dtype_become_torch_views(trt):
    """NVIDIA's Tensor refuses BF16 in __cuda_array_interface__; ours carries it as int16.
    Mutation: torch.as_tensor(t) on the trtp.Tensor raises ValueError for BF16."""
    core, trtp, _ = trt
    for dtype, typestr in ((core.float32, "<f4"), (core.float16, "<f2"), (core.bfloat16, "<i2")):
        t = trtp.Tensor()
        t.dtype, t.shape, t.strides, t.data_ptr = dtype, trtp.Shape((2, 3)), (3, 1), 4096
        face = trt_plugin._CudaArray(t).__cuda_array_interface__
        size = int(typestr[2:])
        assert face["typestr"] == typestr and face["strides"] == (3 * size, size) and face["data"] == (4096, False)
    with pytest.raises(ValueError, match="BF16"):
        bf = trtp.Tensor()
        bf.dtype, bf.shape, bf.strides = core.bfloat16, trtp.Shape((2,)), (1,)
        bf.__cuda_array_interface__


def test_tensorrt_without_aot_impl_gets_a_clear_error(monkeypatch, fused_demo):
    """A TensorRT whose plugin layer has no AOT (before 10.12): JIT registers; an AOT build says so."""
    monkeypatch.setattr(trt_plugin, "_arch", lambda: "sm_90")
    with h.tensorrt(VERSIONS[1], aot=False) as (core, trtp):
        assert trt_plugin.register_plugin() is False
        from convattn.exporter.engine import build_engine, parse_profiles

        with pytest.raises(EngineBuildError, match="--plugin-mode jit"):
            build_engine(_typed(fused_demo), "/nonexistent/x.plan", parse_profiles(["input"], [(1, 64, 8, 8)]))


@pytest.fixture(scope="session")
def fused_demo():
    """A fused ConvMHAttn(16, 16, 2) graph, exported before any harness replaces `tensorrt`."""
    from conftest import cached

    return cached(("einsum", "dynamo", 18))[3].model


@pytest.fixture(scope="session")
def fused_d64():
    """A fused ConvMHAttn(128, 128, 2) graph: head dim 64, one the Hopper kernel takes."""
    from conftest import cached

    return cached(("einsum_d64", "dynamo", 18))[3].model


@pytest.fixture(scope="session")
def windowed():
    """Fused windowed-attention graphs (timm's NesT pattern) from both exporters, made before any
    harness replaces `tensorrt`."""
    import user_models

    from convattn.exporter.export import export_onnx
    from convattn.exporter.fuse import fuse_attention

    graphs = {}
    for exporter in ("dynamo", "torchscript"):
        exported = export_onnx(user_models.WindowedAttention().eval(), [(1, 16, 64, 64)], exporter=exporter)
        graphs[exporter] = (exported.input_names, fuse_attention(exported.model, exported.input_shapes).model)
    return graphs


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_windowed_graph_builds_with_a_static_head_dim(windowed, trt, tmp_path, monkeypatch, exporter):
    """A windowed node's merged (B, heads x windows, S, D) inputs reach the plugin with D known at
    build (the kernel compiles it in) and the heads axis dynamic, from both exporters: TorchScript's
    graph computes D from shapes, so the fuser writes it as the constant it is. The stand-in parser
    infers shapes through Shape/Slice/Concat of constants, as TensorRT's shape tensors do.
    Mutation: D from Shape() in the merge: the TorchScript graph fails ("must be a static dimension")."""
    from convattn.exporter import engine

    names, fused = windowed[exporter]
    monkeypatch.setattr(engine, "gpu_identity", lambda: ("stand-in", "9.0"))
    profile = engine.parse_profiles(names, [(1, 16, 64, 64)], max_shape="2x16x128x128")
    engine.build_engine(_typed(fused, dtype="fp16"), tmp_path / "w.plan", profile)
    plan = __import__("json").loads((tmp_path / "w.plan").read_bytes())
    assert [layer["mode"] for layer in plan["Layers"]] == ["aot"]


def _typed(fused, plugin_mode="aot", dtype="fp32"):
    from convattn.exporter.fuse import set_plugin_mode
    from convattn.exporter.precision import cast_graph

    return cast_graph(set_plugin_mode(fused, plugin_mode), dtype)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("plugin_mode", ["aot", "jit"])
def test_build_engine_is_strongly_typed_and_says_its_mode(fused_demo, trt, tmp_path, monkeypatch, dtype, plugin_mode):
    """build_engine over the stand-in builder: no precision flags (TensorRT 11 has none), strong
    typing as 10.x's creation flag, the sidecar's mode is what every node asks for.
    Mutations: config.set_flag(BuilderFlag.FP16) (AttributeError -> exit 4 on 11.x); a fixed aot=1."""
    core, _, version = trt
    from convattn.exporter import engine

    monkeypatch.setattr(engine, "gpu_identity", lambda: ("stand-in", "9.0"))
    profile = engine.parse_profiles(["input"], [(1, 16, 7, 9)], max_shape="2x16x9x9")
    built = engine.build_engine(_typed(fused_demo, plugin_mode, dtype), tmp_path / "m.plan", profile, plugin_mode=plugin_mode)
    plan = __import__("json").loads((tmp_path / "m.plan").read_bytes())
    assert plan["builder_flags"] == []
    assert ("STRONGLY_TYPED" in plan["flags"]) is version.startswith("10.")
    assert [layer["mode"] for layer in plan["Layers"]] == [plugin_mode]
    assert built.sidecar["plugin_mode"] == plugin_mode and built.sidecar["precision"] == dtype
    assert built.sidecar["needs_python_plugin"] is (plugin_mode == "jit")


@pytest.mark.parametrize("tf32", [False, True])
def test_tf32_attribute_decides_the_fp32_products_and_the_engine_flag(fused_demo, trt, tmp_path, monkeypatch, tf32):
    """--tf32 reaches the AOT kernel through the node (fp32 products as wgmma on TF32 operands,
    instead of about 16k exact FMAs) and leaves TensorRT's TF32 on; without it the engine is exact
    fp32 end to end (TensorRT's default TF32 cleared: its convs too).
    Mutations: IEEE from the dtype alone (the attribute ignored); no clear_flag."""
    core, _, _ = trt
    trt_plugin.register_plugin()
    (q_shape, kv_shape), env = SHAPES["NCHW"]
    plugin = h.parse_node(core, node("NCHW", tf32=tf32))
    launch = h.build_node(core, plugin, [core.float32] * 3, [q_shape, kv_shape, kv_shape], env, tactics=[1]).launches[1]
    assert ("wgmma.mma_async" in launch.ptx and ".tf32" in launch.ptx) is tf32
    from convattn.exporter import engine

    from convattn.exporter.fuse import TF32_KEY

    graph = _typed(fused_demo)
    for n in graph.graph.node:
        for a in n.attribute:
            if a.name == "tf32":
                a.s = str(int(tf32)).encode()
    onnx.helper.set_model_props(graph, {**{p.key: p.value for p in graph.metadata_props}, TF32_KEY: str(int(tf32))})
    monkeypatch.setattr(engine, "gpu_identity", lambda: ("stand-in", "9.0"))
    built = engine.build_engine(graph, tmp_path / "m.plan", engine.parse_profiles(["input"], [(1, 16, 7, 9)]))
    plan = __import__("json").loads((tmp_path / "m.plan").read_bytes())
    assert ("TF32" in plan["builder_flags"]) is tf32 and built.sidecar["tf32"] is tf32


def test_errors_inside_tensorrt_are_one_line_exit_4(fused_demo, trt, tmp_path, monkeypatch):
    """A plugin error TensorRT reports (here: an unknown layout) is EngineBuildError, exit code 4."""
    core, _, _ = trt
    from convattn.exporter import engine

    monkeypatch.setattr(engine, "gpu_identity", lambda: ("stand-in", "9.0"))
    bad = _typed(fused_demo)
    for n in bad.graph.node:
        for a in n.attribute:
            if a.name == "q_layout":
                a.s = b"NHWC"
    profile = engine.parse_profiles(["input"], [(1, 16, 7, 9)])
    with pytest.raises(EngineBuildError) as e:
        engine.build_engine(bad, tmp_path / "m.plan", profile)
    assert e.value.exit_code == 4 and "\n" not in str(e.value) and "q_layout" in str(e.value)
    assert not (tmp_path / "m.plan").exists()


# ------------------------------------------------------------------- on the GPU: what TensorRT would run


def _gpu_tensors(layout, env, dtype, seed):
    (q_shape, kv_shape), _ = SHAPES[layout]
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(concrete(s, env), generator=gen).to(getattr(torch, DTYPES[dtype])).cuda()
               for s in (q_shape, kv_shape, kv_shape))
    return q, k, v, torch.full_like(q, float("nan"))


TOL = {"fp32": 1e-5, "fp16": 4e-3, "bf16": 3e-2}


def _enqueue_as_tensorrt(core, plugin, trt_dtype, inputs, outputs):
    """NVIDIA's JIT `enqueue` with real CUDA pointers, LINEAR descriptors and strides, on a stream of its own."""
    def desc(t):
        d = core.PluginTensorDesc()
        d.dims, d.type, d.format = core.Dims(t.shape), trt_dtype, core.TensorFormat.LINEAR
        return d

    stream = torch.cuda.Stream()
    plugin.enqueue([desc(t) for t in inputs], [desc(t) for t in outputs], [t.data_ptr() for t in inputs],
                   [t.data_ptr() for t in outputs], [t.stride() for t in inputs], [t.stride() for t in outputs],
                   stream.cuda_stream)
    stream.synchronize()


def _launch_as_tensorrt(launch, inputs, outputs):
    """The PTX from get_kernel with get_launch_params' grid, block, shared memory and extras."""
    from convattn.plugins.aot import launch_ptx

    launch_ptx(launch.ptx, launch.kernel_name, launch.grid, launch.block, launch.shared_mem, inputs, launch.extras, outputs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_aot_launch_as_tensorrt_passes_it(trt, layout, dtype):
    """The PTX TensorRT got from get_kernel, launched through the CUDA driver with exactly the grid,
    block, shared memory and int32 extras it got from get_launch_params, against float64."""
    core, _, _ = trt
    trt_plugin.register_plugin()
    (q_shape, kv_shape), env = SHAPES[layout]
    trt_dtype = {"fp32": core.float32, "fp16": core.float16, "bf16": core.bfloat16}[dtype]
    plugin = h.parse_node(core, node(layout))
    launch = h.build_node(core, plugin, [trt_dtype] * 3, [q_shape, kv_shape, kv_shape], env, tactics=[1]).launches[1]
    q, k, v, out = _gpu_tensors(layout, env, dtype, seed=len(layout))
    _launch_as_tensorrt(launch, (q, k, v), (out,))
    torch.cuda.synchronize()
    ref = _reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), layout, float(plugin.attrs["scale"].rstrip("\0")))
    assert (out.double().cpu() - ref).abs().max() <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_jit_enqueue_as_tensorrt_calls_it(trt, layout, dtype, monkeypatch):
    """NVIDIA's JIT plugin `enqueue` with real CUDA pointers: our `impl` turns TensorRT's tensors
    (bf16 included) into views and runs the kernel on TensorRT's stream, against float64."""
    core, _, _ = trt
    monkeypatch.setattr(trt_plugin, "_arch", lambda: "sm_90")
    trt_plugin.register_plugin()
    (q_shape, kv_shape), env = SHAPES[layout]
    trt_dtype = {"fp32": core.float32, "fp16": core.float16, "bf16": core.bfloat16}[dtype]
    plugin = h.parse_node(core, node(layout, plugin_mode="jit"))
    built = h.build_node(core, plugin, [trt_dtype] * 3, [q_shape, kv_shape, kv_shape], env)
    plugin.set_tactic(built.tactics[0])
    tensors = _gpu_tensors(layout, env, dtype, seed=7)
    scratch = torch.empty(built.output_shapes[1], dtype=tensors[0].dtype, device="cuda")  # TensorRT allocates both
    _enqueue_as_tensorrt(core, plugin, trt_dtype, tensors[:3], (tensors[3], scratch))
    q, k, v, out = tensors
    ref = _reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), layout, float(plugin.attrs["scale"].rstrip("\0")))
    assert (out.double().cpu() - ref).abs().max() <= TOL[dtype]


def test_python_errors_of_the_tensorrt_path_are_exit_4(fused_demo, trt, tmp_path, monkeypatch):
    """What the bindings raise themselves (here AttributeError, as a flag TensorRT 11 removed would)
    reaches the user as EngineBuildError, one line. Mutation: no `tensorrt_errors` around the build."""
    from convattn.exporter import engine

    def removed_flag(trt_module, mode):
        return trt_module.BuilderFlag.FP16 if not hasattr(trt_module.BuilderFlag, "FP16") else 1 / 0

    monkeypatch.setattr(engine, "network_flags", removed_flag)
    with pytest.raises(EngineBuildError, match=r"(AttributeError|ZeroDivisionError)") as e:
        engine.build_engine(_typed(fused_demo), tmp_path / "m.plan", engine.parse_profiles(["input"], [(1, 16, 7, 9)]))
    assert e.value.exit_code == 4 and "\n" not in str(e.value)


# The Hopper kernel's tactic: (layout, q shape, k/v shape) with fixed sizes, head dim 64 (2 heads of 128
# channels, NCHW) and the sequence lengths TMA accepts: S_q = 8 x 12 = 96 (a masked tail block), S_kv 56.
HOPPER_SHAPES = {"NCHW": [(2, 128, 8, 12), (2, 128, 7, 8), (2, 128, 7, 8)],
                 "BHDS": [(2, 2, 64, 96), (2, 2, 64, 56), (2, 2, 64, 56)]}


@pytest.mark.parametrize("case,offered", [
    ("fixed", True), ("dynamic", False), ("unaligned", False), ("fp32", False), ("sm_80", False), ("head_dim_8", False),
])
def test_hopper_tactic_only_where_its_kernel_can_run(trt, monkeypatch, case, offered):
    """The Hopper tactic is offered for fp16/bf16 on sm_90 with S fixed at build and 16-byte rows;
    otherwise only the Triton configs. Mutation: dropping the fixed-S check offers it for "dynamic"."""
    core, _, _ = trt
    trt_plugin.register_plugin()
    shapes = [list(s) for s in HOPPER_SHAPES["NCHW"]]
    dtype = core.float32 if case == "fp32" else core.float16
    if case == "dynamic":
        shapes = [["B", 128, "H", "W"]] * 3
    if case == "unaligned":
        shapes = [[2, 128, 7, 9]] * 3  # 63 pixels: rows of 126 bytes
    if case == "sm_80":
        monkeypatch.setattr(trt_plugin, "_arch", lambda: "sm_80")
    if case == "head_dim_8":
        shapes = [[2, 16, 8, 12]] * 3
    env = {"B": 2, "H": 8, "W": 12}
    built = h.build_node(core, h.parse_node(core, node("NCHW")), [dtype] * 3, shapes, env, tactics=[])
    assert (plan.HOPPER_TACTIC in built.tactics) is offered
    assert 1 in built.tactics  # the Triton kernel is always a tactic


def _hopper_launch(core, layout, dtype, out_layout=None):
    shapes = HOPPER_SHAPES[layout]
    trt_dtype = {"fp16": core.float16, "bf16": core.bfloat16}[dtype]
    plugin = h.parse_node(core, node(layout, out_layout, heads=HEADS, scale=64**-0.5))
    built = h.build_node(core, plugin, [trt_dtype] * 3, shapes, {}, tactics=[plan.HOPPER_TACTIC])
    return built, built.launches[plan.HOPPER_TACTIC]


@pytest.mark.parametrize("layout,out_layout", [("NCHW", "NCHW"), ("BHDS", "BSC")])
def test_hopper_tactic_launch_is_tensorrts_argument_list_plus_scratch(trt, layout, out_layout):
    """The Hopper tactic's PTX entry takes inputs, int32 extras, output, then the scratch output (Triton's
    global scratch, read by the body); profile scratch is gone. Extras, grid and the scratch size are
    checked against values written out here from torch's strides. Mutation: keeping profile_scratch
    (strip n_user + 2) fails the parameter list."""
    core, _, _ = trt
    trt_plugin.register_plugin()
    built, launch = _hopper_launch(core, layout, "fp16", out_layout)
    entry = re.search(rf"\.entry\s+{launch.kernel_name}\s*\((.*?)\)", launch.ptx, re.S).group(1)
    params = [p.strip().split()[-1] for p in entry.split(",") if p.strip()]
    assert len(params) == 3 + len(launch.extras) + 2
    assert re.search(rf"\[{params[-1]}\]", launch.ptx), "the body must read the scratch pointer"
    b, heads, s_q, d = 2, HEADS, 96, 64
    out = torch.empty(b, heads, s_q, d)
    out = {"NCHW": out.transpose(-1, -2), "BSC": out.transpose(1, 2)}[out_layout]  # contiguous in its layout
    view = out.contiguous().transpose(-1, -2) if out_layout == "NCHW" else out.contiguous().transpose(1, 2)
    assert launch.extras == [*view.stride(), b, heads, s_q, 56]
    from convattn.plugins.aot import compile_hopper_artifact

    art = compile_hopper_artifact(head_dim=d, num_heads=heads, dtype="fp16", scale=64**-0.5, layouts=(layout,) * 3 + (out_layout,),
                                  seq_kv=56)
    rows = art.config.block_m  # query rows per CTA: 128 (two consumer warpgroups of the warp-specialized kernel)
    assert launch.grid == (-(-s_q // rows), b * heads, 1) and launch.block == (art.threads_per_block, 1, 1)
    assert built.output_shapes[1][0] * 2 >= art.scratch_bytes * launch.grid[0] * launch.grid[1]  # bytes it addresses


@pytest.mark.parametrize("max_shape,offered", [(None, True), ("1x128x8x16", False)])
def test_a_profile_that_fixes_the_sequence_lets_the_hopper_kernel_compete(fused_d64, trt, tmp_path, monkeypatch,
                                                                         max_shape, offered):
    """The exported graph's H and W are dynamic; a profile with min == max (the default: the export
    shape) fixes them, and `build_engine` writes them as constants, so the plugin sees a fixed S and
    offers the Hopper tactic beside the Triton ones; a profile that lets W vary does not.
    Mutation: no `fixed_dims` -> not offered for the fixed profile."""
    from convattn.exporter import engine

    monkeypatch.setattr(engine, "gpu_identity", lambda: ("stand-in", "9.0"))
    profile = engine.parse_profiles(["input"], [(1, 128, 8, 8)], max_shape=max_shape)
    engine.build_engine(_typed(fused_d64, "aot", "fp16"), tmp_path / "m.plan", profile)
    (layer,) = __import__("json").loads((tmp_path / "m.plan").read_bytes())["Layers"]
    assert (plan.HOPPER_TACTIC in layer["tactics"]) is offered and 1 in layer["tactics"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("layout,out_layout", [("NCHW", "NCHW"), ("BHDS", "BSC")])
def test_gpu_hopper_tactic_as_tensorrt_passes_it(trt, layout, out_layout, dtype):
    """The Hopper tactic's PTX from get_kernel, launched through the CUDA driver with get_launch_params'
    grid, block, shared memory and extras, then the output and the scratch output (sized by the
    plugin's shape rule), against float64; and the JIT `impl` of the same tactic, bit for bit."""
    core, _, _ = trt
    trt_plugin.register_plugin()
    built, launch = _hopper_launch(core, layout, dtype, out_layout)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(s, generator=gen).to(getattr(torch, DTYPES[dtype])).cuda() for s in HOPPER_SHAPES[layout])
    out = torch.full(built.output_shape, float("nan"), dtype=q.dtype, device="cuda")
    scratch = torch.full(built.output_shapes[1], float("nan"), dtype=q.dtype, device="cuda")
    _launch_as_tensorrt(launch, (q, k, v), (out, scratch))
    torch.cuda.synchronize()
    from convattn.plugins.op import bhsd_view

    views = [bhsd_view(t, layout, HEADS) for t in (q, k, v)]
    ref = torch.softmax(views[0].double() @ views[1].double().transpose(-1, -2) * 64**-0.5, -1) @ views[2].double()
    assert (bhsd_view(out, out_layout, HEADS).double() - ref).abs().max() <= TOL[dtype]
    # The JIT plugin at the same tactic: NVIDIA's enqueue, our impl, the same kernel with host descriptors.
    jit = h.parse_node(core, node(layout, out_layout, plugin_mode="jit", scale=64**-0.5))
    trt_dtype = {"fp16": core.float16, "bf16": core.bfloat16}[dtype]
    assert plan.HOPPER_TACTIC in h.build_node(core, jit, [trt_dtype] * 3, HOPPER_SHAPES[layout], {}).tactics
    jit.set_tactic(plan.HOPPER_TACTIC)
    out_jit = torch.full_like(out, float("nan"))
    _enqueue_as_tensorrt(core, jit, trt_dtype, (q, k, v), (out_jit, scratch))
    assert torch.equal(out_jit, out)


@pytest.mark.parametrize("tf32", [False, True])
def test_the_jit_impl_passes_the_nodes_tf32_to_the_kernel(trt, monkeypatch, tf32):
    """NVIDIA's JIT `enqueue` into our `impl` with the node's tf32 attribute: the kernel call gets it.
    On the CPU: TensorRT's tensors are stood in by CPU tensors of their shapes, the stream by nothing,
    the kernel by a recorder. Mutation: the impl's `tf32=attrs.tf32` dropped (the JIT plugin ignores it)."""
    import contextlib

    from convattn.plugins import flash

    core, _, _ = trt
    trt_plugin.register_plugin()
    seen = []
    monkeypatch.setattr(trt_plugin, "torch_tensor", lambda t: torch.zeros(tuple(t.shape)))
    monkeypatch.setattr(torch.cuda, "ExternalStream", lambda stream: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(flash, "jit_attention", lambda *a, **kw: seen.append(kw.get("tf32")))
    (q_shape, kv_shape), env = SHAPES["NCHW"]
    shapes = [concrete(s, env) for s in (q_shape, kv_shape, kv_shape)]
    plugin = h.parse_node(core, node("NCHW", plugin_mode="jit", tf32=tf32))
    built = h.build_node(core, plugin, [core.float32] * 3, shapes, {})
    plugin.set_tactic(built.tactics[0])

    def desc(shape):
        d = core.PluginTensorDesc()
        d.dims, d.type, d.format = core.Dims(shape), core.float32, core.TensorFormat.LINEAR
        return d

    outs = [built.output_shapes[0], built.output_shapes[1]]
    strides = lambda s: torch.empty(s).stride()  # noqa: E731
    plugin.enqueue([desc(s) for s in shapes], [desc(s) for s in outs], [4096] * 3, [8192, 16384],
                   [strides(s) for s in shapes], [strides(s) for s in outs], 0)
    assert seen == [tf32]


def test_aot_v_strides_come_from_v_when_its_head_dim_differs(monkeypatch):
    """D_v != D (V's channels 2 x 16, Q's and K's 2 x 8) and S_kv != S_q: the extras TensorRT receives,
    replayed through the kernel (Triton's interpreter) against float64. Mutation: V's strides computed
    from K's shape in `AotArtifact.scalar_args` (no test had D_v != D)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("replays in Triton's CPU interpreter (the GPU tests launch the PTX)")
    monkeypatch.setattr(trt_plugin, "_arch", lambda: "sm_90")
    env = {"B": 2, "H": 3, "W": 5, "H2": 4, "W2": 3}
    shapes = [("B", 16, "H", "W"), ("B", 16, "H2", "W2"), ("B", 32, "H2", "W2")]
    with h.tensorrt(VERSIONS[0]) as (core, _):
        trt_plugin.register_plugin()
        plugin = h.parse_node(core, node("NCHW"))
        built = h.build_node(core, plugin, [core.float32] * 3, shapes, env, tactics=[1])
    launch = built.launches[1]
    from convattn.plugins.aot import compile_artifact
    from convattn.plugins.kernel import _attn_fwd

    art = compile_artifact(head_dim=8, head_dim_v=16, num_heads=HEADS, dtype="fp32", arch=90, layouts=("NCHW",) * 4,
                           config=plan.tactic_config(8, "fp32", "sm_90", 1), scale=D**-0.5)
    torch.manual_seed(0)
    q, k, v = (torch.randn(concrete(s, env)) for s in shapes)
    out = torch.full(built.output_shape, float("nan"))
    _attn_fwd[launch.grid](q, k, v, Out=out, num_warps=art.num_warps,
                           **dict(zip(art.scalar_arg_names, launch.extras)), **art.constants)

    def heads(t, d):  # (B, heads*d, H, W) -> (B, heads, H*W, d), written out here
        return t.double().reshape(t.shape[0], HEADS, d, -1).transpose(-1, -2)

    ref = torch.softmax(heads(q, 8) @ heads(k, 8).transpose(-1, -2) * D**-0.5, -1) @ heads(v, 16)
    assert built.output_shape == (2, 32, 3, 5)
    assert (heads(out, 16) - ref).abs().max() <= 1e-5
