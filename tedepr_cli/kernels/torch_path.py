"""The packed chain run with plain torch ops: the fallback of the compiled and Triton kernels.

Same packed steps, same layouts, same result (up to float rounding): each step is its
``(n_rows, n_in_rows)`` matrix (torch CSR, or dense where denser) times the feature-major
buffer, scattered into the next layout with the same offset tables. It runs on any device
and dtype, so a caller always has a path even without a compiler, Triton or a GPU.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .layout import ChainLayout, StepLayout


def _csr(s: StepLayout) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we only multiply
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.from_numpy(s.row_ptr.astype("int64")),
                                       torch.from_numpy(s.col.astype("int64")),
                                       torch.from_numpy(s.val), (s.n_rows, s.n_in_rows),
                                       check_invariants=False)


class TorchChain:
    """``(B, N) -> (B, M)`` for a :class:`ChainLayout`, with torch ops only."""

    def __init__(self, layout: ChainLayout) -> None:
        self.layout = layout
        # sparse steps as torch CSR (a pruned 25088 x 4096 layer must not densify), dense ones dense
        self._mats = [_csr(s) if s.nnz < 0.25 * s.n_rows * s.n_in_rows else torch.from_numpy(s.dense())
                      for s in layout.steps]
        # destination unit of each (row, group) pair: B * base + b is the element's address
        self._base = [(torch.from_numpy(s.roff).long()[:, None] + torch.from_numpy(s.goff).long()[None, :])
                      .reshape(-1) for s in layout.steps]
        self._bias = None if layout.bias is None else torch.from_numpy(layout.bias)
        self._cache: dict[tuple, tuple] = {}

    def _on(self, device: torch.device, dtype: torch.dtype) -> tuple:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = ([m.to(device, dtype) for m in self._mats],
                                [b.to(device) for b in self._base],
                                None if self._bias is None else self._bias.to(device, dtype))
        return self._cache[key]

    def feature_major(self, xt: Tensor) -> Tensor:
        """``(N, B) -> (M, B)``, both feature-major (the kernels' native layout)."""
        mats, bases, bias = self._on(xt.device, xt.dtype)
        b = xt.shape[1]
        x = xt.reshape(-1)
        lanes = torch.arange(b, device=xt.device)
        for s, a, base in zip(self.layout.steps, mats, bases, strict=True):
            y = a @ x.reshape(s.n_in_rows, s.g_in * b)  # (rows, g * B + b)
            out = x.new_empty(s.out_units * b)
            out[(base[:, None] * b + lanes[None, :]).reshape(-1)] = y.reshape(-1)
            x = out
        y = x.reshape(self.layout.n_out, b)
        return y if bias is None else y + bias[:, None]

    def __call__(self, x: Tensor) -> Tensor:
        """``(..., N) -> (..., M)``."""
        lead = x.shape[:-1]
        y = self.feature_major(x.reshape(-1, self.layout.n_in).t())
        return y.t().reshape(*lead, self.layout.n_out)
