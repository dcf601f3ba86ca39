"""Writing outputs: atomically, and never over an existing file unless asked."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from convattn.errors import OutputError


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: no half-written file, ever."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output(path: Path | None, force: bool) -> None:
    if path is None:
        return
    if path.is_dir():
        raise OutputError(f"{path}: is a directory, expected a file path")
    if path.exists() and not force:
        raise OutputError(f"{path}: exists; pass --force to overwrite")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputError(f"{path}: cannot write to directory {parent}")
