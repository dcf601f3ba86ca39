"""Each loader kind, and each kind of file that is not a model."""

import pytest
import torch
from user_models import TwoBlocks

from convattn.errors import InputError, ModelError
from convattn.exporter.load import load_model
from convattn.models import ConvMHAttn, SeedEinsum


@pytest.fixture
def block():
    return ConvMHAttn(16, 16, 2).eval()


def same_function(a, b, *shape):
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=1e-6, rtol=0)


def test_demo():
    loaded = load_model(None)
    assert loaded.kind == "demo" and isinstance(loaded.module, ConvMHAttn)
    assert (loaded.module.num_heads, loaded.module.head_dim) == (8, 8)
    torch.testing.assert_close(loaded.module.q_conv.weight, load_model(None).module.q_conv.weight)  # fixed weights


def test_state_dict_needs_heads_and_takes_channels_from_weights(tmp_path):
    path = tmp_path / "sd.pt"
    seed = SeedEinsum(12, 24, 4)  # a forum checkpoint loads into ConvMHAttn
    torch.save(seed.state_dict(), path)
    with pytest.raises(InputError, match="--heads"):
        load_model(path)
    with pytest.raises(InputError, match="divisor of the 24 channels"):
        load_model(path, heads=5)
    loaded = load_model(path, heads=4)
    assert loaded.kind == "state_dict" and loaded.default_input_shapes == [(1, 12, 32, 32)]
    x = torch.randn(1, 12, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), seed(x, x, x), atol=1e-6, rtol=0)
    assert len(loaded.sha256) == 64


def test_torchscript(tmp_path, block):
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.trace(block, torch.randn(1, 16, 4, 4)), path)
    loaded = load_model(path)
    assert loaded.kind == "torchscript"
    same_function(loaded.module, block, 1, 16, 4, 4)


def test_torch_export_pt2(tmp_path, block):
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(block, (torch.randn(1, 16, 4, 4),)), path)
    loaded = load_model(path)
    assert loaded.kind == "torch.export" and loaded.default_input_shapes == [(1, 16, 4, 4)]
    same_function(loaded.module, block, 1, 16, 4, 4)


def test_pickled_module_only_with_trust(tmp_path):
    path = tmp_path / "m.pt"
    model = TwoBlocks().eval()
    torch.save(model, path)
    with pytest.raises(InputError, match="--trust-pickle"):
        load_model(path)
    loaded = load_model(path, trust_pickle=True, imports=("user_models",))
    assert loaded.kind == "pickle"
    same_function(loaded.module, model, 1, 3, 4, 4)


def test_import_of_missing_module(tmp_path, block):
    path = tmp_path / "m.pt"
    torch.save(block.state_dict(), path)
    with pytest.raises(InputError, match="--import no_such_module"):
        load_model(path, heads=2, imports=("no_such_module",))


@pytest.mark.parametrize(
    "content,match",
    [
        (b"hello, I am a text file\n", "not a PyTorch model file"),
        (bytes(range(256)) * 8, "not a PyTorch model file"),
        (None, "no such file"),
    ],
    ids=["text", "random-bytes", "missing"],
)
def test_files_that_are_not_models(tmp_path, content, match):
    path = tmp_path / "m.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=match):
        load_model(path)


def test_truncated_archive(tmp_path, block):
    path = tmp_path / "m.pt"
    torch.save(block.state_dict(), path)
    path.write_bytes(path.read_bytes()[:700])
    with pytest.raises(InputError):
        load_model(path, heads=2)


def test_state_dict_of_another_architecture(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(torch.nn.Linear(3, 3).state_dict(), path)
    with pytest.raises(InputError, match="not of one ConvMHAttn block"):
        load_model(path, heads=1)


def test_nan_weights_are_refused(tmp_path, block):
    path = tmp_path / "m.pt"
    with torch.no_grad():
        block.v_conv.weight[0, 0] = float("nan")
    torch.save(block.state_dict(), path)
    with pytest.raises(ModelError, match="v_conv.weight.*NaN"):
        load_model(path, heads=2)


def test_first_line_never_cuts_a_sentence():
    """A warning cut mid-sentence ("...inferred ranges from model tracing:") said nothing."""
    from convattn.errors import first_line

    e = ValueError("Traceback noise\n<class 'UserError'>: inferred ranges from model tracing:\n  batch: [2, inf]\nmore")
    assert first_line(e) == "<class 'UserError'>: inferred ranges from model tracing: batch: [2, inf]"
    assert first_line(ValueError("")) == "ValueError"


@pytest.mark.parametrize("kind", ["torchscript", "pt2", "pickle"])
@pytest.mark.parametrize("keep", [0.3, 0.95])
def test_a_truncated_model_file_says_so(tmp_path, kind, keep):
    """A copy cut short said "[Errno 22] Invalid argument" (torch's reader on a zip with no directory).
    Mutation: no truncation check in `_archive_kind`."""
    import torch

    from convattn.errors import InputError
    from convattn.exporter.load import load_model
    from convattn.models import ConvMHAttn

    m, path = ConvMHAttn(16, 16, 2).eval(), tmp_path / "m.pt"
    x = torch.randn(1, 16, 4, 4)
    {"torchscript": lambda: torch.jit.save(torch.jit.trace(m, x), path),
     "pt2": lambda: torch.export.save(torch.export.export(m, (x,)), path),
     "pickle": lambda: torch.save(m, path)}[kind]()
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(InputError, match="truncated"):
        load_model(path, trust_pickle=True)
