"""A restricted unpickler for data pickles (the CIFAR "python version" batches).

Unpickling normally imports and calls whatever the file names, so a crafted file runs code.
Here :meth:`find_class` refuses every global except the numpy callables a pickled array or
scalar needs (``_reconstruct``, ``ndarray``, ``dtype``, ``scalar``, and protocol 5's
``_frombuffer``; under numpy 1.x's ``numpy.core`` and numpy 2.x's ``numpy._core`` names),
wrapped so they can only build plain arrays and numeric scalars (bool, signed and unsigned
integers, floats, complex: labels written from numpy integers are ``numpy.int64``
scalars). What comes out is therefore plain data: dicts, lists, tuples, str, bytes,
numbers, numeric numpy arrays and scalars; anything else (an object dtype included) is
:class:`UnsafeInput` (exit 5) before a single byte of the payload can run.
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
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct  # type: ignore[no-redef]
    from numpy.core.multiarray import scalar as _np_scalar  # type: ignore[no-redef]

_PLAIN = (dict, list, tuple, str, bytes, int, float, bool, type(None))
_NUMERIC_KINDS = "biufc"  # bool, signed and unsigned integers, floats, complex


def _is_numeric(dt: Any) -> bool:
    """A plain numeric dtype: no fields, no sub-array, no object references (its flags come
    from the pickle's state too, so ``hasobject`` is checked, not assumed from the kind)."""
    return (isinstance(dt, np.dtype) and dt.kind in _NUMERIC_KINDS and dt.fields is None
            and dt.subdtype is None and not dt.hasobject)


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
        raise UnsafeInput("pickled numpy dtype of Python objects refused (only numeric arrays and "
                          "scalars are data)")
    return dt


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any = "C", axis_order: Any = None
                     ) -> np.ndarray:
    """numpy's protocol-5 array builder: a flat buffer viewed as ``dtype``, reshaped."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafeInput("pickled numpy array of Python objects refused (only numeric arrays are data)")
    if not isinstance(buf, bytes | bytearray | pickle.PickleBuffer) or not isinstance(shape, tuple) \
            or order not in ("C", "F", "K") or axis_order is not None and not isinstance(axis_order, tuple):
        raise BadInput("pickled numpy array has a malformed buffer, shape or order")
    try:
        flat = np.frombuffer(buf, dtype=dtype)
        if order == "K" and axis_order is not None:
            return flat.reshape(shape, order="C").transpose(axis_order)
        return flat.reshape(shape, order="C" if order == "K" else order)
    except (ValueError, TypeError) as e:
        raise BadInput(f"pickled numpy array does not match its shape: {e}") from None


def _safe_scalar(dtype: Any, data: Any = None) -> np.generic:
    """numpy's scalar builder (``scalar(dtype, raw_bytes)``) for numeric dtypes only: an
    object-dtype scalar would be handed a Python object built by the pickle."""
    if not _is_numeric(dtype):
        what = (f"built from a {type(dtype).__name__}, not a dtype," if not isinstance(dtype, np.dtype)
                else "whose dtype holds Python objects" if dtype.hasobject else f"of dtype {dtype}")
        raise UnsafeInput(f"pickled numpy scalar {what} refused (only bool, integer, float and complex "
                          f"scalars are data)")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise BadInput(f"pickled numpy {dtype} scalar has malformed data ({type(data).__name__}, "
                       f"{len(data) if isinstance(data, bytes) else '?'} bytes for {dtype.itemsize})")
    return _np_scalar(dtype, data)


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy.core.multiarray", "scalar"): _safe_scalar,
    ("numpy._core.multiarray", "scalar"): _safe_scalar,
    ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
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
                              f"data (dicts, lists, strings, bytes, numbers, numeric numpy arrays and "
                              f"scalars) is loaded")
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
    if isinstance(obj, np.generic):
        if not _is_numeric(obj.dtype):
            raise UnsafeInput(f"{where}: a numpy {obj.dtype} scalar is not plain numeric data")
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
