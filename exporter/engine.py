"""TensorRT engine: build from the fused graph, run, and say what it needs to be served.

TensorRT is imported lazily, so everything before this stage runs without it. What can be
checked without TensorRT is pure and tested in CI: optimization profiles (`parse_profiles`),
the sidecar (`sidecar`), Triton Inference Server's model repository (`triton_repository`).
The builder, parser and runtime calls are thin; they need a machine with TensorRT and a GPU.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

import convattn
from convattn.errors import (ConvattnError, DriverError, EngineBuildError, InputError, ModelError, TensorRTUnavailable,
                             first_line)
from convattn.plugins.op import (PLUGIN_MODES, FlashAttentionAttrs, int32_problem, is_fused_node, logical_shape,
                                 undeclared_attributes)

from .. import external_data
from .files import write_atomic
from .fuse import plugin_modes, set_plugin_mode, uses_tf32
from .graph import dims_at, graph_inputs, parse_shape, set_input_dims
from .precision import graph_precision

_TRT_DTYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.BFLOAT16: "TYPE_BF16"}


@dataclass
class Profile:
    """min/opt/max shapes per graph input: one TensorRT optimization profile."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {name: {"min": list(a), "opt": list(b), "max": list(c)} for name, (a, b, c) in self.shapes.items()}


def _parse_one(text: str, names: list[str], option: str) -> dict[str, tuple[int, ...]]:
    """'input_0:1x64x16x16,input_1:1x64x8x8' or '1x64x16x16' (every input, in order)."""
    out = {}
    for i, part in enumerate(p for p in text.split(",") if p.strip()):
        name, _, dims = part.rpartition(":")
        name = name.strip() or (names[i] if i < len(names) else "")
        if name not in names:
            raise InputError(f"{option}: expected an input among {names}, got {name or part!r}")
        out[name] = parse_shape(dims, f"{option} (NAME:BxCxHxW)", rank=None)
    if len(out) == 1 and len(names) > 1 and ":" not in text:
        out = {n: next(iter(out.values())) for n in names}  # one shape serves every input
    return out


def parse_profiles(names: list[str], export_shapes: list[tuple[int, ...]], min_shape=None, opt_shape=None,
                   max_shape=None) -> Profile:
    """One optimization profile. Each of min/opt/max defaults to the export shape; every input
    must satisfy min <= opt <= max per dim, with the rank of the export shape."""
    base = dict(zip(names, map(tuple, export_shapes)))
    parsed = [
        {**base, **_parse_one(text, names, opt)} if text else dict(base)
        for text, opt in ((min_shape, "--min-shape"), (opt_shape, "--opt-shape"), (max_shape, "--max-shape"))
    ]
    profile = Profile()
    for name in names:
        lo, mid, hi = (p[name] for p in parsed)
        if not len(lo) == len(mid) == len(hi) == len(base[name]):
            raise InputError(f"profile for {name!r}: expected rank {len(base[name])}, got {lo}, {mid}, {hi}")
        if any(c != base[name][1] for c in (lo[1], mid[1], hi[1])):
            raise InputError(f"profile for {name!r}: the channel count is fixed at {base[name][1]}")
        if not all(a <= b <= c for a, b, c in zip(lo, mid, hi)):
            raise InputError(f"profile for {name!r}: expected min <= opt <= max per dim, got {lo}, {mid}, {hi}")
        profile.shapes[name] = (lo, mid, hi)
    return profile


def sidecar_path(plan: str | Path) -> Path:
    """out.plan -> out.plan.json"""
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


def sidecar(*, trt_version: str, gpu: str, compute_capability: str, profile: Profile, plugin_mode: str, dtype: str,
            model_sha256: str | None, device_memory_bytes: int | None = None, tf32: bool = False,
            kernels: list | None = None) -> dict:
    """What the plan needs to be served: an engine runs only on the TensorRT version and GPU
    family it was built for, and a JIT engine needs the Python plugin in the serving process."""
    return {
        "tensorrt": trt_version,
        "gpu": gpu,
        "compute_capability": compute_capability,
        "profiles": [profile.to_dict()],
        "plugin_mode": plugin_mode,
        "needs_python_plugin": plugin_mode == "jit",
        "precision": dtype,
        "tf32": tf32,
        "ptx": ptx_requirements(kernels or []),
        "device_memory_bytes": device_memory_bytes,
        "convattn": convattn.__version__,
        "source_model_sha256": model_sha256,
    }


def ptx_requirements(kernels: list[dict]) -> dict | None:
    """What the PTX an AOT plan carries needs from the serving machine: its PTX ISA, target and the
    oldest CUDA driver that loads it (the newest over its kernels); None when it carries none (JIT)."""
    if not kernels:
        return None
    def key(k):
        return tuple(int(x) for x in k["ptx_isa"].split("."))

    newest = max(kernels, key=key)
    return {"ptx_isa": newest["ptx_isa"], "targets": sorted({k["target"] for k in kernels}),
            "min_cuda": newest["min_cuda"], "min_driver": newest["min_driver"],
            "max_shared_mem": max(k["shared_mem"] for k in kernels),
            "kernels": sorted({k["kernel"] for k in kernels})}


def check_driver(meta: dict, driver_cuda: str | None = None, capability: str | None = None) -> None:
    """Refuse, in one line, a plan this machine cannot load: PTX newer than its driver (a CUDA error at
    load otherwise), or a GPU of another family. `driver_cuda` ("12.8") and `capability` ("9.0")
    default to this machine's."""
    need = (meta.get("ptx") or {}).get("min_cuda")
    if need and need != "?":
        have = driver_cuda or _driver_cuda()
        if have and tuple(map(int, have.split("."))) < tuple(map(int, need.split("."))):
            raise DriverError(f"the engine's PTX (ISA {meta['ptx']['ptx_isa']}) needs a CUDA {need} driver (Linux >= "
                              f"{meta['ptx']['min_driver']}); this machine's driver is CUDA {have}: update the driver, "
                              "or build the engine with a Triton whose PTX this driver loads")
    want = meta.get("compute_capability")
    if want:
        have_cc = capability or gpu_identity()[1]
        if have_cc != want:
            raise DriverError(f"the engine was built for compute capability {want} ({meta.get('gpu')}); this GPU is "
                              f"{have_cc}: rebuild it on this GPU family")


def _driver_cuda() -> str | None:
    """The CUDA version this machine's driver supports, "12.8"; None if it cannot be asked."""
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver
        except ImportError:
            driver = None
    try:
        if driver is not None:
            err, version = driver.cuDriverGetVersion()
            if err != driver.CUresult.CUDA_SUCCESS or not version:
                return None
        else:
            import torch

            version = torch._C._cuda_getDriverVersion()
    except Exception:  # noqa: BLE001  (best effort: TensorRT reports what it cannot load)
        return None
    return f"{version // 1000}.{version % 1000 // 10}"


def triton_repository(repo: str | Path, name: str, plan: str | Path, model: onnx.ModelProto, profile: Profile,
                      *, force: bool = False) -> Path:
    """A Triton Inference Server model repository: <repo>/<name>/config.pbtxt and 1/model.plan (with
    its sidecar beside it when the plan has one), staged and put in place whole.

    Dims are -1 where the profile lets them vary; max_batch_size 0 (the batch is an explicit
    dim of every input, as exported)."""
    target = Path(repo) / name
    if target.exists() and not force:
        raise InputError(f"{target}: exists; pass --force to overwrite")
    Path(repo).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
    try:
        write_triton_model(staging, name, plan, model, profile)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def write_triton_model(folder: Path, name: str, plan: str | Path, model: onnx.ModelProto, profile: Profile) -> None:
    """One Triton model into an existing empty `folder`: config.pbtxt, 1/model.plan and, where the plan
    has a sidecar, 1/model.plan.json (a C++ server reads the PTX's driver needs there)."""
    def entry(vi, dims) -> str:
        dtype = _TRT_DTYPES.get(vi.type.tensor_type.elem_type)
        if dtype is None:
            raise InputError(f"{vi.name}: no Triton data type for ONNX elem_type {vi.type.tensor_type.elem_type}")
        return f'  {{\n    name: "{vi.name}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'

    in_entries = []
    for vi in graph_inputs(model):
        lo, _, hi = profile.shapes[vi.name]
        in_entries.append(entry(vi, [a if a == b else -1 for a, b in zip(lo, hi)]))
    out_entries = [
        entry(vi, [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim])
        for vi in model.graph.output
    ]
    sep = ",\n"
    text = (
        f'name: "{name}"\nplatform: "tensorrt_plan"\nmax_batch_size: 0\n'
        f"input [\n{sep.join(in_entries)}\n]\noutput [\n{sep.join(out_entries)}\n]\n"
    )
    (Path(folder) / "1").mkdir()
    shutil.copyfile(plan, Path(folder) / "1" / "model.plan")
    if sidecar_path(plan).exists():
        shutil.copyfile(sidecar_path(plan), sidecar_path(Path(folder) / "1" / "model.plan"))
    (Path(folder) / "config.pbtxt").write_text(text)


def attention_layers(engine_info_json: str) -> list[str]:
    """Names of the engine's layers that run attention: our plugin, or a fused attention kernel of
    TensorRT's own (Myelin's MHA/fMHA). A graph TensorRT "could fuse" proves nothing: this does."""
    info = json.loads(engine_info_json) if engine_info_json else {}
    names = []
    for layer in info.get("Layers", []):
        text = json.dumps(layer) if isinstance(layer, dict) else str(layer)
        name = layer.get("Name", text) if isinstance(layer, dict) else text
        if re.search(r"flashattention|fmha|mha|attention", text, re.I):
            names.append(str(name))
    return names


def require_tensorrt():
    """The `tensorrt` module, or TensorRTUnavailable (exit 5) in one line: the CLI asks first, before
    any stage runs, so a run that cannot end in an engine costs nothing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(
            f"--engine needs the `tensorrt` Python package, which is not installed ({e}): install "
            "convattn[tensorrt] on a machine with an NVIDIA GPU, or leave --engine out for the fused ONNX alone") from e
    return trt


@dataclass
class EngineResult:
    plan: Path
    sidecar: dict


def network_flags(trt, plugin_mode: str) -> int:
    """The one place that knows TensorRT versions apart. Precision lives in the graph: TensorRT 11
    builds strongly typed networks only (no STRONGLY_TYPED flag, no BuilderFlag.FP16/BF16); on 10.x
    strong typing is a creation flag. The PREFER_* flag names the implementation for plugins
    whose node does not say (ours do: their `aot` attribute)."""
    names = []
    if int(trt.__version__.split(".")[0]) < 11:
        names.append("STRONGLY_TYPED")
    prefer = f"PREFER_{plugin_mode.upper()}_PYTHON_PLUGINS"
    if hasattr(trt.NetworkDefinitionCreationFlag, prefer):
        names.append(prefer)
    return sum(1 << int(getattr(trt.NetworkDefinitionCreationFlag, n)) for n in names)


def build_engine(
    fused: onnx.ModelProto,
    plan_path: str | Path,
    profile: Profile,
    *,
    plugin_mode: str = "aot",
    workspace_bytes: int | None = None,
    timing_cache: str | Path | None = None,
    model_sha256: str | None = None,
) -> EngineResult:
    """Build a strongly typed TensorRT engine from the fused graph; write the plan and its sidecar atomically.

    The engine computes in the graph's types (`precision.cast_graph`); the sidecar records them.

    Args:
        profile: min/opt/max shapes per input (`parse_profiles`).
        plugin_mode: "aot" (default: the engine carries our PTX, no Python needed to serve it) or
            "jit". Written on every FlashAttention node (`fuse.set_plugin_mode`), which is what
            TensorRT's ONNX parser obeys.
        workspace_bytes: builder workspace limit. Defaults to TensorRT's.
        timing_cache: read if present, written after the build.

    Raises:
        EngineBuildError: anything TensorRT or the plugin refused, as one line (exit code 4).
    """
    if plugin_mode not in PLUGIN_MODES:
        raise InputError(f"--plugin-mode: expected one of {PLUGIN_MODES}, got {plugin_mode!r}")
    trt = require_tensorrt()
    check_attributes(fused)
    check_int32(fused, {name: hi for name, (_, _, hi) in profile.shapes.items()})
    with tensorrt_errors(trt):
        return _build(trt, fixed_dims(set_plugin_mode(fused, plugin_mode), profile), Path(plan_path), profile,
                      plugin_mode, workspace_bytes, timing_cache, model_sha256)


def check_attributes(model: onnx.ModelProto) -> None:
    """Refuse a FlashAttention node with an attribute the plugin does not declare: TensorRT's parser
    would drop it without a word (loadFields passes declared fields only), and the kernel would run
    as if it were not there."""
    for node in model.graph.node:
        if is_fused_node(node):
            extra = undeclared_attributes(a.name for a in node.attribute)
            if extra:
                raise EngineBuildError(f"{node.name}: attribute(s) {', '.join(extra)} are not fields of the FlashAttention "
                                       "plugin: TensorRT's ONNX parser would drop them and the kernel ignore them; "
                                       "re-fuse the graph with this convattn")


def check_int32(model: onnx.ModelProto, shapes: dict) -> None:
    """Refuse (ModelError, one line) a profile whose largest shapes give a FlashAttention node a tensor
    the kernels cannot index with int32 (`op.int32_problem`); shapes per graph input, from ONNX shape
    inference (a node whose input shapes it cannot infer is left to the plugin)."""
    nodes = [n for n in model.graph.node if is_fused_node(n)]
    if not nodes:
        return
    dims = dims_at(model, shapes, [name for n in nodes for name in n.input[:3]])
    for node in nodes:
        q, k, v = (dims.get(name) for name in node.input[:3])
        try:
            attrs = FlashAttentionAttrs.from_attributes({a.name: a.s for a in node.attribute
                                                         if a.type == onnx.AttributeProto.STRING})
        except ValueError:
            continue  # the plugin refuses it inside TensorRT, with TensorRT's report
        if not all(s and None not in s for s in (q, k, v)):
            continue
        (b, h, s_q, d), (_, _, s_kv, _), (_, _, _, d_v) = (logical_shape(s, layout, attrs.num_heads) for s, layout in
                                                             ((q, attrs.q_layout), (k, attrs.k_layout), (v, attrs.v_layout)))
        problem = int32_problem(b, h, s_q, s_kv, d, d_v)
        if problem:
            raise ModelError(f"{node.name}: at the profile's largest shapes {problem}: narrow --max-shape")


def fixed_dims(model: onnx.ModelProto, profile: Profile) -> onnx.ModelProto:
    """`model` (changed in place) with every input dim the profile fixes (min == max) written as a
    constant, so that TensorRT knows it at build, as a plugin's shape expressions do: a fixed
    sequence length lets the plugin offer its Hopper (TMA) kernel (`plan.hopper_problem`).
    Dims the profile lets vary stay dynamic. The inner shape annotations go (TensorRT infers its own)."""
    set_input_dims(model, {name: [a if a == b else None for a, b in zip(lo, hi)]
                           for name, (lo, _, hi) in profile.shapes.items()})
    del model.graph.value_info[:]
    return model


@contextlib.contextmanager
def tensorrt_errors(trt):
    """Whatever the TensorRT path raises (ValueError, TypeError, RuntimeError, ...) as one line,
    EngineBuildError (exit code 4); our own errors pass through."""
    try:
        yield
    except ConvattnError:
        raise
    except Exception as e:
        raise EngineBuildError(f"TensorRT {trt.__version__}: {type(e).__name__}: {first_line(e)}") from e


def _build(trt, fused, plan_path: Path, profile, plugin_mode, workspace_bytes, timing_cache, model_sha256):
    from convattn.plugins.trt_plugin import emitted_kernels, register_plugin

    emitted_kernels(clear=True)
    if not register_plugin() and plugin_mode == "aot" and plugin_modes(fused):  # a graph of ours needs AOT
        raise EngineBuildError(f"TensorRT {trt.__version__} has no AOT Python plugins (tensorrt.plugin.aot_impl, "
                               "TensorRT >= 10.12): pass --plugin-mode jit, or use a newer TensorRT")
    log = _Log(trt)
    builder = trt.Builder(log)
    network = builder.create_network(network_flags(trt, plugin_mode))
    parser = trt.OnnxParser(network, log)
    with external_data.readable(fused) as source:  # a large model's weights: read from the data file beside it
        parsed = parser.parse(source) if isinstance(source, bytes) else parser.parse_from_file(str(source))
    if not parsed:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError("TensorRT's ONNX parser refused the fused graph: " + "; ".join(errors))
    tf32 = uses_tf32(fused)
    config = _builder_config(trt, builder, profile, workspace_bytes, tf32)
    cache = None
    if timing_cache:
        data = Path(timing_cache).read_bytes() if Path(timing_cache).exists() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError("TensorRT could not build the engine: " + " | ".join(log.messages[-10:]))
    engine = trt.Runtime(log).deserialize_cuda_engine(plan)
    kernels = emitted_kernels()
    memory = getattr(engine, "device_memory_size_v2", None) or getattr(engine, "device_memory_size", None)
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    gpu, capability = gpu_identity()
    meta = sidecar(trt_version=trt.__version__, gpu=gpu, compute_capability=capability, profile=profile,
                   plugin_mode=plugin_mode, dtype=graph_precision(fused), tf32=tf32, model_sha256=model_sha256,
                   device_memory_bytes=int(memory) if memory is not None else None,
                   kernels=kernels if plugin_mode == "aot" else None)
    meta["attention_layers"] = attention_layers(info)
    write_atomic(plan_path, bytes(plan))
    write_atomic(sidecar_path(plan_path), (json.dumps(meta, indent=2) + "\n").encode())
    if cache is not None:
        write_atomic(Path(timing_cache), bytes(cache.serialize()))
    return EngineResult(plan_path, meta)


def _builder_config(trt, builder, profile: Profile, workspace_bytes, tf32: bool):
    """No precision flags: the graph's types are the engine's. TF32 (on in TensorRT's default
    config) only where the fused graph was made with tf32 (`fuse.uses_tf32`): an exact-fp32 graph
    gets an exact-fp32 engine, TensorRT's own convs and matmuls included."""
    config = builder.create_builder_config()
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer information for the report
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.shapes.items():
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)
    return config


def gpu_identity() -> tuple[str, str]:
    """(name, "major.minor") of the GPU the engine is built for: a plan runs on that family only."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def _bound(plan: str | Path, feeds: dict):
    """Load a plan and bind CUDA torch inputs (name -> tensor) and freshly allocated outputs."""
    trt = require_tensorrt()
    import torch

    from convattn.plugins.trt_plugin import register_plugin

    meta = sidecar_path(plan)
    if meta.exists():  # a plan this machine cannot load: one line now, not a CUDA error inside TensorRT
        check_driver(json.loads(meta.read_text()))
    register_plugin()  # a JIT engine needs it; an AOT engine does not, but it does no harm
    log = _Log(trt)
    engine = trt.Runtime(log).deserialize_cuda_engine(Path(plan).read_bytes())
    if engine is None:
        raise EngineBuildError("TensorRT could not load the plan:\n" + "\n".join(log.messages[-30:]))
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    for name in names:
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            context.set_input_shape(name, tuple(feeds[name].shape))
            context.set_tensor_address(name, feeds[name].data_ptr())
    outputs = []
    for name in names:
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            dtype = {trt.float32: torch.float32, trt.float16: torch.float16,
                     trt.bfloat16: torch.bfloat16}[engine.get_tensor_dtype(name)]
            out = torch.empty(tuple(context.get_tensor_shape(name)), device="cuda", dtype=dtype)
            context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
    return context, outputs, log


def _execute(context, log, stream) -> None:
    if not context.execute_async_v3(stream.cuda_stream):
        raise EngineBuildError("TensorRT failed to run the engine:\n" + "\n".join(log.messages[-30:]))


def run_engine(plan: str | Path, feeds: dict) -> list:
    """Run a plan once on CUDA torch tensors (name -> tensor); returns the outputs as tensors."""
    import torch

    with tensorrt_errors(require_tensorrt()):
        context, outputs, log = _bound(plan, feeds)
        stream = torch.cuda.current_stream()
        _execute(context, log, stream)
        stream.synchronize()
    return outputs


def time_engine(plan: str | Path, feeds: dict, repeat: int = 20) -> float:
    """Median ms of `repeat` runs (CUDA events), after one warm-up run."""
    import torch

    times = []
    with tensorrt_errors(require_tensorrt()):
        context, _, log = _bound(plan, feeds)
        stream = torch.cuda.current_stream()
        _execute(context, log, stream)
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            _execute(context, log, stream)
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


class _Log:
    """A TensorRT logger that keeps the messages, for one readable error instead of a traceback."""

    def __new__(cls, trt):
        class Log(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.messages: list[str] = []

            def log(self, severity, msg):
                if severity <= trt.ILogger.Severity.WARNING:
                    self.messages.append(f"[{severity.name}] {msg}")

        return Log()


def compare_paths(plan: str | Path, unfused: onnx.ModelProto, profile: Profile, names: list[str],
                  plugin_memory: int | None = None) -> dict:
    """Our plugin's engine (`plan`) against TensorRT's own attention (an engine of the unfused graph),
    same profile, same inputs: median ms at the opt shape and device memory, {"plugin": .., "native": ..}."""
    import torch

    feeds = {n: torch.randn(profile.shapes[n][1], device="cuda") for n in names}
    result = {"plugin": {"ms": time_engine(plan, feeds), "device_memory_bytes": plugin_memory}}
    with tempfile.TemporaryDirectory() as tmp:
        native = build_engine(unfused, Path(tmp) / "native.plan", profile)
        result["native"] = {"ms": time_engine(native.plan, feeds),
                            "device_memory_bytes": native.sidecar.get("device_memory_bytes")}
    return result


def validate_engine(
    plan,
    module,
    unfused: onnx.ModelProto,
    input_names: list[str],
    input_shapes: list[tuple[int, ...]],
    *,
    dtype: str = "fp32",
    blocks: list | None = None,
    seed: int | None = None,
    tf32: bool = False,
) -> "ValidationReport":
    """The TensorRT engine against a float64 PyTorch run, next to PyTorch (einsum, SDPA) on
    the GPU in `dtype` and ONNX Runtime on the unfused graph, on fresh random inputs and on
    the same inputs x8 (large logits: where a naive fp16 softmax overflows). Needs CUDA and
    TensorRT; memory notes give the engine's peak and where einsum would run out of memory."""
    import numpy as np
    import torch

    from convattn.plugins.ort_op import run as run_onnx

    from .validate import (DTYPES, ValidationReport, block_memory, compare, einsum_oom_side, flat, run_torch,
                           torch_variants)

    seed = secrets.randbits(31) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=gen, dtype=torch.float64) for s in input_shapes]
    comparisons, notes = [], []
    for label, factor in (("", 1.0), (" (x8 inputs)", 8.0)):
        inputs = [x * factor for x in base]
        ref = run_torch(module, inputs, torch.float64)
        scale = max(1.0, float(np.abs(ref).max()))
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        outputs = run_engine(plan, {n: x.float().cuda() for n, x in zip(input_names, inputs)})
        peak = torch.cuda.max_memory_allocated() - before
        got = flat([o.double().cpu().numpy() for o in outputs])  # every output, as the reference flattens them
        # a TF32 engine (fp32 graph, --tf32) is held to TF32's tolerance
        comparisons.append(compare(f"tensorrt engine{label}", "tf32" if tf32 and dtype == "fp32" else dtype, got, ref, scale))
        feeds = {i.name: x.float().numpy() for i, x in zip(graph_inputs(unfused), inputs)}
        if dtype != "bf16":  # the unfused graph is typed in `dtype` too; ONNX Runtime's CPU kernels have no bf16
            comparisons.append(compare(f"onnxruntime unfused{label}", dtype, flat(run_onnx(unfused, feeds)), ref, scale))
        for name, variant in torch_variants(module).items():
            got = run_torch(variant, inputs, DTYPES[dtype], "cuda")
            comparisons.append(compare(f"{name} (cuda){label}", dtype, got, ref, scale))
        if not label:
            notes.append(f"engine run: {peak / 1e6:.1f} MB allocated through PyTorch for inputs and outputs "
                         "(the engine's own activation memory is in the sidecar)")
    _, total = torch.cuda.mem_get_info()
    batch = input_shapes[0][0]
    memory = block_memory(blocks, batch, dtype)
    for m in memory:
        side = einsum_oom_side(batch, m.heads, total, dtype)
        notes.append(f"block {m.block}: an einsum attention would run out of this GPU's {total / 1e9:.0f} GB "
                     f"at {side}x{side} pixels (batch {batch})")
    return ValidationReport(dtype, seed, [tuple(s) for s in input_shapes], comparisons, memory, notes)
