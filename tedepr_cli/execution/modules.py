"""The modules a planned layer runs as: the compiled sparse chain (``kernel``), the dense
rebuild (``dense``) or the layer itself (``torch``), and which layers have such a choice.

An LSTM (a ``TensorizedLSTM``, or an ``nn.LSTM`` with pruned weights) is planned as one
layer: ``kernel`` is :class:`~tedepr_cli.kernels.lstm.KernelLSTM` (input projections of all
steps in one chain call, the recurrence in one compiled C loop, sparse ``W_hh``), ``dense``
the ``nn.LSTM`` rebuilt from the cores (torch's fused LSTM; for an ``nn.LSTM``, itself),
``torch`` the module's own forward."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..tensorized.base import TensorizedLayer
from ..tensorized.conv import ChainConv2d
from ..tensorized.layers import to_dense_layer
from ..tensorized.wrappers import TensorizedLSTM

CHOICES = ("kernel", "dense", "torch")


class KernelConv2d(nn.Module):
    """A conv chain whose 1×1 core steps run in the compiled kernel (inference only)."""

    def __init__(self, layer: ChainConv2d, masks: list[Tensor | None], threads: int) -> None:
        from ..kernels.cpu import ConvChainKernel

        super().__init__()
        self.layer = layer
        self.kernel = ConvChainKernel(layer, masks, threads)

    def forward(self, x: Tensor) -> Tensor:
        if self.training or x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled():
            return self.layer(x)
        return self.kernel(x)


def core_masks(name: str, layer: nn.Module, masks: dict[str, Tensor]) -> list[Tensor | None]:
    return [masks.get(f"{name}.cores.{i}") for i in range(len(layer.cores))]


def kernel_module(name: str, layer: nn.Module, masks: dict[str, Tensor], threads: int) -> nn.Module:
    from ..kernels.cpu import KernelLinear

    if isinstance(layer, ChainConv2d):
        return KernelConv2d(layer, core_masks(name, layer, masks), threads).eval()
    if isinstance(layer, nn.Linear):
        return KernelLinear(layer, masks.get(f"{name}.weight"), threads).eval()
    return KernelLinear(layer, core_masks(name, layer, masks), threads).eval()


def is_planned_lstm(name: str, mod: nn.Module, masks: dict[str, Tensor]) -> bool:
    """Whether ``mod`` is an LSTM the planner decides for as a whole: a ``TensorizedLSTM``,
    or an ``nn.LSTM`` with at least one pruned weight."""
    if isinstance(mod, TensorizedLSTM):
        return True
    pre = f"{name}." if name else ""
    return isinstance(mod, nn.LSTM) and any(f"{pre}{w}" in masks for w in mod._flat_weights_names)


def candidates(model: nn.Module, masks: dict[str, Tensor], recurrent: bool = True) -> dict[str, nn.Module]:
    """Layers the planner decides for: tensorized layers, pruned ``nn.Linear``s and (with
    ``recurrent``) LSTMs as a whole (:func:`is_planned_lstm`; their input projections are
    then part of the LSTM's choice, not layers of their own)."""
    out: dict[str, nn.Module] = {}
    whole: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(f"{w}.") for w in whole):
            continue
        if recurrent and is_planned_lstm(name, mod, masks):
            out[name] = mod
            whole.append(name)
        elif isinstance(mod, TensorizedLayer) or (isinstance(mod, nn.Linear) and f"{name}.weight" in masks):
            out[name] = mod
    return out


def unavailable(layer: nn.Module) -> dict[str, str]:
    """Choices a candidate layer lacks here, with the reason (only LSTMs say: the others'
    absent choices follow from their type)."""
    if not isinstance(layer, nn.LSTM | TensorizedLSTM):
        return {}
    from ..kernels import build
    from ..kernels.lstm import unsupported

    why = unsupported(layer)
    if why is None and build.load_lstm() is None:
        why = f"compiled LSTM kernel unavailable ({build.status(build.LSTM_SOURCE)['reason']})"
    return {} if why is None else {"kernel": why}


def options(name: str, layer: nn.Module, masks: dict[str, Tensor], threads: int
            ) -> dict[str, Callable[[], nn.Module]]:
    """The ways ``layer`` can run here, as module factories."""
    from ..kernels import build
    from ..kernels.cpu import supports

    opts: dict[str, Callable[[], nn.Module]] = {}
    if isinstance(layer, nn.LSTM | TensorizedLSTM):
        from ..kernels.lstm import KernelLSTM

        if isinstance(layer, TensorizedLSTM):
            opts["torch"] = lambda: layer
            if all(getattr(m, "chain", None) == "linear" for m in layer.ih):
                opts["dense"] = lambda: to_dense_layer(layer).eval()
        else:
            opts["dense"] = lambda: layer
        if not unavailable(layer):
            opts["kernel"] = lambda: KernelLSTM(layer, masks, name, threads).eval()
        return opts
    if isinstance(layer, nn.Linear):  # a pruned dense layer: BLAS or the 1-core sparse chain
        opts["dense"] = lambda: layer
        if build.available():
            opts["kernel"] = lambda: kernel_module(name, layer, masks, threads)
        return opts
    opts["torch"] = lambda: layer
    if layer.chain == "linear":
        opts["dense"] = lambda: to_dense_layer(layer).eval()
        if build.available() and supports(layer):
            opts["kernel"] = lambda: kernel_module(name, layer, masks, threads)
    return opts
