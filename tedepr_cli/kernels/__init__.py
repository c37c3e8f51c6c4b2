"""Compiled sparse tensor-chain kernels (issue #7): C on the CPU, Triton on GPUs.

``build`` compiles and loads ``kernels/chain.c``; ``layout`` packs a layer's cores into
CSR steps; ``cpu`` runs them (:class:`SparseChainKernel`, :class:`ConvChainKernel`,
:class:`KernelLinear`, and :class:`FusedSequence` for chains of layers in one call);
``triton`` is the GPU version; ``torch_path`` is the fallback every path shares.
Importing this package imports neither torch nor triton.
"""

from __future__ import annotations

from typing import Any

from .build import available, status

__all__ = ["available", "status", "SparseChainKernel", "ConvChainKernel", "KernelLinear", "FusedSequence",
           "supports"]


def __getattr__(name: str) -> Any:
    if name in ("SparseChainKernel", "ConvChainKernel", "KernelLinear", "FusedSequence", "supports"):
        from . import cpu

        return getattr(cpu, name)
    raise AttributeError(name)
