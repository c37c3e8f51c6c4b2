"""The interface every tensorized layer shares (coarse grain, DESIGN §2.1).

A tensorized layer holds its cores in one ``ParameterList`` named ``cores`` (in chain
order; these are what the fine grain prunes; read them with ``list(self.cores)[i:j]``,
never ``self.cores[i:j]``: slicing a ParameterList re-wraps the tensors that
``torch.func.functional_call`` substitutes, which silently cuts autograd -- the
pruning criteria differentiate through exactly that call), an optional dense ``bias``, and a JSON
``spec`` that rebuilds it. It can return its dense equivalent weight (tests, export, the
execution planner) and count the work of its chain against the dense layer.

Work model: one forward at batch ``B`` uses every entry of core ``k`` exactly ``uses_k(B)``
times in a multiply-add, so ``chain FLOPs = 2 Σ_k uses_k · nnz_k`` (DESIGN §4) -- pruning
a core entry removes exactly ``2 · uses_k`` FLOPs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

CHAINS = ("linear", "nonlinear")


class TensorizedLayer(nn.Module):
    """Base class: cores, bias, spec, dense weight, parameter and FLOP accounting."""

    kind = "layer"
    format = "?"
    # "dense": while autograd records, run on the rebuilt dense weight (train_path.py)
    train_path = "chain"

    def __init__(self, spec: dict[str, Any], core_shapes: list[tuple[int, ...]], bias: bool) -> None:
        super().__init__()
        self._spec = dict(spec)
        self.cores = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in core_shapes])
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None
        self.chain = spec.get("chain", "linear")
        if self.chain not in CHAINS:
            raise ValueError(f"chain must be one of {CHAINS}, got {self.chain!r}")

    # -- description -------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return math.prod(self._spec["in_modes"])

    @property
    def out_features(self) -> int:
        return math.prod(self._spec["out_modes"])

    @property
    def ranks(self) -> list[int]:
        return list(self._spec["ranks"])

    def spec(self) -> dict[str, Any]:
        """JSON description that :func:`tedepr_cli.tensorized.plan.build_layer` rebuilds."""
        return {**self._spec, "type": self.kind, "format": self.format,
                "bias": self.bias is not None}

    def extra_repr(self) -> str:
        s = self._spec
        return (f"{self.format}, in_modes={s['in_modes']}, out_modes={s['out_modes']}, "
                f"ranks={s['ranks']}, chain={self.chain}")

    # -- accounting ----------------------------------------------------------------
    def core_params(self) -> int:
        return sum(c.numel() for c in self.cores)

    def dense_params(self) -> int:
        """Weight entries of the dense layer this one replaces."""
        return self.dense_weight_shape_numel()

    def dense_weight_shape_numel(self) -> int:
        raise NotImplementedError

    def core_uses(self, batch: int) -> list[int]:
        """How often each entry of each core is used in one forward of ``batch`` samples."""
        raise NotImplementedError

    def dense_flops(self, batch: int) -> int:
        raise NotImplementedError

    def chain_flops(self, batch: int, masks: list[Tensor] | None = None) -> int:
        """Multiply-add FLOPs of the chain; with ``masks`` only kept entries count."""
        nnz = [int(m.sum()) for m in masks] if masks is not None else [c.numel() for c in self.cores]
        return 2 * sum(u * z for u, z in zip(self.core_uses(batch), nnz, strict=True))

    # -- weights -------------------------------------------------------------------
    def dense_weight(self) -> Tensor:
        """The dense weight this chain equals (linear chain only), in the replaced layer's
        layout: ``(out, in)`` for Linear, ``(out, in, kh, kw)`` for Conv2d."""
        raise NotImplementedError

    @property
    def weight(self) -> Tensor:
        """:meth:`dense_weight`, under the name the replaced layer had, so that code reading
        ``layer.weight`` (torch's own modules, user code) keeps working; computed on each
        read (differentiable), never stored. A nonlinear chain has none (AttributeError)."""
        if self.chain != "linear":
            raise AttributeError("a nonlinear chain has no dense equivalent weight")
        return self.dense_weight()

    def training_on_rebuild(self) -> bool:
        """Whether this call runs on the rebuilt dense weight (:mod:`.train_path`)."""
        return self.train_path == "dense" and self.chain == "linear" and torch.is_grad_enabled()

    def _require_linear_chain(self) -> None:
        if self.chain != "linear":
            raise ValueError("a nonlinear chain has no single dense equivalent weight")


def bn_relu(channels: int, dims: int) -> nn.Module:
    """The nonlinearity the nonlinear chain inserts between steps: BN then ReLU."""
    bn = nn.BatchNorm1d(channels) if dims == 1 else nn.BatchNorm2d(channels)
    return nn.Sequential(bn, nn.ReLU())
