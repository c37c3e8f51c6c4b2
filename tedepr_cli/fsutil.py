"""Atomic outputs: a target is either absent, the old complete version, or the new one.

Everything tedepr writes goes through :func:`atomic_output`: it builds the result in a
hidden temporary sibling (same filesystem, so ``os.replace``/``rename`` is atomic), syncs it
and renames it into place only after the writer finished. Ctrl-C or an exception removes the
temporary; a ``kill -9`` can leave a hidden ``.NAME.tmp-*`` sibling but never a partial
target.

Every file and directory renamed into place has the mode a plain ``open``/``mkdir`` gives
(``0666 & ~umask``, ``0777 & ~umask``; executables ``0777 & ~umask``), whatever the writer
that made it chose: several (safetensors' ``save_file``, ``tempfile.mkstemp``) create
``0600`` files, which another user (a web server, a CI artifact store, a shared volume)
could not read.

Paths the user types go through :func:`expand_user` (``~`` only, also after a ``reader:``
prefix).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import InputNotFound, OutputError, opt

#: files only tedepr writes at the top of an output directory: an artifact (manifest.json,
#: model.safetensors), an export (export.json), a finetune run (state.pt, metrics.jsonl), a
#: `tedepr run` directory (recipe.json, bench.json). tests/test_fsutil.py keeps them in step
#: with the modules that write them.
TEDEPR_FILES = ("manifest.json", "model.safetensors", "export.json", "state.pt", "metrics.jsonl",
                "recipe.json", "bench.json")


_OWN_TEMP = re.compile(r"\.(.+\.(tmp|old)-[0-9a-f-]+|tedepr-probe-.+)")


#: what identifies the files whose names are common elsewhere (a web app's manifest.json, a
#: PyTorch user's state.pt): the artifact schema (artifact.SCHEMA) and the safetensors
#: metadata key of the manifest (artifact.META_MANIFEST); tests/test_fsutil.py keeps them in step
ARTIFACT_SCHEMA, MANIFEST_KEY = "tedepr-artifact", "tedepr.manifest"
_MAX_MANIFEST_BYTES = 64 << 20


def is_tedepr_file(f: Path) -> bool:
    """Whether ``f``, a file named in :data:`TEDEPR_FILES`, is one tedepr wrote. By content
    where the name is common: ``manifest.json`` must be JSON with tedepr's artifact schema,
    ``model.safetensors`` must carry tedepr's manifest in its metadata (read with
    ``safetensors.safe_open``: the header only), ``metrics.jsonl`` must be empty or start
    with a JSON object that has an ``epoch``, and ``state.pt`` counts only beside such a
    ``metrics.jsonl`` (a finetune run). The other names are tedepr's own."""
    if f.is_symlink() or not f.is_file():
        return False
    if f.name == "manifest.json":
        import json

        try:
            if f.stat().st_size > _MAX_MANIFEST_BYTES:
                return False
            d = json.loads(f.read_bytes())
        except (OSError, ValueError):
            return False
        return isinstance(d, dict) and d.get("schema") == ARTIFACT_SCHEMA
    if f.name == "model.safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(f), "pt") as st:
                return MANIFEST_KEY in (st.metadata() or {})
        except Exception:  # noqa: BLE001 - not a safetensors file, or a broken one: not ours
            return False
    if f.name == "state.pt":
        return is_tedepr_file(f.parent / "metrics.jsonl")
    if f.name == "metrics.jsonl":  # finetune's: one JSON object per epoch, each with its epoch
        import json

        try:
            with f.open("rb") as fh:
                first = fh.readline(1 << 20)
            d = json.loads(first) if first.strip() else {}
        except (OSError, ValueError):
            return False
        return isinstance(d, dict) and (not d or "epoch" in d)
    return f.name in TEDEPR_FILES


def is_tedepr_output(path: Path) -> bool:
    """Whether the directory ``path`` is one tedepr wrote (so ``--overwrite`` may replace
    it): empty, holding one of :data:`TEDEPR_FILES` that :func:`is_tedepr_file` recognises,
    or holding only directories that do (a `tedepr run` directory stopped before its
    recipe.json), besides the hidden temporaries tedepr itself leaves (``.NAME.tmp-*``,
    ``.NAME.old-*``, probes). Any other hidden entry (``.git``) makes it a user's
    directory."""
    entries = [c for c in path.iterdir() if not _OWN_TEMP.fullmatch(c.name)]
    if not entries or any(c.name in TEDEPR_FILES and is_tedepr_file(c) for c in entries):
        return True
    return all(c.is_dir() and not c.is_symlink() and any(is_tedepr_file(c / f) for f in TEDEPR_FILES)
               for c in entries)


def check_output(target: Path, overwrite: bool, directory: bool | None = None) -> None:
    """Fail early (before any work) with :class:`OutputError` if ``target`` cannot be
    written: it exists and ``overwrite`` is off; it is a directory tedepr did not write
    (:func:`is_tedepr_output`: ``overwrite`` never deletes a user's own directory); it is a
    directory and a file is to be written there (``directory=False``), or a file and a
    directory is (``directory=True``); or the nearest existing ancestor is not a directory
    tedepr can create a file in (a probe file is created and removed)."""
    if target.exists() or target.is_symlink():
        # a file where a directory goes, or the reverse, is refused whatever --overwrite says
        if directory is True and not target.is_dir():
            raise OutputError(f"{target} is a file; the output is a directory: name a directory path")
        if directory is False and target.is_dir() and not target.is_symlink():
            raise OutputError(f"{target} is a directory; the output is a file: name a file path")
        if not overwrite:
            raise OutputError(f"{target} already exists; pass {opt('overwrite')} to replace it")
        if target.is_dir() and not target.is_symlink():
            try:
                ours = is_tedepr_output(target)
            except OSError as e:
                raise OutputError(f"cannot inspect {target}: {e.strerror or e}") from None
            if not ours:
                raise OutputError(f"{target} is a non-empty directory tedepr did not write (none of "
                                  f"{', '.join(TEDEPR_FILES[:3])}, ... that is tedepr's): {opt('overwrite')} "
                                  "only replaces tedepr outputs; name a new path or remove it yourself")
    parent = target.parent if str(target.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot create {target}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {target}: {probe} is not writable")
    try:  # permission bits are not the whole story (read-only mounts, ACLs, root-squashed NFS)
        fd, name = tempfile.mkstemp(prefix=".tedepr-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise OutputError(f"cannot write {target}: {probe}: {e.strerror or e}") from None


def current_umask() -> int:
    """The process umask, read without changing it where the kernel reports it
    (``/proc/self/status``, Linux >= 4.7); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_mode(directory: bool = False, executable: bool = False, umask: int | None = None) -> int:
    """The mode ``open``/``mkdir`` would give a new file or directory under ``umask`` (the
    current one by default): ``0o666 & ~umask`` for a file, ``0o777 & ~umask`` for a
    directory or an executable (a compiled kernel library)."""
    umask = current_umask() if umask is None else umask
    return (0o777 if directory or executable else 0o666) & ~umask


def set_output_modes(path: str | Path) -> None:
    """Give ``path`` (a file, or a directory tree) the usual umask-respecting modes
    (:func:`output_mode`): files keep their executable kind, nothing else of the writer's
    choice survives. Symlinks are left alone (their mode means nothing)."""
    path = Path(path)
    umask = current_umask()
    items = [*path.rglob("*"), path] if path.is_dir() and not path.is_symlink() else [path]
    for p in items:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        is_dir = stat.S_ISDIR(st.st_mode)
        mode = output_mode(is_dir, bool(st.st_mode & stat.S_IXUSR) and not is_dir, umask)
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(p, mode)


_USER = re.compile(r"(?P<reader>[A-Za-z][A-Za-z0-9_-]+:)?(?P<path>~.*)", re.DOTALL)


def expand_user(path: str | Path) -> Path:
    """``path`` with a leading ``~`` / ``~user`` replaced by that home directory, also
    right after a ``reader:`` prefix (``npz:~/x.npz`` -> ``npz:/home/me/x.npz``).

    Only ``~`` is expanded (no ``$VARS``, no globs), as the shell does for a word it sees;
    the shell leaves ``reader:~/...`` alone, so tedepr does it. Every path option of the CLI
    and every ``--data`` spec passes through here.
    """
    s = str(path)
    m = _USER.fullmatch(s)
    if m is None:
        return Path(s)
    return Path((m.group("reader") or "") + os.path.expanduser(m.group("path")))


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
    check_output(target, overwrite, directory)
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
        set_output_modes(tmp)  # some writers create 0600 files: give outputs the usual modes
        _fsync_tree(tmp)
        if target.exists() or target.is_symlink():
            if not overwrite:  # appeared while we worked
                raise OutputError(f"{target} appeared while writing; pass {opt('overwrite')} to replace it")
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
