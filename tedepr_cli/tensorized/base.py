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

from ..kernels import chain_train
from ..masks import stored_and_mask

CHAINS = ("linear", "nonlinear")


class TensorizedLayer(nn.Module):
    """Base class: cores, bias, spec, dense weight, parameter and FLOP accounting."""

    kind = "layer"
    format = "?"
    # "dense": while autograd records, run on the rebuilt dense weight; "kernel": on the
    # compiled training chain where it can run (train_path.py)
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

    # -- the compiled training chain (train path "kernel") ------------------------------
    def kernel_trainable(self) -> bool:
        """Whether this layer has a compiled training chain (TT/TR Linear, linear chain)."""
        return self.chain == "linear" and type(self)._train_layout is not TensorizedLayer._train_layout

    def training_on_kernel(self, x: Tensor) -> bool:
        """Whether this call runs on the compiled training chain
        (:mod:`tedepr_cli.kernels.chain_train`): the train path is ``"kernel"``, autograd
        records, the layer has one (:meth:`kernel_trainable`), and it can run here (float32
        CPU tensors, the library built; each core plain or masked by one ``FixedMask``; no
        ``torch.func`` transform, tracing, compiling or autocast active). Elsewhere the
        layer runs its chain."""
        return self._kernel_parts(x) is not None

    def _kernel_parts(self, x: Tensor) -> tuple[list[Tensor], list[Tensor | None]] | None:
        """Per core the stored (trainable) tensor and its mask, where this call runs on the
        training kernel (see :meth:`training_on_kernel`); else None."""
        if not (self.train_path == "kernel" and torch.is_grad_enabled() and self.kernel_trainable()):
            return None
        if (torch._C._functorch.is_functorch_wrapped_tensor(x) or torch._C._are_functorch_transforms_active()
                or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or torch.is_autocast_enabled(x.device.type)):
            return None
        parts = [stored_and_mask(self.cores, str(k)) for k in range(len(self.cores))]
        if any(p is None for p in parts):
            return None
        stored = [p[0] for p in parts]  # type: ignore[index]
        if chain_train.usable(x, self.bias, *stored) is not None:
            return None
        return stored, [p[1] for p in parts]  # type: ignore[index]

    def _train_layout(self, masks: list[Tensor]) -> tuple[Any, list[int]]:
        """The layer packed for the training kernel with these per-core boolean ``masks``
        (a :class:`~tedepr_cli.kernels.layout.ChainLayout`) and the core each step
        contracts. Implemented by the layers that have one."""
        raise NotImplementedError

    def _reference(self, x: Tensor, cores: list[Tensor], bias: Tensor | None) -> Tensor:
        """The layer's chain in torch ops on ``x`` ``(B, N)`` with the given cores and bias
        (the training kernel's double backward differentiates it)."""
        raise NotImplementedError

    def _train_chain(self, masks: list[Tensor | None]) -> chain_train.TrainChain:
        """The packed training chain of the cores' current ``masks`` (None: every entry
        kept), cached while the mask tensors are the same, unmodified."""
        key = [(None, -1) if m is None else (m, m._version) for m in masks]
        cached = getattr(self, "_kernel_chain", None)
        if cached is None or len(cached[0]) != len(key) or any(
                a[0] is not b[0] or a[1] != b[1] for a, b in zip(cached[0], key, strict=True)):
            shapes = [tuple(self.cores[k].shape) for k in range(len(masks))]
            full = [torch.ones(s, dtype=torch.bool) if m is None else m.detach().cpu()
                    for s, m in zip(shapes, masks, strict=True)]
            layout, step_core = self._train_layout(full)
            cached = self._kernel_chain = (key, chain_train.TrainChain(layout, step_core, shapes, masks))
        return cached[1]

    def _kernel_forward(self, x: Tensor) -> Tensor | None:
        """The forward on the compiled training chain, or None where it cannot run (see
        :meth:`training_on_kernel`): the caller then runs the chain."""
        parts = self._kernel_parts(x)
        if parts is None:
            return None
        stored, masks = parts
        plan = self._train_chain(masks)
        if x.shape[-1] != plan.n_in:
            raise ValueError(f"input has {x.shape[-1]} features, the layer {plan.n_in}")
        return chain_train.run(x, stored, self.bias, plan, self._reference)

    def _require_linear_chain(self) -> None:
        if self.chain != "linear":
            raise ValueError("a nonlinear chain has no single dense equivalent weight")


def bn_relu(channels: int, dims: int) -> nn.Module:
    """The nonlinearity the nonlinear chain inserts between steps: BN then ReLU."""
    bn = nn.BatchNorm1d(channels) if dims == 1 else nn.BatchNorm2d(channels)
    return nn.Sequential(bn, nn.ReLU())
