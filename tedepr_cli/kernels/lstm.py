"""The compiled LSTM (inference): per layer and direction, ONE chain call for the input
projections of all time steps, then ONE C call (``kernels/lstm.c``) for the whole
recurrence over time, with the hidden-to-hidden matrix stored as CSR over its kept entries.

Why: a tensorized LSTM's torch forward runs the recurrence as a sequence of small torch ops
per step (tens of microseconds each at batch 1), so a 28-step layer costs ~1.8 ms while its
arithmetic at 99.5 % sparsity is a few thousand multiply-adds. Here the per-step cost is a
sparse mat-vec over the kept entries of ``W_hh`` and the gate arithmetic, all in C.

:class:`KernelLSTM` wraps a :class:`~tedepr_cli.tensorized.wrappers.TensorizedLSTM` (input
projections: the compiled sparse chain of each tensorized ``W_ih``) or a plain
``nn.LSTM`` (input projections: the CSR kernel of a pruned ``W_ih``, BLAS for an unpruned
one); ``batch_first`` either way, any number of layers, uni- or bidirectional, with or
without an initial state. It equals the wrapped module's forward up to fp32 rounding
(tested within 1e-5 relative). Anything the C path does not take -- training mode,
autograd on the input, other dtypes or devices, unbatched input, ``proj_size`` -- runs the
wrapped module's own forward. The packed weights are a snapshot: build a new one after
changing the weights. Training has its own compiled recurrence with a backward through
time (:mod:`.lstm_train`, the tensorized LSTM's ``"kernel"`` recurrence).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import build

_F32 = torch.float32


def _csr(weight: Tensor, mask: Tensor | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``weight`` (R, C) as CSR over its kept entries (``mask``, else the nonzeros):
    int32 row pointers, int32 columns, float32 values."""
    w = weight.detach().to("cpu", _F32)
    keep = (mask.to("cpu", torch.bool) if mask is not None else w != 0).numpy()
    rows, cols = np.nonzero(keep)  # row-major: already CSR order
    row_ptr = np.zeros(w.shape[0] + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=w.shape[0]), out=row_ptr[1:])
    return row_ptr, cols.astype(np.int32), w.numpy()[rows, cols].astype(np.float32)


def lstm_suffixes(lstm: nn.Module) -> list[str]:
    """``l0``, ``l0_reverse``, ``l1``, ... in torch's order (layer-major, forward first)."""
    dirs = ["", "_reverse"] if lstm.bidirectional else [""]
    return [f"l{k}{d}" for k in range(lstm.num_layers) for d in dirs]


def unsupported(lstm: nn.Module) -> str | None:
    """Why :class:`KernelLSTM` cannot take ``lstm`` (None: it can)."""
    from ..tensorized.wrappers import TensorizedLSTM

    if not isinstance(lstm, nn.LSTM | TensorizedLSTM):
        return f"{type(lstm).__name__} is not an LSTM"
    if isinstance(lstm, nn.LSTM) and lstm.proj_size:
        return "LSTM with projections (proj_size)"
    w = lstm.weight_hh_l0
    if w.dtype != _F32 or w.device.type != "cpu":
        return f"weights are {w.dtype} on {w.device.type} (the kernel is float32 CPU)"
    return None


class KernelLSTM(nn.Module):
    """Drop-in inference module for a ``TensorizedLSTM`` or ``nn.LSTM`` (see the module doc).

    ``lstm``: the module, masks folded in (``masks.folded_copy``); ``masks``: an
    artifact-style dict (plain parameter name -> bool mask) whose keys start with ``name``
    (entries absent: the exact zeros are the pruned entries). ``threads``: C threads of the
    input-projection chain calls. Raises ``ValueError`` for a module :func:`unsupported`
    names. Call: ``(B, T, D)`` (``batch_first``) or ``(T, B, D)``, optional
    ``(h0, c0)`` of shape ``(layers * dirs, B, H)`` -> ``(output, (h_n, c_n))`` as the module.
    """

    def __init__(self, lstm: nn.Module, masks: Mapping[str, Tensor] | None = None, name: str = "",
                 threads: int = 1) -> None:
        from ..tensorized.wrappers import TensorizedLSTM
        from .cpu import KernelLinear, supports

        super().__init__()
        why = unsupported(lstm)
        if why is not None:
            raise ValueError(f"no compiled LSTM for this module: {why}")
        masks = masks or {}
        pre = f"{name}." if name else ""
        self.lstm = lstm
        self.hidden_size, self.num_layers = int(lstm.hidden_size), int(lstm.num_layers)
        self.dirs = 2 if lstm.bidirectional else 1
        self.batch_first = bool(lstm.batch_first)
        chain_ok = build.available()
        proj: list[nn.Module] = []
        self._hh: list[tuple[np.ndarray, ...]] = []
        for idx, sfx in enumerate(lstm_suffixes(lstm)):
            if isinstance(lstm, TensorizedLSTM):
                ih = lstm.ih[idx]
                if chain_ok and supports(ih):
                    ms = [masks.get(f"{pre}ih.{idx}.cores.{i}") for i in range(len(ih.cores))]
                    ih = KernelLinear(ih, ms, threads).eval()
            else:
                w_ih = getattr(lstm, f"weight_ih_{sfx}").detach()
                b_ih = getattr(lstm, f"bias_ih_{sfx}", None) if lstm.bias else None
                ih = nn.Linear(w_ih.shape[1], w_ih.shape[0], bias=b_ih is not None)
                with torch.no_grad():
                    ih.weight.copy_(w_ih)
                    if b_ih is not None:
                        ih.bias.copy_(b_ih.detach())
                mask = masks.get(f"{pre}weight_ih_{sfx}")
                if chain_ok and mask is not None:  # pruned: the CSR kernel; unpruned: BLAS
                    ih = KernelLinear(ih, mask, threads).eval()
                ih.eval()
            proj.append(ih)
            w_hh = getattr(lstm, f"weight_hh_{sfx}")
            b_hh = getattr(lstm, f"bias_hh_{sfx}", None)
            row_ptr, col, val = _csr(w_hh, masks.get(f"{pre}weight_hh_{sfx}"))
            bias = None if b_hh is None else b_hh.detach().to("cpu", _F32).numpy().copy()
            self._hh.append((row_ptr, col, val, bias))
        self.proj = nn.ModuleList(proj)
        self._lib = build.load_lstm()
        self._hh_ptrs = [(r.ctypes.data, c.ctypes.data if c.size else None,
                          v.ctypes.data if v.size else None, None if b is None else b.ctypes.data)
                         for r, c, v, b in self._hh]

    @property
    def compiled(self) -> bool:
        """Whether float32 CPU inference runs the compiled recurrence."""
        return self._lib is not None

    def kept_hh(self) -> int:
        """Kept entries of all hidden-to-hidden matrices (what the recurrence multiplies)."""
        return sum(int(v.size) for _, _, v, _ in self._hh)

    def describe(self) -> dict[str, Any]:
        return {"layers": self.num_layers, "directions": self.dirs, "hidden": self.hidden_size,
                "kept_hh": self.kept_hh(), "input_projections": [type(p).__name__ for p in self.proj],
                "compiled": self.compiled}

    def _native(self, x: Tensor, hx: tuple[Tensor, Tensor] | None) -> bool:
        if self._lib is None or self.training or x.dim() != 3 or x.dtype is not _F32 or not x.is_cpu:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or (hx is not None and any(
                t.requires_grad for t in hx))):
            return False
        return hx is None or all(t.dtype is _F32 and t.is_cpu and t.dim() == 3 for t in hx)

    def forward(self, x: Tensor, hx: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if not self._native(x, hx):
            return self.lstm(x, hx)
        h, dirs = self.hidden_size, self.dirs
        x = x.contiguous()
        if self.batch_first:
            b, steps = x.shape[0], x.shape[1]
        else:
            steps, b = x.shape[0], x.shape[1]
        # rows of the (B*T or T*B, features) views: sample and step strides, in rows
        sb, st = (steps, 1) if self.batch_first else (1, b)
        hn = torch.empty(self.num_layers * dirs, b, h, dtype=_F32)
        cn = torch.empty(self.num_layers * dirs, b, h, dtype=_F32)
        if hx is not None:
            h0s, c0s = hx[0].contiguous(), hx[1].contiguous()
        layer_in = x
        fn = self._lib.tedepr_lstm_layer
        for layer in range(self.num_layers):
            out = torch.empty(*layer_in.shape[:2], dirs * h, dtype=_F32)
            flat = layer_in.reshape(-1, layer_in.shape[2])
            for d in range(dirs):
                idx = layer * dirs + d
                gx = self.proj[idx](flat)
                if gx.dtype is not _F32 or not gx.is_contiguous():
                    gx = gx.to(_F32).contiguous()
                row_ptr, col, val, bias = self._hh_ptrs[idx]
                rc = fn(b, steps, h, d, gx.data_ptr(), sb * 4 * h, st * 4 * h, row_ptr, col, val, bias,
                        None if hx is None else h0s[idx].data_ptr(),
                        None if hx is None else c0s[idx].data_ptr(),
                        out.data_ptr() + 4 * d * h, sb * dirs * h, st * dirs * h,
                        hn[idx].data_ptr(), cn[idx].data_ptr())
                if rc:
                    raise RuntimeError(f"tedepr_lstm_layer failed ({rc})")
            layer_in = out
        return layer_in, (hn, cn)
