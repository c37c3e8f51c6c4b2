"""The compiled LSTM recurrence for training: forward and backward through time in C.

One layer and direction of ``torch.nn.LSTM``'s recurrence (gates i, f, g, o; Hochreiter &
Schmidhuber 1997 with the forget gate of Gers et al. 2000) as a ``torch.autograd.Function``
around ``kernels/lstm.c`` (``tedepr_lstm_train_forward`` / ``tedepr_lstm_train_backward``):
the caller computes the input projections ``gx = x W_ih^T + b_ih`` of all steps (the
tensorized chain or its rebuild, under autograd), the C code runs the whole recurrence with
the hidden-to-hidden matrix ``W_hh`` as CSR over its KEPT entries, saving per step the gate
activations, ``c_t`` and ``h_{t-1}``, and its backward through time (BPTT, Werbos 1990)
returns ``dL/dgx`` (autograd carries it on through the input projections), ``dL/dh_0``,
``dL/dc_0``, ``dL/db_hh`` and ``dL/dW_hh`` at the kept entries only (an SDDMM: per kept
``(r, c)`` the sum over samples and steps of ``dgates[b, r] h_{t-1}[b, c]``); pruned entries
are never computed.

Why: a tensorized LSTM pruned to 99.5 % keeps ~100 of the 65,536 entries of a 512x128
``W_hh``, but torch's fused LSTM (oneDNN) multiplies the whole matrix in every step of the
forward and twice in the backward: 85 % of a training step of the zoo LSTM.

fp32 on the CPU, one thread, deterministic (fixed summation order; the kept-entry and bias
gradients summed in double). A double backward (``create_graph=True``, e.g. the GraSP and
``tedepr`` pruning criteria's Hessian-vector products) recomputes the recurrence in torch ops
from the saved inputs (:func:`torch_recurrence`) and differentiates that, so higher-order
gradients are torch's own. :func:`usable` says where the C path cannot run (no compiler,
other dtypes or devices); the caller then takes torch's path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import build
from .chain_train import not_f32_cpu

_F32 = torch.float32


@dataclass(frozen=True)
class KeptPattern:
    """The kept entries of a ``(4H, H)`` hidden-to-hidden matrix: CSR structure (int32 row
    pointers and columns, row-major order) and ``flat``, their row-major flat indices (an
    int64 tensor: ``W.reshape(-1)[flat]`` are the CSR values)."""

    rows: int
    cols: int
    row_ptr: np.ndarray
    col: np.ndarray
    flat: Tensor

    @property
    def nnz(self) -> int:
        return int(self.col.size)

    @classmethod
    def of(cls, mask: Tensor | None, shape: tuple[int, int]) -> KeptPattern:
        """The pattern of boolean ``mask`` of ``shape`` (None: every entry kept)."""
        r, c = int(shape[0]), int(shape[1])
        keep = np.ones((r, c), dtype=bool) if mask is None else mask.detach().to("cpu", torch.bool).numpy()
        rows, cols = np.nonzero(keep)  # row-major: already CSR order
        row_ptr = np.zeros(r + 1, dtype=np.int32)
        np.cumsum(np.bincount(rows, minlength=r), out=row_ptr[1:])
        flat = torch.from_numpy((rows.astype(np.int64) * c + cols).copy())
        return cls(r, c, row_ptr, cols.astype(np.int32), flat)


def usable(*tensors: Tensor | None) -> str | None:
    """Why the compiled training recurrence cannot take these tensors (None: it can):
    the library cannot be built or loaded here, or a tensor is not float32 on the CPU."""
    if (why := not_f32_cpu(*tensors)) is not None:
        return why
    if build.load_lstm() is None:
        return "the compiled LSTM kernel is unavailable (see `tedepr kernels`)"
    return None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def torch_recurrence(gx: Tensor, w_hh: Tensor, b_hh: Tensor | None, h0: Tensor | None,
                     c0: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The recurrence step by step in torch ops (any dtype or device, differentiable to any
    order). ``gx``: ``(B, T, 4H)`` input projections incl. ``b_ih``; ``w_hh``: ``(4H, H)``;
    ``b_hh``: ``(4H,)`` or None; ``h0``/``c0``: ``(B, H)`` or None (zeros); ``reverse``: run
    from the last step back. Returns ``out (B, T, H)``, ``h_T (B, H)``, ``c_T (B, H)``."""
    b, steps, hidden = gx.shape[0], gx.shape[1], w_hh.shape[1]
    h = gx.new_zeros(b, hidden) if h0 is None else h0
    c = gx.new_zeros(b, hidden) if c0 is None else c0
    outs: list[Tensor] = [h] * steps
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        g = gx[:, t] + h @ w_hh.T
        if b_hh is not None:
            g = g + b_hh
        i, f, gg, o = g.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs[t] = h
    out = torch.stack(outs, dim=1) if steps else gx.new_zeros(b, 0, hidden)
    return out, h, c


def _dense(vals: Tensor, pattern: KeptPattern) -> Tensor:
    """The ``(4H, H)`` matrix with ``vals`` at the kept entries, zeros elsewhere (differentiable)."""
    w = vals.new_zeros(pattern.rows * pattern.cols).index_put((pattern.flat,), vals)
    return w.reshape(pattern.rows, pattern.cols)


class _Recurrence(torch.autograd.Function):
    """``(gx, kept W_hh values, b_hh, h0, c0) -> (out, h_T, c_T)``, see the module doc."""

    @staticmethod
    def forward(ctx, gx: Tensor, vals: Tensor, b_hh: Tensor | None, h0: Tensor | None, c0: Tensor | None,
                pattern: KeptPattern, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        b, steps, g4 = gx.shape
        hidden = g4 // 4
        gx = gx.contiguous()
        vals = vals.contiguous()
        b_hh = None if b_hh is None else b_hh.contiguous()
        h0 = None if h0 is None else h0.contiguous()
        c0 = None if c0 is None else c0.contiguous()
        out = gx.new_empty(b, steps, hidden)
        hn, cn = gx.new_empty(b, hidden), gx.new_empty(b, hidden)
        act = gx.new_empty(steps, b, g4)
        cs = gx.new_empty(steps, b, hidden)
        ht = gx.new_empty(steps, hidden, b)
        rc = build.load_lstm().tedepr_lstm_train_forward(
            b, steps, hidden, int(reverse), gx.data_ptr(), steps * g4, g4, pattern.row_ptr.ctypes.data,
            pattern.col.ctypes.data if pattern.nnz else None, vals.data_ptr() if pattern.nnz else None,
            _ptr(b_hh), _ptr(h0), _ptr(c0), out.data_ptr(), steps * hidden, hidden, hn.data_ptr(),
            cn.data_ptr(), act.data_ptr(), cs.data_ptr(), ht.data_ptr())
        if rc:
            raise MemoryError(f"tedepr_lstm_train_forward failed ({rc})")
        ctx.pattern, ctx.reverse = pattern, bool(reverse)
        ctx.has = (b_hh is not None, h0 is not None, c0 is not None)
        ctx.save_for_backward(gx, vals, b_hh, h0, c0, act, cs, ht)
        return out, hn, cn

    @staticmethod
    def backward(ctx, dout: Tensor | None, dhn: Tensor | None, dcn: Tensor | None):
        gx, vals, b_hh, h0, c0, act, cs, ht = ctx.saved_tensors
        pattern = ctx.pattern
        if torch.is_grad_enabled():  # a double backward: differentiate torch's recurrence instead
            return _torch_backward(ctx, gx, vals, b_hh, h0, c0, dout, dhn, dcn)
        b, steps, g4 = gx.shape
        hidden = g4 // 4
        need = ctx.needs_input_grad
        dgx = gx.new_empty(b, steps, g4)
        dvals = vals.new_empty(pattern.nnz) if need[1] else None
        db = gx.new_empty(g4) if need[2] else None
        dh0 = gx.new_empty(b, hidden) if need[3] else None
        dc0 = gx.new_empty(b, hidden) if need[4] else None
        dout, dhn, dcn = (None if t is None else t.to(_F32).contiguous() for t in (dout, dhn, dcn))
        rc = build.load_lstm().tedepr_lstm_train_backward(
            b, steps, hidden, int(ctx.reverse), pattern.row_ptr.ctypes.data,
            pattern.col.ctypes.data if pattern.nnz else None, vals.data_ptr() if pattern.nnz else None,
            _ptr(c0), act.data_ptr(), cs.data_ptr(), ht.data_ptr(), _ptr(dout), steps * hidden, hidden,
            _ptr(dhn), _ptr(dcn), dgx.data_ptr(), steps * g4, g4,
            _ptr(dvals) if pattern.nnz else None, _ptr(db), _ptr(dh0), _ptr(dc0))
        if rc:
            raise MemoryError(f"tedepr_lstm_train_backward failed ({rc})")
        return dgx, dvals, db, dh0, dc0, None, None


def _torch_backward(ctx, gx, vals, b_hh, h0, c0, dout, dhn, dcn):
    """The backward as a differentiable torch graph (for ``create_graph=True``): the
    recurrence recomputed by :func:`torch_recurrence` from the saved inputs, then
    ``torch.autograd.grad`` of it with ``create_graph=True``."""
    inputs = [gx, vals, b_hh, h0, c0]
    with torch.enable_grad():
        leaves = [t if t is None or t.requires_grad else t.detach().requires_grad_(need)
                  for t, need in zip(inputs, ctx.needs_input_grad[:5], strict=True)]
        outs = torch_recurrence(leaves[0], _dense(leaves[1], ctx.pattern), *leaves[2:], ctx.reverse)
        pairs = [(o, g) for o, g in zip(outs, (dout, dhn, dcn), strict=True) if g is not None]
        wrt = [(k, t) for k, t in enumerate(leaves) if t is not None and ctx.needs_input_grad[k]]
        grads = torch.autograd.grad([o for o, _ in pairs], [t for _, t in wrt], [g for _, g in pairs],
                                    create_graph=True, allow_unused=True) if pairs and wrt else []
    result: list[Tensor | None] = [None] * 7
    for (k, t), g in zip(wrt, grads, strict=True):
        result[k] = torch.zeros_like(t) if g is None else g
    return tuple(result)


def recurrence(gx: Tensor, vals: Tensor, b_hh: Tensor | None, h0: Tensor | None, c0: Tensor | None,
               pattern: KeptPattern, reverse: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer and direction over all steps, compiled, differentiable.

    ``gx``: ``(B, T, 4H)`` float32 input projections (incl. ``b_ih``) of every step;
    ``vals``: ``(nnz,)`` the kept entries of ``W_hh`` in ``pattern``'s CSR order (e.g.
    ``w_hh.reshape(-1)[pattern.flat]``); ``b_hh``: ``(4H,)`` or None; ``h0``/``c0``:
    ``(B, H)`` or None (zeros); ``reverse``: the backward direction. Returns ``out (B, T, H)``,
    ``h_T``, ``c_T`` (``(B, H)``), equal to :func:`torch_recurrence` with the dense matrix up
    to fp32 rounding, and so are their gradients. Call only where :func:`usable` is None;
    raises ``ValueError`` for a tensor that is not float32 on the CPU or of the wrong shape
    and ``MemoryError`` if the C workspace cannot be allocated."""
    why = usable(gx, vals, b_hh, h0, c0)
    if why is not None:
        raise ValueError(f"compiled LSTM recurrence: {why}")
    b, steps, g4 = gx.shape
    if g4 != 4 * pattern.cols or pattern.rows != g4 or vals.shape != (pattern.nnz,) or any(
            t is not None and tuple(t.shape) != want for t, want in
            ((b_hh, (g4,)), (h0, (b, pattern.cols)), (c0, (b, pattern.cols)))):
        raise ValueError("compiled LSTM recurrence: shapes do not match the (4H, H) pattern")
    return _Recurrence.apply(gx, vals, b_hh, h0, c0, pattern, bool(reverse))
