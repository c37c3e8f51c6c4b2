"""Tensor-train layers: TT-matrix Linear (Novikov et al. 2015) and the open-chain conv.

TT-matrix: ``W[(j_1..j_d), (i_1..i_d)] = G_1[i_1, j_1] G_2[i_2, j_2] ⋯ G_d[i_d, j_d]`` with
cores ``G_k ∈ R^{r_{k-1} × n_k × m_k × r_k}``, ``r_0 = r_d = 1``; parameters
``Σ r_{k-1} n_k m_k r_k``. The forward contracts one core at a time and never forms ``W``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.layout import ChainLayout, tt_linear_layout
from ..masks import mask_of
from .base import TensorizedLayer, bn_relu
from .chain import tt_matrix_dense, tt_matrix_forward, tt_matrix_support
from .conv import ChainConv2d


class TTLinear(TensorizedLayer):
    """``nn.Linear`` as a TT-matrix (same number of input and output modes)."""

    kind = "linear"
    format = "tt"

    def __init__(self, spec: dict[str, Any]) -> None:
        ins, outs, r = spec["in_modes"], spec["out_modes"], spec["ranks"]
        if len(ins) != len(outs):
            raise ValueError(f"TT-matrix needs as many input as output modes: {ins} vs {outs}")
        if len(r) != len(ins) + 1 or r[0] != 1 or r[-1] != 1:
            raise ValueError(f"TT-matrix ranks must be [1, ..., 1] of length {len(ins) + 1}, got {r}")
        shapes = [(r[k], ins[k], outs[k], r[k + 1]) for k in range(len(ins))]
        super().__init__(spec, shapes, spec.get("bias", True))
        self.mid_after = max(0, (len(ins) + 1) // 2 - 1)
        if self.chain == "nonlinear":
            self.act = bn_relu(r[self.mid_after + 1], 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.training_on_rebuild():
            return self._rebuilt_forward(x)
        if self.train_path == "kernel" and (y := self._kernel_forward(x)) is not None:
            return y
        lead = x.shape[:-1]
        y = tt_matrix_forward(x.reshape(-1, x.shape[-1]), list(self.cores), self._spec["in_modes"],
                              self.act if self.chain == "nonlinear" else None, self.mid_after)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, -1)

    def dense_weight(self) -> Tensor:
        self._require_linear_chain()
        return tt_matrix_dense(list(self.cores))

    def _train_layout(self, masks: list[Tensor]) -> tuple[ChainLayout, list[int]]:
        spec = self._spec
        return tt_linear_layout(list(self.cores), spec["in_modes"], spec["out_modes"], masks), \
            list(range(len(self.cores)))

    def _reference(self, x: Tensor, cores: list[Tensor], bias: Tensor | None) -> Tensor:
        y = tt_matrix_forward(x, cores, self._spec["in_modes"])
        return y if bias is None else y + bias

    def _rebuilt_forward(self, x: Tensor) -> Tensor:
        """``F.linear`` on the rebuilt weight (:mod:`.train_path`), restricted to the block of
        ``W`` that the masks leave nonzero (:func:`~.chain.tt_matrix_support`).

        A pruned TT-matrix's ``W`` is zero on every input feature whose mode index is pruned
        out of its core (and on every such output feature): at 99.5 % most of it. Only the
        kept block is rebuilt (fewer, smaller ops in the forward and the backward); the input
        is gathered to the kept columns when that halves them or more, else the block is
        placed in zero columns; likewise the output is scattered from the kept rows, or the
        block placed in zero rows. The same function and the same core gradients (pruned
        entries contribute exact zeros either way), up to float summation order."""
        support = self._kept_support()
        if support is None:
            return F.linear(x, self.dense_weight(), self.bias)
        index, cols, rows = support
        n, m = self.in_features, self.out_features
        w = tt_matrix_dense([c[i] for c, i in zip(list(self.cores), index, strict=True)])
        gather, scatter = 2 * cols.numel() <= n, 2 * rows.numel() <= m
        if not gather and cols.numel() < n:
            w = w.new_zeros(w.shape[0], n).index_copy(1, cols, w)
        if not scatter and rows.numel() < m:
            w = w.new_zeros(m, w.shape[1]).index_copy(0, rows, w)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, n)
        if gather:
            x2 = x2.index_select(1, cols)
        if not scatter:
            return F.linear(x2, w, self.bias).reshape(*lead, m)
        base = self.bias.expand(x2.shape[0], m) if self.bias is not None else x2.new_zeros(x2.shape[0], m)
        return base.index_add(1, rows, x2 @ w.T).reshape(*lead, m)

    def _kept_support(self) -> tuple[list[tuple[Tensor, ...]], Tensor, Tensor] | None:
        """:func:`~.chain.tt_matrix_support` of the cores' masks, cached while the masks are
        the same tensors, unmodified; None when nothing is pruned away (no mask, or every
        core's kept block is the whole core) or when everything is (the plain rebuild then
        keeps the gradients' shapes)."""
        masks = [mask_of(self.cores, str(k)) for k in range(len(self.cores))]
        if all(mk is None for mk in masks):
            return None
        key = [(mk, mk._version) if mk is not None else None for mk in masks]
        cached = getattr(self, "_support", None)  # absent on modules pickled before it
        if cached is None or len(cached[0]) != len(key) or any(
                (a is None) != (b is None) or (a is not None and (a[0] is not b[0] or a[1] != b[1]))
                for a, b in zip(cached[0], key, strict=True)):
            full = [torch.ones(c.shape, dtype=torch.bool, device=c.device) if mk is None else mk
                    for c, mk in zip(self.cores, masks, strict=True)]
            index, cols, rows = tt_matrix_support(full)
            kept = [tuple(t.numel() for t in i) for i in index]
            whole = all(k == tuple(c.shape) for k, c in zip(kept, self.cores, strict=True))
            cached = self._support = (key, None if whole or not cols.numel() or not rows.numel()
                                      else (index, cols, rows))
        return cached[1]

    def dense_weight_shape_numel(self) -> int:
        return self.in_features * self.out_features

    def core_uses(self, batch: int) -> list[int]:
        ins, outs = self._spec["in_modes"], self._spec["out_modes"]
        return [batch * math.prod(ins[k + 1:]) * math.prod(outs[:k]) for k in range(len(ins))]

    def dense_flops(self, batch: int) -> int:
        return 2 * batch * self.in_features * self.out_features


class TTConv2d(ChainConv2d):
    """Conv2d as an open tensor train: input cores, a k×k kernel core, output cores."""

    format = "tt"

    def __init__(self, spec: dict[str, Any]) -> None:
        r = spec["ranks"]
        if r[0] != 1 or r[-1] != 1:
            raise ValueError(f"TT conv ranks must start and end with 1, got {r}")
        super().__init__(spec)
