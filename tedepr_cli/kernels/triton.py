"""The sparse chain kernel in Triton (GPU), on the same packed steps as the C kernel.

One launch per step; each program owns one CSR row (one output row of the step) and a
block of columns (free indices x batch, contiguous in the feature-major buffer): it walks
the row's stored entries, accumulates ``val * X[col, lanes]`` in registers and stores the
block straight into the next step's layout through the ``roff``/``goff`` offset tables,
exactly like ``kernels/chain.c``; like the C kernel it computes only a step's live free
groups (:func:`.layout.live_groups`). Triton is an optional extra (``pip install
tedepr[triton]``) and is imported lazily; without it, or without a CUDA device (unless
``TRITON_INTERPRET=1``, Triton's CPU interpreter, which the tests use), calls run
:class:`.torch_path.TorchChain`, the same computation in torch ops.

:func:`triton_model` swaps every layer the kernel can run (TT/TR Linear and conv chains
with a linear chain, pruned ``nn.Linear``) for a :class:`TritonLayer`: the model that
``tedepr bench``'s ``triton`` engine times.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from .layout import ChainLayout
from .torch_path import TorchChain

BLOCKS = (32, 64, 128, 256)  # lanes per program: the smallest that covers a step's columns
_kernel: Any = None


def interpreted() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def status() -> dict[str, Any]:
    """Triton version (or why it cannot be imported), CUDA, interpreter, usable."""
    st: dict[str, Any] = {"triton": None, "cuda": torch.cuda.is_available(),
                          "interpret": interpreted(), "available": False, "reason": None}
    try:
        import triton
    except Exception as e:  # not installed, or broken: the torch path serves
        st["reason"] = f"triton not importable ({type(e).__name__}: {e}); pip install 'tedepr[triton]'"
        return st
    st["triton"] = triton.__version__
    if not (st["cuda"] or st["interpret"]):
        st["reason"] = "no CUDA device (TRITON_INTERPRET=1 runs Triton on the CPU, slowly)"
        return st
    st["available"] = True
    return st


def available() -> bool:
    return bool(status()["available"])


def block_for(n_cols: int) -> int:
    """Lanes per program for a step with ``n_cols`` live columns (a power of two, 32..256)."""
    return next((b for b in BLOCKS if b >= n_cols), BLOCKS[-1])


def _csr_step_kernel() -> Any:
    """Build the jitted kernel on first use. Triton picks its interpreter when it is first
    imported: ``TRITON_INTERPRET=1`` must be set before that (tests: a fresh process)."""
    global _kernel
    if _kernel is not None:
        return _kernel
    import triton
    import triton.language as tl

    @triton.jit
    def csr_step(x_ptr, y_ptr, row_ptr, col_ptr, val_ptr, roff_ptr, goff_ptr, ld, lane_lo, lane_hi, batch,
                 BLOCK: tl.constexpr):
        o = tl.program_id(0)
        lanes = lane_lo + tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = lanes < lane_hi
        start = tl.load(row_ptr + o)
        end = tl.load(row_ptr + o + 1)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(start, end):
            w = tl.load(val_ptr + j)
            c = tl.load(col_ptr + j).to(tl.int64)
            acc += w * tl.load(x_ptr + c * ld + lanes, mask=ok, other=0.0)
        g = lanes // batch
        b = lanes - g * batch
        base = tl.load(roff_ptr + o).to(tl.int64) + tl.load(goff_ptr + g, mask=ok, other=0).to(tl.int64)
        tl.store(y_ptr + base * batch + b, acc, mask=ok)

    _kernel = csr_step
    return csr_step


class TritonChainKernel:
    """``(..., N) -> (..., M)`` for a :class:`ChainLayout` with the Triton kernel on
    ``device`` (CUDA; or CPU tensors under ``TRITON_INTERPRET=1``); the torch path when
    Triton cannot run or the input is not float32 on ``device``."""

    def __init__(self, layout: ChainLayout, device: str | torch.device | None = None) -> None:
        self.layout = layout
        self.n_in, self.n_out = layout.n_in, layout.n_out
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.torch_path = TorchChain(layout)
        self.triton = available()

        def t(a: Any, dtype: torch.dtype) -> Tensor:
            return torch.as_tensor(a.astype("int64") if dtype != torch.float32 else a).to(self.device, dtype)

        self._steps = [(s, t(s.row_ptr, torch.int32), t(s.col, torch.int32), t(s.val, torch.float32),
                        t(s.roff, torch.int32), t(s.goff, torch.int32)) for s in layout.steps]
        self._bias = None if layout.bias is None else torch.as_tensor(layout.bias).to(self.device)

    @classmethod
    def from_layer(cls, layer: torch.nn.Module, masks: Any = None,
                   device: str | torch.device | None = None) -> TritonChainKernel:
        """Pack a TT/TR Linear like :meth:`.cpu.SparseChainKernel.from_layer`."""
        from .cpu import SparseChainKernel

        return cls(SparseChainKernel.from_layer(layer, masks).layout, device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Tensor | None = None,
                    device: str | torch.device | None = None) -> TritonChainKernel:
        """A pruned ``nn.Linear`` as a 1-core chain (kept entries: ``mask``, else the nonzeros)."""
        from .layout import sparse_matrix_layout

        return cls(sparse_matrix_layout(linear.weight, mask, linear.bias), device)

    def flops(self, batch: int) -> int:
        """Multiply-add FLOPs of one call at ``batch`` (kept entries, live groups)."""
        return self.layout.flops(batch)

    def runs_triton(self, x: Tensor) -> bool:
        """Whether a call with ``x`` runs the Triton kernel (else the torch path)."""
        return self.triton and x.dtype == torch.float32 and x.device == self.device

    def feature_major(self, xt: Tensor) -> Tensor:
        """``(N, B) -> (M, B)``, or blocks ``(nb, N, B) -> (nb, M, B)`` (conv: one block per
        image, pixels as the batch), like :meth:`.cpu.SparseChainKernel.feature_major`."""
        if xt.dim() not in (2, 3) or xt.shape[-2] != self.n_in:
            raise ValueError(f"expected (N={self.n_in}, B) or (nb, N, B), got {tuple(xt.shape)}")
        if xt.dim() == 3:  # every lane is independent: run the blocks as one (N, nb * B) buffer
            nb, _, b = xt.shape
            y = self.feature_major(xt.permute(1, 0, 2).reshape(self.n_in, nb * b))
            return y.reshape(self.n_out, nb, b).permute(1, 0, 2)
        if not self.runs_triton(xt):
            return self.torch_path.feature_major(xt)
        kernel = _csr_step_kernel()
        b = xt.shape[1]
        x = xt.contiguous()
        for s, rp, col, val, roff, goff in self._steps:
            y = torch.empty(s.out_units * b, dtype=torch.float32, device=self.device)
            lo, hi = s.g_lo * b, (s.g_lo + s.live_groups) * b  # dead groups: never read, not computed
            if hi > lo and s.n_rows:
                block = block_for(hi - lo)
                grid = (s.n_rows, (hi - lo + block - 1) // block)
                kernel[grid](x, y, rp, col, val, roff, goff, s.g_in * b, lo, hi, b, BLOCK=block)
            x = y
        y = x.reshape(self.n_out, b)
        return y if self._bias is None else y + self._bias[:, None]

    def __call__(self, x: Tensor) -> Tensor:
        """``(..., N) -> (..., M)``."""
        lead = x.shape[:-1]
        y = self.feature_major(x.reshape(-1, self.n_in).t())
        return y.t().reshape(*lead, self.n_out)


class TritonLayer(nn.Module):
    """Inference wrapper: ``layer``'s forward through a Triton chain (``kernel`` is a
    :class:`TritonChainKernel` for Linear-like layers, a :class:`.cpu.ConvChainKernel`
    over Triton chains for conv chains); the wrapped layer's own forward when training,
    recording gradients, or given another dtype or device."""

    def __init__(self, layer: nn.Module, kernel: Any, device: torch.device) -> None:
        super().__init__()
        self.layer = layer
        self.kernel = kernel
        self.device = device

    def forward(self, x: Tensor) -> Tensor:
        if self.training or torch.is_grad_enabled() or x.dtype != torch.float32 or x.device != self.device:
            return self.layer(x)
        return self.kernel(x)


def triton_layer(name: str, layer: nn.Module, masks: dict[str, Tensor], device: torch.device
                 ) -> TritonLayer | None:
    """The Triton version of one layer of an artifact's model, or None when the kernel cannot
    run it (a nonlinear chain, an unpruned dense layer). ``masks``: the artifact's."""
    from ..tensorized.conv import ChainConv2d
    from .cpu import ConvChainKernel, supports

    if isinstance(layer, nn.Linear):
        if f"{name}.weight" not in masks:
            return None
        kernel: Any = TritonChainKernel.from_linear(layer, masks[f"{name}.weight"], device)
    elif not supports(layer):
        return None
    else:
        core_masks = [masks.get(f"{name}.cores.{i}") for i in range(len(layer.cores))]
        if isinstance(layer, ChainConv2d):
            kernel = ConvChainKernel(layer, core_masks, chain=lambda lay: TritonChainKernel(lay, device))
            kernel.weight = kernel.weight.to(device)
        else:
            kernel = TritonChainKernel.from_layer(layer, core_masks, device)
    return TritonLayer(layer, kernel, device)


def triton_model(model: nn.Module, masks: dict[str, Tensor], device: str | torch.device
                 ) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` on ``device`` (eval mode) whose every layer the Triton kernel can
    run does (the compressed layers :func:`tedepr_cli.execution.candidates` lists). Returns
    (model, names of the layers on Triton). Inference only: run it under ``torch.no_grad()``."""
    from ..execution import candidates
    from ..masks import folded_copy

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    out = folded_copy(model).eval()  # plain weights: the masks ride in the kernels' layouts
    on = []
    for name, layer in candidates(out, masks, recurrent=False).items():  # an LSTM's projections
        wrapped = triton_layer(name, layer, masks, dev)
        if wrapped is not None:
            out.set_submodule(name, wrapped)
            on.append(name)
    return out.to(dev).eval(), on
