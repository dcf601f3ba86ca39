"""NVIDIA's real TensorRT (TensorRT for RTX 1.7.1.116: libnvinfer and onnx-tensorrt, no GPU needed to
parse and build) against what the harness models (`trt_harness`), and the graph around our node
built for real (`trt_rtx`).

(A) the parser's plugin lookup and field loading, RTX's against the harness's, node by node;
(B) every fused graph, its FlashAttention nodes replaced by a native stand-in of the same semantics
    (checked in ONNX Runtime against our custom op), parsed and built, fp32 (TF32 on and off) and
    fp16, at the export shape and with a dynamic profile; `--attention native` graphs too;
(C) what RTX does with our real node: the lookup and our fields, then the end of the process.

RTX's messages are constants here: they are what TensorRT says. Everything runs in child
processes (`trt_rtx.run_many`), several cases per child."""

import subprocess
import sys

import numpy as np
import onnx
import pytest

import trt_harness
import trt_rtx
from convattn.plugins import trt_plugin
from convattn.plugins.op import DOMAIN, LAYOUTS, OP_TYPE, FlashAttentionAttrs, native_attention_applies, output_shape

HARNESS_VERSION = "11.4.0.106"

# What TensorRT-RTX 1.7.1.116 says (parser error descriptions, log lines, the child's stderr).
RTX_NOT_FOUND = 'creator && "Plugin not found, are the plugin name, version, and namespace correct?"'  # INVALID_NODE
RTX_CREATE_RETURNED_NONE = "Assertion failed: plugin: Could not create the plugin."  # UNSUPPORTED_NODE
RTX_V3ONE_ONLY = ("Assertion failed: false: TensorRT-RTX imports IPluginV3 plugins registered with an "
                  "IPluginCreatorV3One creator only.")  # UNSUPPORTED_NODE
RTX_SEARCHING = "Searching for plugin: FlashAttention, plugin_version: 1, plugin_namespace: {}"  # INFO
RTX_DOMAIN_FALLBACK = ("Searching for plugin with node domain namespace: using pluginName: FlashAttention, "
                       "pluginVersion: {}, pluginNamespace: {}")  # INFO, when the attribute namespace finds nothing
RTX_CREATED = "Successfully created plugin: FlashAttention"  # INFO, right before the abort
RTX_ABORT = "terminate called without an active exception"  # stderr; the child ends with SIGABRT
RTX_MISSING_ATTRIBUTE = ("onnxOpImporters.cpp:8789: Attribute tf32 not found in plugin node! Ensure that the plugin "
                         "creator has a default value defined or the engine may fail to build.")  # WARNING
RTX_NO_ATTENTION_KERNEL = "Attention operation was not supported by a dedicated kernel."  # in the build's ERROR
RTX_NO_CUDA = "CUDA driver version is insufficient for CUDA runtime version"  # deserializing a plan, no GPU


# ------------------------------------------------------------------- shared


@pytest.fixture(scope="module")
def rtx_info():
    return trt_rtx.introspect()


@pytest.fixture(scope="module")
def our_fields():
    """(name, PluginFieldType name) of our plugin's creator, as NVIDIA's `tensorrt.plugin` declares them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trt_plugin, "_arch", lambda: "sm_90")
        with trt_harness.tensorrt(HARNESS_VERSION) as (core, _):
            trt_plugin.register_plugin()
            creator = core.get_plugin_registry().get_creator(OP_TYPE, "1", "convattn")
            return [(f.name, f.type.name) for f in creator.field_names]


def test_our_fields_are_the_attributes_dataclass(our_fields):
    assert [n for n, _ in our_fields] == list(FlashAttentionAttrs.__dataclass_fields__)
    assert {t for _, t in our_fields} == {"CHAR"}


def _node_model(node: onnx.NodeProto) -> onnx.ModelProto:
    """The node alone, on NCHW (1, 16, 7, 9) inputs q, k, v."""
    vi = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 16, 7, 9]) for n in "qkv"]
    out = onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)
    opsets = [onnx.helper.make_opsetid("", 18)] + [onnx.helper.make_opsetid(d, 1) for d in {node.domain} if d]
    return onnx.helper.make_model(onnx.helper.make_graph([node], "g", vi, [out]), opset_imports=opsets)


def _fields_of_rtx(call) -> list:
    return [(f["name"], f["type"], f["length"], None if f["bytes"] is None else bytes.fromhex(f["bytes"]))
            for f in call["fields"]]


def _fields_of_harness(fields) -> list:
    def data(f):
        try:
            return f.data.tobytes()
        except AttributeError:  # "No known conversion for returning data from PluginField" (FLOAT16, ...)
            return None

    return [(f.name, f.type.name, int(f.size), data(f)) for f in fields]


def _harness_outcomes(nodes: dict) -> dict:
    """name -> {"found", "fields", "phase", "error"}: `trt_harness.parse_node` on each node, with NVIDIA's
    create_plugin of our registered creator wrapped to record what it is handed (found = it was called)."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trt_plugin, "_arch", lambda: "sm_90")
        with trt_harness.tensorrt(HARNESS_VERSION) as (core, _):
            trt_plugin.register_plugin()
            creator = core.get_plugin_registry().get_creator(OP_TYPE, "1", "convattn")
            original = creator.create_plugin
            for name, node in nodes.items():
                calls = []

                def recording(*args, _calls=calls):
                    _calls.append(args)
                    return original(*args)

                mp.setattr(creator, "create_plugin", recording)
                error = error_obj = None
                try:
                    trt_harness.parse_node(core, node)
                except Exception as e:  # noqa: BLE001  (ParseError, or what create_plugin raised)
                    error, error_obj = f"{type(e).__name__}: {e}", e
                found = bool(calls)
                out[name] = {"found": found, "error": error, "code": getattr(error_obj, "code", None),
                             "fields": _fields_of_harness(calls[0][2]) if found else None,
                             "phase": calls[0][3].name if found else None}
    return out


# ------------------------------------------------------------------- (A) lookup and fields


def _ours(**changes) -> onnx.NodeProto:
    """Our node as the fuser makes it (two outputs: the output and its scratch), attributes changed
    (a value of None removes the attribute); `domain`/`name` change the node itself."""
    domain, name = changes.pop("domain", DOMAIN), changes.pop("name", "n")
    attrs = FlashAttentionAttrs(2, 0.35, "NCHW", "NCHW", "NCHW", "NCHW").onnx_attributes("aot")
    attrs.update(changes)
    attrs = {k: v for k, v in attrs.items() if v is not None}
    return onnx.helper.make_node(OP_TYPE, ["q", "k", "v"], ["o", "o_scratch"], name, domain=domain, **attrs)


# name -> the node; what RTX does with each is asserted in the tests below.
NODES = {
    "ours_aot": _ours(),
    "ours_jit": _ours(aot=0),
    "wrong_plugin_version": _ours(plugin_version="2"),
    "wrong_plugin_namespace": _ours(plugin_namespace="other"),
    "no_plugin_namespace": _ours(plugin_namespace=None),
    "no_plugin_namespace_ort_domain": _ours(plugin_namespace=None, domain="ai.onnx.contrib"),
    "plugin_namespace_in_another_domain": _ours(domain="other"),
    "undeclared_extra_attribute": _ours(extra="x"),
    "declared_attribute_missing": _ours(tf32=None),
    "int_attribute": _ours(num_heads=2),
    "float_attribute": _ours(scale=0.35),
    "ints_attribute": _ours(num_heads=[2, 3]),
    "floats_attribute": _ours(scale=[0.5, 0.25]),
    "strings_attribute": _ours(q_layout=["NCHW", "BSC"]),
    "int64_attribute": _ours(num_heads=2**33 + 2),
    "tensor_float_attribute": _ours(num_heads=onnx.numpy_helper.from_array(np.array([[1, 2], [3, 4]], np.float32))),
    "tensor_int32_attribute": _ours(num_heads=onnx.numpy_helper.from_array(np.array([1, 2], np.int32))),
    "tensor_float16_attribute": _ours(num_heads=onnx.numpy_helper.from_array(np.array([1, 2], np.float16))),
    "tensor_int64_attribute": _ours(num_heads=onnx.numpy_helper.from_array(np.array([1, 2], np.int64))),
    "int_plugin_version": _ours(plugin_version=1),
    "int_plugin_namespace": _ours(plugin_namespace=7),
    "default_domain": _ours(domain=""),
}
FOUND_BY_RTX = {  # what TensorRT-RTX's lookup did (observed, and asserted in test_rtx_lookup)
    "wrong_plugin_version": False,
    "no_plugin_namespace_ort_domain": False,
    "int_plugin_version": False,  # a non-STRING plugin_version reads as ""
}


@pytest.fixture(scope="module")
def lookups(our_fields):
    """(RTX result, harness outcome) per NODES entry; RTX in one child, create_plugin returning None."""
    cases = [trt_rtx.case(_node_model(n), creator=trt_rtx.creator_spec(our_fields), label=k) for k, n in NODES.items()]
    rtx = dict(zip(NODES, trt_rtx.run_many(cases)))
    return rtx, _harness_outcomes(NODES)


@pytest.mark.parametrize("name", list(NODES))
def test_rtx_lookup(lookups, name):
    """RTX's own outcome, with its messages: found nodes reach create_plugin (which returned None
    here: the parser then fails the node), others fail the parser's static check."""
    rtx = lookups[0][name]
    assert rtx["returncode"] == 0 and rtx["parsed"] is False, rtx
    [error] = rtx["errors"]
    assert error["node_name"] == "n" and error["node_operator"] == OP_TYPE
    if FOUND_BY_RTX.get(name, True):
        assert rtx["call"] is not None
        assert (error["desc"], error["code"]) == (RTX_CREATE_RETURNED_NONE, "UNSUPPORTED_NODE")
    else:
        assert rtx["call"] is None
        assert (error["desc"], error["code"]) == (RTX_NOT_FOUND, "INVALID_NODE")


@pytest.mark.parametrize("name", list(NODES))
def test_lookup_and_fields_agree_with_the_harness(lookups, name):
    """Same creator found or not, same field names, types, lengths and bytes, same phase."""
    rtx, harness = lookups[0][name], lookups[1][name]
    rtx_found = rtx["call"] is not None
    assert harness["found"] == rtx_found, (
        f"RTX {'found' if rtx_found else 'did not find'} the creator "
        f"({[e['desc'] for e in rtx['errors']]}; {[m for m in trt_rtx.messages(rtx, 'INFO') if 'plugin' in m]}); "
        f"the harness {'did' if harness['found'] else 'did not'} ({harness['error']})")
    if rtx_found:
        assert harness["fields"] == _fields_of_rtx(rtx["call"])
        assert harness["phase"] == rtx["call"]["phase"] == "BUILD"
    elif harness["code"] is not None:  # the harness's ParseError carries onnx-tensorrt's error code
        assert harness["code"] == rtx["errors"][0]["code"]


def test_rtx_namespace_falls_back_to_the_node_domain(lookups):
    """onnx-tensorrt's FallbackPluginImporter: plugin_namespace (default "") first, then the node's domain."""
    rtx = lookups[0]
    for name, namespace in (("wrong_plugin_namespace", "other"), ("no_plugin_namespace", "")):
        info = trt_rtx.messages(rtx[name], "INFO")
        assert RTX_DOMAIN_FALLBACK.format("1", DOMAIN) in info and RTX_SEARCHING.format(namespace) in info
    assert RTX_DOMAIN_FALLBACK.format("1", "ai.onnx.contrib") in trt_rtx.messages(rtx["no_plugin_namespace_ort_domain"])
    assert RTX_SEARCHING.format(DOMAIN) in trt_rtx.messages(rtx["plugin_namespace_in_another_domain"], "INFO")
    # a non-STRING plugin_namespace reads as "", then the domain; a non-STRING plugin_version as "": not found
    assert RTX_DOMAIN_FALLBACK.format("1", DOMAIN) in trt_rtx.messages(rtx["int_plugin_namespace"], "INFO")
    assert RTX_DOMAIN_FALLBACK.format("", DOMAIN) in trt_rtx.messages(rtx["int_plugin_version"], "INFO")


def test_rtx_field_encoding(lookups):
    """STRING: kCHAR, length counting the trailing NUL; INT: one kINT32; FLOAT: one kFLOAT32 (rounded);
    INTS/FLOATS: kINT32/kFLOAT32 arrays; STRINGS: kCHAR, each string NUL-terminated, concatenated;
    undeclared attributes (`aot`, `plugin_*`, extras) are not passed; a declared one missing is warned about."""
    rtx = lookups[0]

    def field(name, key):
        return next(f for f in _fields_of_rtx(rtx[name]["call"]) if f[0] == key)

    assert field("ours_aot", "q_layout") == ("q_layout", "CHAR", 5, b"NCHW\0")
    assert field("ours_aot", "scale") == ("scale", "CHAR", 5, b"0.35\0")
    assert field("int_attribute", "num_heads") == ("num_heads", "INT32", 1, np.int32(2).tobytes())
    assert field("float_attribute", "scale") == ("scale", "FLOAT32", 1, np.float32(0.35).tobytes())
    assert field("ints_attribute", "num_heads") == ("num_heads", "INT32", 2, np.array([2, 3], np.int32).tobytes())
    assert field("floats_attribute", "scale") == ("scale", "FLOAT32", 2, np.array([0.5, 0.25], np.float32).tobytes())
    assert field("strings_attribute", "q_layout") == ("q_layout", "CHAR", 9, b"NCHW\0BSC\0")
    assert [f[0] for f in _fields_of_rtx(rtx["undeclared_extra_attribute"]["call"])] == \
        list(FlashAttentionAttrs.__dataclass_fields__)
    assert field("int64_attribute", "num_heads") == ("num_heads", "INT32", 1, np.int32(2).tobytes())  # truncated
    assert field("tensor_float_attribute", "num_heads") == ("num_heads", "FLOAT32", 4,
                                                            np.array([1, 2, 3, 4], np.float32).tobytes())
    assert field("tensor_int32_attribute", "num_heads") == ("num_heads", "INT32", 2, np.array([1, 2], np.int32).tobytes())
    # FLOAT16 (PluginFieldType 0): the bindings cannot return its data; an int64 tensor arrives so typed too
    assert field("tensor_float16_attribute", "num_heads") == ("num_heads", "FLOAT16", 2, None)
    assert field("tensor_int64_attribute", "num_heads") == ("num_heads", "FLOAT16", 2, None)
    missing = rtx["declared_attribute_missing"]
    assert "tf32" not in [f[0] for f in _fields_of_rtx(missing["call"])]
    assert RTX_MISSING_ATTRIBUTE in trt_rtx.messages(missing, "WARNING")


@pytest.fixture(scope="module")
def creator_variants(our_fields):
    """RTX with other creators on our node: fields declared in reverse, `aot` declared, a V3Quick creator
    (what NVIDIA's `tensorrt.plugin` registers), none at all."""
    model = _node_model(_ours())
    jit = _node_model(_ours(aot=0))
    variants = {
        "reversed": trt_rtx.creator_spec(our_fields[::-1]),
        "aot_declared": trt_rtx.creator_spec([*our_fields, ("aot", "INT32")]),
        "v3quick": trt_rtx.creator_spec(our_fields, kind="v3quick"),
        "none": None,
    }
    cases = [trt_rtx.case(model, creator=c, label=k) for k, c in variants.items()]
    cases.append(trt_rtx.case(jit, creator=variants["aot_declared"], label="aot_declared_jit"))
    return dict(zip([*variants, "aot_declared_jit"], trt_rtx.run_many(cases)))


def test_rtx_passes_fields_in_the_creators_order_as_the_harness(creator_variants, our_fields):
    rtx = creator_variants["reversed"]
    assert [f[0] for f in _fields_of_rtx(rtx["call"])] == [n for n, _ in our_fields[::-1]]
    with trt_harness.tensorrt(HARNESS_VERSION) as (core, _):
        declared = [core.PluginField(n, np.array([], np.int8), getattr(core.PluginFieldType, t))
                    for n, t in our_fields[::-1]]
        assert _fields_of_harness(trt_harness.load_fields(core, declared, _ours())) == _fields_of_rtx(rtx["call"])


def test_rtx_v3one_create_plugin_gets_the_node_name_fields_and_phase_only(creator_variants, rtx_info):
    """IPluginCreatorV3One.create_plugin(name, fields, phase): the node's name, BUILD, no
    QuickPluginCreationRequest (RTX has none); `aot` reaches a V3One creator only as a declared field."""
    call = creator_variants["reversed"]["call"]
    assert call["nargs"] == 3 and call["arg_types"] == ["str", "PluginFieldCollection_", "TensorRTPhase"]
    assert call["strings"] == ["n"] and call["phase"] == "BUILD" and call["others"] == []
    assert rtx_info["has"]["QuickPluginCreationRequest"] is False
    for name, value in (("aot_declared", 1), ("aot_declared_jit", 0)):
        aot = next(f for f in _fields_of_rtx(creator_variants[name]["call"]) if f[0] == "aot")
        assert aot == ("aot", "INT32", 1, np.int32(value).tobytes())


def test_rtx_refuses_v3quick_creators_and_reports_a_missing_one(creator_variants):
    quick = creator_variants["v3quick"]
    assert quick["call"] is None and RTX_SEARCHING.format(DOMAIN) in trt_rtx.messages(quick, "INFO")
    assert [(e["desc"], e["code"]) for e in quick["errors"]] == [(RTX_V3ONE_ONLY, "UNSUPPORTED_NODE")]
    none = creator_variants["none"]
    assert [(e["desc"], e["code"]) for e in none["errors"]] == [(RTX_NOT_FOUND, "INVALID_NODE")]


def _relu(domain, **attrs) -> onnx.ModelProto:
    node = onnx.helper.make_node("Relu", ["x"], ["y"], "r", domain=domain, **attrs)
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    opsets = [onnx.helper.make_opsetid("", 18)] + ([onnx.helper.make_opsetid(domain, 1)] if domain else [])
    return onnx.helper.make_model(graph, opset_imports=opsets)


RELU_CREATOR = trt_rtx.creator_spec(["alpha"], name="Relu", namespace="convattn")
DISPATCH = {  # name -> (model, whether a creator named Relu is registered in namespace convattn)
    "builtin_op_in_our_domain": (_relu(DOMAIN), False),
    "builtin_op_in_our_domain_creator_registered": (_relu(DOMAIN), True),
    "builtin_op_with_plugin_namespace": (_relu("", plugin_namespace="convattn"), False),
    "builtin_op_with_plugin_namespace_creator_registered": (_relu("", plugin_namespace="convattn"), True),
    "builtin_op_with_another_plugin_namespace_creator_registered": (_relu("", plugin_namespace="other"), True),
    "builtin_op_with_another_plugin_version_creator_registered": (
        _relu("", plugin_namespace="convattn", plugin_version="2"), True),
    "builtin_op_in_our_domain_with_empty_plugin_namespace_creator_registered": (_relu(DOMAIN, plugin_namespace=""), True),
}


@pytest.fixture(scope="module")
def dispatches():
    cases = [trt_rtx.case(m, creator=RELU_CREATOR if registered else None, label=k) for k, (m, registered) in DISPATCH.items()]
    return dict(zip(DISPATCH, trt_rtx.run_many(cases)))


@pytest.fixture(scope="module")
def harness_dispatches():
    """name -> "builtin" or "plugin": the harness's OnnxParser on each DISPATCH model, with a creator
    named Relu (version 1, namespace convattn) in its registry where the case has one."""
    out = {}
    for name, (model, registered) in DISPATCH.items():
        with trt_harness.tensorrt(HARNESS_VERSION) as (core, _):
            calls = []

            class Creator:
                name, plugin_version = "Relu", "1"
                field_names = core.PluginFieldCollection([core.PluginField("alpha", np.array([], np.int8),
                                                                           core.PluginFieldType.CHAR)])

                def create_plugin(self, *args):
                    calls.append(args)

            if registered:
                core.get_plugin_registry().register_creator(Creator(), "convattn")
            logger = core.Logger()
            parser = core.OnnxParser(core.Builder(logger).create_network(0), logger)
            parsed = parser.parse(model.SerializeToString())
            out[name] = "builtin" if parsed and not calls else "plugin"
    return out


@pytest.mark.parametrize("name", list(DISPATCH))
def test_dispatch_agrees_with_the_harness(dispatches, harness_dispatches, name):
    """Builtin importer or plugin: RTX's (a builtin imports as its layer, no creator called; onnx-tensorrt's
    shouldImportAsPlugin looks the creator up by op_type, plugin_version, plugin_namespace exactly, with
    no domain fallback) against the harness's OnnxParser."""
    rtx = dispatches[name]
    if rtx["parsed"] and rtx["call"] is None:
        rtx_dispatch = "builtin"
        assert [layer["type"] for layer in rtx["network"]["layers"]] == ["ACTIVATION"]
    else:
        rtx_dispatch = "plugin"
        assert rtx["call"] is not None or [e["desc"] for e in rtx["errors"]] == [RTX_NOT_FOUND]
    assert harness_dispatches[name] == rtx_dispatch


def test_a_creator_returning_none_is_the_same_error(lookups):
    """RTX's error code for a creator whose create_plugin returns None, against the harness's parse_node."""
    with trt_harness.tensorrt(HARNESS_VERSION) as (core, _):
        class Creator:
            name, plugin_version = OP_TYPE, "1"
            field_names = core.PluginFieldCollection([])

            def create_plugin(self, *args):
                return None

        core.get_plugin_registry().register_creator(Creator(), "convattn")
        with pytest.raises(trt_harness.ParseError) as e:
            trt_harness.parse_node(core, _ours())
    [rtx_error] = lookups[0]["ours_aot"]["errors"]
    assert rtx_error["desc"] == RTX_CREATE_RETURNED_NONE
    assert getattr(e.value, "code", None) == rtx_error["code"] == "UNSUPPORTED_NODE"


def test_rtx_flags(rtx_info):
    """Strong typing: STRONGLY_TYPED is RTX's only creation flag, deprecated and set on every network
    (create_network(0) has it); no PREFER_*_PYTHON_PLUGINS. Builder: TF32 on by default, no FP16/BF16/INT8."""
    assert rtx_info["version"] == trt_rtx.VERSION
    assert rtx_info["network_creation_flags"] == ["STRONGLY_TYPED"]
    assert rtx_info["strongly_typed_of_create_network_0"] is True
    assert rtx_info["default_builder_flags"] == ["TF32"]
    assert not {"FP16", "BF16", "INT8", "FP8", "STRONGLY_TYPED"} & set(rtx_info["builder_flags"])
    assert rtx_info["network_has_add_plugin_v3"] is False


# ------------------------------------------------------------------- (C) our real node


@pytest.fixture(scope="module")
def fused_demo():
    from conftest import cached

    return cached(("einsum", "dynamo", 18))[3].model


def _typed(fused, plugin_mode="aot", dtype="fp32"):
    from convattn.exporter.fuse import set_plugin_mode
    from convattn.exporter.precision import cast_graph

    return cast_graph(set_plugin_mode(fused, plugin_mode), dtype)


@pytest.fixture(scope="module")
def our_node_on_rtx(fused_demo, our_fields):
    """The fused demo graph (our real node, as the fuser makes it) on RTX: a V3One creator of our fields
    returning a plugin (aot fp32, jit fp16), returning None, a V3Quick creator, no creator."""
    graphs = {"aot_fp32": _typed(fused_demo), "jit_fp16": _typed(fused_demo, "jit", "fp16")}
    spec = trt_rtx.creator_spec(our_fields, returns="plugin")
    cases = [trt_rtx.case(graphs["aot_fp32"], creator=trt_rtx.creator_spec(our_fields), label="returns_none"),
             trt_rtx.case(graphs["aot_fp32"], creator=trt_rtx.creator_spec(our_fields, kind="v3quick"), label="v3quick"),
             trt_rtx.case(graphs["aot_fp32"], creator=None, label="no_creator"),
             trt_rtx.case(graphs["aot_fp32"], creator=spec, label="aot_fp32"),
             trt_rtx.case(graphs["jit_fp16"], creator=spec, label="jit_fp16")]
    return graphs, {c["label"]: r for c, r in zip(cases, trt_rtx.run_many(cases))}


@pytest.mark.parametrize("graph", ["aot_fp32", "jit_fp16"])
def test_our_node_reaches_create_plugin_with_the_harness_fields_then_rtx_aborts(our_node_on_rtx, graph, our_fields):
    """onnx-tensorrt finds our creator, hands it exactly the fields the harness's load_fields makes,
    logs that it created the plugin, and then TensorRT-RTX ends the process (its networks have no
    plugin layers: no INetworkDefinition.add_plugin_v3)."""
    graphs, results = our_node_on_rtx
    rtx = results[graph]
    [node] = [n for n in graphs[graph].graph.node if n.op_type == OP_TYPE]
    assert rtx["returncode"] == -6 and RTX_ABORT in rtx["stderr"]
    info = trt_rtx.messages(rtx, "INFO")
    assert info[-2:] == [RTX_SEARCHING.format(DOMAIN), RTX_CREATED]
    assert rtx["call"]["strings"] == [node.name] and rtx["call"]["phase"] == "BUILD"
    with trt_harness.tensorrt(HARNESS_VERSION) as (core, _):
        declared = [core.PluginField(n, np.array([], np.int8), getattr(core.PluginFieldType, t)) for n, t in our_fields]
        assert _fields_of_rtx(rtx["call"]) == _fields_of_harness(trt_harness.load_fields(core, declared, node))
    assert rtx["plugin_calls"] == []  # nothing of the plugin was called before the end


def test_our_node_other_creators(our_node_on_rtx):
    graphs, results = our_node_on_rtx
    [node] = [n for n in graphs["aot_fp32"].graph.node if n.op_type == OP_TYPE]
    expected = {"returns_none": (RTX_CREATE_RETURNED_NONE, "UNSUPPORTED_NODE"),
                "v3quick": (RTX_V3ONE_ONLY, "UNSUPPORTED_NODE"), "no_creator": (RTX_NOT_FOUND, "INVALID_NODE")}
    for label, (desc, code) in expected.items():
        r = results[label]
        assert r["returncode"] == 0 and r["parsed"] is False
        assert [(e["desc"], e["code"], e["node_name"]) for e in r["errors"]] == [(desc, code, node.name)]


def test_nvidias_plugin_layer_cannot_load_over_rtx():
    """Our plugin cannot even be registered on TensorRT-RTX: NVIDIA's `tensorrt.plugin` (11.4) needs
    core classes RTX does not have (its first: ISymExpr)."""
    root = trt_harness._plugin_root(HARNESS_VERSION)
    code = ("import sys, tensorrt_rtx_bindings as trt\n"
            f"trt.__path__ = [{str(root)!r}]\n"
            "sys.modules['tensorrt'] = trt\n"
            "import tensorrt.plugin\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=trt_rtx._child_env(trt_rtx.rtx_path()))
    assert proc.returncode == 1
    assert "AttributeError: module 'tensorrt_rtx_bindings' has no attribute 'ISymExpr'" in proc.stderr


# ------------------------------------------------------------------- (B) the graph around our node


GRAPHS = ["demo", "d64", "cross", "sdpa", "windowed_dynamo", "windowed_torchscript"]
KEYS = {"demo": ("einsum", "dynamo", 18), "d64": ("einsum_d64", "dynamo", 18), "cross": ("cross", "dynamo", 18),
        "sdpa": ("sdpa", "dynamo", 23)}


@pytest.fixture(scope="module")
def graphs():
    """name -> (input names, export shapes, fused model, --attention native model, head dim)."""
    import user_models
    from conftest import cached

    from convattn.exporter.export import export_onnx
    from convattn.exporter.fuse import fuse_attention

    out = {}
    for name in GRAPHS:
        if name in KEYS:
            _, shapes, exported, fusion = cached(KEYS[name])
        else:
            exported = export_onnx(user_models.WindowedAttention().eval(), [(1, 16, 64, 64)],
                                   exporter=name.split("_")[1])
            shapes = exported.input_shapes
            fusion = fuse_attention(exported.model, shapes)
        [block] = fusion.fused
        native = fuse_attention(exported.model, shapes, attention="native").model
        assert any(n.op_type == OP_TYPE for n in fusion.model.graph.node)
        out[name] = (list(exported.input_names), [tuple(s) for s in shapes], fusion.model, native,
                     block.details["head_dim"])
    return out


def _copy(m):
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("name", GRAPHS)
def test_stand_in_computes_what_our_node_computes(graphs, name, dtype):
    """The stand-in (both forms) against the fused graph run with our custom op, batch 2."""
    from convattn.exporter.precision import cast_graph
    from convattn.plugins import ort_op

    names, shapes, fused, _, _ = graphs[name]
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((2, *s[1:])).astype(np.float32) for n, s in zip(names, shapes)}
    ours = ort_op.run(cast_graph(_copy(fused), dtype), feeds)
    tol = {"fp32": 1e-5, "fp16": 2e-3}[dtype]
    for attention in ("onnx", "matmul"):
        stand_in = trt_rtx.native_stand_in(fused, attention)
        assert not any(n.domain == DOMAIN for n in stand_in.graph.node)
        theirs = ort_op.session(cast_graph(stand_in, dtype)).run(None, feeds)
        assert len(theirs) == len(ours)
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(b, a, rtol=tol, atol=tol, err_msg=f"{name} {dtype} {attention}")


def _layout_shape(layout, s, hw):
    return {"NCHW": (2, 16, *hw), "BHSD": (2, 2, s, 8), "BHDS": (2, 2, 8, s), "BSC": (2, s, 16), "SBC": (s, 2, 16)}[layout]


LAYOUT_COMBINATIONS = [(q, kv, o) for q in LAYOUTS for kv in LAYOUTS for o in LAYOUTS if o != "NCHW" or q == "NCHW"]


@pytest.mark.parametrize("q_layout,kv_layout,out_layout", LAYOUT_COMBINATIONS)
def test_stand_in_every_layout(q_layout, kv_layout, out_layout):
    """One node, every layout combination (an NCHW output takes H, W from an NCHW query): the stand-in
    against our custom op (the CPU reference). heads 2, D 8, S_q 5 x 7, S_kv 4 x 6."""
    from convattn.plugins import ort_op

    attrs = FlashAttentionAttrs(2, 0.3, q_layout, kv_layout, kv_layout, out_layout)
    node = onnx.helper.make_node(OP_TYPE, ["q", "k", "v"], ["o", "o_scratch"], "n", domain=DOMAIN,
                                 **attrs.onnx_attributes("aot"))
    shapes = {"q": _layout_shape(q_layout, 35, (5, 7)), "k": _layout_shape(kv_layout, 24, (4, 6)),
              "v": _layout_shape(kv_layout, 24, (4, 6))}
    vi = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in shapes.items()]
    out_shape = output_shape(shapes["q"], shapes["v"], attrs)
    graph = onnx.helper.make_graph([node], "g", vi, [onnx.helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT,
                                                                                          out_shape)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid(DOMAIN, 1)])
    rng = np.random.default_rng(2)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    [ours] = ort_op.run(model, feeds)
    for attention in ("onnx", "matmul"):
        [theirs] = ort_op.session(trt_rtx.native_stand_in(model, attention)).run(None, feeds)
        assert theirs.shape == ours.shape
        np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)


PROFILES = ["export", "dynamic"]


def _profile(names, shapes, kind):
    """export: min = opt = max = the export shape (build_engine's default); dynamic: batch and spatial
    dims up to 2x."""
    from convattn.exporter.engine import parse_profiles

    if kind == "export":
        return parse_profiles(names, shapes)
    big = ",".join(f"{n}:" + "x".join(str(d * (1 if i == 1 else 2)) for i, d in enumerate(s)) for n, s in zip(names, shapes))
    return parse_profiles(names, shapes, max_shape=big)


def _build_case(model, names, shapes, kind, dtype, tf32, label):
    """As build_engine does: typed graph, fixed_dims for the profile, TF32 cleared unless asked."""
    from convattn.exporter.engine import fixed_dims
    from convattn.exporter.precision import cast_graph

    profile = _profile(names, shapes, kind)
    typed = fixed_dims(cast_graph(_copy(model), dtype), profile)
    return trt_rtx.case(typed, build=True, tf32=tf32, label=label,
                        profile={n: [list(d) for d in v] for n, v in profile.shapes.items()})


BUILDS = [(n, d, p) for n in GRAPHS for d in ("fp32", "fp16") for p in PROFILES]


@pytest.fixture(scope="module")
def builds(graphs):
    """Every build case in one child: label -> result."""
    cases = []
    for name, dtype, kind in BUILDS:
        names, shapes, fused, native, _ = graphs[name]
        matmul, attention = trt_rtx.native_stand_in(fused, "matmul"), trt_rtx.native_stand_in(fused, "onnx")
        cases.append(_build_case(matmul, names, shapes, kind, dtype, False, f"matmul {name} {dtype} {kind}"))
        cases.append(_build_case(native, names, shapes, kind, dtype, False, f"native {name} {dtype} {kind}"))
        if kind == "dynamic":
            cases.append(_build_case(attention, names, shapes, kind, dtype, False, f"onnx {name} {dtype} {kind}"))
        if dtype == "fp32":
            cases.append(_build_case(matmul, names, shapes, kind, dtype, True, f"matmul {name} {dtype} {kind} tf32"))
    return {c["label"]: r for c, r in zip(cases, trt_rtx.run_many(cases))}


def _assert_built(r):
    errors = [m for m in trt_rtx.messages(r, "ERROR") if RTX_NO_CUDA not in m]
    assert r["returncode"] == 0 and r["parsed"] is True and r["errors"] == [], r["errors"]
    assert r["built"] is True and r["plan_bytes"] > 0, errors
    assert r["network"]["strongly_typed"] is True
    assert not [layer for layer in r["network"]["layers"] if layer["type"].startswith("PLUGIN")]


@pytest.mark.parametrize("name,dtype,kind", BUILDS)
def test_graph_around_our_node_builds(builds, name, dtype, kind):
    """The fused graph with a MatMul/Softmax stand-in for our node: parsed and built by TensorRT-RTX,
    fp32 with TF32 cleared and set (the flag as asked), fp16; the export shape and a dynamic profile."""
    r = builds[f"matmul {name} {dtype} {kind}"]
    _assert_built(r)
    assert r["builder_flags"]["TF32"] is False
    if dtype == "fp32":
        tf32 = builds[f"matmul {name} {dtype} {kind} tf32"]
        _assert_built(tf32)
        assert tf32["builder_flags"]["TF32"] is True
    # the plan builds with no GPU; it cannot be deserialized here
    assert r["engine_info"] is None and any(RTX_NO_CUDA in m for m in trt_rtx.messages(r, "ERROR"))


@pytest.mark.parametrize("name,dtype", [(n, d) for n in GRAPHS for d in ("fp32", "fp16")])
def test_onnx_attention_stand_in_builds_where_native_attention_applies(builds, graphs, name, dtype):
    """With a dynamic profile, TensorRT-RTX builds ONNX Attention (IAttention) exactly where
    `native_attention_applies` says TensorRT fuses attention itself (fp16, 16 <= head_dim <= 256, % 8)."""
    r = builds[f"onnx {name} {dtype} dynamic"]
    assert r["parsed"] is True and any(layer["type"] == "ATTENTION_INPUT" for layer in r["network"]["layers"])
    applies = native_attention_applies(dtype, graphs[name][4])
    if applies:
        _assert_built(r)
    else:
        assert r["built"] is False
        assert any(RTX_NO_ATTENTION_KERNEL in m for m in trt_rtx.messages(r, "ERROR"))


@pytest.mark.parametrize("name,dtype,kind", BUILDS)
def test_attention_native_graphs_build(builds, graphs, name, dtype, kind):
    """`--attention native` graphs (no node of ours) parsed and built for real; the one that keeps an ONNX
    Attention node (the SDPA export at opset 23) builds with a dynamic profile only where
    `native_attention_applies`."""
    r = builds[f"native {name} {dtype} {kind}"]
    native = graphs[name][3]
    has_attention = any(n.op_type == "Attention" for n in native.graph.node)
    if has_attention and kind == "dynamic" and not native_attention_applies(dtype, graphs[name][4]):
        assert r["parsed"] is True and r["built"] is False
        assert any(RTX_NO_ATTENTION_KERNEL in m for m in trt_rtx.messages(r, "ERROR"))
    else:
        _assert_built(r)
