"""A restricted unpickler for data pickles (the CIFAR "python version" batches).

Unpickling normally imports and calls whatever the file names, so a crafted file runs code.
Here :meth:`find_class` refuses every global except the three numpy callables a pickled
array needs (``_reconstruct``, ``ndarray``, ``dtype``), wrapped so they can only build
plain numeric arrays. What comes out is therefore plain data: dicts, lists, tuples, str,
bytes, numbers and numeric numpy arrays; anything else is :class:`UnsafeInput` (exit 5)
before a single byte of the payload can run.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput, UnsafeInput

try:  # numpy >= 2 keeps the real module in numpy._core; numpy.core is a deprecated alias
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct  # type: ignore[no-redef]

_PLAIN = (dict, list, tuple, str, bytes, int, float, bool, type(None))


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise UnsafeInput("pickled array of a subclass of numpy.ndarray refused")
    return _np_reconstruct(np.ndarray, shape, _safe_dtype(dtype))


def _safe_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if not isinstance(spec, str | bytes):
        raise UnsafeInput(f"pickled numpy dtype built from {type(spec).__name__} refused")
    try:
        dt = np.dtype(spec.decode("latin-1") if isinstance(spec, bytes) else spec, bool(align), bool(copy))
    except TypeError as e:
        raise BadInput(f"pickled numpy dtype {spec!r} is not valid: {e}") from None
    if dt.hasobject:
        raise UnsafeInput("pickled numpy array of Python objects refused (only numeric arrays are data)")
    return dt


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
}


class _DataUnpickler(pickle.Unpickler):
    """``find_class`` admits only the numpy array builders above; nothing else resolves."""

    def __init__(self, file: io.BufferedIOBase, where: str) -> None:
        super().__init__(file, encoding="bytes")  # Python 2 str -> bytes, as CIFAR's own recipe
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        fn = _ALLOWED.get((module, name))
        if fn is None:
            raise UnsafeInput(f"{self.where} is a pickle that references {module}.{name}; only plain "
                              f"data (dicts, lists, strings, bytes, numbers, numpy arrays) is loaded")
        return fn

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeInput(f"{self.where} is a pickle with persistent references; only plain data is loaded")


def _check_plain(obj: Any, where: str, depth: int = 0) -> None:
    if depth > 50:
        raise BadInput(f"{where}: nesting too deep for a data file")
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise UnsafeInput(f"{where}: numpy array of Python objects refused")
        return
    if not isinstance(obj, _PLAIN) or type(obj) not in _PLAIN:
        raise UnsafeInput(f"{where}: a {type(obj).__name__} is not plain data")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, where, depth + 1)
            _check_plain(v, where, depth + 1)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _check_plain(v, where, depth + 1)


def load_data_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` admitting only plain data; refuses anything else with UnsafeInput."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            obj = _DataUnpickler(f, str(p)).load()
    except (UnsafeInput, BadInput):
        raise
    except OSError as e:
        raise BadInput(f"{p} cannot be read: {e.strerror or e}") from None
    except Exception as e:  # truncated, not a pickle, bad numpy state, ...
        raise BadInput(f"{p} is not a readable data pickle: {type(e).__name__}: {e}") from None
    _check_plain(obj, str(p))
    return obj
