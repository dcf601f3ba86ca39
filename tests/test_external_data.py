"""Models past protobuf's 2 GiB limit: ONNX external data through export, fuse, validate and the
engine build, each ONNX file written with its `.data` file beside it.

The fast tests lower `external_data.THRESHOLD` so that a small model takes the same path; the slow
one exports a model of more than 2 GiB of random weights (the CLI in a child process)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from convattn import external_data
from convattn.errors import EngineBuildError
from convattn.exporter.cli import app
from convattn.models import ConvMHAttn, SeedSDPA
from convattn.plugins import ort_op

runner = CliRunner()
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def external(monkeypatch):
    """Every model takes the external-data path (tensors of >= 1 KiB go to the data file)."""
    monkeypatch.setattr(external_data, "THRESHOLD", 1)


def _module(channels=32, heads=2, seed=0):
    torch.manual_seed(seed)
    return ConvMHAttn(channels, channels, heads).eval()


def _reference(module, x) -> np.ndarray:
    """float64 PyTorch (SDPA: the same function) on `x`."""
    m = ConvMHAttn(module.q_conv.in_channels, module.q_conv.out_channels, module.num_heads, attention="sdpa")
    m.load_state_dict(module.state_dict())
    with torch.no_grad():
        return m.double()(torch.from_numpy(x).double()).numpy()


def _user_file(path: Path) -> onnx.ModelProto:
    """A written graph as the passes hold it: its tensors left in the data file beside it."""
    m = onnx.load(str(path), load_external_data=False)
    onnx.helper.set_model_props(m, {**{p.key: p.value for p in m.metadata_props},
                                    external_data.FOLDER_KEY: str(path.parent.resolve())})
    return m


def _assert_external(path: Path):
    """The graph holds no tensor of 1 KiB or more; each names the data file beside it, by a relative name."""
    m = onnx.load(str(path), load_external_data=False)
    assert not any(p.key == external_data.FOLDER_KEY for p in m.metadata_props)  # a run's folder is not the user's
    big = [t for t in m.graph.initializer if t.raw_data and len(t.raw_data) >= 1024]
    assert not big
    locations = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {path.name + ".data"}


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_the_cli_writes_each_graph_with_its_data_beside_it(tmp_path, monkeypatch, external, dtype):
    """Export, fuse and validate with external data; the written files, read back by ONNX Runtime on a fresh
    input, match float64 PyTorch. Mutation: `save` writing every tensor's offset as 0 (the files then
    compute garbage)."""
    monkeypatch.chdir(tmp_path)
    module = _module()
    torch.save(module.state_dict(), "m.pt")
    r = cli("m.pt", "--heads", 2, "--input-shape", "1x32x6x5", "--dtype", dtype, "--onnx", "u.onnx",
            "--fused-onnx", "f.onnx")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(tmp_path)) == ["f.onnx", "f.onnx.data", "m.pt", "u.onnx", "u.onnx.data"]
    for name in ("u.onnx", "f.onnx"):
        _assert_external(tmp_path / name)
        onnx.checker.check_model(str(tmp_path / name), full_check=True)
    x = np.random.default_rng(7).standard_normal((2, 32, 4, 7)).astype(np.float32)  # not the export shape
    want = _reference(module, x)
    [plain] = ort.InferenceSession("u.onnx", providers=["CPUExecutionProvider"]).run(None, {"input": x})
    [fused] = ort_op.run(_user_file(tmp_path / "f.onnx"), {"input": x})
    for got in (plain, fused):
        assert np.abs(got - want).max() < TOLERANCE[dtype]
    for name in ("u.onnx", "f.onnx"):  # the data file holds the graph's own precision
        stored = {t.data_type for t in onnx.load(str(tmp_path / name), load_external_data=False).graph.initializer
                  if t.external_data}
        assert stored == {onnx.TensorProto.FLOAT16 if dtype == "fp16" else onnx.TensorProto.FLOAT}


def test_an_existing_data_file_is_replaced_only_with_force(tmp_path, monkeypatch, external):
    """`f.onnx.data` is an output too: without --force, exit 2 with one line as soon as the export shows the
    model is large (before fusion), the file untouched and no `f.onnx` written; with --force, replaced."""
    monkeypatch.chdir(tmp_path)
    torch.save(_module().state_dict(), "m.pt")
    (tmp_path / "f.onnx.data").write_bytes(b"keep")
    r = cli("m.pt", "--heads", 2, "--input-shape", "1x32x4x4", "--fused-onnx", "f.onnx")
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1] == "error: f.onnx.data: exists; pass --force to overwrite"
    assert "fuse" not in r.output
    assert (tmp_path / "f.onnx.data").read_bytes() == b"keep"
    assert sorted(os.listdir(tmp_path)) == ["f.onnx.data", "m.pt"]
    r = cli("m.pt", "--heads", 2, "--input-shape", "1x32x4x4", "--fused-onnx", "f.onnx", "--force")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "f.onnx.data").read_bytes() != b"keep"


def test_a_data_file_may_not_be_the_input(tmp_path, monkeypatch, external):
    """A model named like the fused graph's data file is refused before any work, --force or not."""
    monkeypatch.chdir(tmp_path)
    torch.save(_module().state_dict(), "f.onnx.data")
    before = (tmp_path / "f.onnx.data").read_bytes()
    r = cli("f.onnx.data", "--heads", 2, "--input-shape", "1x32x4x4", "--fused-onnx", "f.onnx", "--force")
    assert r.exit_code == 2 and "is the input model" in r.output, r.output
    assert (tmp_path / "f.onnx.data").read_bytes() == before


def test_a_failed_run_leaves_no_data_and_no_working_folder(tmp_path, monkeypatch, external):
    """Exit 3 (attention found, none fusable) after the tensors went to the run's working folder:
    nothing of the run is left."""
    monkeypatch.chdir(tmp_path)
    torch.save(SeedSDPA(16, 16, 2), "seed.pt")
    r = cli("seed.pt", "--input-shape", "1x16x4x4", "--trust-pickle", "--onnx", "u.onnx")
    assert r.exit_code == 3, r.output
    assert sorted(os.listdir(tmp_path)) == ["seed.pt"]


def test_a_model_held_whole_in_memory_still_runs(monkeypatch):
    """A library caller's model past the threshold, never externalized: ONNX Runtime and the checker
    get an externalized copy; the caller's model is left as it was."""
    from convattn.exporter.export import export_onnx

    module = _module()
    model = export_onnx(module, [(1, 32, 4, 4)], dynamic=False).model
    before = model.SerializeToString()
    monkeypatch.setattr(external_data, "THRESHOLD", 1)
    x = np.random.default_rng(3).standard_normal((1, 32, 4, 4)).astype(np.float32)
    [got] = ort_op.run(model, {"input": x})
    external_data.check_model(model, full_check=True)
    assert np.abs(got - _reference(module, x)).max() < 1e-4
    assert model.SerializeToString() == before


def _fused_external(tmp_path):
    from convattn.exporter.export import export_onnx
    from convattn.exporter.fuse import fuse_attention

    exported = export_onnx(_module(), [(1, 32, 4, 4)], dynamic=False, data_folder=tmp_path)
    assert external_data.folder(exported.model) == tmp_path.resolve()
    return fuse_attention(exported.model, [(1, 32, 4, 4)]).model


def test_the_engine_build_parses_the_graph_beside_its_data(tmp_path, monkeypatch, external, trt_core):
    """build_engine gives TensorRT's parser a file beside the data (`parse_from_file`), and the parser
    reads every tensor: a data file cut short fails the build with the parser's error. Mutation: the
    harness's read of the tensors removed (the short file then builds)."""
    from convattn.exporter import engine
    from convattn.exporter.engine import build_engine, parse_profiles

    monkeypatch.setattr(engine, "gpu_identity", lambda: ("stand-in", "9.0"))  # what cannot run here
    fused = _fused_external(tmp_path)
    profile = parse_profiles(["input"], [(1, 32, 4, 4)])
    result = build_engine(fused, tmp_path / "e.plan", profile)
    assert Path(result.plan).exists()
    [data] = [p for p in tmp_path.iterdir() if p.suffix == ".data"]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(EngineBuildError, match="parser refused the fused graph: .*v_conv.weight"):
        build_engine(fused, tmp_path / "e2.plan", profile)
    assert not any(p.suffix == ".onnx" for p in tmp_path.iterdir())  # the graph file went again


def test_tensorrt_rtx_parses_and_builds_the_written_files(tmp_path, external):
    """The real onnx-tensorrt (TensorRT-RTX 1.7.1.116) reads what `save` writes: the fused graph with a native
    stand-in for our node, its tensors in `<name>.data` beside it, parses and builds; with the data file
    cut short it refuses the model."""
    import trt_rtx

    (tmp_path / "work").mkdir()
    fused = _fused_external(tmp_path / "work")
    stand_in = trt_rtx.native_stand_in(fused, "matmul")
    graph = tmp_path / "out" / "s.onnx"
    graph.parent.mkdir()
    external_data.save(stand_in, graph)
    _assert_external(graph)
    short = tmp_path / "short" / "s.onnx"
    short.parent.mkdir()
    short.write_bytes(graph.read_bytes())
    external_data.data_path(short).write_bytes(external_data.data_path(graph).read_bytes()[:4096])
    wrong = _wrong_length(graph, tmp_path / "wrong")
    whole, cut, sized = trt_rtx.run_many([trt_rtx.case(str(p), build=True) for p in (graph, short, wrong)])
    assert whole["parsed"] is True and whole["errors"] == [] and whole["built"] is True, whole["errors"]
    assert cut["parsed"] is False and any("out of range" in m for m in trt_rtx.messages(cut, "ERROR")), cut["log"]
    assert sized["parsed"] is False, sized["log"]


def _wrong_length(graph: Path, folder: Path) -> Path:
    """A copy of `graph` (and its data) whose first external tensor's length is half what its shape needs."""
    folder.mkdir()
    m = onnx.load(str(graph), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.external_data)
    for e in t.external_data:
        if e.key == "length":
            e.value = str(int(e.value) // 2)
    out = folder / graph.name
    out.write_bytes(m.SerializeToString())
    external_data.data_path(out).write_bytes(external_data.data_path(graph).read_bytes())
    return out


def test_the_harness_refuses_a_tensor_of_the_wrong_size(tmp_path, external, trt_core):
    """The stand-in parser, as onnx-tensorrt's convertOnnxWeights: a tensor whose stored bytes do not cover its
    shape is refused (the real parser's verdict on the same file: the test above). Mutation: the size check
    removed from `trt_harness.OnnxParser.parse_from_file`."""
    (tmp_path / "work").mkdir()
    graph = tmp_path / "out" / "f.onnx"
    graph.parent.mkdir()
    external_data.save(_fused_external(tmp_path / "work"), graph)
    network = trt_core.Builder(None).create_network(0)
    assert trt_core.OnnxParser(network, None).parse_from_file(str(graph)) is True
    parser = trt_core.OnnxParser(network, None)
    assert parser.parse_from_file(str(_wrong_length(graph, tmp_path / "wrong"))) is False
    assert "Unexpected size for the external weights" in parser.get_error(0)


@pytest.mark.slow
def test_a_model_past_2_gib_goes_through(tmp_path):
    """A ConvMHAttn of 2.07 GiB of random fp32 weights (one tensor is 529 MiB; no single proto could
    hold the model): the CLI exports, fuses, validates and writes both graphs with their data beside
    them; the written files, read back by ONNX Runtime, match float64 PyTorch on a fresh input; the
    real parser and builder of TensorRT-RTX build the fused graph (a native stand-in for our node)."""
    import trt_rtx

    channels, heads = 11776, 92
    torch.manual_seed(0)
    module = ConvMHAttn(channels, channels, heads).eval()
    assert sum(p.numel() * 4 for p in module.parameters()) > 2**31
    torch.save(module.state_dict(), tmp_path / "big.pt")
    x = np.random.default_rng(11).standard_normal((1, channels, 3, 5)).astype(np.float32)
    want = _reference(module, x)
    del module
    r = subprocess.run([sys.executable, "-m", "convattn.exporter.entry", "big.pt", "--heads", str(heads),
                        "--input-shape", f"1x{channels}x4x4", "--onnx", "u.onnx", "--fused-onnx", "f.onnx"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["big.pt", "f.onnx", "f.onnx.data", "u.onnx", "u.onnx.data"]
    for name in ("u.onnx", "f.onnx"):
        _assert_external(tmp_path / name)
        assert (tmp_path / name).stat().st_size < 2**20 and (tmp_path / f"{name}.data").stat().st_size > 2**31
    [plain] = ort.InferenceSession(str(tmp_path / "u.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert np.abs(plain - want).max() < 1e-4
    fused_file = _user_file(tmp_path / "f.onnx")
    [fused] = ort_op.run(fused_file, {"input": x})
    assert np.abs(fused - want).max() < 1e-4
    from convattn.exporter.graph import set_input_dims

    stand_in = trt_rtx.native_stand_in(fused_file, "matmul")
    set_input_dims(stand_in, {"input": (1, channels, 4, 4)})
    (tmp_path / "rtx").mkdir()
    external_data.save(stand_in, tmp_path / "rtx" / "s.onnx")
    r = trt_rtx.run(str(tmp_path / "rtx" / "s.onnx"), build=True)
    assert r["parsed"] is True and r["errors"] == [] and r["built"] is True, r["errors"]
    assert r["plan_bytes"] > 2**31  # the weights are in the plan
