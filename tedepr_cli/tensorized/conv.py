"""The 3-step conv chain shared by the TT and TR formats (TR-Nets, Wang et al. 2018).

``W[o, i, s] = Tr(U_1[i_1] ⋯ U_d[i_d] · K[s] · V_1[o_1] ⋯ V_e[o_e])`` with input cores
``U`` over the input-channel modes, one kernel core ``K`` over the ``kh·kw`` positions and
output cores ``V`` over the output-channel modes. Forward: (a) the input cores mix the
channels of every pixel into rank space (a chain of 1×1 steps), (b) a k×k conv in rank
space, (c) the output cores map rank space to output channels. With ``r_0 = 1`` the ring
is an open tensor train (the TT format, spatial part in its own core).
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from .base import TensorizedLayer, bn_relu
from .chain import merge_ring, ring_conv, ring_dense, ring_input, ring_output


def conv_out_hw(hw: tuple[int, int], k: tuple[int, int], s: tuple[int, int], p: tuple[int, int],
                d: tuple[int, int]) -> tuple[int, int]:
    return tuple((hw[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))


class ChainConv2d(TensorizedLayer):
    """Conv2d as input cores -> k×k rank-space conv -> output cores (groups=1).

    ``merge`` (default True): contract a side's cores as one merged matrix where that is
    cheaper (:meth:`merged_sides`); False runs every step mode by mode, as the compiled
    kernels and :meth:`chain_flops` count them."""

    kind = "conv2d"
    merge = True

    def __init__(self, spec: dict[str, Any]) -> None:
        ins, outs, r = spec["in_modes"], spec["out_modes"], spec["ranks"]
        kh, kw = spec["kernel_size"]
        d = len(ins)
        if len(r) != d + len(outs) + 2 or r[0] != r[-1]:
            raise ValueError(f"conv chain needs {d + len(outs) + 2} ranks with r[0] == r[-1], got {r}")
        shapes = [(r[k], ins[k], r[k + 1]) for k in range(d)]
        shapes.append((r[d], kh * kw, r[d + 1]))
        shapes += [(r[d + 1 + j], outs[j], r[d + 2 + j]) for j in range(len(outs))]
        super().__init__(spec, shapes, spec.get("bias", True))
        self.kernel_size = (int(kh), int(kw))
        self.stride = tuple(spec.get("stride", (1, 1)))
        self.padding = tuple(spec.get("padding", (0, 0)))
        self.dilation = tuple(spec.get("dilation", (1, 1)))
        self.n_in = d
        self._merged: tuple[tuple, tuple[bool, bool]] | None = None
        if self.chain == "nonlinear":
            self.act_a = bn_relu(r[0] * r[d], 2)
            self.act_b = bn_relu(r[0] * r[d + 1], 2)

    @property
    def in_cores(self) -> list[Tensor]:
        return list(self.cores)[: self.n_in]

    @property
    def kernel_core(self) -> Tensor:
        return self.cores[self.n_in]

    @property
    def out_cores(self) -> list[Tensor]:
        return list(self.cores)[self.n_in + 1:]

    def forward(self, x: Tensor) -> Tensor:
        if self.training_on_rebuild():
            return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding, self.dilation)
        merge_in, merge_out = self.merged_sides()
        b, c, h, w = x.shape
        r0, rd = self.in_cores[0].shape[0], self.kernel_core.shape[0]
        if merge_in:  # the input cores merged into one (C, r0*rd) matrix: a 1x1 conv, no permute
            a = merge_ring(self.in_cores)  # (r0, C, rd)
            s = F.conv2d(x, a.permute(0, 2, 1).reshape(r0 * rd, c, 1, 1))
        else:
            s = ring_input(x.permute(0, 2, 3, 1).reshape(b * h * w, c), self.in_cores,
                           self._spec["in_modes"])
            s = s.reshape(b, h, w, r0 * rd).permute(0, 3, 1, 2)
        if self.chain == "nonlinear":  # the state is (B, r0 * r_d, H, W) either way
            s = self.act_a(s)
        s = ring_conv(s, self.kernel_core, r0, self.kernel_size, self.stride, self.padding, self.dilation)
        if self.chain == "nonlinear":
            s = self.act_b(s)
        rn, h2, w2 = self.kernel_core.shape[2], s.shape[2], s.shape[3]
        if merge_out:  # the output cores merged into one (r0*rn, M) matrix: a 1x1 conv
            bm = merge_ring(self.out_cores)  # (rn, M, r0)
            return F.conv2d(s, bm.permute(1, 2, 0).reshape(bm.shape[1], r0 * rn, 1, 1), self.bias)
        y = ring_output(s.permute(0, 2, 3, 1).reshape(b * h2 * w2, r0, rn), self.out_cores)
        y = y.reshape(b, h2, w2, -1).permute(0, 3, 1, 2)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y

    def merged_sides(self) -> tuple[bool, bool]:
        """Whether the forward contracts the input (output) cores as one merged matrix, a
        1×1 conv on the NCHW tensor, rather than mode by mode over every pixel: where the
        merged matrix costs no more multiply-adds per pixel than the steps it replaces
        (plus the merge itself, per sample). The same function either way; the merged form
        also skips the chain's two layout permutes. Depends on the shapes only.

        Returns ``(input side merged, output side merged)``; ``(False, False)`` when
        :attr:`merge` is off. The merged form is what the torch forward and the ONNX export
        run; the compiled kernels keep the sparse mode-by-mode steps."""
        if not self.merge:
            return False, False
        key = tuple(tuple(c.shape) for c in self.cores)
        cached = getattr(self, "_merged", None)  # (key, decision); absent on modules pickled before it
        if cached is None or cached[0] != key:
            ins, outs = self._spec["in_modes"], self._spec["out_modes"]
            r = [c.shape[0] for c in self.cores] + [self.cores[-1].shape[-1]]
            d, r0 = len(ins), r[0]
            (h, w), (h2, w2) = self._hw()
            uses = self.core_uses(1)
            numel = [math.prod(c.shape) for c in self.cores]
            chain_in = sum(uses[k] * numel[k] for k in range(d))
            chain_out = sum(uses[d + 1 + j] * numel[d + 1 + j] for j in range(len(outs)))
            merge_in = sum(r0 * math.prod(ins[:k + 1]) * r[k + 1] * ins[k + 1] * r[k + 2]
                           for k in range(d - 1))
            merge_out = sum(r[d + 1] * math.prod(outs[:j + 1]) * r[d + 2 + j] * outs[j + 1] * r[d + 3 + j]
                            for j in range(len(outs) - 1))
            sides = (h * w * math.prod(ins) * r0 * r[d] + merge_in <= chain_in,
                     h2 * w2 * r0 * r[d + 1] * math.prod(outs) + merge_out <= chain_out)
            cached = self._merged = (key, sides)
        return cached[1]

    def dense_weight(self) -> Tensor:
        self._require_linear_chain()
        w = ring_dense(self.in_cores, self.out_cores, self.kernel_core)
        return w.reshape(self.out_features, self.in_features, *self.kernel_size)

    def dense_weight_shape_numel(self) -> int:
        return self.out_features * self.in_features * math.prod(self.kernel_size)

    def _hw(self) -> tuple[tuple[int, int], tuple[int, int]]:
        hw = tuple(self._spec.get("input_hw") or (1, 1))
        return hw, conv_out_hw(hw, self.kernel_size, self.stride, self.padding, self.dilation)

    def core_uses(self, batch: int) -> list[int]:
        (h, w), (h2, w2) = self._hw()
        ins, outs, r0 = self._spec["in_modes"], self._spec["out_modes"], self.ranks[0]
        pin, pout = batch * h * w, batch * h2 * w2
        uses = [pin * math.prod(ins[k + 1:]) * (r0 if k else 1) for k in range(len(ins))]
        uses.append(batch * r0 * h2 * w2)
        uses += [pout * math.prod(outs[:j]) * (r0 if j + 1 < len(outs) else 1)
                 for j in range(len(outs))]
        return uses

    def dense_flops(self, batch: int) -> int:
        _, (h2, w2) = self._hw()
        return 2 * batch * h2 * w2 * self.dense_weight_shape_numel()
