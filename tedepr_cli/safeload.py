"""Reading the NumPy, PyTorch and safetensors files a user passes, without running code
from them and with one-line errors.

Every ``.npz``/``.npy`` (data, clips, export samples), ``.pt``/``.pth`` (checkpoints,
finetune resume states, ``.pt2`` members) and ``.safetensors`` file tedepr reads goes
through this module: NumPy with ``allow_pickle=False``, PyTorch with ``weights_only=True``.
A file that is not what it should be (random bytes, a text file renamed, a truncated
download, object arrays) raises :class:`~tedepr_cli.errors.BadInput` (exit 4) naming the
file and what is wrong, in tedepr's words: the libraries' own messages advise loading
unsafely (``allow_pickle=True``, ``weights_only=False``), which tedepr never does for these
files, so they are never passed on. A PyTorch file that is a well-formed pickle building
Python objects raises :class:`PickledObjects` (an :class:`~tedepr_cli.errors.UnsafeInput`,
exit 5): only :mod:`tedepr_cli.loading` may load such a checkpoint, behind ``--trust-pickle``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
import pickletools
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import BadInput, InputNotFound, UnsafeInput
from .logs import log

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first local header, or an empty zip
_UNSAFE_ADVICE = ("allow_pickle", "weights_only", "pickle.load", "trusted source", "unsafely")


class PickledObjects(UnsafeInput):
    """A PyTorch file that is a well-formed pickle importing or calling Python objects:
    loading it would run code stored in the file."""


def first_line(e: BaseException | str) -> str:
    """The first line of an exception's (or a text's) message; an exception's type's name
    when it has none."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _cause(e: BaseException) -> str:
    """A library's message fit to repeat: its first line, unless it suggests loading the
    file unsafely (then only the exception's type)."""
    text = first_line(e)
    if any(a in text for a in _UNSAFE_ADVICE):
        return type(e).__name__
    return text


def _head(path: Path, data: bytes | None = None, n: int = 64) -> bytes:
    if data is not None:
        return data[:n]
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except IsADirectoryError:
        raise InputNotFound(f"{path} is a directory, expected a file") from None
    except FileNotFoundError:
        raise InputNotFound(f"{path} does not exist") from None
    except OSError as e:
        raise InputNotFound(f"{path} cannot be read: {e.strerror or e}") from None


def sniff(head: bytes) -> str:
    """What the first bytes of a file say it is, in words: ``empty``, ``a zip archive``,
    ``an .npy array``, ``a Python pickle``, ``a text file`` or ``unrecognized bytes``."""
    if not head:
        return "empty"
    if head.startswith(ZIP_MAGICS):
        return "a zip archive"
    if head.startswith(NPY_MAGIC):
        return "an .npy array"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "a Python pickle"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "a text file"
    return "unrecognized bytes"


def _not_a(what: str, path: object, expected: str, found: str) -> BadInput:
    detail = "it is empty (0 bytes)" if found == "empty" else f"it is {found}"
    if found == "unrecognized bytes":
        detail = "its first bytes match no known format (random, foreign or damaged data)"
    return BadInput(f"{what} {path} is not {expected}: {detail}")


def _damaged(what: str, path: object, e: BaseException, expected: str) -> BadInput:
    text = str(e)
    if "Object arrays" in text or "pickled" in text:
        return BadInput(f"{what} {path} holds object (pickled) arrays: tedepr reads numeric arrays only "
                        "and never unpickles data; save plain numeric arrays (np.savez)")
    return BadInput(f"{what} {path} is a truncated or damaged {expected} ({_cause(e)})")


_NUMPY_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, TypeError)


@contextlib.contextmanager
def open_npz(path: str | Path, what: str = "file") -> Iterator[Any]:
    """Open ``path`` as a NumPy ``.npz`` archive (``allow_pickle=False``) for the block; the
    yielded ``NpzFile`` reads each array when indexed. Raises :class:`BadInput` when the file
    is no ``.npz`` (it says what it is instead), is truncated or damaged, or holds object
    arrays, also when an array read inside the block fails; errors the block raises itself
    (a :class:`~tedepr_cli.errors.TedeprError`) pass through. ``what`` names the file's role
    in messages (``data file``, ``clip``)."""
    import numpy as np

    p = Path(path)
    found = sniff(_head(p))
    if found == "an .npy array":
        raise BadInput(f"{what} {p} is a single .npy array, not an .npz archive of named arrays "
                       "(np.savez writes one)")
    if found != "a zip archive":
        raise _not_a(what, p, "a NumPy .npz archive", found)
    try:
        with np.load(p, allow_pickle=False) as f:
            yield f
    except _NUMPY_ERRORS as e:
        raise _damaged(what, p, e, ".npz archive") from None


def load_npy(path: str | Path, what: str = "file", mmap_mode: str | None = None) -> Any:
    """The array of a NumPy ``.npy`` file (``allow_pickle=False``; ``mmap_mode="r"``
    memory-maps it). Raises :class:`BadInput` when the file is no ``.npy`` (it says what
    it is instead), is truncated or damaged, or holds an object array."""
    import numpy as np

    p = Path(path)
    found = sniff(_head(p))
    if found == "a zip archive":
        raise BadInput(f"{what} {p} is an .npz archive, not a single .npy array")
    if found != "an .npy array":
        raise _not_a(what, p, "a NumPy .npy array", found)
    try:
        return np.load(p, mmap_mode=mmap_mode, allow_pickle=False)
    except _NUMPY_ERRORS as e:
        raise _damaged(what, p, e, ".npy array") from None


# ---------------------------------------------------------------------------- PyTorch
_UNSAFE_OPS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX",
               "BUILD", "EXT1", "EXT2", "EXT4"}


def pickle_builds_objects(data: bytes) -> bool:
    """True if ``data`` (a raw pickle, or a ``torch.save`` zip) is a well-formed pickle
    that imports or calls something -- i.e. loading it would run code. Garbage is False."""
    if data[:2] == b"PK":
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
            member = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
            if member is None:
                return False
            data = zf.read(member)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error):
            return False
    try:
        return any(op.name in _UNSAFE_OPS for op, _, _ in pickletools.genops(data))
    except Exception:  # not a pickle at all
        return False


@contextlib.contextmanager
def held_torch_logs() -> Iterator[list[logging.LogRecord]]:
    """Hold back what torch logs (and Python warnings) while a file is loaded.

    ``torch.export.load`` logs a whole traceback before it raises, and other loaders warn
    on stderr; tedepr reports a bad file in one line. The records are collected into the
    yielded list instead (a caller can cite the cause) and repeated on tedepr's logger at
    debug level. Every ``torch`` logger gets its handlers and propagation back afterwards;
    no level is changed.
    """
    held: list[logging.LogRecord] = []

    class _Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    manager = logging.Logger.manager
    loggers = [logging.getLogger("torch")] + [
        lg for name, lg in list(manager.loggerDict.items())
        if name.startswith("torch.") and isinstance(lg, logging.Logger)]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:  # everything flows up to "torch", which keeps it
        lg.handlers = []
        lg.propagate = True
    loggers[0].propagate = False
    loggers[0].addHandler(_Hold())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield held
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers = handlers
            lg.propagate = propagate
        for r in held:
            log.debug(f"torch ({r.name}): {first_line(r.getMessage())}")


def load_torch(path: str | Path, what: str = "file", data: bytes | None = None) -> Any:
    """What ``torch.load(path, map_location="cpu", weights_only=True)`` returns (``data``:
    the file's bytes, when already read, e.g. a member of a ``.pt2`` archive that ``path``
    then names). Raises :class:`BadInput` when the file is no PyTorch file (it says what it
    is instead), or is truncated or damaged; :class:`PickledObjects` when it is a
    well-formed pickle that builds Python objects (the safe loader refuses it; nothing of it
    ran)."""
    import torch

    p = Path(path) if not isinstance(path, Path) else path
    found = sniff(_head(p, data))
    if found not in ("a zip archive", "a Python pickle"):
        raise _not_a(what, p, "a PyTorch file (torch.save)", found)
    raw = data
    if found == "a zip archive":
        raw = raw if raw is not None else p.read_bytes()
        try:
            zipfile.ZipFile(io.BytesIO(raw)).namelist()
        except (zipfile.BadZipFile, OSError, EOFError):
            raise BadInput(f"{what} {p} is a truncated or damaged PyTorch file (its zip archive "
                           "is unreadable)") from None
    try:
        with held_torch_logs():
            return torch.load(io.BytesIO(raw) if raw is not None else p, map_location="cpu",
                              weights_only=True)
    except pickle.UnpicklingError as e:
        # the safe loader refused: a pickle that imports or calls things, or just garbage
        if pickle_builds_objects(raw if raw is not None else p.read_bytes()):
            raise PickledObjects(f"{what} {p} holds pickled Python objects, not plain tensors: loading "
                                 "it would run code stored in the file, which tedepr does not do") from None
        if found == "a Python pickle":
            raise BadInput(f"{what} {p} is a Python pickle that is not a torch.save file the weights-only "
                           f"loader reads, or is truncated or damaged ({_cause(e)})") from None
        raise BadInput(f"{what} {p} is a truncated or damaged PyTorch file ({_cause(e)})") from None
    except Exception as e:  # the safe loader ran no code; any other failure means a bad file
        raise BadInput(f"{what} {p} is a truncated or damaged PyTorch file ({_cause(e)})") from None


# ---------------------------------------------------------------------------- safetensors
def safetensors_header(path: Path) -> dict[str, Any]:
    """The safetensors JSON header of ``path``, read without touching tensor data."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise BadInput(f"{path} is not a safetensors file (truncated header)")
            n = int.from_bytes(raw, "little")
            if n > 100_000_000 or n > path.stat().st_size:
                raise BadInput(f"{path} is not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadInput(f"{path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise BadInput(f"{path} is not a safetensors file (header is not an object)")
    return header


def read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with format errors as :class:`BadInput`."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    header = safetensors_header(path)
    meta = header.get("__metadata__") or {}
    try:
        tensors = st_load(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as e:
        raise BadInput(f"{path} is not a valid safetensors file: {_cause(e)}") from None
    return tensors, meta
