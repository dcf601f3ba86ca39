"""NVIDIA's TensorRT for RTX (a real libnvinfer and onnx-tensorrt) on a machine without a GPU.

TensorRT-RTX 1.7.1.116 (PyPI: `tensorrt-rtx-cu12-bindings`, `tensorrt-rtx-cu12-libs`; import name
`tensorrt_rtx_bindings`, which loads its libraries through `tensorrt_rtx_libs`, ctypes over the
wheel's own `.so` files) creates builders, networks and ONNX parsers and builds engines of native
layers with no GPU. Its ONNX parser is onnx-tensorrt: on a plugin node it does the real creator
lookup and field loading, calls the creator, and then ends the process (`std::terminate`: an RTX
network has no plugin layers). So everything runs in a child process:

- `rtx_path()`: the wheels, fetched on first use into `.trt-wheels/` (or $CONVATTN_TRT_WHEELS) and
  extracted to `.trt-wheels/tensorrt-rtx-1.7.1.116/`; a wheel that cannot be had fails in CI
  (env CI set), else skips.
- `run(model, ...)` / `run_many(cases)`: parse (and build) in child processes, several cases per
  child, a fresh child after one that aborted; every log line, the creator's call and the results
  stream to the parent as they happen, so an abort loses nothing.
- `native_stand_in(model)`: every FlashAttention node replaced by native ONNX of the same
  semantics (layout views, attention, output layout), so the graph around it can be built for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

VERSION = "1.7.1.116"
PACKAGES = ("tensorrt-rtx-cu12-bindings", "tensorrt-rtx-cu12-libs")
IMPORT_NAME = "tensorrt_rtx_bindings"
WHEEL_DIR = Path(os.environ.get("CONVATTN_TRT_WHEELS", Path(__file__).resolve().parents[1] / ".trt-wheels"))
CHILD_TIMEOUT_S = 120  # one child process (several cases); a hung child is killed


def _unavailable(message: str):
    import pytest

    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def rtx_path() -> Path:
    """The folder holding `tensorrt_rtx_bindings` and `tensorrt_rtx_libs` (put it on sys.path)."""
    target = WHEEL_DIR / f"tensorrt-rtx-{VERSION}"
    if (target / IMPORT_NAME / "__init__.py").exists() and (target / "tensorrt_rtx_libs" / "libtensorrt_rtx.so.1").exists():
        return target
    tag = f"{sys.version_info.major}{sys.version_info.minor}"
    wheels = {}
    for package in PACKAGES:
        dist = package.replace("-", "_")
        found = sorted(WHEEL_DIR.glob(f"{dist}-{VERSION}-*.whl"))
        found = [w for w in found if "-py3-" in w.name or f"-cp{tag}-" in w.name]
        if not found:
            WHEEL_DIR.mkdir(parents=True, exist_ok=True)
            got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                                  "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}",
                                  "--platform", "manylinux_2_28_x86_64", f"{package}=={VERSION}", "-d", str(WHEEL_DIR)],
                                 capture_output=True, text=True)
            found = sorted(WHEEL_DIR.glob(f"{dist}-{VERSION}-*.whl"))
            if not found:
                _unavailable(f"cannot get {package}=={VERSION}: {got.stderr.strip()[-300:]}")
        wheels[package] = found[-1]
    # Extract into a fresh folder, then rename: a half-extracted tree is never taken for a whole one.
    WHEEL_DIR.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tensorrt-rtx-{VERSION}-", dir=WHEEL_DIR))
    for wheel in wheels.values():
        with zipfile.ZipFile(wheel) as z:
            z.extractall(staging)
    try:
        staging.rename(target)
    except OSError:  # another process got there first
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return target


# ------------------------------------------------------------------- the parent side


def case(model, *, build: bool = False, profile: dict | None = None, creator: dict | None = None,
         network_flags=(), tf32: bool | None = None, label: str = "") -> dict:
    """One unit of work for `run_many`. model: an onnx.ModelProto, its bytes, or a path.
    profile: {input: (min, opt, max)}; None: every input at its static shape (all must be static).
    creator: a Python IPluginCreatorV3One (`creator_spec`) registered before parsing.
    tf32: None leaves the builder config's default, True sets BuilderFlag.TF32, False clears it."""
    return dict(model=model, build=build, profile=profile, creator=creator, network_flags=list(network_flags),
                tf32=tf32, label=label)


def creator_spec(fields, *, name="FlashAttention", version="1", namespace="convattn", kind="v3one",
                 returns="none", num_outputs=2) -> dict:
    """A Python plugin creator for the child: `fields` are (name, PluginFieldType name) pairs or names
    (CHAR). kind "v3one" (IPluginCreatorV3One) or "v3quick" (IPluginCreatorV3Quick, what NVIDIA's
    `tensorrt.plugin` registers). returns "none" (create_plugin returns None: the parser then fails
    the node) or "plugin" (a minimal IPluginV3 of `num_outputs` outputs: the parser goes on to add it)."""
    fields = [(f, "CHAR") if isinstance(f, str) else tuple(f) for f in fields]
    return dict(name=name, version=version, namespace=namespace, kind=kind, returns=returns,
                num_outputs=num_outputs, fields=fields)


def run(model, *, build: bool = False, profile: dict | None = None, creator: dict | None = None,
        network_flags=(), tf32: bool | None = None) -> dict:
    """One case in its own child: see `case` and `run_many`."""
    return run_many([case(model, build=build, profile=profile, creator=creator, network_flags=network_flags,
                          tf32=tf32)])[0]


def run_many(cases: list[dict], timeout_s: float = CHILD_TIMEOUT_S) -> list[dict]:
    """Run `cases` through TensorRT-RTX in as few child processes as possible: one child runs the
    cases in order; after one that ends it (an abort) or hangs (killed after timeout_s plus 5 s a case),
    a fresh child takes the rest. Per case:

    returncode (0; the child's, negative for a signal, for the case that ended it; None: timed out),
    parsed, errors [{desc, code, node_name, node_operator}], log [[severity, message]], call (what
    create_plugin received, or None), built, plan_bytes, network (flags, layers, inputs, outputs),
    builder_flags, engine_info (the engine inspector's JSON, where the engine deserializes), stderr
    (the child's, for the case that ended it), seconds."""
    import onnx

    path = rtx_path()
    results: list = [None] * len(cases)
    with tempfile.TemporaryDirectory(prefix="convattn-rtx-") as tmp:
        tmp = Path(tmp)
        specs = []
        for i, c in enumerate(cases):
            model = c["model"]
            if isinstance(model, onnx.ModelProto):
                model = model.SerializeToString()
            if isinstance(model, (bytes, bytearray)):
                file = tmp / f"case{i}.onnx"
                file.write_bytes(bytes(model))
                model = str(file)
            specs.append({**c, "model": str(model), "index": i})
        pending = list(range(len(cases)))
        child = 0
        while pending:
            spec_file, events_file = tmp / f"spec{child}.json", tmp / f"events{child}.jsonl"
            spec_file.write_text(json.dumps({"cases": [specs[i] for i in pending], "events": str(events_file)}))
            child += 1
            started = time.monotonic()
            try:
                proc = subprocess.run([sys.executable, __file__, "--child", str(spec_file)], capture_output=True,
                                      text=True, timeout=timeout_s + 5 * len(pending),
                                      env=_child_env(path))
                returncode, stderr, timed_out = proc.returncode, proc.stderr, False
            except subprocess.TimeoutExpired as e:
                returncode, timed_out = None, True
                stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            per_case = _read_events(events_file)
            done = [i for i in pending if per_case.get(i, {}).get("finished")]
            for i in done:
                results[i] = _result(per_case[i], 0)
            rest = [i for i in pending if i not in done]
            if rest:
                first = rest[0]
                if first not in per_case:  # the child died before starting any case: nothing to retry
                    raise RuntimeError(f"TensorRT-RTX child failed (rc {returncode}): {stderr[-2000:]}")
                r = _result(per_case[first], returncode)
                r.update(stderr=stderr[-4000:], timed_out=timed_out,
                         seconds=round(time.monotonic() - started, 3) if r["seconds"] is None else r["seconds"])
                results[first] = r
                rest = rest[1:]
            pending = rest
    return results


def _child_env(path: Path) -> dict:
    """This environment with the RTX wheels' folder first on PYTHONPATH."""
    rest = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), *([rest] if rest else [])])}


def _read_events(file: Path) -> dict:
    per_case: dict = {}
    if not file.exists():
        return per_case
    for line in file.read_text().splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the abort
            continue
        r = per_case.setdefault(e["case"], {"log": [], "plugin_calls": []})
        kind = e.pop("kind")
        if kind == "log":
            r["log"].append(e["line"])
        elif kind == "plugin_call":
            r["plugin_calls"].append(e["method"])
        else:
            r.update({k: v for k, v in e.items() if k != "case"})
            if kind == "end":
                r["finished"] = True
    return per_case


def _result(raw: dict, returncode) -> dict:
    keys = ("label", "parsed", "errors", "call", "built", "plan_bytes", "network", "builder_flags", "engine_info",
            "engine_error", "exception", "seconds")
    out = {k: raw.get(k) for k in keys}
    out.update(returncode=returncode, log=raw.get("log", []), plugin_calls=raw.get("plugin_calls", []),
               stderr="", timed_out=False)
    return out


def messages(result: dict, severity: str | None = None) -> list[str]:
    """The log lines of a result (of one severity: "ERROR", "WARNING", "INFO", "VERBOSE", ...)."""
    return [m for s, m in result["log"] if severity is None or s == severity]


_INTROSPECT = r"""
import json
import tensorrt_rtx_bindings as trt
logger = trt.Logger(trt.Logger.ERROR)
builder = trt.Builder(logger)
network = builder.create_network(0)
config = builder.create_builder_config()
names = lambda enum: list(enum.__members__)
print(json.dumps({
    "version": trt.__version__,
    "network_creation_flags": names(trt.NetworkDefinitionCreationFlag),
    "network_flags_of_create_network_0": int(network.flags),
    "strongly_typed_of_create_network_0": bool(network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)),
    "builder_flags": names(trt.BuilderFlag),
    "default_builder_flags": sorted(f for f in names(trt.BuilderFlag) if config.get_flag(getattr(trt.BuilderFlag, f))),
    "plugin_field_types": names(trt.PluginFieldType),
    "compute_capabilities": names(trt.ComputeCapability),
    "has": {n: hasattr(trt, n) for n in ("QuickPluginCreationRequest", "IPluginCreatorV3One", "IPluginCreatorV3Quick",
                                         "IPluginV3QuickAOTBuild", "ISymExpr", "KernelLaunchParams")},
    "network_has_add_plugin_v3": hasattr(network, "add_plugin_v3"),
    "strongly_typed_doc": trt.NetworkDefinitionCreationFlag.__doc__,
}))
"""


def introspect(timeout_s: float = 60) -> dict:
    """What this TensorRT-RTX offers: its enums (network creation flags, builder flags and the
    default config's, plugin field types), plugin interfaces, read in a child process."""
    proc = subprocess.run([sys.executable, "-c", _INTROSPECT], capture_output=True, text=True, timeout=timeout_s,
                          env=_child_env(rtx_path()))
    if proc.returncode:
        raise RuntimeError(f"TensorRT-RTX introspection failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


# ------------------------------------------------------------------- the native stand-in


def native_stand_in(model, attention: str = "onnx"):
    """A copy of `model` whose FlashAttention nodes are native ONNX of the same semantics:
    per input, its layout -> (B, heads, S, D) (Reshape/Transpose), attention, then the output layout
    (NCHW takes H, W from the query map through Shape/Slice). attention "onnx": ONNX `Attention`
    (opset 23, `scale`; TensorRT imports it as IAttention); "matmul": MatMul, Mul by the scale,
    Softmax, MatMul (what TensorRT builds at any dtype and head dim). The scratch output (a node's
    second one) is dropped: nothing may consume it. The default opset goes to 23 for "onnx"."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from convattn.plugins.op import BIAS_OP_TYPE, DOMAIN, OP_TYPES, FlashAttentionAttrs

    if attention not in ("onnx", "matmul"):
        raise ValueError(f"attention: expected 'onnx' or 'matmul', got {attention!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    used = {n for node in g.node for n in [*node.input, *node.output]} | {i.name for i in g.initializer} \
        | {i.name for i in g.input}
    consumed = {n for node in g.node for n in node.input} | {o.name for o in g.output}

    def fresh(base):
        name, k = base, 0
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        return name

    inits = []

    def const(base, values):
        name = fresh(base)
        inits.append(numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    nodes = []
    for node in g.node:
        if not (node.op_type in OP_TYPES and node.domain == DOMAIN):
            nodes.append(node)
            continue
        for extra in node.output[1:]:
            if extra and extra in consumed:
                raise ValueError(f"{node.name}: its output {extra!r} (the scratch) is consumed; the stand-in has none")
        attrs = FlashAttentionAttrs.from_attributes({a.name: helper.get_attribute_value(a) for a in node.attribute})
        base = node.name or node.output[0]
        new = []

        def add(op, inputs, name, **kw):
            o = fresh(f"{base}/stand_in/{name}")
            new.append(helper.make_node(op, inputs, [o], name=o, **kw))
            return o

        def to_bhsd(t, layout, tag):
            h = attrs.num_heads
            if layout == "BHSD":
                return t
            if layout == "BHDS":
                return add("Transpose", [t], f"{tag}_bhsd", perm=[0, 1, 3, 2])
            if layout == "BSC":  # (B, S, h*D) -> (B, S, h, D) -> (B, h, S, D)
                r = add("Reshape", [t, const(f"{base}/stand_in/{tag}_bshd_shape", [0, 0, h, -1])], f"{tag}_bshd")
                return add("Transpose", [r], f"{tag}_bhsd", perm=[0, 2, 1, 3])
            if layout == "SBC":  # (S, B, h*D) -> (S, B, h, D) -> (B, h, S, D)
                r = add("Reshape", [t, const(f"{base}/stand_in/{tag}_sbhd_shape", [0, 0, h, -1])], f"{tag}_sbhd")
                return add("Transpose", [r], f"{tag}_bhsd", perm=[1, 2, 0, 3])
            # NCHW (B, h*D, H, W) -> (B, h, D, H*W) -> (B, h, S, D); channel = head*D + d, pixel = y*W + x
            shape = add("Shape", [t], f"{tag}_shape")
            hw = add("Slice", [shape, const(f"{base}/stand_in/{tag}_hw_start", [2]),
                               const(f"{base}/stand_in/{tag}_hw_end", [4])], f"{tag}_hw")
            s = add("ReduceProd", [hw], f"{tag}_s", keepdims=1)
            target = add("Concat", [const(f"{base}/stand_in/{tag}_bh", [0, h]), const(f"{base}/stand_in/{tag}_d", [-1]),
                                    s], f"{tag}_bhds_shape", axis=0)
            r = add("Reshape", [t, target], f"{tag}_bhds")
            return add("Transpose", [r], f"{tag}_bhsd", perm=[0, 1, 3, 2])

        q, k, v = (to_bhsd(t, layout, tag) for t, layout, tag in
                   zip(node.input, (attrs.q_layout, attrs.k_layout, attrs.v_layout), "qkv"))
        biased = node.op_type == BIAS_OP_TYPE
        if attention == "onnx" and not biased:
            o = add("Attention", [q, k, v], "attention", scale=float(attrs.scale))
        else:
            kt = add("Transpose", [k], "k_t", perm=[0, 1, 3, 2])
            scores = add("MatMul", [q, kt], "scores")
            scale = fresh(f"{base}/stand_in/scale_fp32")
            inits.append(numpy_helper.from_array(np.array(attrs.scale, np.float32), scale))
            scaled = add("Mul", [scores, add("CastLike", [scale, scores], "scale")], "scaled")
            if biased:  # batch b reads bias[b % Bb]: the scores as (B / Bb, Bb, H, S_q, S_kv) plus the bias
                bias = node.input[3]
                bb = add("Slice", [add("Shape", [bias], "bias_shape"), const(f"{base}/stand_in/b0", [0]),
                                   const(f"{base}/stand_in/b1", [1])], "bias_batch")
                split = add("Concat", [const(f"{base}/stand_in/minus1", [-1]), bb,
                                       add("Slice", [add("Shape", [scaled], "scores_shape"),
                                                     const(f"{base}/stand_in/s1", [1]), const(f"{base}/stand_in/s4", [4])],
                                           "scores_hqk")], "periodic_shape", axis=0)
                periodic = add("Add", [add("Reshape", [scaled, split], "periodic"), bias], "biased")
                scaled = add("Reshape", [periodic, add("Shape", [scaled], "scores_shape_back")], "scores_biased")
            o = add("MatMul", [add("Softmax", [scaled], "probs", axis=-1), v], "attention")
        result = node.output[0]
        if attrs.out_layout == "BHSD":
            new.append(helper.make_node("Identity", [o], [result], name=fresh(f"{base}/stand_in/out")))
        elif attrs.out_layout == "BHDS":
            new.append(helper.make_node("Transpose", [o], [result], name=fresh(f"{base}/stand_in/out"), perm=[0, 1, 3, 2]))
        elif attrs.out_layout == "BSC":  # (B, h, S, D) -> (B, S, h, D) -> (B, S, h*D)
            t = add("Transpose", [o], "o_bshd", perm=[0, 2, 1, 3])
            new.append(helper.make_node("Reshape", [t, const(f"{base}/stand_in/o_bsc_shape", [0, 0, -1])], [result],
                                        name=fresh(f"{base}/stand_in/out")))
        elif attrs.out_layout == "SBC":  # (B, h, S, D) -> (S, B, h, D) -> (S, B, h*D)
            t = add("Transpose", [o], "o_sbhd", perm=[2, 0, 1, 3])
            new.append(helper.make_node("Reshape", [t, const(f"{base}/stand_in/o_sbc_shape", [0, 0, -1])], [result],
                                        name=fresh(f"{base}/stand_in/out")))
        else:  # NCHW: (B, h, D, S) -> (B, h*D, H, W), H and W from the query map
            t = add("Transpose", [o], "o_bhds", perm=[0, 1, 3, 2])
            qshape = add("Shape", [node.input[0]], "q_map_shape")
            hw = add("Slice", [qshape, const(f"{base}/stand_in/o_hw_start", [2]), const(f"{base}/stand_in/o_hw_end", [4])],
                     "q_map_hw")
            target = add("Concat", [const(f"{base}/stand_in/o_bc", [0, -1]), hw], "o_nchw_shape", axis=0)
            new.append(helper.make_node("Reshape", [t, target], [result], name=fresh(f"{base}/stand_in/out")))
        nodes += new
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)
    dropped = {o for node in model.graph.node if node.op_type in OP_TYPES and node.domain == DOMAIN for o in node.output[1:]}
    keep_outputs = [o for o in g.output if o.name not in dropped]
    del g.output[:]
    g.output.extend(keep_outputs)
    keep_vi = [v for v in g.value_info if v.name not in dropped]
    del g.value_info[:]
    g.value_info.extend(keep_vi)
    imports = [o for o in out.opset_import if o.domain != DOMAIN]
    if attention == "onnx":
        for o in imports:
            if o.domain in ("", "ai.onnx"):
                o.version = max(o.version, 23)
    del out.opset_import[:]
    out.opset_import.extend(imports)
    if attention == "onnx" and out.ir_version < 10:
        out.ir_version = 10  # opset 23 needs IR 10 or later for ONNX's checker
    from convattn.external_data import check_model

    check_model(out)  # (a model with external data: checked beside its data)
    return out


# ------------------------------------------------------------------- the child side


def _child(spec_file: str) -> None:  # noqa: C901  (one sequential script)
    spec = json.loads(Path(spec_file).read_text())
    fd = os.open(spec["events"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    current = {"case": None}

    def emit(kind, **data):  # one unbuffered write per event: an abort loses nothing written
        os.write(fd, (json.dumps({"kind": kind, "case": current["case"], **data}, default=repr) + "\n").encode())

    import numpy as np
    import tensorrt_rtx_bindings as trt

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            emit("log", line=[severity.name, msg])

    logger = Logger()  # one per process: TensorRT keeps the first logger it is given
    builder = trt.Builder(logger)
    registry = trt.get_plugin_registry()

    def field_record(f):
        record = {"name": f.name, "type": f.type.name, "length": int(f.size)}
        try:
            data = np.asarray(f.data)
            record.update(dtype=str(data.dtype), bytes=data.tobytes().hex(), data=data.tolist())
        except Exception as e:  # noqa: BLE001  (the bindings refuse some field types)
            record.update(dtype=None, bytes=None, data=None, data_error=f"{type(e).__name__}: {e}")
        return record

    def make_plugin(c):
        class Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
            def __init__(self):
                trt.IPluginV3.__init__(self)
                trt.IPluginV3OneCore.__init__(self)
                trt.IPluginV3OneBuild.__init__(self)
                trt.IPluginV3OneRuntime.__init__(self)
                self.plugin_name, self.plugin_version, self.plugin_namespace = c["name"], c["version"], c["namespace"]
                self.num_outputs = c["num_outputs"]

            def get_capability_interface(self, kind):
                emit("plugin_call", method=f"get_capability_interface({kind.name})")
                return self

            def clone(self):
                emit("plugin_call", method="clone")
                return make_plugin(c)

            def get_output_data_types(self, input_types):
                emit("plugin_call", method="get_output_data_types")
                return [input_types[0]] * c["num_outputs"]

            def get_output_shapes(self, inputs, shape_inputs, exprBuilder):
                emit("plugin_call", method="get_output_shapes")
                return [inputs[0]] * c["num_outputs"]

            def supports_format_combination(self, pos, in_out, num_inputs):
                emit("plugin_call", method="supports_format_combination")
                return True

            def configure_plugin(self, inp, out):
                emit("plugin_call", method="configure_plugin")

            def get_fields_to_serialize(self):
                emit("plugin_call", method="get_fields_to_serialize")
                return trt.PluginFieldCollection([])

        return Plugin()

    def make_creator(c):
        base = trt.IPluginCreatorV3Quick if c["kind"] == "v3quick" else trt.IPluginCreatorV3One

        class Creator(base):
            def __init__(self):
                base.__init__(self)
                self.name, self.plugin_version, self.plugin_namespace = c["name"], c["version"], c["namespace"]
                self.field_names = trt.PluginFieldCollection(
                    [trt.PluginField(n, np.array([], np.int8), getattr(trt.PluginFieldType, t)) for n, t in c["fields"]])

            def create_plugin(self, *args):
                fields = next((a for a in args if isinstance(a, trt.PluginFieldCollection_)), None)
                phase = next((a for a in args if isinstance(a, trt.TensorRTPhase)), None)
                emit("call", call={
                    "nargs": len(args),
                    "arg_types": [type(a).__name__ for a in args],
                    "strings": [a for a in args if isinstance(a, str)],
                    "phase": phase.name if phase is not None else None,
                    "others": [repr(a) for a in args if not isinstance(a, (str, trt.PluginFieldCollection_, trt.TensorRTPhase))],
                    "fields": [field_record(f) for f in fields] if fields is not None else None,
                })
                return make_plugin(c) if c["returns"] == "plugin" else None

        return Creator()

    for c in spec["cases"]:
        current["case"] = c["index"]
        started = time.monotonic()
        emit("start", label=c.get("label", ""), seconds=None)
        creator = None
        if c["creator"]:
            creator = make_creator(c["creator"])
            if not registry.register_creator(creator, c["creator"]["namespace"]):
                emit("exception", exception="register_creator returned False")
        try:
            flags = sum(1 << int(getattr(trt.NetworkDefinitionCreationFlag, n)) for n in c["network_flags"])
            network = builder.create_network(flags)
            parser = trt.OnnxParser(network, logger)
            parsed = bool(parser.parse_from_file(c["model"]))
            errors = []
            for i in range(parser.num_errors):
                e = parser.get_error(i)
                errors.append({"desc": e.desc(), "code": e.code().name, "node_name": e.node_name(),
                               "node_operator": e.node_operator(), "node": e.node()})

            def tensor(t):
                return {"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape)}

            info = {"flags": int(network.flags),
                    "strongly_typed": bool(network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)),
                    "inputs": [tensor(network.get_input(i)) for i in range(network.num_inputs)],
                    "outputs": [tensor(network.get_output(i)) for i in range(network.num_outputs)],
                    "layers": [{"name": network.get_layer(i).name, "type": network.get_layer(i).type.name}
                               for i in range(network.num_layers)]}
            emit("parsed", parsed=parsed, errors=errors, network=info)
            if c["build"] and parsed:
                config = builder.create_builder_config()
                if c["tf32"] is True:
                    config.set_flag(trt.BuilderFlag.TF32)
                elif c["tf32"] is False:
                    config.clear_flag(trt.BuilderFlag.TF32)
                config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
                profile = builder.create_optimization_profile()
                shapes = c["profile"] or {t["name"]: [t["shape"]] * 3 for t in info["inputs"]}
                for name, (lo, opt, hi) in shapes.items():
                    profile.set_shape(name, lo, opt, hi)
                config.add_optimization_profile(profile)
                emit("config", builder_flags={f: bool(config.get_flag(getattr(trt.BuilderFlag, f)))
                                              for f in trt.BuilderFlag.__members__})
                plan = builder.build_serialized_network(network, config)
                emit("built", built=plan is not None, plan_bytes=plan.nbytes if plan is not None else None)
                if plan is not None:
                    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)  # needs a GPU
                    if engine is None:
                        emit("engine", engine_info=None, engine_error="deserialize_cuda_engine returned None")
                    else:
                        inspector = engine.create_engine_inspector()
                        emit("engine", engine_info=json.loads(inspector.get_engine_information(
                            trt.LayerInformationFormat.JSON)), engine_error=None)
        except Exception as e:  # noqa: BLE001
            emit("exception", exception=f"{type(e).__name__}: {e}")
        if creator is not None:
            registry.deregister_creator(creator)
        emit("end", seconds=round(time.monotonic() - started, 3))
    os.close(fd)


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child(sys.argv[2])
