"""onnx-tensorrt's plugin path, rule by rule, as the ONNX parser of each supported TensorRT runs it.

TensorRT's ONNX parser is onnx-tensorrt, compiled into libnvonnxparser, which cannot run here (only
TensorRT for RTX's, in `trt_rtx`, which has no plugin layers). This module emulates the part of it
that a plugin node meets, and nothing more permissive: each rule is one function, each cites the
file and line of the onnx-tensorrt commit that the TensorRT release ships (NVIDIA/TensorRT's
`parsers/onnx` submodule at the release tag), and each has a negative test in
`tests/test_parser_rules.py` that fails when the rule is switched off (`without`). The table of
rules x releases is `tests/PARSER_RULES.md`.

Releases (`RELEASES`): the harness drives NVIDIA's `tensorrt.plugin` of a bindings wheel under the
parser rules of the release that wheel belongs to. TensorRT 11.1's commit (7c51a63) is public but
its plugin-path files are not stored where this project can read them, and 11.2-11.4 have no public
commit at all: 11.0's commit (5ab48c5) stands in for them, the newest one whose source was read.
Every rule below reads identically at 10.16 and 11.0.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import numpy as np
import onnx


@dataclass(frozen=True)
class Release:
    tensorrt: str  # the TensorRT release(s) this row is for
    commit: str  # the onnx-tensorrt commit (NVIDIA/TensorRT parsers/onnx at the release tag)
    read: str  # which commit's source the rules were read at, and why it stands in where it differs
    # Each rule's file:line at that commit: tests/PARSER_RULES.md (one table; a test keeps it and RULES alike).


# bindings wheel version (what `trt_harness.tensorrt(version)` loads) -> the parser it meets
RELEASES = {
    "10.16.1.11": Release("10.16", "6bde6596eca84abf9afe9b4d21c18c32800fd3ad", "6bde659 (its own)"),
    "11.4.0.106": Release("11.0-11.4", "5ab48c5c436a5686b8574c4a372cbca224273b5a",
                          "5ab48c5 (11.0's own); 11.1's 7c51a63 is not readable here and 11.2-11.4 have no public "
                          "commit: 11.0's stands in"),
}


class ParseError(Exception):
    """What onnx-tensorrt reports for a node: its error code and description."""

    def __init__(self, code: str, desc: str):
        super().__init__(f"{code}: {desc}")
        self.code, self.desc = code, desc


# ------------------------------------------------------------------- switching a rule off (mutation checks)

_OFF: set[str] = set()


@contextlib.contextmanager
def without(rule: str):
    """The parser with `rule` switched off: a negative test must then fail (tests/test_parser_rules.py)."""
    if rule not in RULES:
        raise KeyError(f"no rule {rule!r}: {sorted(RULES)}")
    _OFF.add(rule)
    try:
        yield
    finally:
        _OFF.discard(rule)


def _on(rule: str) -> bool:
    return rule not in _OFF


# ------------------------------------------------------------------- the rules


def dispatch(core, node: onnx.NodeProto) -> str:
    """"builtin" or "plugin": the importer a node gets. op_type alone picks a builtin importer (the
    domain plays no part); a node with a `plugin_namespace` attribute whose creator is registered under
    exactly (op_type, plugin_version, plugin_namespace) -- no domain fallback at this step -- is
    imported as a plugin even where op_type names a builtin (10.16+: shouldImportAsPlugin); a node
    with no builtin importer goes to the FallbackPluginImporter."""
    has_namespace = any(a.name == "plugin_namespace" for a in node.attribute)
    registered = core.get_plugin_registry().get_creator(
        node.op_type, _string_attr(node, "plugin_version", "1"), _string_attr(node, "plugin_namespace", "")) is not None
    if _on("dispatch") and has_namespace and registered:
        return "plugin"
    if onnx.defs.has(node.op_type):  # onnx-tensorrt's importers are keyed by op_type, whatever the domain
        return "builtin"
    return "plugin"


def _string_attr(node: onnx.NodeProto, name: str, default: str) -> str:
    """OnnxAttrs::get<std::string>: `->s()` with no type check: a non-STRING attribute reads as ""."""
    for a in node.attribute:
        if a.name == name:
            if a.type == onnx.AttributeProto.STRING:
                return a.s.decode()
            return "" if _on("lookup_strings") else str(onnx.helper.get_attribute_value(a))
    return default


def lookup(core, node: onnx.NodeProto):
    """(creator, namespace it was found in). name = op_type, version = `plugin_version` (default "1"),
    namespace = `plugin_namespace` (default ""), then the node's domain as namespace; none: the
    static checker's kINVALID_NODE (it runs before the importer)."""
    registry = core.get_plugin_registry()
    version = _string_attr(node, "plugin_version", "1")
    namespace = _string_attr(node, "plugin_namespace", "")
    creator = registry.get_creator(node.op_type, version, namespace)
    if creator is None and _on("lookup_domain_fallback"):
        namespace = node.domain
        creator = registry.get_creator(node.op_type, version, namespace)
    if creator is None and _on("lookup"):
        raise ParseError("INVALID_NODE", 'creator && "Plugin not found, are the plugin name, version, and namespace correct?"')
    if creator is None:  # rule off: the first creator of that name, whatever its version or namespace
        creator = next(c for (name, _, _), c in registry.creators.items() if name == node.op_type)
    return creator, namespace


_TENSOR_FIELD = {onnx.TensorProto.FLOAT: ("FLOAT32", np.float32), onnx.TensorProto.INT8: ("INT8", np.int8),
                 onnx.TensorProto.INT16: ("INT16", np.int16), onnx.TensorProto.INT32: ("INT32", np.int32),
                 onnx.TensorProto.FLOAT16: ("FLOAT16", np.float16), onnx.TensorProto.DOUBLE: ("FLOAT64", np.float64)}


def load_fields(core, field_names, node: onnx.NodeProto) -> list:
    """loadFields: the creator's declared fields only, in its order (other attributes are dropped with
    no message; a declared field the node lacks is skipped with a warning). The ONNX attribute's type
    decides the field type, never the declared one: FLOAT -> one FLOAT32, INT -> one INT32 (an int64
    truncated), STRING -> CHAR whose length counts the trailing NUL, FLOATS -> FLOAT32 x n, INTS ->
    INT32 x n, STRINGS -> CHAR, each string followed by NUL, TENSOR by its element type; any other
    kind -> an empty field of type 0 (the "unsupported" error is built but never raised)."""
    attrs = {a.name: a for a in node.attribute}
    declared = [f.name for f in field_names] if _on("fields_declared_only") else list(attrs)
    fields = []
    for name in declared:
        a = attrs.get(name)
        if a is None:
            warnings.warn(f"Attribute {name} not found in plugin node! Ensure that the plugin creator has a default "
                          "value defined or the engine may fail to build.", stacklevel=2)
            continue
        kind, data = _field_data(a)
        fields.append(core.PluginField(name, data, getattr(core.PluginFieldType, kind)))
    return fields


def _field_data(a: onnx.AttributeProto):
    t = onnx.AttributeProto
    if not _on("field_types"):  # rule off: every attribute as raw chars
        return "CHAR", onnx.helper.get_attribute_value(a).__repr__().encode()
    if a.type == t.FLOAT:
        return "FLOAT32", np.array([a.f], np.float32)
    if a.type == t.INT:
        return "INT32", np.array([a.i], np.int64).astype(np.int32)  # get<int32_t>: truncated
    if a.type == t.STRING:
        return "CHAR", a.s + b"\0" if _on("string_nul") else a.s
    if a.type == t.FLOATS:
        return "FLOAT32", np.array(a.floats, np.float32)
    if a.type == t.INTS:
        return "INT32", np.array(a.ints, np.int64).astype(np.int32)
    if a.type == t.STRINGS:
        return "CHAR", b"".join(s + b"\0" for s in a.strings)
    if a.type == t.TENSOR and a.t.data_type in _TENSOR_FIELD:
        kind, dtype = _TENSOR_FIELD[a.t.data_type]
        return kind, onnx.numpy_helper.to_array(a.t).astype(dtype).ravel()
    if a.type == t.TENSOR and a.t.data_type == onnx.TensorProto.STRING:
        return "CHAR", b"".join(onnx.numpy_helper.to_array(a.t).ravel())
    if a.type == t.TENSOR:  # MAKE_ERROR(...) not returned: the tensor's data as a field of type {} (0),
        count = int(np.prod(a.t.dims))  # length its element count (TensorRT-RTX's parser: the same)
        return "FLOAT16", np.frombuffer(onnx.numpy_helper.to_array(a.t).tobytes(), np.float16)[:count].copy()
    return "FLOAT16", None  # other kinds: emplaced empty, type {} (0)


def request(core, node: onnx.NodeProto, prefer: str | None):
    """The QuickPluginCreationRequest (Python plugins, TensorRT >= 10.12's core): the node's `aot`
    attribute (read as an int: a non-INT reads 0) forces STRICT_AOT/STRICT_JIT; else the network's
    PREFER_* flag, both at once refused; neither: UNKNOWN."""
    kind = core.QuickPluginCreationRequest
    aot = next((a for a in node.attribute if a.name == "aot"), None)
    if aot is not None and _on("aot"):
        return kind.STRICT_AOT if (aot.i if aot.type == onnx.AttributeProto.INT else 0) else kind.STRICT_JIT
    if prefer == "both":
        raise ParseError("UNSUPPORTED_GRAPH", "Both NetworkDefinitionCreationFlag::kPREFER_AOT_PYTHON_PLUGINS and "
                         "NetworkDefinitionCreationFlag::kPREFER_JIT_PYTHON_PLUGINS cannot be specified at the same time.")
    return {"aot": kind.PREFER_AOT, "jit": kind.PREFER_JIT, None: kind.UNKNOWN}[prefer]


def inputs(node: onnx.NodeProto) -> list:
    """The plugin layer's inputs: an empty input name is a nullptr in its slot (not compacted). Whether
    TensorRT's addPluginV3 accepts a nullptr is decided inside libnvinfer, which no source shows: the
    harness refuses it (never more permissive than TensorRT)."""
    if _on("optional_inputs") and any(not name for name in node.input):
        raise ParseError("INVALID_NODE", f"Invalid Node - {node.name}: an unset (empty) input reaches addPluginV3 "
                         "as nullptr, which this harness cannot show TensorRT accepts")
    return [name or None for name in node.input]


def outputs(node: onnx.NodeProto, layer_outputs: int) -> list:
    """The node's output names mapped to the layer's outputs: the non-empty names must be exactly as
    many as the layer's outputs (kINVALID_GRAPH otherwise, fewer included, though the message says
    "more"); empty names are skipped and take no layer output."""
    named = [name for name in node.output if name] if _on("output_empty_names") else list(node.output)
    if _on("output_count") and len(named) != layer_outputs:
        raise ParseError("INVALID_GRAPH", f"Node has more output tensors than TRT expected, expected output size is "
                         f"{layer_outputs}, actual output size is {len(named)}.")
    return named


RULES = {"dispatch": dispatch, "lookup": lookup, "lookup_domain_fallback": lookup, "lookup_strings": lookup,
         "fields_declared_only": load_fields, "field_types": load_fields, "string_nul": load_fields,
         "aot": request, "optional_inputs": inputs, "output_count": outputs, "output_empty_names": outputs,
         "created": None}  # parse_node's own check, below


# ------------------------------------------------------------------- the plugin importer


def parse_node(core, node: onnx.NodeProto, prefer: str | None = None):
    """The plugin the FallbackPluginImporter creates for `node`, or ParseError with onnx-tensorrt's
    code and words; `prefer`: the network's PREFER_*_PYTHON_PLUGINS flag ("aot", "jit", "both" or None)."""
    creator, namespace = lookup(core, node)
    fields = core.PluginFieldCollection(load_fields(core, creator.field_names, node))
    args = [node.op_type, namespace, fields, core.TensorRTPhase.BUILD]
    if hasattr(core, "QuickPluginCreationRequest"):  # 10.12+: the request (before: no AOT)
        args.append(request(core, node, prefer))
    # NumPy >= 2.4 refuses int()/float() of a 1-element array, which TensorRT 10's create_plugin does
    # for int and float attributes (11.x takes element 0); NumPy < 2.4 only warns: an error here.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "Conversion of an array with ndim > 0", DeprecationWarning)
        plugin = creator.create_plugin(*args)
    if plugin is None and _on("created"):
        raise ParseError("UNSUPPORTED_NODE", "Could not create the plugin.")
    inputs(node)
    outputs(node, plugin.get_num_outputs())
    return plugin
