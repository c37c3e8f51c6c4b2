"""The modules a planned layer runs as: the compiled sparse chain (``kernel``), the dense
rebuild (``dense``) or the layer itself (``torch``), and which layers have such a choice."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..tensorized.base import TensorizedLayer
from ..tensorized.conv import ChainConv2d
from ..tensorized.layers import to_dense_layer

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


def candidates(model: nn.Module, masks: dict[str, Tensor]) -> dict[str, nn.Module]:
    """Layers the planner decides for: tensorized layers and pruned ``nn.Linear``s."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, TensorizedLayer) or (isinstance(mod, nn.Linear) and f"{name}.weight" in masks):
            out[name] = mod
    return out


def options(name: str, layer: nn.Module, masks: dict[str, Tensor], threads: int
            ) -> dict[str, Callable[[], nn.Module]]:
    """The ways ``layer`` can run here, as module factories."""
    from ..kernels import build
    from ..kernels.cpu import supports

    opts: dict[str, Callable[[], nn.Module]] = {}
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
