"""The compiled CPU chain kernel, per layer: pack once, then one C call per forward.

:class:`SparseChainKernel` packs a tensorized Linear (TT or TR), the per-pixel parts of a
conv chain or a plain (pruned) weight matrix into CSR steps (:mod:`.layout`) and runs the
whole chain in one call of ``kernels/chain.c``; :class:`ConvChainKernel` is the full conv
forward (kernel for the 1x1 parts, ``torch.conv2d`` for the k x k rank-space conv);
:class:`KernelLinear` is a drop-in module (e.g. for ``TensorizedLSTM.ih``). Every class
falls back to :class:`.torch_path.TorchChain` - same packed data, torch ops - when the
library cannot be built, or the input is not a float32 CPU tensor, or autograd needs a
graph. The packed cores are a snapshot: re-create the kernel after changing the weights.
"""

from __future__ import annotations

import ctypes
import math
import threading
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import build
from .layout import (
    ChainLayout,
    MaskArg,
    core_masks,
    ring_in_layout,
    ring_out_layout,
    sparse_matrix_layout,
    tr_linear_layout,
    tt_linear_layout,
)
from .torch_path import TorchChain


class _Step(ctypes.Structure):
    """Mirror of ``tedepr_step`` in chain.c."""

    _fields_ = [("n_rows", ctypes.c_int32), ("n_in_rows", ctypes.c_int32),
                ("g_in", ctypes.c_int32), ("col_bytes", ctypes.c_int32),
                ("row_ptr", ctypes.c_void_p), ("col", ctypes.c_void_p), ("val", ctypes.c_void_p),
                ("roff", ctypes.c_void_p), ("goff", ctypes.c_void_p)]


class _Chain(ctypes.Structure):
    """Mirror of ``tedepr_chain`` in chain.c."""

    _fields_ = [("n_steps", ctypes.c_int32), ("n_in", ctypes.c_int32), ("n_out", ctypes.c_int32),
                ("buf_units", ctypes.c_int32), ("steps", ctypes.POINTER(_Step)),
                ("bias", ctypes.c_void_p), ("nthreads", ctypes.c_int32), ("pad_", ctypes.c_int32),
                ("chunk", ctypes.c_int64)]


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data if a.size else 0


def supports(layer: nn.Module) -> bool:
    """Whether :meth:`SparseChainKernel.from_layer` / :class:`ConvChainKernel` take ``layer``:
    TT/TR Linear and conv chains with the linear chain (a nonlinear chain has BN+ReLU
    between steps and stays on the torch path)."""
    from ..tensorized.conv import ChainConv2d
    from ..tensorized.tr import TRLinear
    from ..tensorized.tt import TTLinear

    return isinstance(layer, TTLinear | TRLinear | ChainConv2d) and \
        getattr(layer, "chain", "linear") == "linear"


class SparseChainKernel:
    """One tensorized layer (or sparse matrix) as a compiled sparse chain.

    ``kernel(x)`` maps ``(..., N) -> (..., M)`` like the layer's forward (bias included);
    :meth:`feature_major` maps ``(N, B) -> (M, B)`` (or ``(nb, N, B) -> (nb, M, B)``)
    without the two transposes. ``threads`` C threads share each call (default 1: the
    caller controls parallelism, e.g. one process per core). Results are deterministic.
    """

    def __init__(self, layout: ChainLayout, threads: int = 1, chunk: int = 0) -> None:
        self.layout = layout
        self.n_in, self.n_out = layout.n_in, layout.n_out
        self._torch_path: TorchChain | None = None
        self._keep: list[np.ndarray] = []
        steps = (_Step * len(layout.steps))()
        for i, s in enumerate(layout.steps):
            arrays = [np.ascontiguousarray(a) for a in (s.row_ptr, s.col, s.val, s.roff, s.goff)]
            self._keep += arrays
            steps[i] = _Step(s.n_rows, s.n_in_rows, s.g_in, arrays[1].itemsize,
                             *[_ptr(a) for a in arrays])
        self._steps = steps
        self._bias = None if layout.bias is None else np.ascontiguousarray(layout.bias, np.float32)
        self._bias_ptr = self._bias.ctypes.data if self._bias is not None else None
        self._chain = _Chain(len(layout.steps), layout.n_in, layout.n_out, layout.buf_units, steps,
                             self._bias_ptr, 1, 0, 0)
        self._chain_ptr = ctypes.addressof(self._chain)
        self.threads, self.chunk = threads, chunk
        self._lib = build.load()  # None: every call takes the torch path
        self._local = threading.local()  # per-thread workspaces: calls may run concurrently

    @property
    def torch_path(self) -> TorchChain:
        """The same chain in torch ops (built on first use): other dtypes/devices, autograd,
        no compiler."""
        if self._torch_path is None:
            self._torch_path = TorchChain(self.layout)
        return self._torch_path

    @property
    def threads(self) -> int:
        """C threads per call (1: the caller's thread only)."""
        return int(self._chain.nthreads)

    @threads.setter
    def threads(self, n: int) -> None:
        self._chain.nthreads = max(1, int(n))

    @property
    def chunk(self) -> int:
        """Samples per batch chunk of a batch-major call (0: auto, sized so that the
        intermediate buffers stay in cache); a tuning knob for the planner."""
        return int(self._chain.chunk)

    @chunk.setter
    def chunk(self, n: int) -> None:
        self._chain.chunk = max(0, int(n))

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_layer(cls, layer: nn.Module, masks: MaskArg = None, threads: int = 1) -> SparseChainKernel:
        """Pack a ``TTLinear`` or ``TRLinear`` (linear chain). ``masks``: per core, a list
        or an artifact-style dict; without masks the exact zeros are the pruned entries."""
        from ..tensorized.tr import TRLinear
        from ..tensorized.tt import TTLinear

        if not supports(layer) or not isinstance(layer, TTLinear | TRLinear):
            raise ValueError(f"no compiled chain for {type(layer).__name__} "
                             f"(chain={getattr(layer, 'chain', '?')}); use its torch forward")
        spec = layer._spec
        fn = tt_linear_layout if isinstance(layer, TTLinear) else tr_linear_layout
        return cls(fn(list(layer.cores), spec["in_modes"], spec["out_modes"], masks, layer.bias), threads)

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, mask: Tensor | None = None,
                   threads: int = 1) -> SparseChainKernel:
        """A plain pruned weight ``(M, N)`` as a 1-core chain (CSR SpMM), e.g. the dense-pruned
        baseline; kept entries are ``mask`` or the nonzeros."""
        return cls(sparse_matrix_layout(weight, mask, bias), threads)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Tensor | None = None,
                    threads: int = 1) -> SparseChainKernel:
        """A pruned ``nn.Linear`` as a 1-core chain."""
        return cls.from_dense(linear.weight, linear.bias, mask, threads)

    # -- facts ----------------------------------------------------------------------
    @property
    def compiled(self) -> bool:
        """Whether float32 CPU calls run the compiled kernel (else the torch path)."""
        return self._lib is not None

    def flops(self, batch: int) -> int:
        """Multiply-add FLOPs of one call at ``batch`` (kept entries only)."""
        return self.layout.flops(batch)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.layout.kind, "n_in": self.n_in, "n_out": self.n_out,
                "steps": len(self.layout.steps), "nnz": self.layout.nnz,
                "nnz_per_step": [s.nnz for s in self.layout.steps], "threads": self.threads,
                "compiled": self.compiled}

    # -- running --------------------------------------------------------------------
    def _workspace(self, lib: ctypes.CDLL, batch: int, fm: int) -> int:
        """Address of this thread's workspace for ``batch`` (kept between calls)."""
        local = self._local
        key = (batch, fm, self.chunk)
        if getattr(local, "key", None) == key:
            return local.ptr
        need = int(lib.tedepr_chain_workspace(self._chain_ptr, batch, fm, fm, self.chunk))
        ws = getattr(local, "ws", None)
        if ws is None or ws.numel() < need:
            ws = local.ws = torch.empty(need, dtype=torch.float32)
        local.key, local.ptr = key, ws.data_ptr()
        return local.ptr

    def _native(self, x: Tensor) -> bool:
        """Whether the compiled kernel can take ``x`` (float32, CPU, no graph to record)."""
        return (self._lib is not None and x.dtype is torch.float32 and x.is_cpu
                and not (x.requires_grad and torch.is_grad_enabled()))

    def _run(self, x: Tensor, y: Tensor, batch: int, nouter: int, fm: int) -> None:
        lib = self._lib
        rc = lib.tedepr_chain_run(self._chain_ptr, x.data_ptr(), y.data_ptr(), batch, nouter,
                                  self.n_in * batch, self.n_out * batch, fm, fm, self._bias_ptr,
                                  self._workspace(lib, batch, fm), self.threads, self.chunk)
        if rc != 0:
            raise RuntimeError(f"tedepr_chain_run failed ({rc})")

    def __call__(self, x: Tensor) -> Tensor:
        """``(..., N) -> (..., M)``, batch-major like ``nn.Linear``."""
        if x.shape[-1] != self.n_in:
            raise ValueError(f"expected {self.n_in} input features, got {x.shape[-1]}")
        if not self._native(x):
            return self.torch_path(x)
        if x.dim() == 2 and x.is_contiguous():  # the fast path: one short C call
            b = x.shape[0]
            y = torch.empty(b, self.n_out)
            if b and self._lib.tedepr_chain_forward(self._chain_ptr, x.data_ptr(), y.data_ptr(), b,
                                                    self._workspace(self._lib, b, 0)):
                raise RuntimeError("tedepr_chain_forward failed")
            return y
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.n_in).contiguous()
        b = x2.shape[0]
        y = torch.empty(b, self.n_out)
        if b:
            self._run(x2, y, b, 1, 0)
        return y.reshape(*lead, self.n_out)

    def feature_major(self, xt: Tensor) -> Tensor:
        """``(N, B) -> (M, B)``, or blocks ``(nb, N, B) -> (nb, M, B)`` (conv: one block per
        image, pixels as the batch). No transposes: the kernels' own layout."""
        if xt.dim() not in (2, 3) or xt.shape[-2] != self.n_in:
            raise ValueError(f"expected (N={self.n_in}, B) or (nb, N, B), got {tuple(xt.shape)}")
        if not self._native(xt):
            if xt.dim() == 2:
                return self.torch_path.feature_major(xt)
            return torch.stack([self.torch_path.feature_major(t) for t in xt])
        if xt.dim() == 2 and xt.is_contiguous():  # the fast path: one short C call
            b = xt.shape[1]
            y = torch.empty(self.n_out, b)
            if b and self._lib.tedepr_chain_forward_fm(self._chain_ptr, xt.data_ptr(), y.data_ptr(),
                                                       b, self._workspace(self._lib, b, 1)):
                raise RuntimeError("tedepr_chain_forward_fm failed")
            return y
        xt = xt.contiguous()
        b = xt.shape[-1]
        nb = xt.shape[0] if xt.dim() == 3 else 1
        y = torch.empty(*xt.shape[:-2], self.n_out, b)
        if nb and b:
            self._run(xt, y, b, nb, 1)
        return y


class ConvChainKernel:
    """A ``ChainConv2d`` (TT or TR conv, linear chain): the compiled kernel runs the input
    cores (C -> ring state, per pixel) and the output cores (state -> M, per pixel), torch
    runs the k x k conv in rank space. Equals ``layer.forward`` up to fp32 rounding."""

    def __init__(self, layer: nn.Module, masks: MaskArg = None, threads: int = 1) -> None:
        from ..tensorized.conv import ChainConv2d

        if not isinstance(layer, ChainConv2d) or not supports(layer):
            raise ValueError(f"no compiled chain for {type(layer).__name__} "
                             f"(chain={getattr(layer, 'chain', '?')}); use its torch forward")
        cores = list(layer.cores)
        ms = core_masks(cores, masks)
        d = layer.n_in
        self.inputs = SparseChainKernel(ring_in_layout(cores[:d], ms[:d]), threads)
        self.outputs = SparseChainKernel(ring_out_layout(cores[d + 1:], ms[d + 1:], layer.bias), threads)
        kernel = layer.kernel_core.detach().float()
        if ms[d] is not None:
            kernel = kernel * ms[d].to(kernel.device, torch.bool)
        r_in, _, r_out = kernel.shape
        self.weight = kernel.permute(2, 0, 1).reshape(r_out, r_in, *layer.kernel_size).contiguous()
        self.r0 = cores[0].shape[0]
        self.kernel_size, self.stride = layer.kernel_size, layer.stride
        self.padding, self.dilation = layer.padding, layer.dilation

    def flops(self, batch: int, hw: tuple[int, int]) -> int:
        """FLOPs of one forward at ``batch`` images of size ``hw`` (kept entries only)."""
        from ..tensorized.conv import conv_out_hw

        h2, w2 = conv_out_hw(hw, self.kernel_size, self.stride, self.padding, self.dilation)
        conv = 2 * batch * self.r0 * h2 * w2 * int((self.weight != 0).sum())
        return self.inputs.flops(batch * math.prod(hw)) + conv + self.outputs.flops(batch * h2 * w2)

    def __call__(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, M, H', W')``."""
        b, c, h, w = x.shape
        s = self.inputs.feature_major(x.reshape(b, c, h * w))  # (B, r0 * rd, H * W)
        rd = s.shape[1] // self.r0
        s = torch.nn.functional.conv2d(s.reshape(b * self.r0, rd, h, w),
                                       self.weight.to(s.device, s.dtype), None,
                                       self.stride, self.padding, self.dilation)
        h2, w2 = s.shape[-2], s.shape[-1]
        y = self.outputs.feature_major(s.reshape(b, -1, h2 * w2))  # (B, M, H' * W')
        return y.reshape(b, -1, h2, w2)


class KernelLinear(nn.Module):
    """Drop-in inference module for a tensorized Linear (or a pruned ``nn.Linear``): the
    compiled chain when it can run, the wrapped module's own forward otherwise (training,
    other devices or dtypes). Use it e.g. for each ``TensorizedLSTM.ih[i]``."""

    def __init__(self, layer: nn.Module, masks: MaskArg | Tensor = None, threads: int = 1) -> None:
        """``masks``: per-core masks of a tensorized layer, or the weight mask of an ``nn.Linear``."""
        super().__init__()
        self.layer = layer
        if isinstance(layer, nn.Linear):
            self.kernel = SparseChainKernel.from_linear(layer, masks, threads)  # type: ignore[arg-type]
        else:
            self.kernel = SparseChainKernel.from_layer(layer, masks, threads)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        if self.training or not self.kernel._native(x):
            return self.layer(x)
        return self.kernel(x)
