"""Writing outputs: atomically, readable as the umask says, and never over an existing file unless asked."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from convattn.errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: no half-written file, ever. The file
    gets the mode a plain `open` would give it (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror})") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({e.strerror})") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output(path: Path | None, force: bool) -> None:
    """Refuse an output path before any work: an existing file (without `force`), a directory, or a
    folder where a file cannot be created (tried, not guessed from permission bits)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory, expected a file path")
    if path.exists() and not force:
        raise OutputError(f"{path}: exists; pass --force to overwrite")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{path}: cannot write to directory {parent} (it does not exist)")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"{path}: cannot write to directory {parent} ({e.strerror})") from e


def check_distinct(paths: dict[str, Path | None]) -> None:
    """Every output its own file: {option: path}."""
    seen: dict[Path, str] = {}
    for option, path in paths.items():
        if path is None:
            continue
        key = Path(os.path.abspath(path))
        if key in seen:
            raise OutputError(f"{option} and {seen[key]} name the same file {path}: give each output its own path")
        seen[key] = option
