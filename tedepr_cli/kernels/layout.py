"""Pack a tensorized layer into the step tables the compiled and Triton kernels run.

Every chain (TT-matrix, tensor ring, the 1x1 parts of the conv chain, a plain sparse
matrix) is written as steps of one shape: a sparse matrix (a core, as CSR) times an
activation buffer stored *feature-major* - the contracted index is the row, the free
indices and then the batch are the contiguous columns - written straight into the next
step's layout (DESIGN §4). A buffer's layout is an ordered list of named axes (outermost
first, batch implicitly innermost); a step contracts the axes its buffer starts with, so
its reads stream along contiguous columns, and its output row ``o`` / free group ``g``
land at ``B * (roff[o] + goff[g]) + b``: the permutation costs nothing.

The layouts below put the axes that survive a step innermost, so stores are contiguous
runs (vector stores) wherever the shapes allow. Pruned entries (mask False, or exact zeros
without a mask) are simply not stored: work and bytes follow the kept-entry count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

MaskArg = Sequence[Tensor | None] | Mapping[object, Tensor] | None


@dataclass(frozen=True)
class StepLayout:
    """One step: CSR ``(n_rows, n_in_rows)`` applied to a ``(n_in_rows, g_in * B)`` buffer."""

    n_rows: int
    n_in_rows: int
    g_in: int
    out_units: int  # size of the buffer the step writes, per batch element
    row_ptr: np.ndarray  # int32, n_rows + 1
    col: np.ndarray  # uint16 or int32 (narrowest that holds n_in_rows - 1)
    val: np.ndarray  # float32
    roff: np.ndarray  # int32, n_rows
    goff: np.ndarray  # int32, g_in
    g_lo: int = 0  # live free groups [g_lo, g_hi): the compiled kernel computes only these
    g_hi: int = -1  # -1: g_in (see ChainLayout: outputs no later step reads are dead)
    src: np.ndarray | None = None  # int64, nnz: each entry's flat index into its core (training)

    @property
    def nnz(self) -> int:
        return int(self.val.size)

    @property
    def live_groups(self) -> int:
        """Free groups the compiled kernel computes (the others' outputs are never read)."""
        return (self.g_in if self.g_hi < 0 else self.g_hi) - self.g_lo

    def dense(self) -> np.ndarray:
        """The step's matrix as a dense ``(n_rows, n_in_rows)`` array (torch/Triton paths)."""
        a = np.zeros((self.n_rows, self.n_in_rows), dtype=np.float32)
        rows = np.repeat(np.arange(self.n_rows), np.diff(self.row_ptr))
        a[rows, self.col.astype(np.int64)] = self.val
        return a


@dataclass(frozen=True)
class ChainLayout:
    """A whole layer: ``(B, n_in) -> (B, n_out)`` as a list of steps, plus the bias."""

    n_in: int
    n_out: int
    steps: tuple[StepLayout, ...]
    bias: np.ndarray | None = None
    kind: str = "chain"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", live_groups(self.steps))

    @property
    def buf_units(self) -> int:
        """Largest intermediate buffer (per batch element) the chain needs."""
        return max([s.out_units for s in self.steps[:-1]], default=0)

    @property
    def nnz(self) -> int:
        return sum(s.nnz for s in self.steps)

    def flops(self, batch: int) -> int:
        """Multiply-add FLOPs one compiled call does: every stored entry meets every live
        lane once."""
        return 2 * batch * sum(s.nnz * s.live_groups for s in self.steps)


LIVE_GROUPS_MAX_CELLS = 1 << 26  # larger (rows x groups) steps are not analysed (packing time)


def live_groups(steps: Sequence[StepLayout]) -> tuple[StepLayout, ...]:
    """Mark each step's live free groups: a group ``g`` of step ``k`` is dead when none of
    its outputs ``(o, g)`` lands in an input row that step ``k + 1`` reads (a column of its
    CSR). E.g. pruning that empties a whole input mode value of core ``k + 1`` (MNIST's
    border pixels) kills those groups of step ``k``. The live groups are kept as one range
    ``[g_lo, g_hi)`` (no gathers); the compiled kernel skips the rest, whose values no step
    ever reads. The torch and Triton paths compute every group (same result)."""
    out = list(steps)
    for k in range(len(out) - 1):
        s, nxt = out[k], out[k + 1]
        if s.n_rows * s.g_in > LIVE_GROUPS_MAX_CELLS or s.g_in <= 1:
            continue
        read = np.zeros(nxt.n_in_rows + 1, dtype=bool)
        read[nxt.col.astype(np.int64)] = True
        live = np.zeros(s.g_in, dtype=bool)
        goff = s.goff.astype(np.int64)[None, :]
        step = max(1, (1 << 20) // s.g_in)  # rows per block: ~8 MB of temporaries at most
        for r0 in range(0, s.n_rows, step):
            units = s.roff[r0:r0 + step].astype(np.int64)[:, None] + goff
            live |= read[np.minimum(units // max(nxt.g_in, 1), nxt.n_in_rows)].any(axis=0)
        idx = np.flatnonzero(live)
        lo, hi = (int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, 0)
        if (lo, hi) != (s.g_lo, s.g_in if s.g_hi < 0 else s.g_hi):
            out[k] = replace(s, g_lo=lo, g_hi=hi)
    return tuple(out)


# ------------------------------------------------------------------------ one step
def _radix(axes: list[str], sizes: Mapping[str, int]) -> dict[str, int]:
    """Row-major strides of ``axes`` (last axis fastest)."""
    out, s = {}, 1
    for a in reversed(axes):
        out[a] = s
        s *= sizes[a]
    return out


def _offsets(axes: list[str], sizes: Mapping[str, int], stride: Mapping[str, int]) -> np.ndarray:
    """``sum_a idx_a * stride[a]`` over the row-major enumeration of ``axes``."""
    off = np.zeros([sizes[a] for a in axes] or [1], dtype=np.int64)
    for i, a in enumerate(axes):
        shape = [1] * len(axes)
        shape[i] = sizes[a]
        off = off + (np.arange(sizes[a], dtype=np.int64) * stride[a]).reshape(shape)
    return off.reshape(-1)


def make_step(core: np.ndarray, keep: np.ndarray, core_axes: list[str], sizes: Mapping[str, int],
              lin: list[str], lout: list[str]) -> StepLayout:
    """The step that contracts ``core`` (axes ``core_axes``) into a buffer laid out as
    ``lin`` and writes a buffer laid out as ``lout``.

    The contracted axes (those of ``lin`` the core also has) must lead ``lin`` - size-1
    axes aside - so that the free axes are the contiguous columns.
    """
    contracted = [a for a in lin if a in core_axes]
    free = [a for a in lin if a not in core_axes]
    produced = [a for a in core_axes if a not in lin]
    big = [a for a in lin if sizes[a] > 1]
    if big[:len([a for a in contracted if sizes[a] > 1])] != [a for a in contracted if sizes[a] > 1]:
        raise ValueError(f"contracted axes {contracted} do not lead the layout {lin}")
    if sorted(lout) != sorted(free + produced):
        raise ValueError(f"layout {lout} is not free {free} + produced {produced}")
    stride = _radix(lout, sizes)
    # rows in order of falling destination stride: consecutive rows land side by side
    produced.sort(key=lambda a: -stride[a])
    n_rows = math.prod(sizes[a] for a in produced)
    n_in = math.prod(sizes[a] for a in contracted)
    perm = [core_axes.index(a) for a in produced + contracted]
    a = np.ascontiguousarray(core.transpose(perm)).reshape(n_rows, n_in).astype(np.float32)
    k = np.ascontiguousarray(keep.transpose(perm)).reshape(n_rows, n_in)
    rows, cols = np.nonzero(k)  # row-major: ascending column within each row
    src = np.arange(core.size, dtype=np.int64).reshape(core.shape).transpose(perm).reshape(n_rows, n_in)
    row_ptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=row_ptr[1:])
    out_units = math.prod(sizes[x] for x in lout)
    if out_units >= 2**31 or row_ptr[-1] >= 2**31:
        raise ValueError("layer too large for 32-bit offsets")
    return StepLayout(
        n_rows=n_rows, n_in_rows=n_in, g_in=math.prod(sizes[x] for x in free), out_units=out_units,
        row_ptr=row_ptr.astype(np.int32),
        col=cols.astype(np.uint16 if n_in <= 2**16 else np.int32),
        val=a[rows, cols].astype(np.float32),
        roff=_offsets(produced, sizes, stride).astype(np.int32),
        goff=_offsets(free, sizes, stride).astype(np.int32), src=src[rows, cols])


def _np(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _keep(core: Tensor, mask: Tensor | None) -> np.ndarray:
    """Kept entries: the mask where given, else the nonzero values."""
    if mask is not None:
        if tuple(mask.shape) != tuple(core.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} != core shape {tuple(core.shape)}")
        return mask.detach().to("cpu").bool().numpy()
    return _np(core) != 0


def core_masks(cores: Sequence[Tensor], masks: MaskArg) -> list[Tensor | None]:
    """Masks aligned with ``cores``: a list, or a mapping keyed by core index or by a
    parameter name ending in ``cores.<i>`` (an artifact's mask dict)."""
    if masks is None:
        return [None] * len(cores)
    if isinstance(masks, Mapping):
        out: list[Tensor | None] = [None] * len(cores)
        for key, m in masks.items():
            if isinstance(key, int):
                out[key] = m
            elif isinstance(key, str) and key.rsplit(".", 2)[-2:-1] == ["cores"]:
                idx = int(key.rsplit(".", 1)[1])
                if idx < len(cores):
                    out[idx] = m
        return out
    out = list(masks)
    if len(out) != len(cores):
        raise ValueError(f"{len(out)} masks for {len(cores)} cores")
    return out


def _bias(bias: Tensor | None) -> np.ndarray | None:
    return None if bias is None else _np(bias).astype(np.float32)


# ------------------------------------------------------------------------- chains
def sparse_matrix_layout(weight: Tensor, mask: Tensor | None = None, bias: Tensor | None = None
                         ) -> ChainLayout:
    """The 1-core chain: ``y = x @ W.T`` for a (pruned) dense ``W`` of shape ``(M, N)``."""
    m, n = weight.shape
    sizes = {"m": m, "n": n}
    step = make_step(_np(weight), _keep(weight, mask), ["m", "n"], sizes, ["n"], ["m"])
    return ChainLayout(n, m, (step,), _bias(bias), "sparse")


def tt_linear_layout(cores: Sequence[Tensor], in_modes: Sequence[int], out_modes: Sequence[int],
                     masks: MaskArg = None, bias: Tensor | None = None) -> ChainLayout:
    """TT-matrix Linear, cores ``(r_k, n_k, m_k, r_{k+1})`` (Novikov et al. 2015).

    Buffer ``k`` is ``[n_k, r_k | m_0..m_{k-1}, n_{k+1}..n_{d-1}]``: the step contracts
    ``(n_k, r_k)`` and the untouched input modes stay innermost, next to the batch.
    """
    d = len(cores)
    ms = core_masks(cores, masks)
    sizes: dict[str, int] = {}
    for k, c in enumerate(cores):
        r0, n, m, r1 = c.shape
        sizes.update({f"r{k}": r0, f"n{k}": n, f"m{k}": m, f"r{k + 1}": r1})
    if [sizes[f"n{k}"] for k in range(d)] != list(in_modes) or \
            [sizes[f"m{k}"] for k in range(d)] != list(out_modes):
        raise ValueError("core shapes do not match the modes")

    def buf(k: int) -> list[str]:
        if k == d:
            return [f"m{j}" for j in range(d)] + [f"r{d}"]
        return ([f"n{k}", f"r{k}"] + [f"m{j}" for j in range(k)]
                + [f"n{j}" for j in range(k + 1, d)])

    steps = tuple(make_step(_np(c), _keep(c, ms[k]), [f"r{k}", f"n{k}", f"m{k}", f"r{k + 1}"],
                            sizes, buf(k), buf(k + 1)) for k, c in enumerate(cores))
    return ChainLayout(math.prod(in_modes), math.prod(out_modes), steps, _bias(bias), "tt")


def _ring_in_steps(cores: Sequence[Tensor], masks: list[Tensor | None], sizes: dict[str, int],
                   last: list[str]) -> list[StepLayout]:
    """Input cores ``(a_k, n_k, a_{k+1})``: ``x -> [a_0, a_d]``; buffer ``k >= 1`` is
    ``[n_k, a_k | a_0, n_{k+1}..]`` (the ring index rides along as an outer free axis)."""
    d = len(cores)

    def buf(k: int) -> list[str]:
        if k == 0:
            return [f"n{j}" for j in range(d)]
        if k == d:
            return last
        return [f"n{k}", f"a{k}", "a0"] + [f"n{j}" for j in range(k + 1, d)]

    return [make_step(_np(c), _keep(c, masks[k]), [f"a{k}", f"n{k}", f"a{k + 1}"], sizes,
                      buf(k), buf(k + 1)) for k, c in enumerate(cores)]


def _ring_out_steps(cores: Sequence[Tensor], masks: list[Tensor | None], sizes: dict[str, int],
                    q: str) -> list[StepLayout]:
    """Output cores ``(s_j, m_j, s_{j+1})`` with ``s_0 = q`` and ``s_e = a_0``, contracted
    from the last one back: ``[a_0, q] -> [m_0..m_{e-1}]``. Buffer before core ``j`` is
    ``[s_{j+1}, q | m_{j+1}..m_{e-1}]``; the first core closes the ring (contracts
    ``s_1`` and ``q``), and each new output mode lands outermost, so stores stay contiguous."""
    e = len(cores)

    def s(j: int) -> str:
        return q if j == 0 else ("a0" if j == e else f"s{j}")

    def buf(j: int) -> list[str]:  # the buffer core j reads; -1: the output
        if j < 0:
            return [f"m{i}" for i in range(e)]
        return [s(j + 1), q] + [f"m{i}" for i in range(j + 1, e)]

    steps = []
    for j in range(e - 1, -1, -1):
        steps.append(make_step(_np(cores[j]), _keep(cores[j], masks[j]), [s(j), f"m{j}", s(j + 1)],
                               sizes, buf(j), buf(j - 1)))
    return steps


def _ring_sizes(in_cores: Sequence[Tensor], out_cores: Sequence[Tensor], q: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for k, c in enumerate(in_cores):
        sizes.update({f"a{k}": c.shape[0], f"n{k}": c.shape[1], f"a{k + 1}": c.shape[2]})
    for j, c in enumerate(out_cores):
        sizes[f"m{j}"] = c.shape[1]
        if j:
            sizes[f"s{j}"] = c.shape[0]
    if out_cores:
        sizes[q] = out_cores[0].shape[0]
        if "a0" not in sizes:
            sizes["a0"] = out_cores[-1].shape[2]
    return sizes


def tr_linear_layout(cores: Sequence[Tensor], in_modes: Sequence[int], out_modes: Sequence[int],
                     masks: MaskArg = None, bias: Tensor | None = None) -> ChainLayout:
    """Tensor-ring Linear (TR-Nets, Wang et al. 2018): input cores into the ring state
    ``(a_0, a_d)``, then the output cores close the ring."""
    d = len(in_modes)
    ms = core_masks(cores, masks)
    ins, outs = list(cores[:d]), list(cores[d:])
    q = f"a{d}"
    sizes = _ring_sizes(ins, outs, q)
    steps = _ring_in_steps(ins, ms[:d], sizes, ["a0", q]) + _ring_out_steps(outs, ms[d:], sizes, q)
    return ChainLayout(math.prod(in_modes), math.prod(out_modes), tuple(steps), _bias(bias), "tr")


def ring_in_layout(cores: Sequence[Tensor], masks: MaskArg = None) -> ChainLayout:
    """The per-pixel input part of the conv chain: ``(P, C) -> (P, a_0 * a_d)``, i.e. the
    ring state ``(r_0, r_d)`` of every pixel (feature-major: ``(B, r_0, r_d, H, W)``)."""
    d = len(cores)
    sizes = _ring_sizes(cores, [], "")
    steps = _ring_in_steps(cores, core_masks(cores, masks), sizes, ["a0", f"a{d}"])
    return ChainLayout(math.prod(c.shape[1] for c in cores), sizes["a0"] * sizes[f"a{d}"],
                       tuple(steps), None, "ring_in")


def ring_out_layout(cores: Sequence[Tensor], masks: MaskArg = None, bias: Tensor | None = None
                    ) -> ChainLayout:
    """The per-pixel output part of the conv chain: state ``(r_0, r_c)`` -> ``(P, M)``."""
    sizes = _ring_sizes([], cores, "c")
    sizes["a0"] = cores[-1].shape[2]
    steps = _ring_out_steps(cores, core_masks(cores, masks), sizes, "c")
    return ChainLayout(sizes["a0"] * sizes["c"], math.prod(c.shape[1] for c in cores), tuple(steps),
                       _bias(bias), "ring_out")
