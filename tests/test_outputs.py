"""No file lost or half-written: no output is the input (by inode), a failed run leaves nothing, two
runs writing one file cannot both win, SIGTERM and Ctrl-C clean up."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from convattn.exporter.cli import app
from convattn.models import ConvMHAttn

runner = CliRunner()
OPTIONS = ["--onnx", "--fused-onnx", "--report", "--engine", "--timing-cache"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("convattn.exporter.engine.require_tensorrt", lambda: None)  # exit 2 must come first
    (tmp_path / "sub").mkdir()
    path = tmp_path / "m.pt"
    torch.save(ConvMHAttn(16, 16, 2).state_dict(), path)
    os.symlink(path, tmp_path / "link.pt")
    os.link(path, tmp_path / "hard.pt")
    return path


SPELLINGS = {"same path": "m.pt", "another spelling": "sub/../m.pt", "a symlink": "link.pt", "a hard link": "hard.pt"}


@pytest.mark.parametrize("force", [False, True], ids=["", "--force"])
@pytest.mark.parametrize("spelling", list(SPELLINGS))
@pytest.mark.parametrize("option", OPTIONS)
def test_no_output_may_be_the_input(model, option, spelling, force):
    """Every output option x every way of naming the model x with and without --force: exit 2, one line,
    the model byte-identical. Mutation: `check_distinct` by name only (a symlink and a hard link pass,
    and --report overwrote the model at 8c10fd2)."""
    before = model.read_bytes()
    extra = ["--engine", "e.plan"] if option in ("--timing-cache",) else []
    r = cli(model, "--heads", 2, option, SPELLINGS[spelling], *extra, *(["--force"] if force else []))
    assert r.exit_code == 2, r.output
    assert "is the input model" in " ".join(r.output.split()) and r.output.strip().count("\n") == 0
    assert model.read_bytes() == before


def test_a_run_that_exits_3_leaves_nothing(tmp_path, monkeypatch):
    """Attention found, none fusable (SeedSDPA: attention over channels): the diagnosis is printed,
    exit 3, and no file of the run exists. Mutation: the fused ONNX written before the check (8c10fd2)."""
    from convattn.models import SeedSDPA

    monkeypatch.chdir(tmp_path)
    torch.save(SeedSDPA(16, 16, 2), tmp_path / "seed.pt")
    r = cli("seed.pt", "--trust-pickle", "--input-shape", "1x16x6x6", "--fused-onnx", "f.onnx", "--report", "r.json",
            "--onnx", "u.onnx")
    assert r.exit_code == 3 and "none fusable" in " ".join(r.output.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed.pt"]


def test_a_parity_failure_leaves_nothing(tmp_path, monkeypatch):
    """Exit 1 (parity failed) is a failed run too: no file. Mutation: commit on any exit."""
    from convattn.exporter import validate

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(validate.ValidationReport, "passed", property(lambda self: False))
    r = cli("--demo", "--fused-onnx", "f.onnx", "--report", "r.json")
    assert r.exit_code == 1 and "FAIL" in r.output
    assert list(tmp_path.iterdir()) == []


def test_of_two_runs_writing_one_file_one_wins(tmp_path):
    """Both pass the upfront check (no file yet); the second to finish finds the file and exits 2 in
    one line, leaving the first's file as it was. Mutation: commit by os.replace without --force."""
    from convattn.errors import OutputError
    from convattn.exporter.files import Outputs

    target = tmp_path / "f.onnx"
    first, second = Outputs(force=False), Outputs(force=False)
    first.write(target, b"first")
    second.write(target, b"second")
    first.commit()
    with pytest.raises(OutputError, match="exists .written by another run meanwhile.") as e:
        second.commit()
    assert target.read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == ["f.onnx"]
    assert e.value.exit_code == 2 and "\n" not in str(e.value)


def _demo_process(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.Popen([sys.executable, "-m", "convattn.exporter.entry", "--demo", "--input-shape", "1x64x48x48",
                             "--fused-onnx", "f.onnx", "--report", "r.json"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("after_s", [0.2, 6.0], ids=["while-importing", "mid-run"])
def test_sigterm_cleans_up_and_exits_143(tmp_path, after_s):
    """SIGTERM while the CLI imports, or mid-run (export or validation): exit 143, one line, no file,
    no hidden temporary. Mutation: no SIGTERM handler in `entry.main` (exit -15 while importing). The
    CLI's own handler, which cleans staged files up, is `test_sigterm_while_the_outputs_are_written_cleans_up`'s."""
    p = _demo_process(tmp_path)
    time.sleep(after_s)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    assert "terminated" in err and "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_an_error_is_one_line_with_stderr_piped(tmp_path):
    """Rich hard-wrapped a long error at its width when stderr was a pipe (2-4 lines at 8c10fd2).
    Mutation: the console without soft_wrap."""
    long = tmp_path / ("a_folder_with_a_long_name_" * 8) / "m.pt"
    p = subprocess.run([sys.executable, "-m", "convattn.exporter.entry", str(long)], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "no such file" in p.stderr, p.stderr


def test_help_shows_defaults_literally():
    """`[default: ...]` in a help text was read as Rich markup and vanished; flags showed `<bool>`.
    Mutation: rich_markup_mode left at Typer's default."""
    r = CliRunner().invoke(app, ["--help"], terminal_width=200)
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "[default: beside the engine, or ./<model>.fused.onnx]" in text
    assert "[default: fresh]" in text and "<bool>" not in text


@pytest.mark.parametrize("passes", [True, False], ids=["exit-0", "exit-1"])
def test_an_engine_run_puts_every_file_in_place_or_none(tmp_path, monkeypatch, passes):
    """`--engine` with `--triton-repo`, `--timing-cache` and `--report`, over the TensorRT harness (NVIDIA's
    plugin layer, the stand-in builder): on success every file at once (the Triton model with the plan's
    sidecar); on a parity failure none, and the existing timing cache as it was. Mutation: the Triton
    repository written at once by `triton_repository` (left behind by the failed run, at 8c10fd2's code)."""
    import trt_harness

    from convattn.exporter import engine, validate
    from convattn.plugins import trt_plugin

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(engine, "gpu_identity", lambda: ("stand-in", "9.0"))
    monkeypatch.setattr(trt_plugin, "_arch", lambda: "sm_90")
    if not passes:
        monkeypatch.setattr(validate.ValidationReport, "passed", property(lambda self: False))
    (tmp_path / "tc.bin").write_bytes(b"old cache")
    with trt_harness.tensorrt("11.4.0.106"):
        r = cli("--demo", "--input-shape", "1x64x8x8", "--engine", "out.plan", "--triton-repo", "repo",
                "--timing-cache", "tc.bin", "--report", "r.json")
    assert r.exit_code == (0 if passes else 1), r.output
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    if passes:
        assert files == ["out.fused.onnx", "out.plan", "out.plan.json", "r.json", "repo/out/1/model.plan",
                         "repo/out/1/model.plan.json", "repo/out/config.pbtxt", "tc.bin"]
        assert (tmp_path / "tc.bin").read_bytes() == b"timing-cache"  # the stand-in builder's cache
    else:
        assert files == ["tc.bin"] and (tmp_path / "tc.bin").read_bytes() == b"old cache"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["tc.bin"]  # no folder, no hidden temporary


def test_sigterm_while_the_outputs_are_written_cleans_up(tmp_path):
    """SIGTERM after every file is staged, as the run commits them: the CLI's own handler (not the entry
    point's) takes it, so the staged temporaries go and the exit is 143. Mutation: no SIGTERM handler in
    `cli.export` (killed by the signal: -15, hidden temporaries left)."""
    script = (
        "import os, signal, sys\n"
        "from convattn.exporter import cli, files\n"
        "real = files.Outputs.commit\n"
        "def commit(self):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    real(self)\n"
        "files.Outputs.commit = commit\n"
        "sys.argv = ['convattn-export', '--demo', '--fused-onnx', 'f.onnx', '--report', 'r.json']\n"
        "cli.main()\n")
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert p.returncode == 143, p.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_a_filesystem_without_hard_links_still_gets_exclusive_files(tmp_path, monkeypatch):
    """vfat, exFAT, some network mounts refuse os.link (EPERM): the target is claimed with O_EXCL and
    the temporary renamed over the claim; a second run still loses in one line. Mutation: only
    FileExistsError handled in `_create_exclusively` (a PermissionError traceback at the end of the run)."""
    from convattn.errors import OutputError
    from convattn.exporter.files import Outputs

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "f.onnx"
    first, second = Outputs(force=False), Outputs(force=False)
    first.write(target, b"first")
    second.write(target, b"second")
    first.commit()
    with pytest.raises(OutputError, match="exists"):
        second.commit()
    assert target.read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == ["f.onnx"]


def test_nothing_may_live_inside_the_triton_model_folder_it_replaces(model, tmp_path):
    """--triton-repo replaces <repo>/<engine name> whole: the model or another output inside it is
    refused up front (it deleted the input model with --force at the first fix's code)."""
    (tmp_path / "repo" / "out").mkdir(parents=True)
    inside = tmp_path / "repo" / "out" / "m.pt"
    inside.write_bytes(model.read_bytes())
    r = cli(inside, "--heads", 2, "--engine", "out.plan", "--triton-repo", "repo", "--force")
    assert r.exit_code == 2 and "inside the Triton model folder" in " ".join(r.output.split())
    assert inside.read_bytes() == model.read_bytes()
