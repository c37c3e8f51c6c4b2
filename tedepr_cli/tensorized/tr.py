"""Tensor-ring layers (Zhao et al. 2016; TR-Nets, Wang et al. 2018).

Linear: ``W[(j), (i)] = Tr(U_1[i_1] ⋯ U_d[i_d] V_1[j_1] ⋯ V_e[j_e])`` with input cores
``U_k ∈ R^{r × n_k × r}`` and output cores ``V_j ∈ R^{r × m_j × r}``; the forward contracts
the input cores into a ``(B, r_0, r_d)`` ring state, then the output cores, the last one
closing the ring. Conv2d: the 3-step chain of :mod:`.conv` with a ring rank ``r_0 >= 1``.
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ..kernels.layout import ChainLayout, tr_linear_layout
from .base import TensorizedLayer, bn_relu
from .chain import ring_dense, ring_input, ring_output
from .conv import ChainConv2d


class TRLinear(TensorizedLayer):
    """``nn.Linear`` as a tensor ring: input cores -> ring state -> output cores."""

    kind = "linear"
    format = "tr"

    def __init__(self, spec: dict[str, Any]) -> None:
        ins, outs, r = spec["in_modes"], spec["out_modes"], spec["ranks"]
        modes = list(ins) + list(outs)
        if len(r) != len(modes) + 1 or r[0] != r[-1]:
            raise ValueError(f"TR ranks must have {len(modes) + 1} entries with r[0] == r[-1], got {r}")
        super().__init__(spec, [(r[k], modes[k], r[k + 1]) for k in range(len(modes))],
                         spec.get("bias", True))
        self.n_in = len(ins)
        if self.chain == "nonlinear":
            self.act = bn_relu(r[0] * r[self.n_in], 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.training_on_rebuild():
            return F.linear(x, self.dense_weight(), self.bias)
        if self.train_path == "kernel" and (y := self._kernel_forward(x)) is not None:
            return y
        lead = x.shape[:-1]
        s = ring_input(x.reshape(-1, x.shape[-1]), list(self.cores)[: self.n_in],
                       self._spec["in_modes"])
        if self.chain == "nonlinear":
            s = self.act(s.reshape(s.shape[0], -1)).reshape(s.shape)
        y = ring_output(s, list(self.cores)[self.n_in:])
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, -1)

    def dense_weight(self) -> Tensor:
        self._require_linear_chain()
        return ring_dense(list(self.cores)[: self.n_in], list(self.cores)[self.n_in:])

    def _train_layout(self, masks: list[Tensor]) -> tuple[ChainLayout, list[int]]:
        spec, d = self._spec, self.n_in
        # input cores in order, then the output cores from the last one back (layout.py)
        return tr_linear_layout(list(self.cores), spec["in_modes"], spec["out_modes"], masks), \
            list(range(d)) + list(range(len(self.cores) - 1, d - 1, -1))

    def _reference(self, x: Tensor, cores: list[Tensor], bias: Tensor | None) -> Tensor:
        y = ring_output(ring_input(x, cores[: self.n_in], self._spec["in_modes"]), cores[self.n_in:])
        return y if bias is None else y + bias

    def dense_weight_shape_numel(self) -> int:
        return self.in_features * self.out_features

    def core_uses(self, batch: int) -> list[int]:
        ins, outs, r0 = self._spec["in_modes"], self._spec["out_modes"], self.ranks[0]
        uses = [batch * math.prod(ins[k + 1:]) * (r0 if k else 1) for k in range(len(ins))]
        uses += [batch * math.prod(outs[:j]) * (r0 if j + 1 < len(outs) else 1)
                 for j in range(len(outs))]
        return uses

    def dense_flops(self, batch: int) -> int:
        return 2 * batch * self.in_features * self.out_features


class TRConv2d(ChainConv2d):
    """Conv2d as a tensor ring (TR-Nets): ring rank ``r_0`` may exceed 1."""

    format = "tr"
