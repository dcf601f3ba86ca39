"""No code from a .pt2 without --trust-pickle. Each route torch.export.load has to unpickle (torch 2.13:
`torch/export/pt2_archive/_package.py`, `torch/_export/serde/serialize.py`) gets a real archive, saved
with torch's own API and then crafted with torch's own archive writer, whose payload would write a
sentinel file when unpickled. Refused with one line, exit 2, before anything is unpickled (the
sentinel never appears); an ordinary exported program still loads, and with --trust-pickle the
crafted ones load as torch loads them."""

import json
import pickle

import pytest
import torch
from torch.export.pt2_archive import constants as c
from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter
from typer.testing import CliRunner

from convattn.errors import InputError
from convattn.exporter.cli import app
from convattn.exporter.load import load_model
from convattn.models import ConvMHAttn


class Payload:
    """Unpickling this opens (creates) the sentinel file: code from the file, run."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return open, (self.sentinel, "w")


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = ConvMHAttn(16, 16, 2).eval()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 16, 5, 5),)), path)
    return path


def craft(src, dst, change):
    """Copy a .pt2 record by record with torch's writer; `change(records)` edits the {name: bytes} map."""
    reader = PT2ArchiveReader(str(src))
    records = {name: reader.read_bytes(name) for name in reader.get_file_names()
               if not name.startswith(".data/") and name not in ("archive_format", "archive_version", "byteorder")}
    change(records)
    with PT2ArchiveWriter(str(dst)) as writer:
        for name, data in records.items():
            writer.write_bytes(name, data)
    return dst


def torch_save(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def sample_inputs_route(records, sentinel):
    records[c.SAMPLE_INPUTS_FILENAME_FORMAT.format("model")] = torch_save(((Payload(sentinel),), {}))


def use_pickle_route(records, sentinel):
    name = c.WEIGHTS_CONFIG_FILENAME_FORMAT.format("model")
    config = json.loads(records[name])
    fqn, meta = next(iter(config["config"].items()))
    meta["use_pickle"] = True
    records[c.WEIGHTS_DIR + meta["path_name"]] = torch_save(Payload(sentinel))
    records[name] = json.dumps(config).encode()


def opaque_constant_route(records, sentinel):
    name = c.CONSTANTS_CONFIG_FILENAME_FORMAT.format("model")
    config = json.loads(records[name])
    config["config"]["evil"] = {"path_name": c.OPAQUE_OBJ_FILENAME_PREFIX + "0", "is_param": False, "use_pickle": True,
                                "tensor_meta": None}
    records[c.CONSTANTS_DIR + c.OPAQUE_OBJ_FILENAME_PREFIX + "0"] = pickle.dumps(Payload(sentinel))
    records[name] = json.dumps(config).encode()


def opaque_constant_without_flag_route(records, sentinel):
    """The same opaque object with `use_pickle` false: torch reads the file name, not the flag."""
    opaque_constant_route(records, sentinel)
    name = c.CONSTANTS_CONFIG_FILENAME_FORMAT.format("model")
    config = json.loads(records[name])
    config["config"]["evil"]["use_pickle"] = False
    records[name] = json.dumps(config).encode()


def legacy_weights_route(records, sentinel):
    records[c.WEIGHTS_DIR + "model.pt"] = torch_save({"w": Payload(sentinel)})


def aoti_route(records, sentinel):
    records[c.AOTINDUCTOR_DIR + "model/model.so"] = b"\x7fELF"


ROUTES = {"sample inputs (weights_only fallback)": sample_inputs_route, "a use_pickle weight": use_pickle_route,
          "an opaque constant": opaque_constant_route, "an opaque constant, flag off": opaque_constant_without_flag_route,
          "legacy weights (weights_only fallback)": legacy_weights_route, "AOTInductor code": aoti_route}


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_crafted_pt2_runs_nothing_and_exits_2(saved, tmp_path, route, monkeypatch):
    """Mutations: no `_pt2_pickles` inspection (the guard still refuses, with the generic line, for
    every route torch unpickles; the AOTInductor route then gets through); no guard either: the
    sentinel is written and the run goes on (8c10fd2 exited 0 with PASS for two of three routes)."""
    sentinel = tmp_path / "sentinel"
    evil = craft(saved, tmp_path / "evil.pt2", lambda r: ROUTES[route](r, sentinel))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, [str(evil), "--fused-onnx", str(tmp_path / "f.onnx")])
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert "--trust-pickle" in text and r.output.strip().count("\n") == 0
    assert not sentinel.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt2", "m.pt2"]


@pytest.mark.parametrize("route", ["sample inputs (weights_only fallback)", "a use_pickle weight"])
def test_the_guard_alone_refuses_before_unpickling(saved, tmp_path, route, monkeypatch):
    """Defence in depth: with the inspection switched off, the guard around torch.export.load still
    refuses before the payload is unpickled."""
    from convattn.exporter import load

    sentinel = tmp_path / "sentinel"
    evil = craft(saved, tmp_path / "evil.pt2", lambda r: ROUTES[route](r, sentinel))
    monkeypatch.setattr(load, "_pt2_pickles", lambda path: [])
    with pytest.raises(InputError, match="--trust-pickle"):
        load_model(evil)
    assert not sentinel.exists()


def test_an_ordinary_pt2_loads_and_the_trusted_crafted_one_runs_as_torch_runs_it(saved, tmp_path):
    loaded = load_model(saved)
    assert loaded.kind == "torch.export" and loaded.default_input_shapes == [(1, 16, 5, 5)]
    sentinel = tmp_path / "sentinel"
    evil = craft(saved, tmp_path / "evil.pt2", lambda r: sample_inputs_route(r, sentinel))
    try:
        load_model(evil, trust_pickle=True)
    except Exception:  # noqa: BLE001  (what torch makes of the payload after running it is not ours)
        pass
    assert sentinel.exists()  # with the flag, torch unpickles, as the user asked


def test_a_pt2_with_two_top_level_folders_is_refused(saved, tmp_path):
    """torch reads the first record's folder; an inspection keyed past the folder would let a benign
    copy be inspected and another loaded. Mutation: no top-level folder check in `_pt2_pickles`."""
    import zipfile

    sentinel = tmp_path / "sentinel"
    evil = craft(saved, tmp_path / "evil.pt2", lambda r: sample_inputs_route(r, sentinel))
    two = tmp_path / "two.pt2"
    with zipfile.ZipFile(evil) as bad, zipfile.ZipFile(saved) as good, zipfile.ZipFile(two, "w") as out:
        for name in bad.namelist():
            out.writestr(name, bad.read(name))
        for name in good.namelist():
            out.writestr("benign/" + name.split("/", 1)[1], good.read(name))
    with pytest.raises(InputError, match="top-level folders"):
        load_model(two)
    assert not sentinel.exists()
