"""The CLI a user runs: success, the SeedSDPA diagnosis, and every kind of bad input."""

import json

import pytest
import torch
from typer.testing import CliRunner

from convattn.exporter.cli import app
from convattn.models import ConvMHAttn, SeedSDPA

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_demo_exports_fuses_validates_and_reports(tmp_path):
    report = tmp_path / "report.json"
    fused, unfused = tmp_path / "demo.fused.onnx", tmp_path / "demo.onnx"
    r = cli("--demo", "--fused-onnx", fused, "--onnx", unfused, "--report", report)
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output
    doc = json.loads(report.read_text())
    assert doc["validation"]["passed"] and [b["fused"] for b in doc["blocks"]] == [True]
    paths = {c["path"] for c in doc["validation"]["comparisons"]}
    assert paths == {"onnxruntime unfused", "onnxruntime fused", "pytorch einsum", "pytorch sdpa",
                     "block node_softmax vs unfused"}
    assert doc["validation"]["memory"][0]["einsum_bytes"] == 2 * 8 * 1024 * 1024 * 4
    assert fused.stat().st_size > 0 and unfused.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.fused.onnx", "demo.onnx", "report.json"]


def test_existing_output_is_refused_without_force(tmp_path):
    fused = tmp_path / "x.onnx"
    fused.write_text("keep me")
    r = cli("--demo", "--fused-onnx", fused)
    assert r.exit_code == 2 and "--force" in r.output
    assert fused.read_text() == "keep me"
    assert cli("--demo", "--fused-onnx", fused, "--force").exit_code == 0
    assert fused.read_bytes() != b"keep me"


def test_engine_without_tensorrt_exits_5_before_any_stage_runs(tmp_path):
    """A run that cannot end in an engine stops before loading, with one line naming the way out and
    nothing written. Mutation: no `require_tensorrt` in `_check_options` (the whole pipeline runs)."""
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here: this test covers machines without it")
    except ImportError:
        pass
    plan = tmp_path / "out.plan"
    r = cli("--demo", "--engine", plan, "--report", tmp_path / "r.json")
    assert r.exit_code == 5, r.output
    text = " ".join(r.output.split())
    assert "convattn[tensorrt]" in text and "leave --engine out" in text
    assert "load" not in r.output.split("error")[0]  # no stage ran before the error
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_malformed_library_log_record_does_not_end_the_run(tmp_path, monkeypatch):
    """torch's serializer logs a format with two %s and one argument; the log capture must keep the
    record, not die on it (a TypeError ended every such run, exit 1). Mutation: `r.getMessage()` in `stage` (8c10fd2)."""
    import logging

    from convattn.exporter import load

    real = load.load_model

    def logging_load(*args, **kwargs):
        logging.getLogger("torch._export.serde.serialize").warning("Loaded %s after failure: %s", "dict")
        return real(*args, **kwargs)

    monkeypatch.setattr(load, "load_model", logging_load)
    report = tmp_path / "r.json"
    r = cli("--demo", "--fused-onnx", tmp_path / "f.onnx", "--report", report)
    assert r.exit_code == 0, r.output
    assert any("Loaded %s after failure" in w for w in json.loads(report.read_text())["library_warnings"])


def test_a_long_dynamic_export_says_what_to_try(tmp_path, monkeypatch):
    """A dynamic export that runs long (timm's maxvit: over 45 minutes, --static 24 s) shows its time
    and, past LONG_STAGE_S, names --static once. Mutation: no hint passed to the export stage."""
    from convattn.exporter import cli as cli_module

    monkeypatch.setattr(cli_module, "LONG_STAGE_S", 0)
    r = cli("--demo", "--fused-onnx", tmp_path / "f.onnx")
    assert r.exit_code == 0, r.output
    assert " ".join(r.output.split()).count("--static exports the export shape alone") == 1


def test_seed_sdpa_is_diagnosed(tmp_path):
    path = tmp_path / "seed.pt"
    torch.save(SeedSDPA(16, 16, 2), path)
    r = cli(path, "--trust-pickle", "--input-shape", "1x16x6x6", "--fused-onnx", tmp_path / "f.onnx")
    assert r.exit_code == 3  # its only attention is not fusable; the diagnosis is printed first
    text = " ".join(r.output.split())
    assert "attention over channels" in text and "none fusable" in text
    assert "dropout" in text and "eval" in text
    assert "FAIL" in text  # PyTorch (dropout in eval) and the graph disagree


def test_state_dict_with_heads_and_cross_attention_shapes(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(ConvMHAttn(8, 16, 2).state_dict(), path)
    r = cli(path, "--heads", 2, "--input-shape", "1x8x7x9", "--input-shape", "1x8x5x3", "--fused-onnx", tmp_path / "f.onnx")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    "args,code,message",
    [
        ([], 2, "no model given"),
        (["missing.pt"], 2, "no such file"),
        (["--demo", "--input-shape", "1x64x32"], 2, "does not run on inputs of shape 1x64x32"),  # any rank parses
        (["--demo", "--input-shape", "1xAx3x3"], 2, "BxCxHxW"),
        (["--demo", "--input-shape", "1x3x32x32"], 2, "channels"),
        (["--demo", "--dtype", "fp8"], 2, "--dtype"),
        (["--demo", "--fused-onnx", "/nonexistent/dir/x.onnx"], 2, "cannot write"),
        (["--demo", "--attention", "fastest"], 2, "--attention"),
        (["--demo", "--engine", "e.plan", "--plugin-mode", "cpp"], 2, "--plugin-mode"),
        (["--demo", "--triton-repo", "repo"], 2, "need --engine"),
        (["--demo", "--engine", "e.plan", "--max-shape", "1x64x8x8"], 2, "min <= opt <= max"),
        (["--demo", "--fused-onnx", "/proc/x.onnx"], 2, "cannot write"),
        (["--demo", "--fused-onnx", "f.onnx", "--report", "/proc/r.json"], 2, "cannot write"),
        (["--demo", "--exporter", "foo"], 2, "--exporter: expected one of auto, dynamo, torchscript"),
        (["--demo", "--opset", "17"], 2, "--opset: expected 18.."),
        (["--demo", "--opset", "99"], 2, "--opset: expected 18.."),
        (["--demo", "--onnx", "a.onnx", "--fused-onnx", "a.onnx", "--report", "a.onnx"], 2, "name the same file"),
        (["--demo", "--engine", "a.plan", "--report", "a.plan.json"], 2, "name the same file"),
        (["--demo", "--tf32", "--dtype", "fp16"], 2, "--tf32 is for fp32 engines"),
    ],
    ids=["no-model", "missing", "rank", "not-a-number", "wrong-channels", "dtype", "unwritable", "attention",
         "plugin-mode", "triton-repo-alone", "bad-profile", "proc-fused", "proc-report", "exporter", "opset-17",
         "opset-99", "same-paths", "report-is-sidecar", "tf32-fp16"],
)
def test_bad_input_is_one_clear_line(tmp_path, monkeypatch, args, code, message):
    monkeypatch.chdir(tmp_path)
    # --engine asks for TensorRT before any stage: stand it in, so the checks after that one run here too
    monkeypatch.setattr("convattn.exporter.engine.require_tensorrt", lambda: None)
    r = cli(*args)
    assert r.exit_code == code, r.output
    assert message in " ".join(r.output.split())
    assert isinstance(r.exception, SystemExit), r.exception  # a clean exit, not an escaped exception
    assert list(tmp_path.iterdir()) == []  # nothing partial left behind


def test_pickle_without_trust_and_no_attention(tmp_path, monkeypatch):
    import user_models

    path = tmp_path / "m.pt"
    torch.save(user_models.NoAttention(), path)
    monkeypatch.chdir(tmp_path)
    r = cli(path, "--input-shape", "1x4x3x3")
    assert r.exit_code == 2 and "--trust-pickle" in r.output
    r = cli(path, "--trust-pickle", "--input-shape", "1x4x3x3")
    assert r.exit_code == 3 and "no attention block" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_heads_not_dividing_channels(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(ConvMHAttn(8, 16, 2).state_dict(), path)
    r = cli(path, "--heads", 3)
    assert r.exit_code == 2 and "divisor of the 16 channels" in r.output


def test_nan_weights(tmp_path):
    m = ConvMHAttn(8, 16, 2)
    with torch.no_grad():
        m.out_conv.bias[0] = float("inf")
    path = tmp_path / "sd.pt"
    torch.save(m.state_dict(), path)
    r = cli(path, "--heads", 2)
    assert r.exit_code == 3 and "NaN/inf" in r.output


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import os

    from convattn.exporter.files import Outputs

    target = tmp_path / "out.onnx"
    target.write_bytes(b"old")

    def boom(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    outputs = Outputs(force=True)
    outputs.write(target, b"new" * 1000)
    with pytest.raises(KeyboardInterrupt):
        outputs.commit()
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_attention_auto_reports_the_path_per_block(tmp_path):
    report = tmp_path / "r.json"
    r = cli("--demo", "--attention", "auto", "--dtype", "fp16", "--fused-onnx", tmp_path / "f.onnx", "--report", report)
    assert r.exit_code == 0, r.output
    [block] = json.loads(report.read_text())["blocks"]
    assert block["path"] == "plugin" and block["head_dim"] == 8  # TensorRT does not fuse head_dim 8 itself


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_dtype_types_the_fused_graph(tmp_path, dtype):
    """--dtype puts the precision in the graph (TensorRT 11 engines are strongly typed): the
    FlashAttention node reads and writes fp16/bf16, the graph's IO stays fp32, and validation runs
    in that precision (ONNX Runtime for fp16; bf16 on PyTorch, with a note that says why).
    Mutation: skipping cast_graph leaves the node fp32 and fails the element-type check."""
    import onnx

    fused, report = tmp_path / "f.onnx", tmp_path / "r.json"
    r = cli("--demo", "--dtype", dtype, "--fused-onnx", fused, "--report", report)
    assert r.exit_code == 0, r.output
    model = onnx.shape_inference.infer_shapes(onnx.load(fused))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    [node] = [n for n in model.graph.node if n.op_type == "FlashAttention"]
    expected = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[dtype]
    assert [types[i] for i in node.input] == [expected] * 3
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT]
    doc = json.loads(report.read_text())["validation"]
    assert {c["dtype"] for c in doc["comparisons"]} == {dtype}
    paths = {c["path"] for c in doc["comparisons"]}
    if dtype == "fp16":
        assert {"onnxruntime unfused", "onnxruntime fused"} <= paths
    else:
        assert not any(p.startswith("onnxruntime") for p in paths) and any("no bf16" in n for n in doc["notes"])


def test_plugin_mode_is_written_on_the_nodes(tmp_path):
    import onnx

    fused = tmp_path / "f.onnx"
    assert cli("--demo", "--plugin-mode", "jit", "--fused-onnx", fused).exit_code == 0
    [node] = [n for n in onnx.load(fused).graph.node if n.op_type == "FlashAttention"]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}["aot"] == 0


def test_existing_sidecar_is_refused_without_force(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out.plan.json").write_text("keep me")
    r = cli("--demo", "--engine", "out.plan")
    assert r.exit_code == 2 and "out.plan.json: exists" in " ".join(r.output.split())
    assert (tmp_path / "out.plan.json").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["out.plan.json"]


def test_outputs_are_readable_as_the_umask_says(tmp_path):
    """mkstemp makes 0600 files: a server running as another user could not read the plan."""
    import os

    old = os.umask(0o022)
    try:
        assert cli("--demo", "--fused-onnx", tmp_path / "f.onnx", "--report", tmp_path / "r.json").exit_code == 0
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"f.onnx": 0o644, "r.json": 0o644}


@pytest.mark.parametrize("stage,extra", [("load", []), ("fuse", ["--input-shape", "1x64x64x64"])],
                         ids=["during-export", "during-validation"])
def test_ctrl_c_exits_130_at_every_stage(tmp_path, stage, extra):
    """Ctrl-C during the dynamo export (torch turns it into other errors) and during validation
    (ONNX Runtime's Python op aborted the process, SIGABRT) exits 130 with one line, nothing written."""
    import signal
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-m", "convattn.exporter.cli", "--demo", "--fused-onnx",
                          str(tmp_path / "f.onnx"), *extra], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    seen = ""
    while f"✓ {stage}" not in seen:
        ch = p.stderr.read(1)
        assert ch, seen
        seen += ch
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    assert p.wait(timeout=120) == 130, seen + rest
    assert "interrupted" in rest and "Traceback" not in rest
    assert list(tmp_path.iterdir()) == []


ABORT_SCRIPT = """
import os, signal, sys
# Ctrl-C as Python starts it, even where this test's runner was started in the background of a shell
# without job control (which starts its children with SIGINT ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
import numpy as np
from onnx import TensorProto, helper
import convattn.plugins.reference as reference
from convattn.plugins import ort_op
from convattn.plugins.op import DOMAIN, FlashAttentionAttrs, make_node

real = reference.flash_attention_reference
def interrupted(*args, **kwargs):  # Ctrl-C arrives while ONNX Runtime is inside our Python op
    os.kill(os.getpid(), signal.SIGINT)
    return real(*args, **kwargs)
reference.flash_attention_reference = interrupted
node = make_node("qkv", "o", FlashAttentionAttrs(2, 0.25))
io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8, 2, 2]) for n in "qkvo"]
model = helper.make_model(helper.make_graph([node], "g", io[:3], io[3:]),
                          opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
try:
    ort_op.run(model, {n: np.ones((1, 8, 2, 2), np.float32) for n in "qkv"})
except KeyboardInterrupt:
    sys.exit(130)
sys.exit(0)
"""


def test_ctrl_c_inside_the_onnxruntime_python_op_does_not_abort():
    """Mutation: ort_op.run without deferred_interrupt: the process dies of SIGABRT (-6)."""
    import subprocess
    import sys

    assert subprocess.run([sys.executable, "-c", ABORT_SCRIPT], capture_output=True).returncode == 130


def test_sigterm_inside_the_onnxruntime_python_op_does_not_abort():
    """SIGTERM while ONNX Runtime runs our Python op: held until the run ends, then delivered to the
    handler it would have met (here the default: killed by SIGTERM, -15), never an abort (-6, 134).
    Mutation: `deferred_interrupt` holding SIGINT only."""
    import subprocess
    import sys

    script = ABORT_SCRIPT.replace("os.kill(os.getpid(), signal.SIGINT)", "os.kill(os.getpid(), signal.SIGTERM)")
    assert script != ABORT_SCRIPT
    assert subprocess.run([sys.executable, "-c", script], capture_output=True).returncode == -15


def test_ctrl_c_inside_torch_export_is_a_keyboard_interrupt(monkeypatch):
    """torch.export turns a KeyboardInterrupt into other errors; export_onnx gives it back.
    Mutation: without `_interrupted` the user gets ExportError (exit 3)."""
    from convattn.exporter import export

    def interrupted_export(*args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise AttributeError("module 'torch._dynamo' has no attribute 'exc'") from e

    monkeypatch.setattr(export, "_export", interrupted_export)
    with pytest.raises(KeyboardInterrupt):
        export.export_onnx(ConvMHAttn(8, 8, 2), [(1, 8, 4, 4)])


def test_validation_in_o_s_memory_skips_what_does_not_fit(tmp_path):
    """With a small --validate-memory the S x S paths (ONNX Runtime unfused, einsum) are skipped
    with a line saying what they need; the fused graph and SDPA still run and PASS. The probe ran
    smaller (64x64 -> 32x32) but the figures are the export shape's (S = 4096)."""
    report = tmp_path / "r.json"
    r = cli("--demo", "--input-shape", "1x64x64x64", "--validate-memory", "100MB", "--fused-onnx",
            tmp_path / "f.onnx", "--report", report)
    assert r.exit_code == 0, r.output
    doc = json.loads(report.read_text())
    assert {c["path"] for c in doc["validation"]["comparisons"]} == {"onnxruntime fused", "pytorch sdpa"}
    skipped = [n for n in doc["validation"]["notes"] if "not run: its attention scores need 1.1 GB" in n]
    assert len(skipped) == 3 and all("100.0 MB" in n for n in skipped)  # unfused, einsum, per-block
    assert doc["validation"]["memory"][0]["seq_q"] == 4096
    assert doc["blocks"][0]["probe_seq_q"] == 1024 and doc["blocks"][0]["seq_q"] == 4096


@pytest.mark.slow
def test_demo_at_128x128_passes_under_12_gb(tmp_path):
    """The typical export the product is for (S = 16384): under a 12 GB address-space limit, every
    stage in O(S) memory (the einsum's scores alone would take 17 GB). Took 30 s on a 2-core CPU."""
    import subprocess
    import sys

    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (12 * 10**9, 12 * 10**9)); "
            "from convattn.exporter.cli import main; sys.argv = ['convattn-export'] + sys.argv[1:]; main()")
    done = subprocess.run([sys.executable, "-c", code, "--demo", "--input-shape", "1x64x128x128", "--fused-onnx",
                           str(tmp_path / "f.onnx")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PASS" in done.stderr


def test_pt2_saved_with_dim_auto_and_batch_1_fuses_at_the_export_shape(tmp_path):
    """torch.export with Dim.AUTO and a batch-1 example specialises the batch, yet the ONNX graph
    claims it dynamic: at 5b1ec6e the probe (batch >= 2) gave a raw ONNX Runtime Reshape error, exit 3.
    Now it fuses and validates at the export shape, with a warning naming --static.
    Mutation: no probe at the exact export shape: exit 3."""
    dim = torch.export.Dim.AUTO
    program = torch.export.export(ConvMHAttn(16, 16, 2).eval(), (torch.randn(1, 16, 8, 8),),
                                  dynamic_shapes=({0: dim, 2: dim, 3: dim},))
    path, report = tmp_path / "m.pt2", tmp_path / "r.json"
    torch.export.save(program, path)
    r = cli(path, "--input-shape", "1x16x8x8", "--fused-onnx", tmp_path / "f.onnx", "--report", report)
    assert r.exit_code == 0, r.output
    doc = json.loads(report.read_text())
    assert [b["fused"] for b in doc["blocks"]] == [True] and doc["validation"]["passed"]
    assert any("--static" in w and "batch included" in w for w in doc["warnings"]), doc["warnings"]


def test_demo_writes_a_fresh_temporary_folder_each_run_and_none_when_refused(tmp_path, monkeypatch):
    """`--demo` alone wrote into the current folder (a second run exited 2). Now each run writes a new
    folder under the temp dir, and a refused run (here: a bad --report) makes none.
    Mutation: the folder made before the output checks leaves an empty folder on refusal."""
    import tempfile

    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir(), tmp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    assert cli("--demo", "--report", tmp_path / "missing" / "r.json").exit_code == 2
    assert list(tmp.iterdir()) == []
    for _ in range(2):
        r = cli("--demo")
        assert r.exit_code == 0, r.output
    folders = sorted(tmp.iterdir())
    assert len(folders) == 2 and all([p.name for p in f.iterdir()] == ["convattn_demo.fused.onnx"] for f in folders)
    assert list(work.iterdir()) == []


def test_ctrl_c_that_a_library_swallows_still_stops_the_run(tmp_path, monkeypatch):
    """Seen about 1 run in 30 with torch's export: the KeyboardInterrupt raised inside it is caught
    there, the export completes, and the run went on to PASS (exit 0) after the user's Ctrl-C.
    The SIGINT is recorded and checked at the stage's end: exit 130, nothing written.
    Mutation: no check at the stage's end: exit 0."""
    import os
    import signal
    import time

    from convattn.exporter import export

    real = export.export_onnx

    def swallowing(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
        except KeyboardInterrupt:
            pass  # what a library may do with it
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "export_onnx", swallowing)
    r = cli("--demo", "--fused-onnx", tmp_path / "f.onnx")
    assert r.exit_code == 130 and "interrupted" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_torch_log_records_are_kept_for_the_report_not_printed(tmp_path, monkeypatch, capfd):
    """torch logs its symbolic-shape solver's failures as WARNING records with a traceback each
    (about 200 lines exporting timm's coatnet) through its own stderr handlers. They go to the
    report's library_warnings (first line), not to the terminal.
    Mutation: no `_library_logs` in `stage`: the traceback lines reach stderr."""
    import logging

    from convattn.exporter import export

    real = export.export_onnx

    def noisy(*args, **kwargs):
        logging.getLogger("torch.fx.experimental.symbolic_shapes").warning("Failed to reduce inequalities\nTraceback x")
        return real(*args, **kwargs)

    monkeypatch.setattr(export, "export_onnx", noisy)
    report = tmp_path / "r.json"
    r = cli("--demo", "--fused-onnx", tmp_path / "f.onnx", "--report", report)
    assert r.exit_code == 0, r.output
    captured = capfd.readouterr()
    assert "Failed to reduce" not in captured.err + captured.out + r.output
    assert "export: log WARNING torch.fx.experimental.symbolic_shapes: Failed to reduce inequalities" in \
        json.loads(report.read_text())["library_warnings"]


def test_tf32_is_written_on_every_node_and_the_graph(tmp_path):
    """--tf32 is the nodes' attribute (what the plugin reads) and the graph's metadata (what
    build_engine reads, also with --attention native and no node of ours); exact fp32 by default."""
    import onnx

    from convattn.exporter.fuse import uses_tf32

    for flag, value in (([], b"0"), (["--tf32"], b"1")):
        fused = tmp_path / f"f{len(flag)}.onnx"
        assert cli("--demo", "--fused-onnx", fused, *flag).exit_code == 0
        model = onnx.load(fused)
        [node] = [n for n in model.graph.node if n.op_type == "FlashAttention"]
        assert {a.name: a.s for a in node.attribute}["tf32"] == value and uses_tf32(model) is bool(flag)
    native = tmp_path / "native.onnx"
    assert cli("--demo", "--fused-onnx", native, "--tf32", "--attention", "native").exit_code == 0
    assert uses_tf32(onnx.load(native))


def test_a_model_dynamo_refuses_exports_with_torchscript_by_default(tmp_path):
    """NesT's fused path (SDPA on 5-D windows): the dynamo exporter refuses it. By default (`--exporter
    auto`) the CLI exports it with TorchScript, says so, and fuses it; `--exporter dynamo` fails
    (exit 3) naming the way out. Mutation: auto as dynamo alone: exit 3."""
    import user_models

    path, report = tmp_path / "w.pt", tmp_path / "r.json"
    torch.save(user_models.WindowedSDPA().eval(), path)
    r = cli(path, "--trust-pickle", "--input-shape", "1x16x16x16", "--fused-onnx", tmp_path / "f.onnx", "--report", report)
    assert r.exit_code == 0, r.output
    doc = json.loads(report.read_text())
    assert any("dynamo exporter failed" in w and "TorchScript" in w for w in doc["warnings"]), doc["warnings"]
    assert [b["fused"] for b in doc["blocks"]] == [True]
    r = cli(path, "--trust-pickle", "--input-shape", "1x16x16x16", "--exporter", "dynamo", "--fused-onnx", tmp_path / "g.onnx")
    assert r.exit_code == 3 and "--exporter torchscript" in " ".join(r.output.split())


def test_a_token_input_of_another_rank_takes_its_own_input_shape(tmp_path):
    """One --input-shape per model input, of any rank: a map and a (B, S, C) token input (a cross-attention
    UNet's encoder_hidden_states); the block fuses (Q NCHW, K/V BSC), the graph keeps batch and sequence
    dynamic, and PASS. Mutation: every input exported with dims 0, 2, 3 dynamic (the token input's channels
    then dynamic: its Linear refuses them)."""
    import onnx

    import user_models

    path = tmp_path / "x.pt"
    torch.save(user_models.TokenCrossAttention().eval(), path)
    r = cli(path, "--trust-pickle", "--input-shape", "1x16x6x5", "--input-shape", "1x7x24",
            "--fused-onnx", tmp_path / "f.onnx", "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    [block] = report["blocks"]
    assert block["fused"] and block["layouts"][:3] == ["NCHW", "BSC", "BSC"]
    tokens = onnx.load(str(tmp_path / "f.onnx")).graph.input[1]
    dims = [d.dim_param or d.dim_value for d in tokens.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and isinstance(dims[1], str) and dims[2] == 24


@pytest.mark.parametrize("model,says", [("seed", "It is dropout applied in eval"),
                                        ("sampling", "It is not F.dropout or SDPA's dropout_p")])
def test_the_nondeterminism_warning_names_its_cause(model, says):
    """Dropout active in eval (SeedSDPA) is named as such; noise drawn in the forward is not blamed on dropout
    (it was, whatever the cause). Mutation: the check without `_no_dropout` (both say dropout)."""
    import user_models
    from convattn.exporter.export import _eval_dropout_warning

    torch.manual_seed(0)
    module = (SeedSDPA(16, 16, 2) if model == "seed" else user_models.Sampling()).eval()
    x = torch.randn(1, 16, 4, 4)
    args = (x, x, x) if model == "seed" else (x,)
    with torch.no_grad():
        first = module(*args)
    assert says in _eval_dropout_warning(module, args, first)
