"""Plugins of the forms NVIDIA's Quickly Deployable Plugin samples use, through the harness on both wheels.

NVIDIA/TensorRT `samples/python/quickly_deployable_plugins/qdp_defs.py` (and its README, qdp_runner.py)
shows the forms a user writes with `tensorrt.plugin`: register + autotune + impl with an int attribute
(elemwise_add_plugin), the same without autotune (qdp_runner.py's `add` without --autotune), an
in-place plugin with an aliased output (elemwise_add_plugin_), a list attribute `npt.NDArray[np.int32]`
that the shape rule reads, with several JIT tactics (circ_pad_plugin, enable_multi_tactic_circ_pad),
the same as an AOT plugin with several tactics (enable_multi_tactic_aot_circ_pad) and with both impl and
aot_impl, the node's `aot` attribute choosing (enable_single_tactic_circ_pad), and two outputs, one a
size tensor (non_zero_plugin).

The plugins below are this project's own (names, bodies, kernels), of the same forms: the same
decorators, signatures, attribute kinds, outputs and tactics. Each one's comment says which sample it
mirrors. Each is reached as a user reaches it: an ONNX node (op_type = plugin name, `plugin_namespace`
and `plugin_version` STRING attributes, the attributes as ONNX INT/INTS/STRING), `parse_node` (what
onnx-tensorrt creates), `build_node` (the builder's calls), on every wheel in `trt_harness.WHEELS`.

Expected failures (xfail, strict: each fails exactly as stated, or the suite fails):
- INT attributes on TensorRT 10: its create_plugin calls int() on the 1-element INT32 field array,
  which NumPy >= 2.4 refuses (< 2.4: a DeprecationWarning); the harness raises that warning.
- size tensors (non_zero's DDS output): `IExprBuilder.declare_size_tensor` is not part of the stand-in.

Written as TensorRT behaves, failing while `trt_harness.build_node` differs (no xfail: a harness gap):
- bytes kernel names (enable_multi_tactic_aot_circ_pad returns `name.encode()`): pybind11 casts a bytes
  object to the std::string of get_kernel's `std::tuple<std::string, py::bytes>` as it does a str;
  build_node raises TypeError for anything but str.
- an AOT plugin with no custom tactics (enable_single_tactic_circ_pad with --aot): TensorRT compiles the
  default tactic 0; build_node launches only the tactics get_valid_tactics lists, so none.
"""

# No `from __future__ import annotations`: tensorrt.plugin reads the annotations as objects.
import enum
import re
from typing import List, Tuple, Union

import numpy as np
import numpy.typing as npt
import onnx
import pytest

import trt_harness as h

VERSIONS = list(h.WHEELS)
NS = "qdp_demo"

# TensorRT 10's _TemplatePluginCreator.create_plugin: `attr_type_annot(f.data)` (int(array([v], int32)));
# TensorRT 11's takes f.data[0]. The parser passes every INT attribute as such a 1-element array.
INT_ATTR_ON_TRT10 = pytest.mark.xfail(
    strict=True, raises=DeprecationWarning,
    reason="TensorRT 10's create_plugin converts the 1-element INT32 field with int(ndarray), refused by NumPy >= 2.4")


def _params(xfail_trt10=None):
    return [pytest.param(v, marks=xfail_trt10 if (xfail_trt10 and v.startswith("10.")) else ()) for v in VERSIONS]


@pytest.fixture(params=_params())
def trt(request):
    """(core, tensorrt.plugin, version): a fresh registry; the plugins are defined inside each test."""
    with h.tensorrt(request.param) as (core, trtp):
        yield core, trtp, request.param


@pytest.fixture(params=_params(INT_ATTR_ON_TRT10))
def trt_int(request):
    """As `trt`, for plugins with an INT attribute (TensorRT 10: an expected failure, see module docstring)."""
    with h.tensorrt(request.param) as (core, trtp):
        yield core, trtp, request.param


def node(op, inputs, outputs, **attrs):
    """The node a user writes (onnx.helper / graphsurgeon): op_type = plugin name, namespace and version as STRINGs."""
    return onnx.helper.make_node(op, inputs, outputs, name=f"{op}_0", plugin_namespace=NS, plugin_version="1", **attrs)


def enqueue(core, plugin, inputs, outputs, stream=0x5EED):
    """NVIDIA's JIT `enqueue` as TensorRT calls it, with made-up device pointers (the impl bodies below only
    record what they are handed; nothing is dereferenced)."""

    def desc(shape, dtype):
        d = core.PluginTensorDesc()
        d.dims, d.type, d.format = core.Dims(shape), dtype, core.TensorFormat.LINEAR
        return d

    def strides(shape):
        return tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))

    ptrs = [0x10000 * (i + 1) for i in range(len(inputs) + len(outputs))]
    plugin.enqueue([desc(*t) for t in inputs], [desc(*t) for t in outputs], ptrs[:len(inputs)], ptrs[len(inputs):],
                   [strides(s) for s, _ in inputs], [strides(s) for s, _ in outputs], stream)
    return ptrs


def format_rows(core, plugin, dtypes, shapes):
    """The (types, formats) rows `get_supported_format_combinations` offers the builder (after build_node)."""
    in_out = []
    for shape, dtype in zip(shapes, dtypes):
        d = core.DynamicPluginTensorDesc()
        d.desc.dims = core.Dims([s if isinstance(s, int) else -1 for s in shape])
        d.desc.type, d.desc.format = dtype, core.TensorFormat.LINEAR
        in_out.append(d)
    n_in = len(plugin.input_types)
    flat = plugin.get_supported_format_combinations(in_out, n_in)
    n = len(in_out)
    return [([c.type for c in flat[i:i + n]], [c.format for c in flat[i:i + n]]) for i in range(0, len(flat), n)]


def cdiv(a, b):
    return -(-a // b)


# ------------------------------------------------------------------- (1), (2): elementwise, an INT attribute


def define_shift_copy(trtp, autotune=True):
    """Mirrors qdp_defs.py's elemwise_add_plugin: register (one TensorDesc in, an int attribute, `like()`
    out), autotune "FP32|FP16, FP32|FP16" (the sample's register_autotune(); left out with
    autotune=False, as qdp_runner.py's `add` without --autotune), impl (Tensors, the attribute, outputs,
    stream). Returns the list the impl appends its calls to."""
    calls = []

    @trtp.register(f"{NS}::shift_copy")
    def shift_copy_desc(src: trtp.TensorDesc, tile: int) -> trtp.TensorDesc:
        return src.like()

    if autotune:
        @trtp.autotune(f"{NS}::shift_copy")
        def shift_copy_tune(src: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
            return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16")]

    @trtp.impl(f"{NS}::shift_copy")
    def shift_copy_run(src: trtp.Tensor, tile: int, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        programs = cdiv(src.numel(), tile)
        calls.append(dict(tile=tile, programs=programs, src=(tuple(src.shape), src.dtype, src.data_ptr),
                          dst=(tuple(outputs[0].shape), outputs[0].dtype, outputs[0].data_ptr), stream=stream))

    return calls


SHIFT_SHAPE, SHIFT_ENV = ("B", 3, "H", "W"), {"B": 2, "H": 5, "W": 7}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_elementwise_with_int_attribute_and_autotune(trt_int, dtype):
    """elemwise_add_plugin's form: an INT attribute arrives as the declared int; JIT (impl only); the
    output is the input's shape and dtype; autotune offers both dtypes, no custom tactics; enqueue hands
    the impl the attribute, TensorRT's tensors and stream."""
    core, trtp, _ = trt_int
    calls = define_shift_copy(trtp)
    n = node("shift_copy", ["x"], ["y"], tile=128)
    assert [a.type for a in n.attribute if a.name == "tile"] == [onnx.AttributeProto.INT]
    plugin = h.parse_node(core, n)
    assert plugin.attrs == {"tile": 128} and type(plugin.attrs["tile"]) is int
    assert isinstance(plugin, core.IPluginV3QuickRuntime) and not isinstance(plugin, core.IPluginV3QuickAOTBuild)
    t = getattr(core, dtype)
    built = h.build_node(core, plugin, [t], [SHIFT_SHAPE], SHIFT_ENV)
    assert built.mode == "jit" and built.output_dtypes == [t]
    assert built.output_shapes == [(2, 3, 5, 7)] and built.tactics == []
    assert format_rows(core, plugin, [t, t], [SHIFT_SHAPE] * 2) == [
        ([core.float32] * 2, [core.TensorFormat.LINEAR] * 2), ([core.float16] * 2, [core.TensorFormat.LINEAR] * 2)]
    plugin.set_tactic(0)  # no custom tactics: the default one
    ptrs = enqueue(core, plugin, [((2, 3, 5, 7), t)], [((2, 3, 5, 7), t)])
    assert calls == [dict(tile=128, programs=cdiv(210, 128), src=((2, 3, 5, 7), t, ptrs[0]),
                          dst=((2, 3, 5, 7), t, ptrs[1]), stream=0x5EED)]


def test_elementwise_without_autotune(trt_int):
    """qdp_runner.py's `add` without --autotune: with no autotune function the only combination offered is
    the network's input type and the registered output type, LINEAR, with no custom tactics."""
    core, trtp, _ = trt_int
    calls = define_shift_copy(trtp, autotune=False)
    plugin = h.parse_node(core, node("shift_copy", ["x"], ["y"], tile=64))
    built = h.build_node(core, plugin, [core.float16], [SHIFT_SHAPE], SHIFT_ENV)
    assert built.mode == "jit" and built.output_dtypes == [core.float16] and built.output_shapes == [(2, 3, 5, 7)]
    assert built.tactics == []
    assert format_rows(core, plugin, [core.float16] * 2, [SHIFT_SHAPE] * 2) == [
        ([core.float16] * 2, [core.TensorFormat.LINEAR] * 2)]
    plugin.set_tactic(0)
    enqueue(core, plugin, [((2, 3, 5, 7), core.float16)], [((2, 3, 5, 7), core.float16)])
    assert [c["tile"] for c in calls] == [64] and calls[0]["programs"] == cdiv(210, 64)


@pytest.mark.parametrize("version", [v for v in VERSIONS if v.startswith("10.")])
def test_int_attribute_on_tensorrt_10_is_the_numpy_conversion(version):
    """Why the INT-attribute cases are expected failures on TensorRT 10: its create_plugin's
    int(<1-element int32 array>), which the harness turns from NumPy < 2.4's DeprecationWarning into the
    error NumPy >= 2.4 raises. TensorRT 11 reads f.data[0] (the 11.4 cases pass)."""
    with h.tensorrt(version) as (core, trtp):
        define_shift_copy(trtp)
        with pytest.raises(DeprecationWarning, match=r"Conversion of an array with ndim > 0 to a scalar"):
            h.parse_node(core, node("shift_copy", ["x"], ["y"], tile=128))


def define_bump_in_place(trtp):
    """Mirrors qdp_defs.py's elemwise_add_plugin_ (in place): register returns `aliased()` (the output shares
    the input's buffer), an int attribute, autotune with two combinations (FP32 in LINEAR or HWC, either
    independently: "LINEAR*HWC"; FP32|FP16 in LINEAR), impl without annotations."""
    calls = []

    @trtp.register(f"{NS}::bump_in_place")
    def bump_desc(buf: trtp.TensorDesc, step: int) -> trtp.TensorDesc:
        return buf.aliased()

    @trtp.autotune(f"{NS}::bump_in_place")
    def bump_tune(buf, outputs) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32, FP32", "LINEAR*HWC"),
                trtp.AutoTuneCombination("FP32|FP16, FP32|FP16", "LINEAR")]

    @trtp.impl(f"{NS}::bump_in_place")
    def bump_run(buf, step: int, outputs, stream) -> None:
        calls.append((step, buf.data_ptr, outputs[0].get_aliased() is buf, buf.get_aliased() is outputs[0]))

    return calls


def test_in_place_plugin_with_an_aliased_output(trt_int):
    """elemwise_add_plugin_'s form: output 0 is aliased to input 0 (get_aliased_input), the combinations
    offered are both of the sample's, duplicates (FP32 LINEAR twice) offered once; at enqueue the output
    Tensor and the input Tensor point at each other."""
    core, trtp, _ = trt_int
    calls = define_bump_in_place(trtp)
    plugin = h.parse_node(core, node("bump_in_place", ["x"], ["x_bumped"], step=3))
    built = h.build_node(core, plugin, [core.float32], [("N", 16)], {"N": 4})
    assert built.output_dtypes == [core.float32] and built.output_shapes == [(4, 16)] and built.tactics == []
    assert plugin.get_aliased_input(0) == 0
    lin, hwc = core.TensorFormat.LINEAR, core.TensorFormat.HWC
    rows = format_rows(core, plugin, [core.float32] * 2, [("N", 16)] * 2)
    assert rows == [([core.float32] * 2, [lin, lin]), ([core.float32] * 2, [hwc, lin]),
                    ([core.float32] * 2, [lin, hwc]), ([core.float32] * 2, [hwc, hwc]),
                    ([core.float16] * 2, [lin, lin])]
    plugin.set_tactic(0)
    ptrs = enqueue(core, plugin, [((4, 16), core.float32)], [((4, 16), core.float32)])
    assert calls == [(3, ptrs[0], True, True)]


# ------------------------------------------------------------------- (3), (4): a list attribute, tactics, AOT


def _wrap_pad_rule(trtp, name):
    """Register `name` with the shape rule of qdp_defs.py's circ_pad_plugin: one TensorDesc in, an
    `npt.NDArray[np.int32]` attribute of (before, after) pairs from the last axis backwards (as
    torch.nn.functional.pad), the output `like()` the input with each padded axis grown by its pair."""

    @trtp.register(f"{NS}::{name}")
    def wrap_pad_desc(src: trtp.TensorDesc, pads: npt.NDArray[np.int32]) -> trtp.TensorDesc:
        out = src.like()
        pairs = np.asarray(pads).reshape(-1, 2)
        for back, (before, after) in enumerate(pairs):
            axis = src.ndim - 1 - back
            out.shape_expr[axis] = src.shape_expr[axis] + int(before + after)
        return out


class PadTactic(enum.IntEnum):
    """Two ways of computing the same wrap padding (as the sample's Tactic.TORCH / Tactic.TRITON)."""

    GATHER = 1
    ROW_COPY = 2


def define_wrap_pad_jit(trtp):
    """Mirrors qdp_defs.py's circ_pad_plugin with enable_multi_tactic_circ_pad(): the list attribute and
    its shape rule, autotune built with `pos([0, 1], "FP32|FP16")` and `tactics([...])`, impl taking
    `tactic`."""
    calls = []
    _wrap_pad_rule(trtp, "wrap_pad")

    @trtp.autotune(f"{NS}::wrap_pad")
    def wrap_pad_tune(src: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        combo = trtp.AutoTuneCombination()
        combo.pos([0, 1], "FP32|FP16")
        combo.tactics([int(PadTactic.GATHER), int(PadTactic.ROW_COPY)])
        return [combo]

    @trtp.impl(f"{NS}::wrap_pad")
    def wrap_pad_run(src: trtp.Tensor, pads: npt.NDArray[np.int32], outputs: Tuple[trtp.Tensor], stream: int,
                     tactic: int) -> None:
        calls.append((PadTactic(tactic), pads.dtype, pads.tolist(), tuple(src.shape), tuple(outputs[0].shape)))

    return calls


@pytest.mark.parametrize("pads,grown", [([1, 2, 3, 0], (3, 3)), ([2, 2], (0, 4))])
def test_list_attribute_shape_rule_and_jit_tactics(trt, pads, grown):
    """circ_pad_plugin's form: an ONNX INTS attribute reaches the shape rule as an int32 array; the output
    shape is symbolic where the input is (H + 3 evaluated), constant where it is; both tactics are
    offered for each dtype; the impl gets the tactic TensorRT set and the array."""
    core, trtp, _ = trt
    calls = define_wrap_pad_jit(trtp)
    n = node("wrap_pad", ["x"], ["y"], pads=pads)
    assert [a.type for a in n.attribute if a.name == "pads"] == [onnx.AttributeProto.INTS]
    creator = core.get_plugin_registry().get_creator("wrap_pad", "1", NS)
    (field,) = h.load_fields(core, creator.field_names, n)
    assert field.type == core.PluginFieldType.INT32 and field.data.tolist() == pads
    plugin = h.parse_node(core, n)
    assert plugin.attrs["pads"].dtype == np.int32 and plugin.attrs["pads"].tolist() == pads
    shape, env = ("N", 3, "H", 40), {"N": 2, "H": 30}
    for t in (core.float32, core.float16):
        built = h.build_node(core, plugin, [t], [shape], env)
        assert built.mode == "jit" and built.output_dtypes == [t] and built.tactics == [1, 2]
        assert built.output_shapes == [(2, 3, 30 + grown[0], 40 + grown[1])]
        width = built.output_exprs[0][3]
        assert width.is_constant() and width.get_constant_value() == 40 + grown[1]
        assert not built.output_exprs[0][2].is_constant()
    for tactic in (PadTactic.ROW_COPY, PadTactic.GATHER):
        plugin.set_tactic(int(tactic))
        out = (2, 3, 30 + grown[0], 40 + grown[1])
        enqueue(core, plugin, [((2, 3, 30, 40), core.float16)], [(out, core.float16)])
    assert calls == [(PadTactic.ROW_COPY, np.int32, pads, (2, 3, 30, 40), out),
                     (PadTactic.GATHER, np.int32, pads, (2, 3, 30, 40), out)]


def test_the_samples_own_node_without_plugin_version(trt):
    """The node as qdp_runner.py writes it for circ_pad (`pads`, `plugin_namespace`, `aot` from a bool; no
    `plugin_version`): onnx-tensorrt looks the creator up at version "1", the one tensorrt.plugin registers."""
    core, trtp, _ = trt
    define_wrap_pad_jit(trtp)
    n = onnx.helper.make_node("wrap_pad", ["x"], ["y"], name="wrap_pad 0", pads=[1, 1, 1, 1], plugin_namespace=NS,
                              aot=False)
    assert {a.name: a.type for a in n.attribute}["aot"] == onnx.AttributeProto.INT
    plugin = h.parse_node(core, n)
    assert isinstance(plugin, core.IPluginV3QuickRuntime)
    built = h.build_node(core, plugin, [core.float32], [(10, 3, 32, 32)], {})
    assert built.output_shapes == [(10, 3, 34, 34)] and built.tactics == [1, 2]


def _ptx(name, n_scalars, threads):
    """A small hand-written PTX module: one entry taking the input pointer, the int32 extras, the output
    pointer (TensorRT's argument order for an AOT plugin). The stand-in never runs it."""
    params = [f".param .u64 {name}_in"] + [f".param .u32 {name}_s{i}" for i in range(n_scalars)] + \
             [f".param .u64 {name}_out"]
    return (".version 8.0\n.target sm_80\n.address_size 64\n\n"
            f".visible .entry {name}(\n\t" + ",\n\t".join(params) + f"\n)\n.maxntid {threads}, 1, 1\n{{\n\tret;\n}}\n")


# tactic -> (elements per program, threads per block); as the sample's BLOCK_256 / BLOCK_1024
PAD_TILES = {1: (256, 64), 2: (1024, 256)}


def _wrap_pad_aot_body(trtp, core, src, pads, outputs, tactic, as_bytes):
    """Our AOT kernel's launch: grid (programs over one sample, samples), extras = the four pad amounts
    (W before/after, H before/after), input H, W, output H, W, elements per sample; shared memory one
    tile of the dtype for the row-copy tactic."""
    elems, threads = PAD_TILES.get(tactic, (512, 128))
    amounts = np.zeros(4, np.int32)
    flat = np.asarray(pads).ravel()[:4]
    amounts[:len(flat)] = flat
    ins, outs = src.shape_expr, outputs[0].shape_expr
    per_sample = outs[1] * outs[2] * outs[3]
    extras = trtp.SymIntExprs.from_tuple([trtp.SymInt32(int(a)) for a in amounts] +
                                        [trtp.SymInt32(e) for e in (ins[2], ins[3], outs[2], outs[3], per_sample)])
    params = trtp.KernelLaunchParams()
    params.grid_x = trtp.cdiv(per_sample, elems)
    params.grid_y = outs[0]
    params.block_x = threads
    params.shared_mem = 0 if tactic == 1 else elems * (4 if src.dtype == core.float32 else 2)
    kind = "f32" if src.dtype == core.float32 else "f16"
    name = f"wrap_pad_t{elems}_{kind}"
    ptx = _ptx(name, len(extras), threads)
    return (name.encode(), ptx.encode(), params, extras) if as_bytes else (name, ptx, params, extras)


def define_wrap_pad_aot(trtp, core, as_bytes):
    """Mirrors qdp_defs.py's enable_multi_tactic_aot_circ_pad(): the circ_pad register, autotune with two
    tactics, aot_impl only, switching on `tactic` (two tile sizes of one kernel). as_bytes: return the
    kernel name and PTX as bytes (`.encode()`, as that sample does); else as str (the form of
    tensorrt.plugin's aot_impl docstring)."""
    _wrap_pad_rule(trtp, "wrap_pad_aot")

    @trtp.autotune(f"{NS}::wrap_pad_aot")
    def wrap_pad_aot_tune(src: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        combo = trtp.AutoTuneCombination()
        combo.pos([0, 1], "FP32|FP16")
        combo.tactics(list(PAD_TILES))
        return [combo]

    @trtp.aot_impl(f"{NS}::wrap_pad_aot")
    def wrap_pad_aot_impl(
        src: trtp.TensorDesc, pads: npt.NDArray[np.int32], outputs: Tuple[trtp.TensorDesc], tactic: int
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        return _wrap_pad_aot_body(trtp, core, src, pads, outputs, tactic, as_bytes)


def _check_launch(launch, tactic, kind, env, pads, elem_bytes):
    n, c, hh, ww = env["N"], 3, env["H"], 40
    oh, ow = hh + pads[2] + pads[3], ww + pads[0] + pads[1]
    elems, threads = PAD_TILES.get(tactic, (512, 128))
    assert launch.kernel_name == f"wrap_pad_t{elems}_{kind}"
    entry = re.search(rf"\.entry\s+{launch.kernel_name}\s*\((.*?)\)", launch.ptx, re.S).group(1)
    params = [p.strip() for p in entry.split(",") if p.strip()]
    assert [p.split()[1] for p in params] == [".u64"] + [".u32"] * len(launch.extras) + [".u64"]
    assert launch.grid == (cdiv(c * oh * ow, elems), n, 1) and launch.block == (threads, 1, 1)
    assert launch.shared_mem == (0 if tactic == 1 else elems * elem_bytes)
    assert launch.extras == [*pads, hh, ww, oh, ow, c * oh * ow]


@pytest.mark.parametrize("as_bytes", [False, True], ids=["str_names", "bytes_names"])
def test_aot_plugin_with_two_tactics(trt, as_bytes):
    """enable_multi_tactic_aot_circ_pad's form: the node's `aot` INT attribute (as graphsurgeon writes the
    sample's bool) makes it STRICT_AOT; both tactics offered; per tactic the launch TensorRT would bake:
    kernel name (std::string: a str here), PTX (bytes), grid/block/shared memory and the int32 extras as
    aot_impl returned them, evaluated at the shape. tensorrt.plugin accepts str or bytes for both
    (get_launch_params' checks), passes the name through get_kernel unchanged and encodes a str PTX;
    pybind11 reads a bytes name into std::string as it reads a str."""
    core, trtp, _ = trt
    define_wrap_pad_aot(trtp, core, as_bytes)
    pads = [1, 2, 3, 0]
    plugin = h.parse_node(core, node("wrap_pad_aot", ["x"], ["y"], pads=pads, aot=1))
    assert isinstance(plugin, core.IPluginV3QuickAOTBuild)
    env = {"N": 2, "H": 30}
    for t, kind, size in ((core.float32, "f32", 4), (core.float16, "f16", 2)):
        built = h.build_node(core, plugin, [t], [("N", 3, "H", 40)], env)
        assert built.mode == "aot" and built.tactics == [1, 2] and sorted(built.launches) == [1, 2]
        assert built.output_dtypes == [t] and built.output_shapes == [(2, 3, 33, 43)]
        for tactic, launch in built.launches.items():
            _check_launch(launch, tactic, kind, env, pads, size)
        plugin.set_tactic(2)
        descs = [d.desc for d in _descs(core, [t, t], [(2, 3, 30, 40), (2, 3, 33, 43)])]
        name, ptx = plugin.get_kernel(descs[:1], descs[1:])
        assert (type(name), type(ptx)) == ((bytes, bytes) if as_bytes else (str, bytes))


def _descs(core, dtypes, shapes):
    out = []
    for dtype, shape in zip(dtypes, shapes):
        d = core.DynamicPluginTensorDesc()
        d.desc.dims, d.desc.type, d.desc.format = core.Dims(shape), dtype, core.TensorFormat.LINEAR
        out.append(d)
    return out


def define_wrap_pad_dual(trtp, core):
    """Mirrors qdp_defs.py's enable_single_tactic_circ_pad(): the circ_pad register, autotune with one
    combination and no custom tactics, both an impl and an aot_impl (str name and PTX); the node's `aot`
    attribute picks one."""
    calls = []
    _wrap_pad_rule(trtp, "wrap_pad_dual")

    @trtp.autotune(f"{NS}::wrap_pad_dual")
    def wrap_pad_dual_tune(src: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16")]

    @trtp.impl(f"{NS}::wrap_pad_dual")
    def wrap_pad_dual_run(src: trtp.Tensor, pads: npt.NDArray[np.int32], outputs: Tuple[trtp.Tensor],
                          stream: int) -> None:
        calls.append(pads.tolist())

    @trtp.aot_impl(f"{NS}::wrap_pad_dual")
    def wrap_pad_dual_aot(
        src: trtp.TensorDesc, pads: npt.NDArray[np.int32], outputs: Tuple[trtp.TensorDesc], tactic: int
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        calls.append(("aot", tactic))
        return _wrap_pad_aot_body(trtp, core, src, pads, outputs, tactic, as_bytes=False)

    return calls


def test_impl_and_aot_impl_the_nodes_aot_attribute_picks_jit(trt):
    """enable_single_tactic_circ_pad's form, node `aot` = 0: STRICT_JIT, the impl runs; no custom tactics."""
    core, trtp, _ = trt
    calls = define_wrap_pad_dual(trtp, core)
    plugin = h.parse_node(core, node("wrap_pad_dual", ["x"], ["y"], pads=[1, 1, 1, 1], aot=0))
    assert isinstance(plugin, core.IPluginV3QuickRuntime) and not isinstance(plugin, core.IPluginV3QuickAOTBuild)
    built = h.build_node(core, plugin, [core.float32], [("N", 3, "H", 40)], {"N": 2, "H": 30})
    assert built.mode == "jit" and built.tactics == [] and built.output_shapes == [(2, 3, 32, 42)]
    plugin.set_tactic(0)
    enqueue(core, plugin, [((2, 3, 30, 40), core.float32)], [((2, 3, 32, 42), core.float32)])
    assert calls == [[1, 1, 1, 1]]


def test_impl_and_aot_impl_the_nodes_aot_attribute_picks_aot_default_tactic(trt):
    """enable_single_tactic_circ_pad's form, node `aot` = 1 (the sample's `--aot`): STRICT_AOT with no
    custom tactics. TensorRT still compiles the default tactic 0 (NvInferRuntime.h, setTactic: "If no
    custom tactics were advertised, this will have a value of 0, which is designated as the default
    tactic"; tensorrt.plugin's get_launch_params reads the tactic set before it): one launch, tactic 0."""
    core, trtp, _ = trt
    calls = define_wrap_pad_dual(trtp, core)
    plugin = h.parse_node(core, node("wrap_pad_dual", ["x"], ["y"], pads=[1, 1, 1, 1], aot=1))
    assert isinstance(plugin, core.IPluginV3QuickAOTBuild)
    env = {"N": 2, "H": 30}
    built = h.build_node(core, plugin, [core.float16], [("N", 3, "H", 40)], env)
    assert built.mode == "aot" and built.tactics == [] and built.output_shapes == [(2, 3, 32, 42)]
    assert sorted(built.launches) == [0] and calls == [("aot", 0)]
    _check_launch(built.launches[0], 0, "f16", env, [1, 1, 1, 1], 2)


# ------------------------------------------------------------------- (5): several outputs


def define_row_peak(trtp, core):
    """Two outputs of different dtypes, as qdp_defs.py's non_zero_plugin returns (an int32 index tensor and
    a second tensor), but both sized by a shape rule (no size tensor): per row of a (rows, cols) input the
    peak value (the input's dtype) and its column (int32); a STRING attribute (arrives with its NUL)."""
    calls = []

    @trtp.register(f"{NS}::row_peak")
    def row_peak_desc(table: trtp.TensorDesc, pick: str) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        rows = table.shape_expr[0]
        return trtp.from_shape_expr((rows,), dtype=table.dtype), trtp.from_shape_expr((rows, 1), dtype=core.int32)

    @trtp.autotune(f"{NS}::row_peak")
    def row_peak_tune(table, outputs) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32|FP16, FP32|FP16, INT32")]

    @trtp.impl(f"{NS}::row_peak")
    def row_peak_run(table, pick: str, outputs, stream) -> None:
        calls.append((pick, [(tuple(o.shape), o.dtype) for o in outputs]))

    return calls


def test_two_outputs_named(trt):
    """A node naming both outputs: two outputs, dtypes [input's, INT32], shapes from the rule; the impl
    gets both output tensors."""
    core, trtp, _ = trt
    calls = define_row_peak(trtp, core)
    n = node("row_peak", ["t"], ["peak", "where"], pick="max")
    (field,) = h.load_fields(core, core.get_plugin_registry().get_creator("row_peak", "1", NS).field_names, n)
    assert field.type == core.PluginFieldType.CHAR and field.data.tobytes() == b"max\0"
    plugin = h.parse_node(core, n)
    assert plugin.get_num_outputs() == 2 and plugin.attrs == {"pick": "max\0"}
    built = h.build_node(core, plugin, [core.float16], [("R", 24)], {"R": 5})
    assert built.output_dtypes == [core.float16, core.int32] and built.output_shapes == [(5,), (5, 1)]
    assert built.tactics == []
    plugin.set_tactic(0)
    enqueue(core, plugin, [((5, 24), core.float16)], [((5,), core.float16), ((5, 1), core.int32)])
    assert calls == [("max\0", [((5,), core.float16), ((5, 1), core.int32)])]


@pytest.mark.parametrize("outputs", [["peak"], ["peak", ""], ["", "where"]])
def test_two_outputs_fewer_named_is_refused(trt, outputs):
    """onnx-tensorrt maps the non-empty output names to the layer's outputs: fewer than two is
    INVALID_GRAPH, in TensorRT's words ("more", though there are fewer)."""
    core, trtp, _ = trt
    define_row_peak(trtp, core)
    with pytest.raises(h.ParseError, match=r"^INVALID_GRAPH: Node has more output tensors than TRT expected, "
                                           r"expected output size is 2, actual output size is 1\.$"):
        h.parse_node(core, node("row_peak", ["t"], outputs, pick="max"))


def test_one_output_plugin_with_two_names_is_refused(trt):
    """The other way round: a one-output plugin on a node naming two outputs."""
    core, trtp, _ = trt
    define_wrap_pad_jit(trtp)
    with pytest.raises(h.ParseError, match="Node has more output tensors than TRT expected, expected output size "
                                           "is 1, actual output size is 2."):
        h.parse_node(core, node("wrap_pad", ["x"], ["y", "y2"], pads=[1, 1]))


def define_nonzero_coords(trtp, core):
    """Mirrors qdp_defs.py's non_zero_plugin (data-dependent shape): outputs (count, 2) int32 coordinates
    and the size tensor `count` (int64), `trtp.size_tensor(opt, upper_bound)` with the upper bound the
    input's element count and a quarter of it to tune for; autotune "FP32|FP16, INT32, INT64"; impl."""

    @trtp.register(f"{NS}::nonzero_coords")
    def nonzero_coords_desc(grid: trtp.TensorDesc) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        cells = grid.shape_expr[0] * grid.shape_expr[1]
        count = trtp.size_tensor(cells // 4, cells)
        count.dtype = core.int64
        return trtp.from_shape_expr((count.expr(), 2), dtype=core.int32), count

    @trtp.autotune(f"{NS}::nonzero_coords")
    def nonzero_coords_tune(grid, outputs) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32|FP16, INT32, INT64")]

    @trtp.impl(f"{NS}::nonzero_coords")
    def nonzero_coords_run(grid, outputs, stream) -> None:
        raise AssertionError("not run: the stand-in builds no engine for it")


def test_size_tensor_plugin_parses_with_both_outputs_named(trt):
    """non_zero_plugin's form up to what needs no size tensor: the node must name both outputs (the sample's
    network marks only output 0, but an ONNX node must still name the size tensor), dtypes [INT32, INT64]."""
    core, trtp, _ = trt
    define_nonzero_coords(trtp, core)
    plugin = h.parse_node(core, node("nonzero_coords", ["g"], ["coords", "count"]))
    assert plugin.get_num_outputs() == 2
    assert plugin.get_output_data_types([core.float32], [2]) == [core.int32, core.int64]
    with pytest.raises(h.ParseError, match="expected output size is 2, actual output size is 1"):
        h.parse_node(core, node("nonzero_coords", ["g"], ["coords"]))


@pytest.mark.xfail(strict=True, raises=NotImplementedError,
                   reason="size tensors are not part of the stand-in: IExprBuilder.declare_size_tensor raises")
def test_size_tensor_plugin_builds(trt):
    """What TensorRT would build: output 0 (size tensor, 2) int32, output 1 a 0-d int64 size tensor. The
    stand-in's `IExprBuilder.declare_size_tensor` (tests/trt_core.py) raises NotImplementedError, which
    tensorrt.plugin reaches in get_output_shapes (SizeTensorShapeExpr._expr)."""
    core, trtp, _ = trt
    define_nonzero_coords(trtp, core)
    plugin = h.parse_node(core, node("nonzero_coords", ["g"], ["coords", "count"]))
    built = h.build_node(core, plugin, [core.float32], [("R", 16)], env=None)  # a size tensor has no value at build
    assert built.output_dtypes == [core.int32, core.int64]
    assert len(built.output_exprs[1]) == 0 and built.output_exprs[0][1].get_constant_value() == 2
    assert built.output_exprs[0][0].is_size_tensor()
