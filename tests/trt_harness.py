"""NVIDIA's real `tensorrt.plugin` over the core stand-in, driven as TensorRT's ONNX parser and builder drive it.

- `tensorrt(version)`: a context in which `import tensorrt` is `trt_core.make_core(version)` and
  `import tensorrt.plugin` is NVIDIA's Python from the pinned bindings wheel of that version.
- `parse_node`: onnx-tensorrt's plugin importer, rule by rule as each supported release runs it, with
  file:line citations (`onnx_tensorrt`, table in tests/PARSER_RULES.md).
- `build_node`: the builder's calls, in its order: output dtypes, symbolic output shapes, format
  combinations, configure, tactics, then per tactic `get_launch_params` + `get_kernel` (AOT).
- `Builder`, `OnnxParser`, `Runtime`: just enough of the core for `convattn.exporter.engine`.

Wheels: `.trt-wheels/` at the repository root (or $CONVATTN_TRT_WHEELS), filled by `pip download`
on first use. In CI a wheel that cannot be had is a failure, never a skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_tensorrt
import trt_core

# The two TensorRT versions the harness runs against: the newest, and one 10.x (same plugin layer,
# its own create_plugin and validation code).
WHEELS = {"11.4.0.106": "tensorrt-cu13-bindings", "10.16.1.11": "tensorrt-cu12-bindings"}
WHEEL_DIR = Path(os.environ.get("CONVATTN_TRT_WHEELS", Path(__file__).resolve().parents[1] / ".trt-wheels"))


def _plugin_root(version: str) -> Path:
    """<dir>/<version>/tensorrt_bindings holding NVIDIA's `plugin` package (extracted from the wheel)."""
    root = WHEEL_DIR / version / "tensorrt_bindings"
    if (root / "plugin" / "__init__.py").exists():
        return root
    dist = WHEELS[version].replace("-", "_")
    wheels = sorted(WHEEL_DIR.glob(f"{dist}-{version}-*.whl"))
    if not wheels:
        WHEEL_DIR.mkdir(parents=True, exist_ok=True)
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                              "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
                              f"{WHEELS[version]}=={version}", "-d", str(WHEEL_DIR)], capture_output=True, text=True)
        wheels = sorted(WHEEL_DIR.glob(f"{dist}-{version}-*.whl"))
        if not wheels:
            message = f"cannot get {WHEELS[version]}=={version}: {got.stderr.strip()[-300:]}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    with zipfile.ZipFile(wheels[0]) as z:
        for name in z.namelist():
            if name.startswith("tensorrt_bindings/plugin/") and name.endswith(".py"):
                z.extract(name, WHEEL_DIR / version)
    return root


@contextlib.contextmanager
def tensorrt(version: str, aot: bool = True):
    """`import tensorrt` gives the stand-in core of `version`, `tensorrt.plugin` NVIDIA's code.
    aot=False: a core without QuickPluginCreationRequest (TensorRT < 10.12), so no `aot_impl`."""
    from convattn.plugins import trt_plugin

    root = _plugin_root(version)
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "tensorrt" or k.startswith("tensorrt.")}
    core = trt_core.make_core(version)
    if not aot:
        del core.QuickPluginCreationRequest
    core.__path__ = [str(root)]
    core.Builder, core.OnnxParser, core.Runtime = Builder, OnnxParser, Runtime
    core.MemoryPoolType, core.ProfilingVerbosity, core.LayerInformationFormat = _MemoryPoolType, _Verbosity, _InfoFormat
    sys.modules["tensorrt"] = core
    trt_plugin.register_plugin.cache_clear()
    try:
        import tensorrt.plugin as trtp  # noqa: F401  (NVIDIA's code, run for real)

        yield core, sys.modules["tensorrt.plugin"]
    finally:
        for k in [k for k in sys.modules if k == "tensorrt" or k.startswith("tensorrt.")]:
            del sys.modules[k]
        sys.modules.update(saved)
        trt_plugin.register_plugin.cache_clear()


# ------------------------------------------------------------------- onnx-tensorrt: `onnx_tensorrt`

ParseError, load_fields, parse_node = onnx_tensorrt.ParseError, onnx_tensorrt.load_fields, onnx_tensorrt.parse_node


# ------------------------------------------------------------------- the builder's calls


@dataclass
class Launch:
    kernel_name: str
    ptx: str
    grid: tuple
    block: tuple
    shared_mem: int
    extras: list  # evaluated int32 extra arguments


@dataclass
class BuiltNode:
    mode: str  # "aot" or "jit"
    output_dtypes: list
    output_shape: tuple  # the first output's, evaluated at the env
    output_exprs: list
    output_shapes: list  # every output's, evaluated at the env
    tactics: list
    launches: dict = field(default_factory=dict)  # tactic -> Launch (AOT)
    plugin: object = None


def sym_dims(core, shape):
    """Input DimsExprs: ints are build-time constants, strings are dynamic dims (symbols)."""
    builder = core.IExprBuilder()
    exprs = core.DimsExprs(len(shape))
    for i, d in enumerate(shape):
        exprs[i] = builder.constant(d) if isinstance(d, int) else trt_core.symbol(d)
    return exprs


def build_node(core, plugin, in_dtypes, in_shapes, env: dict | None, tactics=None) -> BuiltNode:
    """Drive `plugin` as the builder does for inputs of `in_dtypes` and (symbolic) `in_shapes`;
    `env` binds the symbols to the concrete shape the launches are evaluated at."""
    builder = core.IExprBuilder()
    n_in = len(in_shapes)
    out_dtypes = plugin.get_output_data_types(list(in_dtypes), [len(s) for s in in_shapes])
    in_exprs = [sym_dims(core, s) for s in in_shapes]
    out_exprs = plugin.get_output_shapes(in_exprs, [], builder)
    if not all(isinstance(e, core.IDimensionExpr) for dims in out_exprs for e in dims):
        raise TypeError(f"get_output_shapes returned {out_exprs!r}")
    shapes = [[d if isinstance(d, int) else -1 for d in s] for s in in_shapes] + \
             [[e.get_constant_value() if e.is_constant() else -1 for e in dims] for dims in out_exprs]
    in_out = []
    for dims, dtype in zip(shapes, [*in_dtypes, *out_dtypes]):
        d = core.DynamicPluginTensorDesc()
        d.desc.dims, d.desc.type, d.desc.format = core.Dims(dims), dtype, core.TensorFormat.LINEAR
        in_out.append(d)
    combos = plugin.get_supported_format_combinations(in_out, n_in)
    n_io = len(in_out)
    wanted = [*in_dtypes, *out_dtypes]
    rows = [combos[i:i + n_io] for i in range(0, len(combos), n_io)]
    if not any([c.type for c in row] == wanted and all(c.format == core.TensorFormat.LINEAR for c in row) for row in rows):
        raise ParseError(f"no supported format combination for {wanted}: {[[c.type for c in r] for r in rows]}")
    plugin.configure_plugin(in_out[:n_in], in_out[n_in:])
    valid = sorted(plugin.get_valid_tactics())
    mode = "aot" if isinstance(plugin, core.IPluginV3QuickAOTBuild) else "jit"
    def value(e):  # the builder itself evaluates nothing: env=None skips it
        return None if env is None else e.value(env)

    out_shapes = [tuple(value(e) for e in dims) for dims in out_exprs]
    built = BuiltNode(mode, list(out_dtypes), out_shapes[0], list(out_exprs), out_shapes, valid, plugin=plugin)
    if mode == "aot":
        # No custom tactics advertised: TensorRT compiles the default tactic 0 (NvInferRuntime.h, setTactic)
        offered = valid or [0]
        ends = list(dict.fromkeys(offered[:1] + offered[-2:]))  # the default, and the appended ones (no-opt-in, Hopper)
        chosen = offered if tactics is None else ends if tactics == "ends" else [t for t in offered if t in tactics]
        for t in chosen:
            plugin.set_tactic(t)
            params, extras = core.KernelLaunchParams(), core.ISymExprs()
            plugin.get_launch_params(in_exprs, in_out, n_in, params, extras, builder)
            descs = [d.desc for d in in_out]
            name, ptx = plugin.get_kernel(descs[:n_in], descs[n_in:])
            if isinstance(name, (bytes, bytearray)):  # pybind11's std::string caster reads bytes as they are
                name = bytes(name).decode()
            if not isinstance(name, str) or not isinstance(ptx, bytes):  # pybind casts to (std::string, bytes)
                raise TypeError(f"get_kernel returned ({type(name)}, {type(ptx)})")
            for e in extras:
                if e.dtype != core.PluginArgDataType.INT32 or e.type != core.PluginArgType.INT:
                    raise TypeError(f"extra argument of type {e.type}/{e.dtype}")
            ev = {f: value(getattr(params, f).expr) if hasattr(params, f) else None for f in params.FIELDS}
            built.launches[t] = Launch(name, ptx.decode(), (ev["grid_x"], ev["grid_y"], ev["grid_z"]),
                                       (ev["block_x"], ev["block_y"], ev["block_z"]), ev["shared_mem"],
                                       [value(e.expr) for e in extras])
    return built


# ------------------------------------------------------------------- Builder, parser, runtime


class _MemoryPoolType:
    WORKSPACE = "WORKSPACE"


class _Verbosity:
    LAYER_NAMES_ONLY, DETAILED, NONE = "LAYER_NAMES_ONLY", "DETAILED", "NONE"


class _InfoFormat:
    ONELINE, JSON = "ONELINE", "JSON"


class Network:
    def __init__(self, flags: int):
        core = sys.modules["tensorrt"]
        known = sum(1 << f.value for f in core.NetworkDefinitionCreationFlag)
        if flags & ~known:
            raise ValueError(f"create_network: unknown flag bits {flags & ~known:#x}")
        self.flags = {f.name for f in core.NetworkDefinitionCreationFlag if flags & (1 << f.value)}
        self.plugin_layers: list = []  # (node, plugin, input shapes, input dtypes)


class Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags=0):
        return Network(int(flags))

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        """Every plugin layer through the builder's calls; None (and an error logged) if one fails."""
        layers = []
        for node, plugin, shapes, dtypes in network.plugin_layers:
            try:
                # TensorRT compiles and times every tactic; the stand-in compiles the first and the last two
                # (the tactics appended after the tuning space: the no-opt-in config, the Hopper kernel), for time.
                built = build_node(sys.modules["tensorrt"], plugin, dtypes, shapes, env=None, tactics="ends")
            except Exception as e:  # TensorRT catches what a Python plugin raises (PLUGIN_API_CATCH)
                self.logger.log(self.logger.ERROR, f"{node.name}: {type(e).__name__}: {e}")
                return None
            layers.append({"Name": node.name, "LayerType": "PluginV3", "mode": built.mode,
                           "tactics": built.tactics})
        return json.dumps({"Layers": layers, "flags": sorted(network.flags),
                           "builder_flags": sorted(config.flags)}).encode()


class _Config:
    def __init__(self):
        self.flags: set = {"TF32"}  # TensorRT's default builder config allows TF32
        self.profiling_verbosity = None
        self.profiles: list = []

    def set_flag(self, flag):
        self.flags.add(self._name(flag))

    def clear_flag(self, flag):
        self.flags.discard(self._name(flag))

    @staticmethod
    def _name(flag) -> str:
        if not isinstance(flag, sys.modules["tensorrt"].BuilderFlag):
            raise TypeError(f"expected a BuilderFlag, got {flag!r}")
        return flag.name

    def set_memory_pool_limit(self, pool, size):
        self.workspace = int(size)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)

    def create_timing_cache(self, data):
        return _Blob(b"timing-cache")

    def set_timing_cache(self, cache, ignore_mismatch):
        return True


class _Profile:
    def __init__(self):
        self.shapes: dict = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class _Blob(bytes):
    def serialize(self):
        return self


class OnnxParser:
    """onnx-tensorrt, for the plugin nodes (`onnx_tensorrt`): each one's input shapes and dtypes from ONNX shape
    inference (dim_param -> a symbol), its plugin from `parse_node`. Other nodes are accepted."""

    def __init__(self, network, logger):
        self.network, self.logger, self.errors = network, logger, []

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]

    def parse_from_file(self, path: str) -> bool:
        """A graph with external data (tests/PARSER_RULES.md, "External weights"): every tensor read from
        the file it names, relative to the graph's folder (onnx's loader: a missing file, a path out of
        the folder or a read past the file's end fails, as onnx-tensorrt's `parseExternalWeights` does),
        and its bytes must be what its shape and type need (`convertOnnxWeights`: "Unexpected size for
        the external weights!"); then the nodes as `parse` checks them."""
        from onnx import external_data_helper, helper

        from convattn import external_data

        model = onnx.load(path, load_external_data=False)
        try:
            for t in external_data.tensors(model.graph):  # initializers and Constant nodes' tensors
                if external_data_helper.uses_external_data(t):
                    read = onnx.TensorProto()
                    read.CopyFrom(t)
                    external_data_helper.load_external_data_for_tensor(read, os.path.dirname(path))
                    need = int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                    if len(read.raw_data) != need:
                        raise ValueError(f"Unexpected size for the external weights! Expected size: {need} bytes. "
                                         f"Actual size: {len(read.raw_data)} bytes. ({t.name})")
        except Exception as e:
            self.errors.append(f"{type(e).__name__}: {e}")
            return False
        return self._parse(model)

    def parse(self, data: bytes) -> bool:
        return self._parse(onnx.load_from_string(data))

    def _parse(self, model) -> bool:
        core = sys.modules["tensorrt"]
        # data_prop: dims computed through Shape/Slice/Concat of constants are known, as TensorRT's
        # shape-tensor analysis knows them at build (a windowed node's merged input keeps its head dim)
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        types = {v.name: v.type.tensor_type for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
        dtype = {onnx.TensorProto.FLOAT: core.float32, onnx.TensorProto.FLOAT16: core.float16,
                 onnx.TensorProto.BFLOAT16: core.bfloat16}
        prefer = ("aot" if "PREFER_AOT_PYTHON_PLUGINS" in self.network.flags
                  else "jit" if "PREFER_JIT_PYTHON_PLUGINS" in self.network.flags else None)
        for index, node in enumerate(model.graph.node):
            if onnx_tensorrt.dispatch(core, node) == "builtin":
                continue  # TensorRT's own importers: judged by a real parser (tests/test_trt_rtx.py)
            try:
                plugin = parse_node(core, node, prefer)
                shapes = [[d.dim_value if d.HasField("dim_value") else (d.dim_param or f"{name}_{i}")
                           for i, d in enumerate(types[name].shape.dim)] for name in node.input]
                dtypes = [dtype[types[name].elem_type] for name in node.input]
            except Exception as e:
                # onnx-tensorrt's error format: node index, name, operator, code, description
                self.errors.append(f"In node {index} with name: {node.name} and operator: {node.op_type}: "
                                   f"{e if isinstance(e, ParseError) else f'{type(e).__name__}: {e}'}")
                return False
            self.network.plugin_layers.append((node, plugin, shapes, dtypes))
        return True


class Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, plan):
        return _Engine(json.loads(bytes(plan)))


class _Engine:
    device_memory_size_v2 = 0

    def __init__(self, info):
        self.info = info

    def create_engine_inspector(self):
        return self

    def get_engine_information(self, fmt):
        return json.dumps(self.info)
