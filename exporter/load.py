"""Load the user's model file into an eval-mode nn.Module.

Accepted: a ConvMHAttn state_dict (channels from the weight shapes, heads from the caller),
a TorchScript archive, a `torch.export` .pt2, and, only when the caller says it trusts the
file, a whole pickled nn.Module (pickles execute code on load, so `torch.load` runs with
`weights_only=True` unless told otherwise). Anything else is refused with one line that
says what the file is and what was expected. Weights must be finite.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from convattn.errors import InputError, ModelError, first_line
from convattn.models import ConvMHAttn

DEMO_SPEC = (64, 64, 8)  # in_channels, out_channels, heads: head_dim 8, as in the README's figures
DEMO_SHAPE = (1, 64, 32, 32)
_BLOCK_KEYS = tuple(f"{c}_conv.{p}" for c in ("q", "k", "v", "out") for p in ("weight", "bias"))


@dataclass
class LoadedModel:
    module: nn.Module
    kind: str  # demo | state_dict | torchscript | torch.export | pickle
    source: str
    sha256: str | None = None
    default_input_shapes: list[tuple[int, ...]] | None = None


def demo_model() -> ConvMHAttn:
    """ConvMHAttn(64, 64, 8) with fixed random weights (seed 0)."""
    torch.manual_seed(0)
    return ConvMHAttn(*DEMO_SPEC).eval()


def load_model(
    path: str | Path | None = None,
    *,
    heads: int | None = None,
    trust_pickle: bool = False,
    imports: tuple[str, ...] = (),
    attention: str = "einsum",
) -> LoadedModel:
    """Load `path` (None: the embedded demo model) as an eval-mode module.

    Args:
        heads: number of heads, required for a state_dict (it is not in the weights).
        trust_pickle: allow unpickling a whole module (runs code from the file).
        imports: modules to import first, so a pickle's classes resolve.
        attention: attention mode of a ConvMHAttn built from a state_dict or the demo.
    """
    if path is None:
        model = demo_model()
        model.attention = attention
        return LoadedModel(model, "demo", "demo", None, [DEMO_SHAPE])
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: expected a model file, got a directory")
    for name in imports:
        _import(name)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = _load(path, heads, trust_pickle, attention)
    loaded.sha256 = digest
    _check_finite(loaded.module)
    return loaded


def _import(name: str) -> None:
    if "" not in sys.path:
        sys.path.insert(0, "")  # the user's own modules, next to where they run the tool
    try:
        importlib.import_module(name)
    except Exception as e:
        raise InputError(f"--import {name}: {type(e).__name__}: {e}") from e


def _archive_kind(path: Path) -> str | None:
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # a zip archive's start, but no central directory at its end
                raise InputError(f"{path}: a zip archive (TorchScript, .pt2 or torch.save) that ends before its "
                                 f"directory ({path.stat().st_size} bytes): the file is truncated; copy it again")
        return None
    try:
        names = zipfile.ZipFile(path).namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"{path}: not a readable archive ({e}); is the file truncated?") from e
    tails = {n.split("/", 1)[-1] for n in names}
    if "archive_format" in tails or "models/model.json" in tails:
        return "torch.export"
    if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
        return "torchscript"
    return "torch.save"


def _load(path: Path, heads, trust_pickle, attention) -> LoadedModel:
    kind = _archive_kind(path)
    what = "expected a torch.save checkpoint (state_dict or module), a TorchScript archive or a torch.export .pt2"
    try:
        if kind == "torchscript":
            return LoadedModel(torch.jit.load(str(path), map_location="cpu").eval(), "torchscript", str(path))
        if kind == "torch.export":
            pickled = [] if trust_pickle else _pt2_pickles(path)
            if pickled:
                more = f" (and {len(pickled) - 1} more)" if len(pickled) > 1 else ""
                raise InputError(f"{path}: a .pt2 whose {pickled[0]}{more}: loading it runs code from the file. "
                                 "If you trust it, rerun with --trust-pickle")
            with contextlib.nullcontext() if trust_pickle else _no_unpickling(path):
                program = torch.export.load(str(path))
            shapes = [tuple(t.shape) for t in program.example_inputs[0]] if program.example_inputs else None
            return LoadedModel(program.module(), "torch.export", str(path), default_input_shapes=shapes)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: a {kind} archive that does not load: {first_line(e)}") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        if "Unsupported global" not in str(e):
            raise InputError(f"{path}: not a PyTorch model file ({what}): {first_line(e)}") from e
        if not trust_pickle:
            raise InputError(
                f"{path}: contains pickled Python objects (a whole module), and unpickling runs code from the file. "
                "If you trust it, rerun with --trust-pickle (and --import MODULE so its classes resolve)"
            ) from e
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as e2:
            raise InputError(f"{path}: the pickle does not load: {first_line(e2)}; does --import name its module?") from e2
        if not isinstance(obj, nn.Module):
            raise InputError(f"{path}: expected a pickled nn.Module, got {type(obj).__name__}")
        return LoadedModel(eval_mode(obj), "pickle", str(path))
    if isinstance(obj, nn.Module):  # possible for modules made only of allow-listed types
        return LoadedModel(obj, "pickle", str(path))
    if isinstance(obj, dict):
        return _from_state_dict(path, obj, heads, attention)
    raise InputError(f"{path}: {what}, got a {type(obj).__name__}")


def _pt2_pickles(path: Path) -> list[str]:
    """What in a torch.export archive would run code when torch loads it, read before anything of it is
    unpickled (the archive's own JSON configs, and torch's restricted `weights_only` loader): weights and
    tensor constants saved with `use_pickle` (torch.load with weights_only=False), opaque constants
    (pickle.loads) and TorchScript objects, sample inputs or legacy payloads that only load with
    weights_only=False (torch falls back to it), AOTInductor code (a shared library). Names from
    torch's own `pt2_archive.constants`."""
    import io
    import json

    from torch.export.pt2_archive import constants as c

    found = []
    with zipfile.ZipFile(path) as z:
        roots = {n.split("/", 1)[0] for n in z.namelist()}
        if len(roots) != 1:  # torch reads the first record's folder: the one inspected must be the one loaded
            return [f"archive holds {len(roots)} top-level folders ({', '.join(sorted(roots))}), where torch writes one"]
        entries = {n.split("/", 1)[-1]: n for n in z.namelist() if "/" in n}

        def safe_to_load(name: str) -> bool:
            try:
                torch.load(io.BytesIO(z.read(entries[name])), map_location="cpu", weights_only=True)
                return True
            except Exception:  # noqa: BLE001  (what weights_only refuses, torch would unpickle)
                return False

        if any(name.startswith(c.AOTINDUCTOR_DIR) for name in entries):
            found.append("AOTInductor code (a shared library torch loads into this process)")
        models = [n[len(c.MODELS_DIR):-len(".json")] for n in entries if n.startswith(c.MODELS_DIR) and n.endswith(".json")]
        for model in models:
            for fmt, what in ((c.WEIGHTS_CONFIG_FILENAME_FORMAT, "weight"), (c.CONSTANTS_CONFIG_FILENAME_FORMAT, "constant")):
                config = fmt.format(model)
                if config not in entries:
                    continue
                for fqn, meta in json.loads(z.read(entries[config])).get("config", {}).items():
                    name = meta.get("path_name", "")
                    if meta.get("use_pickle"):
                        found.append(f"{what} {fqn!r} is pickled (use_pickle)")
                    elif name.startswith(c.OPAQUE_OBJ_FILENAME_PREFIX):
                        found.append(f"constant {fqn!r} is an opaque pickled object")
                    elif name.startswith(c.CUSTOM_OBJ_FILENAME_PREFIX):
                        found.append(f"constant {fqn!r} is a pickled TorchScript object")
            for name in (c.SAMPLE_INPUTS_FILENAME_FORMAT.format(model), f"{c.WEIGHTS_DIR}{model}.pt",
                         f"{c.CONSTANTS_DIR}{model}.pt"):
                if name in entries and not safe_to_load(name):
                    found.append(f"{name} holds Python objects torch's safe loader refuses (it would unpickle them)")
    return found


@contextlib.contextmanager
def _no_unpickling(path: Path):
    """Defence in depth around torch.export.load: any full unpickling (torch.load with weights_only=False,
    pickle.load/loads, TorchScript's object unpickler) the inspection did not foresee is refused before
    it runs."""
    import pickle

    def refuse(*args, **kwargs):
        raise InputError(f"{path}: loading this .pt2 would unpickle Python objects, which runs code from the file. "
                         "If you trust it, rerun with --trust-pickle")

    real_load = torch.load

    def guarded_load(*args, weights_only=None, **kwargs):
        if weights_only is False:
            refuse()
        return real_load(*args, weights_only=True if weights_only is None else weights_only, **kwargs)

    saved = (torch.load, pickle.load, pickle.loads, torch._C._pickle_load_obj)
    torch.load, pickle.load, pickle.loads, torch._C._pickle_load_obj = guarded_load, refuse, refuse, refuse
    try:
        yield
    finally:
        torch.load, pickle.load, pickle.loads, torch._C._pickle_load_obj = saved


def _from_state_dict(path: Path, state: dict, heads, attention) -> LoadedModel:
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    prefixes = {k[: -len(b)] for k in state for b in _BLOCK_KEYS if k.endswith(b)}
    if len(prefixes) != 1 or not all(next(iter(prefixes)) + k in state for k in _BLOCK_KEYS):
        raise InputError(
            f"{path}: a state_dict, but not of one ConvMHAttn block: expected keys {', '.join(_BLOCK_KEYS)}; "
            "for other architectures save the whole module (torch.save(model)) or a TorchScript/torch.export file"
        )
    prefix = prefixes.pop()
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in _BLOCK_KEYS}
    weight = state["q_conv.weight"]
    if weight.dim() != 4 or weight.shape[2:] != (1, 1):
        raise InputError(f"{path}: q_conv.weight: expected a 1x1 conv weight (C_out, C_in, 1, 1), got {tuple(weight.shape)}")
    c_out, c_in = int(weight.shape[0]), int(weight.shape[1])
    if heads is None:
        raise InputError(f"{path}: a state_dict does not record the number of heads: pass --heads N (N divides {c_out})")
    if heads < 1 or c_out % heads:
        raise InputError(f"--heads: expected a divisor of the {c_out} channels, got {heads}")
    module = ConvMHAttn(c_in, c_out, heads, attention)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise InputError(f"{path}: the weights do not fit ConvMHAttn({c_in}, {c_out}, {heads}): {first_line(e)}") from e
    return LoadedModel(module, "state_dict", str(path), default_input_shapes=[(1, c_in, 32, 32)])


def eval_mode(module: nn.Module) -> nn.Module:
    """module.eval(), where allowed: a torch.export module is fixed in the mode it was exported in."""
    try:
        return module.eval()
    except NotImplementedError:
        return module


def _check_finite(module: nn.Module) -> None:
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    for name, t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ModelError(f"weight {name!r} has {bad} NaN/inf values: the model cannot produce finite outputs")
