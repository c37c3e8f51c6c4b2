"""Atomic outputs: a target is either absent, the old complete version, or the new one.

Everything tedepr writes goes through :func:`atomic_output`: it builds the result in a
hidden temporary sibling (same filesystem, so ``os.replace``/``rename`` is atomic), syncs it
and renames it into place only after the writer finished. Ctrl-C or an exception removes the
temporary; a ``kill -9`` can leave a hidden ``.NAME.tmp-*`` sibling but never a partial
target.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import InputNotFound, OutputError


def check_output(target: Path, overwrite: bool) -> None:
    """Fail early (before any work) if ``target`` exists and ``overwrite`` is off."""
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise OutputError(f"{target} already exists; pass --overwrite to replace it")
    parent = target.parent if str(target.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot create {target}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {target}: {probe} is not writable")


def _fsync_tree(path: Path) -> None:
    items = [path] if path.is_file() else [*path.rglob("*"), path]
    for p in items:
        with contextlib.suppress(OSError):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_output(target: str | Path, overwrite: bool = False, directory: bool = False
                  ) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to ``target`` when the block succeeds.

    ``directory=True`` creates the temporary as a directory (artifacts); otherwise the
    caller creates a file at the yielded path.
    """
    target = Path(target)
    check_output(target, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {target.parent}: {e.strerror}") from None
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if directory:
            tmp.mkdir()
        yield tmp
        if not tmp.exists():
            raise OutputError(f"internal: nothing was written for {target}")
        if tmp.is_file():  # some writers create 0600 files: give outputs the usual umask mode
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        _fsync_tree(tmp)
        if target.exists() or target.is_symlink():
            if not overwrite:  # appeared while we worked
                raise OutputError(f"{target} appeared while writing; pass --overwrite to replace it")
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            _remove(old)
        else:
            os.rename(tmp, target)
    except OSError as e:
        _remove(tmp)
        if e.errno == errno.ENOSPC:
            raise OutputError(f"no space left on device while writing {target}") from None
        raise OutputError(f"cannot write {target}: {e.strerror or e}") from None
    except BaseException:
        _remove(tmp)
        raise


def require_file(path: str | Path, what: str = "input") -> Path:
    """Resolve an input path that must be an existing readable file."""
    p = Path(path)
    if not p.exists():
        raise InputNotFound(f"{what} {p} does not exist")
    if p.is_dir():
        raise InputNotFound(f"{what} {p} is a directory, expected a file")
    if not os.access(p, os.R_OK):
        raise InputNotFound(f"{what} {p} is not readable")
    return p
