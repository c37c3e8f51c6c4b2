"""Tensor-train layers: TT-matrix Linear (Novikov et al. 2015) and the open-chain conv.

TT-matrix: ``W[(j_1..j_d), (i_1..i_d)] = G_1[i_1, j_1] G_2[i_2, j_2] ⋯ G_d[i_d, j_d]`` with
cores ``G_k ∈ R^{r_{k-1} × n_k × m_k × r_k}``, ``r_0 = r_d = 1``; parameters
``Σ r_{k-1} n_k m_k r_k``. The forward contracts one core at a time and never forms ``W``.
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from .base import TensorizedLayer, bn_relu
from .chain import tt_matrix_dense, tt_matrix_forward
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
            return F.linear(x, self.dense_weight(), self.bias)
        lead = x.shape[:-1]
        y = tt_matrix_forward(x.reshape(-1, x.shape[-1]), list(self.cores), self._spec["in_modes"],
                              self.act if self.chain == "nonlinear" else None, self.mid_after)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, -1)

    def dense_weight(self) -> Tensor:
        self._require_linear_chain()
        return tt_matrix_dense(list(self.cores))

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
