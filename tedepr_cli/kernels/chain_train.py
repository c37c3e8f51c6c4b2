"""The compiled training path of a linear chain: forward and backward of a TT/TR Linear in C.

A tensorized Linear (TT-matrix, Novikov et al. 2015; tensor ring, Wang et al. 2018) as a
``torch.autograd.Function`` around ``kernels/chain.c``'s training entry points
(``tedepr_chain_train_forward`` / ``tedepr_chain_train_backward``). The layer is packed as
the inference kernel packs it (:mod:`.layout`: each core a CSR over its KEPT entries, the
activations feature-major, the permutation between steps folded into the stores); the
forward keeps every step's input buffer, and the backward walks the steps in reverse:
``dX_k = A_k^T dY_k`` through the transposed CSR (the same tile kernels, the forward's
store offsets read back) and, per kept entry ``(o, kk)``, ``dval = <dY_k[o], X_k[kk]>`` over
the live lanes (an SDDMM: pruned entries are never computed), the bias gradient, and
``dL/dx`` in the caller's batch-major layout.

The CSR *structure* is fixed by the masks (:class:`TrainChain`, built once per mask state
and cached on the layer by the caller); the *values* change every optimizer step: each call
gathers them from the masked cores (one index gather for the forward CSR, one for the
transposed one) and the backward scatters the kept-entry gradients into each core's shape
(zeros at the pruned entries, which the mask's parametrization zeroes anyway). Cores without
a mask keep every entry (their zeros are trainable).

fp32 on the CPU, one thread, deterministic (every sum in a fixed order). A double backward
(``create_graph=True``: the GraSP and ``tedepr`` pruning criteria's Hessian-vector
products) recomputes the layer in torch ops (the layer's own chain, passed as
``reference``) and differentiates that, so higher-order gradients are torch's own.
:func:`usable` says where the C path cannot run (no compiler, other dtypes or devices); the
caller then takes the torch chain.

Why: at 99.5 % sparsity LeNet-300-100's cores keep a few hundred entries; torch's chain pays
a small GEMM, a permute copy and an autograd node per step, and its rebuild a dense GEMM.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from . import build
from .abi import Chain as _Chain
from .abi import Step as _Step
from .layout import ChainLayout

_F32 = torch.float32
SLACK = 64  # floats after each saved buffer (chain.c's OVERREAD_SLACK)
MAX_STEPS = 64  # chain.c's TRAIN_MAX_STEPS
Reference = Callable[[Tensor, list[Tensor], Tensor | None], Tensor]


def _ptr(a: np.ndarray) -> int | None:
    return a.ctypes.data if a.size else None


class TrainChain:
    """A layer's kept-entry structure packed for the training kernel.

    ``layout``: the layer's :class:`~.layout.ChainLayout` built with its masks (every entry
    kept for a core without one; the layout's values are not used); ``step_core[k]``: the
    index of the core step ``k`` contracts; ``core_shapes``: the cores' shapes; ``masks``:
    the cores' boolean masks the layout was built with (None: unpruned), which the double
    backward's torch recomputation applies. Holds both CSRs of every step (``A_k`` and
    ``A_k^T``) as ctypes structures and each entry's index into its core in either order;
    the C side gathers the values from the cores on every call.
    """

    def __init__(self, layout: ChainLayout, step_core: Sequence[int], core_shapes: Sequence[tuple[int, ...]],
                 masks: Sequence[Tensor | None] | None = None) -> None:
        self.layout = layout
        self.masks = list(masks) if masks is not None else [None] * len(core_shapes)
        self.n_in, self.n_out = layout.n_in, layout.n_out
        self.core_shapes = [tuple(int(d) for d in s) for s in core_shapes]
        self.step_core = [int(k) for k in step_core]
        if len(self.step_core) != len(layout.steps) or len(layout.steps) > MAX_STEPS:
            raise ValueError(f"{len(layout.steps)} steps, {len(self.step_core)} step cores "
                             f"(at most {MAX_STEPS} steps)")
        self._keep: list[np.ndarray] = []
        n = len(layout.steps)
        self._steps, self._tsteps = (_Step * n)(), (_Step * n)()
        src, tsrc = [], []
        for k, s in enumerate(layout.steps):
            if s.src is None:
                raise ValueError("the layout carries no source indices (build it with layout.make_step)")
            live = s.live_groups
            # A_k^T: entries ordered by (input row kk, output row o): a stable sort of the CSR
            rows = np.repeat(np.arange(s.n_rows, dtype=np.int64), np.diff(s.row_ptr))
            cols = s.col.astype(np.int64)
            order = np.lexsort((rows, cols))
            t_ptr = np.zeros(s.n_in_rows + 1, dtype=np.int32)
            np.cumsum(np.bincount(cols, minlength=s.n_in_rows), out=t_ptr[1:])
            t_col = rows[order].astype(np.uint16 if s.n_rows <= 2**16 else np.int32)
            src.append(s.src)
            tsrc.append(s.src[order])
            t_roff = (np.arange(s.n_in_rows, dtype=np.int64) * s.g_in).astype(np.int32)
            t_goff = (s.g_lo + np.arange(live, dtype=np.int64)).astype(np.int32)
            fwd = [np.ascontiguousarray(a) for a in (s.row_ptr, s.col, s.roff, s.goff)]
            bwd = [t_ptr, t_col, t_roff, t_goff]
            self._keep += fwd + bwd
            self._steps[k] = _Step(s.n_rows, s.n_in_rows, s.g_in, fwd[1].itemsize, s.g_lo, s.g_lo + live,
                                   _ptr(fwd[0]), _ptr(fwd[1]), None, _ptr(fwd[2]), _ptr(fwd[3]))
            self._tsteps[k] = _Step(s.n_in_rows, s.n_rows, live, t_col.itemsize, 0, live,
                                    _ptr(t_ptr), _ptr(t_col), None, _ptr(t_roff), _ptr(t_goff))
        self._src = np.ascontiguousarray(np.concatenate(src) if src else np.zeros(0), dtype=np.int32)
        self._tsrc = np.ascontiguousarray(np.concatenate(tsrc) if tsrc else np.zeros(0), dtype=np.int32)
        self._src_ptr, self._tsrc_ptr = _ptr(self._src), _ptr(self._tsrc)
        self.nnz = int(self._src.size)
        self._chain = _Chain(n, layout.n_in, layout.n_out, layout.buf_units, self._steps, None, 1, 0, 0)
        self._chain_ptr = ctypes.addressof(self._chain)
        self._tsteps_ptr = ctypes.addressof(self._tsteps)
        self._ptrs = ctypes.c_void_p * n
        units = [layout.n_in] + [s.n_in_rows * s.g_in for s in layout.steps[1:]]
        self._saved_units = sum(units)

    def __reduce__(self):
        """Copies and pickles are rebuilt from the layout (ctypes pointers do not copy)."""
        return TrainChain, (self.layout, self.step_core, self.core_shapes, self.masks)

    def saved_floats(self, batch: int) -> int:
        """Floats of the buffers the forward keeps for the backward (chain.c's
        ``tedepr_chain_train_saved``)."""
        return self._saved_units * batch + SLACK * len(self.layout.steps)

    def step_pointers(self, tensors: Sequence[Tensor | None]) -> ctypes.Array:
        """Per step the data pointer of the core tensor (or gradient) it contracts."""
        return self._ptrs(*[None if (t := tensors[k]) is None else t.data_ptr() for k in self.step_core])


def not_f32_cpu(*tensors: Tensor | None) -> str | None:
    """Why a compiled training kernel (this chain, :mod:`.lstm_train`'s recurrence) cannot
    take these tensors: one that is not float32 on the CPU (None: all are, or are None)."""
    for t in tensors:
        if t is not None and (t.dtype is not _F32 or t.device.type != "cpu"):
            return f"tensors are {t.dtype} on {t.device.type} (the kernel is float32 CPU)"
    return None


def usable(*tensors: Tensor | None) -> str | None:
    """Why the compiled training chain cannot take these tensors (None: it can): the
    library cannot be built or loaded here, or a tensor is not float32 on the CPU."""
    if (why := not_f32_cpu(*tensors)) is not None:
        return why
    if build.load() is None:
        return "the compiled kernel is unavailable (see `tedepr kernels`)"
    return None


class _ChainFn(torch.autograd.Function):
    """``(x (B, N), bias, *cores) -> (B, M)``, see the module doc."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, plan: TrainChain, reference: Reference,
                *cores: Tensor) -> Tensor:
        ctx.set_materialize_grads(False)
        b = x.shape[0]
        # the inputs themselves are saved (a double backward differentiates through them)
        xc = x.contiguous()
        bc = None if bias is None else bias.contiguous()
        cc = [c.contiguous() for c in cores]
        vals, tvals = x.new_empty(plan.nnz), x.new_empty(plan.nnz)
        saved = x.new_empty(plan.saved_floats(b))
        y = x.new_empty(b, plan.n_out)
        rc = build.load().tedepr_chain_train_forward(
            plan._chain_ptr, plan._tsteps_ptr, plan.step_pointers(cc), plan._src_ptr, plan._tsrc_ptr,
            vals.data_ptr(), tvals.data_ptr(), None if bc is None else bc.data_ptr(), xc.data_ptr(),
            y.data_ptr(), b, saved.data_ptr())
        if rc:
            raise MemoryError(f"tedepr_chain_train_forward failed ({rc})")
        ctx.plan, ctx.reference = plan, reference
        ctx.save_for_backward(x, bias, saved, vals, tvals, *cores)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor | None):
        x, bias, saved, vals, tvals, *cores = ctx.saved_tensors
        need = ctx.needs_input_grad
        if dy is None:
            return (None,) * (4 + len(cores))
        if torch.is_grad_enabled():  # a double backward: differentiate torch's chain instead
            return _torch_backward(ctx, x, bias, cores, dy)
        plan: TrainChain = ctx.plan
        b = x.shape[0]
        dy = dy.to(_F32).contiguous()
        dx = x.new_empty(b, plan.n_in) if need[0] else None
        db = x.new_empty(plan.n_out) if need[1] else None
        dcores = [torch.zeros_like(c) if n else None for c, n in zip(cores, need[4:], strict=True)]
        rc = build.load().tedepr_chain_train_backward(
            plan._chain_ptr, plan._tsteps_ptr, vals.data_ptr(), tvals.data_ptr(), plan._src_ptr,
            plan.step_pointers(dcores), saved.data_ptr(), dy.data_ptr(),
            None if dx is None else dx.data_ptr(), None if db is None else db.data_ptr(), b)
        if rc:
            raise MemoryError(f"tedepr_chain_train_backward failed ({rc})")
        return (dx, db, None, None, *dcores)


def _torch_backward(ctx, x: Tensor, bias: Tensor | None, cores: list[Tensor], dy: Tensor):
    """The backward as a differentiable torch graph (for ``create_graph=True``): the layer
    recomputed by its torch chain (``ctx.reference``) from the saved inputs, then
    ``torch.autograd.grad`` of it with ``create_graph=True``."""
    need = ctx.needs_input_grad
    inputs = [x, bias, *cores]
    flags = [need[0], need[1], *need[4:]]
    with torch.enable_grad():
        leaves = [t if t is None or t.requires_grad else t.detach().requires_grad_(n)
                  for t, n in zip(inputs, flags, strict=True)]
        cores = [c if m is None else c * m for c, m in zip(leaves[2:], ctx.plan.masks, strict=True)]
        y = ctx.reference(leaves[0], cores, leaves[1])
        wrt = [(k, t) for k, t in enumerate(leaves) if t is not None and flags[k]]
        grads = torch.autograd.grad(y, [t for _, t in wrt], dy, create_graph=True,
                                    allow_unused=True) if wrt else []
    result: list[Tensor | None] = [None] * len(inputs)
    for (k, t), g in zip(wrt, grads, strict=True):
        result[k] = torch.zeros_like(t) if g is None else g
    return (result[0], result[1], None, None, *result[2:])


def linear(x: Tensor, cores: Sequence[Tensor], bias: Tensor | None, plan: TrainChain,
           reference: Reference) -> Tensor:
    """One tensorized Linear on the compiled training chain, differentiable.

    ``x``: ``(..., N)`` float32; ``cores``: the layer's cores in order as stored (the
    trainable tensors: a masked core's ``original``, :func:`tedepr_cli.masks.stored_and_mask`;
    only the kept entries are read), float32; ``bias``: ``(M,)`` or None; ``plan``: their
    :class:`TrainChain`; ``reference(x2d, cores, bias)``: the same layer in torch ops (used
    for double backward, on the masked cores). Returns ``(..., M)``, equal to ``reference``
    on the masked cores up to fp32 rounding, and so are the gradients (cores: at the kept
    entries; zeros at the pruned ones: the masked cores' gradients times the masks). Call
    only where :func:`usable` is None; raises ``ValueError`` for a tensor that is not
    float32 on the CPU or of the wrong shape, ``MemoryError`` if the C workspace cannot be
    allocated."""
    why = usable(x, bias, *cores)
    if why is not None:
        raise ValueError(f"compiled training chain: {why}")
    if x.shape[-1] != plan.n_in or [tuple(c.shape) for c in cores] != plan.core_shapes or (
            bias is not None and tuple(bias.shape) != (plan.n_out,)):
        raise ValueError("compiled training chain: shapes do not match the packed layer")
    return run(x, cores, bias, plan, reference)


def run(x: Tensor, cores: Sequence[Tensor], bias: Tensor | None, plan: TrainChain, reference: Reference
        ) -> Tensor:
    """:func:`linear` without its checks, for callers that made them (the layers)."""
    if x.dim() == 2:
        return _ChainFn.apply(x, bias, plan, reference, *cores)
    lead = x.shape[:-1]
    y = _ChainFn.apply(x.reshape(-1, plan.n_in), bias, plan, reference, *cores)
    return y.reshape(*lead, plan.n_out)
