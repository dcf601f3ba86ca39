"""The parser stand-in (`onnx_tensorrt`) tested as TensorRT would judge: each rule has a case TensorRT
rejects (or maps) in a way the rule decides, run over NVIDIA's `tensorrt.plugin` of both bindings
wheels; and each such test is shown to need its rule: with the rule switched off (`without`) the
same case goes the other way (`test_each_rule_is_what_decides_its_case`). Citations per release:
tests/PARSER_RULES.md."""

import pytest

import onnx
import onnx_tensorrt as parser
import trt_harness as h
from convattn.errors import EngineBuildError
from convattn.plugins.op import FlashAttentionAttrs, make_node

ATTRS = FlashAttentionAttrs(2, 0.25)
SHAPES = [("B", 16, "H", "W")] * 3
ENV = {"B": 2, "H": 3, "W": 5}
PLUGIN_NOT_FOUND = 'INVALID_NODE: creator && "Plugin not found, are the plugin name, version, and namespace correct?"'
MORE_OUTPUTS = "INVALID_GRAPH: Node has more output tensors than TRT expected, expected output size is 2, actual output size is {}."


@pytest.fixture
def trt(trt_core):
    return trt_core


def ours(outputs=("o", "o_scratch"), inputs=("q", "k", "v"), **changes):
    """The fused node as convattn writes it, with attributes replaced (None: removed) or added."""
    node = make_node(inputs, "o", ATTRS)
    del node.output[:]
    node.output.extend(outputs)
    for name, value in changes.items():
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend(kept)
        if value is not None:
            node.attribute.append(onnx.helper.make_attribute(name, value))
    return node


def with_domain(node, domain):
    node.domain = domain
    return node


# (id, the rule that decides it, the node, what TensorRT does: an error string, or a check of the plugin)
CASES = [
    ("fewer outputs than the layer", "output_count", lambda: ours(outputs=("o",)), MORE_OUTPUTS.format(1)),
    ("more outputs than the layer", "output_count", lambda: ours(outputs=("o", "o_scratch", "extra")), MORE_OUTPUTS.format(3)),
    ("an empty output name takes no layer output", "output_empty_names", lambda: ours(outputs=("o", "", "o_scratch")), "ok"),
    ("wrong plugin_version", "lookup", lambda: ours(plugin_version="2"), PLUGIN_NOT_FOUND),
    ("wrong plugin_namespace and domain", "lookup", lambda: with_domain(ours(plugin_namespace="other"), "other"),
     PLUGIN_NOT_FOUND),
    ("wrong plugin_namespace, the domain finds it", "lookup_domain_fallback", lambda: ours(plugin_namespace="other"), "ok"),
    ("no plugin_namespace, the domain finds it", "lookup_domain_fallback", lambda: ours(plugin_namespace=None), "ok"),
    ("plugin_version as an INT reads as empty", "lookup_strings", lambda: ours(plugin_version=1), PLUGIN_NOT_FOUND),
    ("an unset (empty) input", "optional_inputs", lambda: ours(inputs=("q", "", "v")), "INVALID_NODE: Invalid Node"),
    ("aot=1 is STRICT_AOT under PREFER_JIT", "aot", lambda: ours(aot=1), "aot"),
    ("aot=0 is STRICT_JIT under PREFER_AOT", "aot", lambda: ours(aot=0), "jit"),
    ("an undeclared attribute is dropped", "fields_declared_only", lambda: ours(causal="1"), "dropped"),
    ("STRING fields count their NUL", "string_nul", lambda: ours(), "nul"),
    ("an INT where the plugin declares a string arrives as its int32 bytes", "field_types", lambda: ours(num_heads=2),
     "int32 bytes"),
    ("a plugin_namespace node is a plugin even under a builtin op_type", "dispatch", lambda: ours(), "dispatch"),
    ("a creator that returns no plugin", "created", lambda: ours(), "UNSUPPORTED_NODE: Could not create the plugin."),
]


def _judge(core, node, expect):
    """Run the stand-in parser on `node`; True when it does what TensorRT does (`expect`)."""
    prefer = {"aot": "jit", "jit": "aot"}.get(expect)
    if expect == "dispatch":
        node.op_type = "Attention"  # a builtin ONNX op's name, registered under ours
        core.get_plugin_registry().creators[("Attention", "1", "convattn")] = \
            core.get_plugin_registry().get_creator("FlashAttention", "1", "convattn")
        return parser.dispatch(core, node) == "plugin"
    if expect.endswith("Could not create the plugin."):
        real = core.get_plugin_registry().get_creator("FlashAttention", "1", "convattn")

        class NoPlugin:  # a creator whose create_plugin returns nothing (a C++ creator's nullptr)
            field_names = real.field_names

            def create_plugin(self, *args):
                return None

        core.get_plugin_registry().creators[("FlashAttention", "1", "convattn")] = NoPlugin()
    try:
        plugin = h.parse_node(core, node, prefer=prefer)
    except h.ParseError as e:
        return str(e).startswith(expect)
    except Exception:  # noqa: BLE001  (a rule switched off can let NVIDIA's code fail otherwise)
        return False
    if expect == "ok":
        return True
    if expect in ("aot", "jit"):
        return isinstance(plugin, core.IPluginV3QuickAOTBuild) is (expect == "aot")
    if expect == "dropped":
        return "causal" not in plugin.attrs
    if expect == "nul":
        return plugin.attrs["q_layout"] == "NCHW\0"
    if expect == "int32 bytes":
        return plugin.attrs["num_heads"] == "\x02\x00\x00\x00"
    return False  # accepted where TensorRT rejects


@pytest.mark.parametrize("case,rule,make,expect", CASES, ids=[c[0] for c in CASES])
def test_the_stand_in_judges_as_tensorrt(trt, case, rule, make, expect):
    """Each case as onnx-tensorrt judges it (its code and words; tests/PARSER_RULES.md cites the lines)."""
    assert _judge(trt, make(), expect), case


@pytest.mark.parametrize("case,rule,make,expect", CASES, ids=[c[0] for c in CASES])
def test_each_rule_is_what_decides_its_case(trt, case, rule, make, expect):
    """The mutation check, automated: with the rule deleted from the stand-in, its case goes the other
    way, so the test above fails. A rule whose case survives its own deletion guards nothing."""
    with parser.without(rule):
        assert not _judge(trt, make(), expect), f"{case}: still judged as TensorRT with rule {rule!r} off"


def test_our_plugin_reads_strings_with_or_without_the_nul(trt):
    """TensorRT passes a STRING as chars counting the NUL (loadFields' copyField); a STRING that reached
    the plugin without it (another parser, a hand-made field) must read the same."""
    creator = trt.get_plugin_registry().get_creator("FlashAttention", "1", "convattn")
    for nul in (b"\0", b""):
        fields = [trt.PluginField(f.name, f.data.tobytes().rstrip(b"\0") + nul, trt.PluginFieldType.CHAR)
                  for f in h.load_fields(trt, creator.field_names, ours())]
        plugin = creator.create_plugin("FlashAttention", "convattn", trt.PluginFieldCollection(fields),
                                       trt.TensorRTPhase.BUILD, trt.QuickPluginCreationRequest.STRICT_AOT)
        built = h.build_node(trt, plugin, [trt.float32] * 3, SHAPES, ENV, tactics=[])
        assert built.output_shape == (2, 16, 3, 5)


def test_an_int_for_a_string_field_fails_with_a_clear_message(trt):
    """num_heads written as an ONNX INT: the parser passes one kINT32 (loadFields), NVIDIA's create_plugin
    decodes its bytes as a string (_lib.py: `f.data.tobytes().decode`), our plugin refuses them by name."""
    plugin = h.parse_node(trt, ours(num_heads=2))
    with pytest.raises(ValueError, match="each an ONNX STRING"):
        h.build_node(trt, plugin, [trt.float32] * 3, SHAPES, ENV, tactics=[])


def test_an_attribute_the_plugin_would_never_see_is_refused_before_tensorrt(trt, tmp_path, monkeypatch):
    """The parser drops an undeclared attribute without a word (case above): `build_engine` refuses
    the node first, naming it (a `causal` flag the kernel would silently ignore)."""
    from conftest import cached

    from convattn.exporter import engine

    monkeypatch.setattr(engine, "gpu_identity", lambda: ("stand-in", "9.0"))
    fused = cached(("einsum", "dynamo", 18))[3].model
    bad = onnx.ModelProto()
    bad.CopyFrom(fused)
    next(n for n in bad.graph.node if n.op_type == "FlashAttention").attribute.append(
        onnx.helper.make_attribute("causal", "1"))
    with pytest.raises(EngineBuildError, match="causal are not fields"):
        engine.build_engine(bad, tmp_path / "m.plan", engine.parse_profiles(["input"], [(1, 16, 7, 9)]))
    engine.build_engine(fused, tmp_path / "m.plan", engine.parse_profiles(["input"], [(1, 16, 7, 9)]))


def test_a_fused_graph_from_before_the_scratch_output_is_refused_as_tensorrt_refuses_it(trt, tmp_path, monkeypatch):
    """A fused file that names one output (convattn before this release) fails in TensorRT 10.16/11.x's
    parser; the stand-in gives TensorRT's words, exit 4."""
    from conftest import cached

    from convattn.exporter import engine

    monkeypatch.setattr(engine, "gpu_identity", lambda: ("stand-in", "9.0"))
    old = onnx.ModelProto()
    old.CopyFrom(cached(("einsum", "dynamo", 18))[3].model)
    node = next(n for n in old.graph.node if n.op_type == "FlashAttention")
    del node.output[1:]
    with pytest.raises(EngineBuildError, match="expected output size is 2, actual output size is 1") as e:
        engine.build_engine(old, tmp_path / "m.plan", engine.parse_profiles(["input"], [(1, 16, 7, 9)]))
    assert e.value.exit_code == 4 and "\n" not in str(e.value)


def test_the_rules_table_covers_every_rule_and_cites_both_releases():
    """tests/PARSER_RULES.md is the contract: one row per rule of `onnx_tensorrt.RULES` (no more, no
    fewer), each citing file:line for 10.16 and for 11.0 and naming a positive and a negative test and
    TensorRT-RTX's verdict."""
    import re
    from pathlib import Path

    text = (Path(__file__).parent / "PARSER_RULES.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", text, re.M)}
    assert set(rows) == set(parser.RULES)
    for rule, row in rows.items():
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 7 and all(cells), rule
        for release in cells[2:4]:
            assert re.search(r"\w+\.(cpp|hpp):\d+", release), (rule, release)
        assert any(case[1] == rule for case in CASES), f"{rule}: no negative case in CASES"
