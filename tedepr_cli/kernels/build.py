"""Compile the shipped C kernel on first use and load it with ctypes (DESIGN §4).

``kernels/lstm.c`` (the compiled LSTM recurrence) is a second, independent library, built
and cached the same way by :func:`load_lstm`.

Why compile at run time: ``-march=native`` code is 3-6x faster than a portable wheel build
for these kernels and the source is one small file (< 2 s to build). The shared library is
cached in a user cache directory under a key made of the source, the compiler and its
version, the flags and the CPU's feature flags, so a new CPU, compiler or source gets a
fresh build and an unchanged one loads in milliseconds.

Environment:
  ``TEDEPR_CC``         compiler to use (default: the first of ``cc``, ``gcc``, ``clang``)
  ``TEDEPR_CFLAGS``     optimisation flags (default ``-O3 -march=native``); ``-shared -fPIC
                        -pthread`` are always added
  ``TEDEPR_CACHE_DIR``  cache directory (default ``$XDG_CACHE_HOME/tedepr`` or
                        ``~/.cache/tedepr``); libraries go in its ``kernels/`` folder
  ``TEDEPR_KERNELS=0``  never build or load: everything runs on the torch path

No compiler or a failed build is never an error: :func:`available` is False, a notice is
logged once on the ``tedepr`` logger and callers use the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import opt
from ..fsutil import output_mode
from ..logs import log
from ..machine import cpu_features

ABI = 4  # must equal TEDEPR_ABI in kernels/chain.c
LSTM_ABI = 2  # must equal TEDEPR_LSTM_ABI in kernels/lstm.c
DEFAULT_CFLAGS = "-O3 -march=native"
REQUIRED_FLAGS = ("-shared", "-fPIC", "-pthread")
SOURCE_NAME = "chain.c"
LSTM_SOURCE = "lstm.c"  # the compiled LSTM recurrence (:mod:`.lstm`), a library of its own

_lock = threading.Lock()
_state: dict[str, Any] | None = None
_lib: ctypes.CDLL | None = None
_others: dict[str, tuple[ctypes.CDLL | None, dict[str, Any]]] = {}  # other sources, by name


def source_path(name: str = SOURCE_NAME) -> Path:
    """The packaged C source ``name`` (top-level ``kernels/`` ships as ``tedepr_cli.csrc``);
    in a source checkout used without installing (``PYTHONPATH``), the ``kernels/`` folder."""
    try:
        return Path(str(importlib.resources.files("tedepr_cli.csrc") / name))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "kernels" / name


def cache_dir() -> Path:
    """Where compiled kernels are kept (one file per build key)."""
    root = os.environ.get("TEDEPR_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "tedepr") if xdg else os.path.join(Path.home(), ".cache", "tedepr")
    return Path(root) / "kernels"


def find_compiler() -> str | None:
    """``TEDEPR_CC`` if set (and runnable), else the first C compiler on PATH."""
    cc = os.environ.get("TEDEPR_CC")
    if cc:
        return shutil.which(cc)
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def cflags() -> list[str]:
    """Optimisation flags (``TEDEPR_CFLAGS`` or the default) plus the flags a shared library needs."""
    return shlex.split(os.environ.get("TEDEPR_CFLAGS", DEFAULT_CFLAGS)) + list(REQUIRED_FLAGS)


def _compiler_version(cc: str) -> str:
    out = subprocess.run([cc, f"{opt('version')}"], capture_output=True, text=True, timeout=30)
    return (out.stdout or out.stderr).strip()


def build_key(source: bytes, cc: str, version: str, flags: list[str], abi: int = ABI) -> str:
    """Hash of everything the compiled library depends on."""
    h = hashlib.sha256()
    for part in (source, cc.encode(), version.encode(), " ".join(flags).encode(),
                 cpu_features().encode(), platform.machine().encode(), str(abi).encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _compile(cc: str, flags: list[str], src: Path, target: Path) -> None:
    """Compile to a temporary name in the cache and rename it into place: the rename is
    atomic, so a concurrent process sees either no library or a whole one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(src)], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
            raise RuntimeError(f"{Path(cc).name} exited {proc.returncode}: " + " | ".join(tail))
        os.chmod(tmp, output_mode(executable=True))  # mkstemp made it 0600
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _locked(path: Path):
    """An exclusive lock file beside the library, so two processes do not both compile
    (a no-op where fcntl does not exist; the atomic rename keeps that case safe too)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    f = open(path, "a+")  # noqa: SIM115 - closed by _unlock
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    return f


def _unlock(f) -> None:
    if f is not None:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


def _setup(lib: ctypes.CDLL) -> None:
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    lib.tedepr_abi.restype = ctypes.c_int
    lib.tedepr_abi.argtypes = []
    lib.tedepr_vector_floats.restype = ctypes.c_int
    lib.tedepr_vector_floats.argtypes = []
    lib.tedepr_chain_workspace.restype = i64
    lib.tedepr_chain_workspace.argtypes = [ptr, i64, i32, i32, i64]
    lib.tedepr_chain_run.restype = ctypes.c_int
    lib.tedepr_chain_run.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i32, i32, ptr, ptr, i32, i64]
    lib.tedepr_chain_forward.restype = ctypes.c_int
    lib.tedepr_chain_forward.argtypes = [ptr, ptr, ptr, i64, ptr]
    lib.tedepr_chain_forward_fm.restype = ctypes.c_int
    lib.tedepr_chain_forward_fm.argtypes = [ptr, ptr, ptr, i64, ptr]
    lib.tedepr_program_workspace.restype = i64
    lib.tedepr_program_workspace.argtypes = [ptr, i64, i64]
    lib.tedepr_program_run.restype = ctypes.c_int
    lib.tedepr_program_run.argtypes = [ptr, ptr, ptr, i64, ptr]
    lib.tedepr_program_forward.restype = ctypes.c_int
    lib.tedepr_program_forward.argtypes = [ptr, ptr, ptr, i64]
    lib.tedepr_chain_train_saved.restype = i64
    lib.tedepr_chain_train_saved.argtypes = [ptr, i64]
    lib.tedepr_chain_train_forward.restype = ctypes.c_int
    lib.tedepr_chain_train_forward.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr]
    lib.tedepr_chain_train_backward.restype = ctypes.c_int
    lib.tedepr_chain_train_backward.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64]


def _setup_lstm(lib: ctypes.CDLL) -> None:
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    lib.tedepr_lstm_abi.restype = ctypes.c_int
    lib.tedepr_lstm_abi.argtypes = []
    lib.tedepr_lstm_layer.restype = ctypes.c_int
    lib.tedepr_lstm_layer.argtypes = [i64, i64, i32, i32, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr,
                                      ptr, i64, i64, ptr, ptr]
    lib.tedepr_lstm_train_forward.restype = ctypes.c_int
    lib.tedepr_lstm_train_forward.argtypes = [i64, i64, i32, i32, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr,
                                              ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr]
    lib.tedepr_lstm_train_backward.restype = ctypes.c_int
    lib.tedepr_lstm_train_backward.argtypes = [i64, i64, i32, i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                                               i64, i64, ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr]


# source -> (library prefix, ABI symbol, expected ABI, ctypes setup)
_SOURCES = {SOURCE_NAME: ("chain", "tedepr_abi", ABI, _setup),
            LSTM_SOURCE: ("lstm", "tedepr_lstm_abi", LSTM_ABI, _setup_lstm)}


def _load(name: str = SOURCE_NAME) -> tuple[ctypes.CDLL | None, dict[str, Any]]:
    prefix, abi_symbol, abi, setup = _SOURCES[name]
    st: dict[str, Any] = {"available": False, "compiler": None, "compiler_version": None,
                          "flags": cflags(), "cache_dir": str(cache_dir()), "library": None,
                          "compiled": False, "build_seconds": None, "vector_floats": None,
                          "reason": None}
    if os.environ.get("TEDEPR_KERNELS", "1").strip().lower() in ("0", "off", "no", "false"):
        st["reason"] = "disabled by TEDEPR_KERNELS"
        return None, st
    cc = find_compiler()
    if cc is None:
        want = os.environ.get("TEDEPR_CC")
        st["reason"] = (f"C compiler {want!r} not found (TEDEPR_CC)" if want
                        else "no C compiler found (install gcc or set TEDEPR_CC)")
        return None, st
    st["compiler"] = cc
    try:
        version = _compiler_version(cc)
        st["compiler_version"] = version.splitlines()[0] if version else "?"
        src = source_path(name)
        key = build_key(src.read_bytes(), cc, version, st["flags"], abi)
        d = cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        target = d / f"{prefix}-{key}.so"
        if not target.exists():
            lock = _locked(d / f"{prefix}-{key}.lock")
            try:
                if not target.exists():  # another process may have built it meanwhile
                    t0 = time.perf_counter()
                    _compile(cc, st["flags"], src, target)
                    st["compiled"] = True
                    st["build_seconds"] = round(time.perf_counter() - t0, 3)
            finally:
                _unlock(lock)
        st["library"] = str(target)
        lib = ctypes.CDLL(str(target))
        setup(lib)
        got = getattr(lib, abi_symbol)()
        if got != abi:
            raise RuntimeError(f"library ABI {got} != expected {abi}")
        if name == SOURCE_NAME:
            st["vector_floats"] = lib.tedepr_vector_floats()
    except Exception as e:  # any failure means "use the torch path", never a crash
        st["reason"] = f"build failed: {type(e).__name__}: {e}"
        return None, st
    st["available"] = True
    return lib, st


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first use; None if it cannot be had
    (the reason is in :func:`status`, and was logged once)."""
    global _state, _lib
    if _state is not None:  # fast path: every kernel call asks
        return _lib
    with _lock:
        if _state is None:
            _lib, _state = _load()
            if not _state["available"]:
                log.warning(f"compiled kernels unavailable ({_state['reason']}); "
                            "using the torch path")
            elif _state["compiled"]:
                log.debug(f"compiled {_state['library']} in {_state['build_seconds']} s")
        return _lib


def load_lstm() -> ctypes.CDLL | None:
    """The compiled LSTM recurrence (``kernels/lstm.c``), built on first use like
    :func:`load`; None if it cannot be had (the reason is logged once)."""
    got = _others.get(LSTM_SOURCE)
    if got is not None:
        return got[0]
    with _lock:
        if LSTM_SOURCE not in _others:
            lib, st = _load(LSTM_SOURCE)
            if not st["available"]:
                log.warning(f"compiled LSTM kernel unavailable ({st['reason']}); using the torch path")
            _others[LSTM_SOURCE] = (lib, st)
        return _others[LSTM_SOURCE][0]


def available() -> bool:
    """Whether the compiled CPU kernel can run here (builds it on first call)."""
    return load() is not None


def status(source: str = SOURCE_NAME) -> dict[str, Any]:
    """What :func:`load` (or, for ``source="lstm.c"``, :func:`load_lstm`) found: compiler,
    flags, cache, library, available, reason."""
    if source != SOURCE_NAME:
        load_lstm()
        return dict(_others[source][1])
    load()
    assert _state is not None
    return dict(_state)


def reset() -> None:
    """Forget the loaded library so the next :func:`load` looks again (tests, after
    changing the environment). A library already mapped stays usable by live objects."""
    global _state, _lib
    with _lock:
        _state, _lib = None, None
        _others.clear()
