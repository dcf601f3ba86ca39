"""The one exception hierarchy of convattn.

Library code raises these with "expected X, got Y" messages that say what to do; only the
CLI prints them (one line) and maps each class to its documented exit code.
"""

from __future__ import annotations


class ConvattnError(Exception):
    """Base class. `exit_code` is what `convattn-export` exits with for this error."""

    exit_code = 2


class InputError(ConvattnError):
    """The user's input is unusable: a missing or unreadable file, a bad option value."""

    exit_code = 2


class ModelError(ConvattnError):
    """The model loads but cannot be exported as asked: no attention block, bad weights."""

    exit_code = 3


class ExportError(ConvattnError):
    """torch.onnx.export failed, or produced a graph that onnx.checker rejects."""

    exit_code = 3


class OutputError(ConvattnError):
    """An output path exists (and --force was not given) or cannot be written."""

    exit_code = 2


class ParityError(ConvattnError):
    """The fused graph does not match PyTorch within tolerance."""

    exit_code = 1


class EngineBuildError(ConvattnError):
    """TensorRT's parser or builder refused the graph; the message carries its log."""

    exit_code = 4


class DriverError(EngineBuildError):
    """A plan cannot run here: its PTX needs a newer driver, or it was built for another GPU family."""

    exit_code = 4


class TensorRTUnavailable(ConvattnError):
    """An engine was asked for, but the `tensorrt` package cannot be imported here."""

    exit_code = 5


class PluginError(ConvattnError, ValueError):
    """The FlashAttention op refused its arguments (a layout, a shape, an attribute): a ValueError too,
    so code written against the op's earlier errors keeps working."""

    exit_code = 2


class KernelError(ConvattnError, RuntimeError):
    """A kernel could not be compiled or launched (Triton, the CUDA driver)."""

    exit_code = 4


def first_line(e: BaseException) -> str:
    """The informative line of an exception from a library: the dynamo exporter's `<class ...>`
    summary where there is one, else the first non-empty line, else the type's name."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    summary = [i for i, ln in enumerate(lines) if ln.startswith("<class")]
    if not lines:
        return type(e).__name__
    i = summary[0] if summary else 0
    line = lines[i]
    if line.endswith(":") and i + 1 < len(lines):  # a sentence that goes on below: one more line
        line = f"{line} {lines[i + 1]}"
    return line
