"""Writing outputs: atomically, readable as the umask says, never over an existing file unless asked,
never over an input (by inode, not name), and, for a run, all together or not at all (`Outputs`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from convattn.errors import OutputError

from .. import external_data


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


def _identities(path) -> set:
    """What makes two spellings one file: its resolved path, and (device, inode) where it exists
    (symlinks followed, hard links alike)."""
    keys = {("path", os.path.realpath(path))}
    try:
        st = os.stat(path)
        keys.add(("inode", st.st_dev, st.st_ino))
    except OSError:
        pass
    return keys


def check_distinct(paths: dict[str, Path | None], inputs: dict[str, Path | None] | None = None) -> None:
    """Every output its own file ({option: path}), and none of them an input ({what: path}): by inode,
    so another spelling, a symlink or a hard link of the model is refused too, `--force` or not."""
    owners = {key: what for what, p in (inputs or {}).items() if p is not None for key in _identities(p)}
    seen: dict = {}
    for option, path in paths.items():
        if path is None:
            continue
        for key in _identities(path):
            if key in owners:
                raise OutputError(f"{option} {path} is the {owners[key]}: an output may never replace an input; "
                                  "give it another path")
            if key in seen:
                raise OutputError(f"{option} and {seen[key]} name the same file {path}: give each output its own path")
            seen[key] = option


class Outputs:
    """A run's outputs, staged as temporaries beside their targets and put in place together only when
    the run succeeds (`commit`); `discard` (any failure, an interrupt, SIGTERM) removes every temporary,
    and the folders this made. Without `force` a target is created exclusively (a hard link of the
    temporary, or an O_EXCL claim where the filesystem has no hard links), so of two runs writing the
    same file one wins and the other gets one line; with `force` it is replaced atomically. A staged
    folder (a Triton model) replaces its target folder whole."""

    def __init__(self, force: bool):
        self.force = force
        self.staged: list[tuple[Path, Path, bool]] = []  # (temporary, target, replace whatever force says)
        self.made: list[Path] = []  # folders made for targets
        self.scratch: list[Path] = []  # working folders, removed when the run ends either way

    def _parent(self, target: Path) -> None:
        if not target.parent.exists():
            try:
                target.parent.mkdir(mode=0o700, parents=True)
            except OSError as e:
                raise OutputError(f"{target}: cannot make its folder ({e.strerror})") from e
            self.made.append(target.parent)

    def temporary(self, target: Path) -> Path:
        """A fresh temporary path beside `target` (the file created empty), for a library that writes the
        file itself (`engine.build_engine`), staged with `adopt`."""
        target = Path(target)
        self._parent(target)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        except OSError as e:
            raise OutputError(f"{target}: cannot write ({e.strerror})") from e
        os.close(fd)
        return Path(tmp)

    def temporary_folder(self, target: Path) -> Path:
        """A fresh temporary folder beside `target`, staged to replace it (`adopt`)."""
        target = Path(target)
        self._parent(target)
        try:
            return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        except OSError as e:
            raise OutputError(f"{target}: cannot write ({e.strerror})") from e

    def scratch_folder(self, near: Path) -> Path:
        """A working folder beside `near` (its filesystem, not a RAM-backed /tmp: a large model's
        tensors go there), removed by `discard`, which ends every run."""
        near = Path(near)
        self._parent(near)
        try:
            path = Path(tempfile.mkdtemp(prefix=f".{near.name}.work.", dir=near.parent))
        except OSError as e:
            raise OutputError(f"{near}: cannot make a working folder beside it ({e.strerror})") from e
        self.scratch.append(path)
        return path

    def write_model(self, target: Path, model) -> None:
        """An ONNX model staged as `target`; one with external data also stages its tensors as
        `<target>.data` beside it (`external_data.save`), which needs --force to replace too."""
        if external_data.folder(model) is None:
            self.write(target, model.SerializeToString())
            return
        data = external_data.data_path(target)
        check_output(data, self.force)
        tmp, tmp_data = self.temporary(target), self.temporary(data)
        self.adopt(tmp, target)
        self.adopt(tmp_data, data)
        external_data.save(model, tmp, tmp_data, location=data.name)

    def adopt(self, tmp: Path, target: Path, replace: bool = False) -> None:
        """Stage `tmp` as `target`; `replace`: put in place over an existing file whatever `force` says
        (a timing cache, read and rewritten by design)."""
        self.staged.append((Path(tmp), Path(target), replace))

    def write(self, target: Path, data: bytes) -> None:
        tmp = self.temporary(target)
        self.adopt(tmp, target)
        try:
            tmp.write_bytes(data)
        except OSError as e:
            raise OutputError(f"{target}: cannot write ({e.strerror})") from e

    def commit(self) -> None:
        """Every staged output in place, with SIGINT and SIGTERM held until it is done (a set of files,
        not some old and some new)."""
        import shutil
        import signal
        import threading

        held = threading.current_thread() is threading.main_thread()
        if held:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        placed: list[Path] = []
        try:
            for tmp, target, replace in self.staged:
                if tmp.is_dir():
                    if target.exists() and not self.force:
                        raise OutputError(f"{target}: exists (written by another run meanwhile); pass --force")
                    if target.exists():
                        shutil.rmtree(target)
                    os.replace(tmp, target)
                else:
                    os.chmod(tmp, 0o666 & ~_umask())
                    if self.force or replace:
                        os.replace(tmp, target)
                    else:
                        _create_exclusively(tmp, target)
                placed.append(target)
        except BaseException as e:
            if not self.force:  # what this run created goes again: nothing half-written
                for target, (_, _, replace) in zip(placed, self.staged):
                    if not replace:
                        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
            self.discard()
            if isinstance(e, OSError):
                raise OutputError(f"cannot put the outputs in place ({e.strerror or e}): nothing was written") from e
            raise
        finally:
            if held:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        self.staged.clear()

    def discard(self) -> None:
        import shutil

        for tmp, _, _ in self.staged:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        self.staged.clear()
        for path in self.scratch:
            shutil.rmtree(path, ignore_errors=True)
        self.scratch.clear()
        for folder in reversed(self.made):
            try:
                folder.rmdir()
            except OSError:
                pass
        self.made.clear()


def _create_exclusively(tmp: Path, target: Path) -> None:
    """`tmp` becomes `target`, which must not exist: a hard link (atomic), or, on a filesystem without
    them, an O_EXCL claim of the name and then a rename over the claim."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise OutputError(f"{target}: exists (written by another run meanwhile); pass --force to overwrite") from None
    except OSError:  # no hard links here (vfat, exFAT, some network mounts)
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise OutputError(f"{target}: exists (written by another run meanwhile); pass --force to overwrite") from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)
