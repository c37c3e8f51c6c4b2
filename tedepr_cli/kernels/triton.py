"""The sparse chain kernel in Triton (GPU), on the same packed steps as the C kernel.

One launch per step; each program owns one CSR row (one output row of the step) and a
block of columns (free indices x batch, contiguous in the feature-major buffer): it walks
the row's stored entries, accumulates ``val * X[col, lanes]`` in registers and stores the
block straight into the next step's layout through the ``roff``/``goff`` offset tables,
exactly like ``kernels/chain.c``. Triton is an optional extra (``pip install
tedepr[triton]``) and is imported lazily; without it, or without a CUDA device (unless
``TRITON_INTERPRET=1``, Triton's CPU interpreter, which the tests use), calls run
:class:`.torch_path.TorchChain`, the same computation in torch ops.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from .layout import ChainLayout
from .torch_path import TorchChain

BLOCK = 64
_kernel: Any = None


def interpreted() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def status() -> dict[str, Any]:
    """Triton version (or why it cannot be imported), CUDA, interpreter, usable."""
    st: dict[str, Any] = {"triton": None, "cuda": torch.cuda.is_available(),
                          "interpret": interpreted(), "available": False, "reason": None}
    try:
        import triton
    except Exception as e:  # not installed, or broken: the torch path serves
        st["reason"] = f"triton not importable ({type(e).__name__}: {e}); pip install 'tedepr[triton]'"
        return st
    st["triton"] = triton.__version__
    if not (st["cuda"] or st["interpret"]):
        st["reason"] = "no CUDA device (TRITON_INTERPRET=1 runs Triton on the CPU, slowly)"
        return st
    st["available"] = True
    return st


def available() -> bool:
    return bool(status()["available"])


def _csr_step_kernel() -> Any:
    """Build the jitted kernel on first use (so ``TRITON_INTERPRET`` set by then counts)."""
    global _kernel
    if _kernel is not None:
        return _kernel
    import triton
    import triton.language as tl

    @triton.jit
    def csr_step(x_ptr, y_ptr, row_ptr, col_ptr, val_ptr, roff_ptr, goff_ptr, ld, n_cols, batch,
                 BLOCK: tl.constexpr):
        o = tl.program_id(0)
        lanes = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = lanes < n_cols
        start = tl.load(row_ptr + o)
        end = tl.load(row_ptr + o + 1)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(start, end):
            w = tl.load(val_ptr + j)
            c = tl.load(col_ptr + j).to(tl.int64)
            acc += w * tl.load(x_ptr + c * ld + lanes, mask=ok, other=0.0)
        g = lanes // batch
        b = lanes - g * batch
        base = tl.load(roff_ptr + o).to(tl.int64) + tl.load(goff_ptr + g, mask=ok, other=0).to(tl.int64)
        tl.store(y_ptr + base * batch + b, acc, mask=ok)

    _kernel = csr_step
    return _kernel


class TritonChainKernel:
    """``(..., N) -> (..., M)`` for a :class:`ChainLayout` with the Triton kernel on
    ``device`` (CUDA; or CPU tensors under ``TRITON_INTERPRET=1``); the torch path when
    Triton cannot run or the input is not float32."""

    def __init__(self, layout: ChainLayout, device: str | torch.device | None = None) -> None:
        self.layout = layout
        self.n_in, self.n_out = layout.n_in, layout.n_out
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.torch_path = TorchChain(layout)
        self.triton = available()

        def t(a: Any, dtype: torch.dtype) -> Tensor:
            return torch.as_tensor(a.astype("int64") if dtype != torch.float32 else a).to(self.device, dtype)

        self._steps = [(s, t(s.row_ptr, torch.int32), t(s.col, torch.int32), t(s.val, torch.float32),
                        t(s.roff, torch.int32), t(s.goff, torch.int32)) for s in layout.steps]
        self._bias = None if layout.bias is None else torch.as_tensor(layout.bias).to(self.device)

    @classmethod
    def from_layer(cls, layer: torch.nn.Module, masks: Any = None,
                   device: str | torch.device | None = None) -> TritonChainKernel:
        """Pack a TT/TR Linear like :meth:`.cpu.SparseChainKernel.from_layer`."""
        from .cpu import SparseChainKernel

        return cls(SparseChainKernel.from_layer(layer, masks).layout, device)

    def feature_major(self, xt: Tensor) -> Tensor:
        """``(N, B) -> (M, B)``."""
        if not (self.triton and xt.dtype == torch.float32 and xt.device == self.device):
            return self.torch_path.feature_major(xt)
        kernel = _csr_step_kernel()
        b = xt.shape[1]
        x = xt.contiguous()
        for s, rp, col, val, roff, goff in self._steps:
            y = torch.empty(s.out_units * b, dtype=torch.float32, device=self.device)
            n_cols = s.g_in * b
            if n_cols:
                grid = (s.n_rows, (n_cols + BLOCK - 1) // BLOCK)
                kernel[grid](x, y, rp, col, val, roff, goff, n_cols, n_cols, b, BLOCK=BLOCK)
            x = y
        y = x.reshape(self.n_out, b)
        return y if self._bias is None else y + self._bias[:, None]

    def __call__(self, x: Tensor) -> Tensor:
        """``(..., N) -> (..., M)``."""
        lead = x.shape[:-1]
        y = self.feature_major(x.reshape(-1, self.n_in).t())
        return y.t().reshape(*lead, self.n_out)
