"""The contraction steps of tensorized layers, as plain functions on tensors.

Each step contracts one small core into a running state with a reshape, a permute and a
matrix product, so a layer's forward never forms its dense weight (Novikov et al. 2015,
TT layers; Wang et al. 2018, TR-Nets). These are the reference ("torch chain") path; the
compiled kernels reproduce them, and export traces them into ordinary ONNX ops.

Conventions: a core is ``(r_in, dim..., r_out)``; flattened feature indices are row-major
over their modes (``i = i1 * n2 * ... + i2 * ... + id``), matching ``Tensor.reshape``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def tt_matrix_forward(x: Tensor, cores: list[Tensor], in_modes: list[int],
                      mid: Callable[[Tensor], Tensor] | None = None, mid_after: int = 0) -> Tensor:
    """``x @ W.T`` for a TT-matrix ``W`` with cores ``(r_{k-1}, n_k, m_k, r_k)``.

    The state after step ``k`` is ``(B, n_{k+1}..n_d, m_1..m_k, r_k)``: each step moves one
    input mode out and one output mode in. ``mid`` (the nonlinear chain) is applied to the
    rank channels of the state after core ``mid_after``.
    """
    b = x.shape[0]
    t = x.reshape(b, in_modes[0], -1, 1)
    for k, core in enumerate(cores):
        r0, n, m, r1 = core.shape
        rest = t.shape[2]
        t = t.permute(0, 2, 1, 3).reshape(b * rest, n * r0)
        t = t @ core.permute(1, 0, 2, 3).reshape(n * r0, m * r1)
        if mid is not None and k == mid_after and k + 1 < len(cores):
            t = mid(t.reshape(-1, r1)).reshape(b * rest, m * r1)
        if k + 1 < len(cores):
            t = t.reshape(b, in_modes[k + 1], -1, r1)
    return t.reshape(b, -1)


def ring_input(x: Tensor, cores: list[Tensor], in_modes: list[int]) -> Tensor:
    """Contract ``x`` (B, N) with input cores ``(r_{k-1}, n_k, r_k)`` into the ring state
    ``(B, r_0, r_d)`` (``r_0 = 1`` for an open tensor-train chain)."""
    b = x.shape[0]
    first = cores[0]
    r0, n1, r1 = first.shape
    t = x.reshape(b, n1, -1).transpose(1, 2).reshape(-1, n1)
    t = t @ first.permute(1, 0, 2).reshape(n1, r0 * r1)  # (B * rest, r0 * r1)
    rest = x.shape[1] // n1
    for k in range(1, len(cores)):
        core = cores[k]
        rp, n, rn = core.shape
        rest //= n
        t = t.reshape(b, n, rest, r0, rp).permute(0, 2, 3, 1, 4).reshape(-1, n * rp)
        t = t @ core.permute(1, 0, 2).reshape(n * rp, rn)
    return t.reshape(b, r0, -1)


def ring_output(state: Tensor, cores: list[Tensor]) -> Tensor:
    """Contract the ring state ``(B, r_0, r)`` with output cores ``(r_{j-1}, m_j, r_j)``;
    the last core's ``r_j = r_0`` closes the ring (a trace). Returns ``(B, M)``."""
    b, r0, rp = state.shape
    t = state.reshape(b, r0, 1, rp)
    for j, core in enumerate(cores):
        rp, m, rn = core.shape
        p = t.shape[2]
        if j + 1 < len(cores):
            t = (t.reshape(-1, rp) @ core.reshape(rp, m * rn)).reshape(b, r0, p * m, rn)
        else:
            t = t.permute(0, 2, 1, 3).reshape(b * p, r0 * rp)
            t = t @ core.permute(2, 0, 1).reshape(r0 * rp, m)
    return t.reshape(b, -1)


def ring_conv(state: Tensor, kernel: Tensor, r0: int, kernel_size: tuple[int, int], stride: tuple[int, int],
              padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """The k×k step in rank space: ``state`` is ``(B, r0 * r_d, H, W)``, ``kernel`` is
    ``(r_d, kh*kw, r_{d+1})``; the ring index r0 rides along as extra batch (no reshape for
    an open TT chain, ``r0 = 1``). Returns ``(B, r0 * r_{d+1}, H', W')``."""
    b, _, h, w = state.shape
    rd, _, rn = kernel.shape
    weight = kernel.permute(2, 0, 1).reshape(rn, rd, *kernel_size)
    if r0 == 1:
        return torch.nn.functional.conv2d(state, weight, None, stride, padding, dilation)
    out = torch.nn.functional.conv2d(state.reshape(b * r0, rd, h, w), weight, None, stride, padding, dilation)
    return out.reshape(b, r0 * rn, out.shape[-2], out.shape[-1])


def tt_matrix_support(masks: list[Tensor]) -> tuple[list[Tensor], Tensor, Tensor]:
    """Where a pruned TT-matrix can be nonzero: per core the kept ``(rank in, input mode,
    output mode, rank out)`` indices, and the flat input and output features that any kept
    path reaches.

    ``masks`` are the cores' boolean masks ``(r_{k-1}, n_k, m_k, r_k)``. An input index
    ``i_k`` (output index ``j_k``, rank index) whose slice of core ``k`` is all pruned adds
    only exact zeros to every entry of ``W``, and a rank index kept on one side of its bond
    but pruned on the other carries only zeros; dropping them (repeated until nothing
    changes) leaves the same ``W`` restricted to the kept rows and columns. Returns
    ``(index, in_features, out_features)``: ``index[k]`` a tuple of four broadcastable index
    tensors that select core ``k``'s kept block (``core[index[k]]``), ``in_features`` /
    ``out_features`` the flat feature indices (row-major over the modes, sorted) of the
    block's columns / rows, so that ``tt_matrix_dense([c[i] for c, i in zip(cores, index)])``
    equals ``W[out_features][:, in_features]``. Empty index tensors when the whole ``W`` is
    pruned away."""
    alive = [m.to(torch.bool) for m in masks]
    while True:  # a dropped rank index can empty a mode slice, and the other way round
        bonds = [alive[0].flatten(1).any(1)]
        bonds += [alive[k - 1].flatten(0, 2).any(0) & alive[k].flatten(1).any(1)
                  for k in range(1, len(alive))]
        bonds.append(alive[-1].flatten(0, 2).any(0))
        pruned = [a & bonds[k][:, None, None, None] & bonds[k + 1] for k, a in enumerate(alive)]
        if all(torch.equal(a, b) for a, b in zip(pruned, alive, strict=True)):
            break
        alive = pruned
    ins = [a.any(3).any(2).any(0).nonzero().flatten() for a in alive]
    outs = [a.any(3).any(1).any(0).nonzero().flatten() for a in alive]
    ranks = [b.nonzero().flatten() for b in bonds]
    index = [(ranks[k][:, None, None, None], ins[k][None, :, None, None], outs[k][None, None, :, None],
              ranks[k + 1][None, None, None, :]) for k in range(len(alive))]

    def flat(kept: list[Tensor], modes: list[int]) -> Tensor:
        out = torch.zeros(1, dtype=torch.long, device=kept[0].device)
        for idx, n in zip(kept, modes, strict=True):
            out = (out[:, None] * n + idx[None, :]).flatten()
        return out

    return index, flat(ins, [m.shape[1] for m in masks]), flat(outs, [m.shape[2] for m in masks])


# ---------------------------------------------------------------------------- dense
def merge_ring(cores: list[Tensor]) -> Tensor:
    """Product of ring/TT cores ``(r_0, d_1, r_1)...`` as ``(r_0, d_1*...*d_L, r_L)``."""
    out = cores[0]
    for core in cores[1:]:
        a, n, c = out.shape
        out = torch.einsum("anc,cme->anme", out, core).reshape(a, n * core.shape[1], core.shape[2])
    return out


def ring_dense(in_cores: list[Tensor], out_cores: list[Tensor],
               kernel: Tensor | None = None) -> Tensor:
    """Dense weight of a ring chain: ``(M, N)``, or ``(M, N, kh*kw)`` with a kernel core."""
    a = merge_ring(in_cores)  # (r0, N, rd)
    if kernel is not None:
        a = torch.einsum("anc,cse->anse", a, kernel)  # (r0, N, S, r)
    bm = merge_ring(out_cores)  # (r, M, r0)
    if kernel is None:
        return torch.einsum("anc,cma->mn", a, bm)
    return torch.einsum("anse,ema->mns", a, bm)


def tt_matrix_dense(cores: list[Tensor]) -> Tensor:
    """Dense ``(M, N)`` weight of a TT-matrix."""
    out = cores[0]  # (1, n1, m1, r1)
    for core in cores[1:]:
        _, n, m, _ = out.shape
        out = torch.einsum("anmc,cpqe->anpmqe", out, core)
        out = out.reshape(out.shape[0], n * core.shape[1], m * core.shape[2], core.shape[3])
    return out[0, :, :, 0].T
