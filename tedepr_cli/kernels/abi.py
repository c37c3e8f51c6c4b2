"""The ctypes mirrors of ``kernels/chain.c``'s structures, in one place for every caller
(the inference kernels in :mod:`.cpu`, the training chain in :mod:`.chain_train`).

Change them together with ``chain.c`` and bump ``TEDEPR_ABI`` there and ``ABI`` in
:mod:`.build` (kernels/README.md, *Data structures*)."""

from __future__ import annotations

import ctypes


class Step(ctypes.Structure):
    """Mirror of ``tedepr_step`` in chain.c."""

    _fields_ = [("n_rows", ctypes.c_int32), ("n_in_rows", ctypes.c_int32),
                ("g_in", ctypes.c_int32), ("col_bytes", ctypes.c_int32),
                ("g_lo", ctypes.c_int32), ("g_hi", ctypes.c_int32),
                ("row_ptr", ctypes.c_void_p), ("col", ctypes.c_void_p), ("val", ctypes.c_void_p),
                ("roff", ctypes.c_void_p), ("goff", ctypes.c_void_p)]


class Chain(ctypes.Structure):
    """Mirror of ``tedepr_chain`` in chain.c."""

    _fields_ = [("n_steps", ctypes.c_int32), ("n_in", ctypes.c_int32), ("n_out", ctypes.c_int32),
                ("buf_units", ctypes.c_int32), ("steps", ctypes.POINTER(Step)),
                ("bias", ctypes.c_void_p), ("nthreads", ctypes.c_int32), ("pad_", ctypes.c_int32),
                ("chunk", ctypes.c_int64)]


class Program(ctypes.Structure):
    """Mirror of ``tedepr_program`` in chain.c."""

    _fields_ = [("n_layers", ctypes.c_int32), ("nthreads", ctypes.c_int32), ("layers", ctypes.c_void_p),
                ("act", ctypes.c_void_p), ("chunk", ctypes.c_int64)]
