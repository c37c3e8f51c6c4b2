"""Rank paths as units of the fine grain: per-layer path floors and the structured grain.

A tensorized layer's cores ``G_k`` have shape ``(r_{k-1}, ..., r_k)`` (the middle dimensions
are the core's modes). A *rank path* is a sequence of rank indices ``(a_0, ..., a_d)`` with
``a_d = a_0`` (TT ends have rank 1, a ring closes); its *slices* are the fibres
``G_k[a_{k-1}, ..., a_k]``, one per core. The layer's weight is the sum over paths of the
product of their slices, so a path is the layer's natural structured unit: in chains with
separate input and output cores (tensor-ring Linear, the conv chains) each path is one
rank-one term of the channel mixing (:func:`~tedepr_cli.pruning.masking.rank_paths`).

Two uses:

- **Path floor** (``min_paths``): every tensorized layer keeps at least ``k`` rank paths
  (as many as its ranks allow), so the global top-K cannot starve a layer down to one
  path while other layers take the budget. Frankle et al., "Pruning neural networks at
  initialization: why are we missing the mark?", ICLR 2021, found the per-layer kept
  fraction to be most of what pruning-at-initialization methods get right; the floor fixes
  the part of that fraction that decides whether a chain layer can pass anything on.
- **Structured grain** (``grain="path"``): keep or drop whole paths (every entry of their
  slices) rather than single entries, chosen greedily by the criterion's saliency per
  newly kept entry (the mean of the saliencies of the path's not yet kept slices; dense
  layers compete entry by entry on the same scale).

Paths are enumerated by a beam search over the rank indices (exact while a layer has at
most ``PATH_BEAM`` paths, the best ``PATH_BEAM`` by summed slice saliency beyond that).
Scores are cleaned first: NaN and negative saliencies count 0 for path values.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PATH_BEAM = 4096  # candidate paths per layer (exact enumeration up to this many)


def slice_values(scores: list[Tensor]) -> list[Tensor]:
    """Per core, the summed saliency of every slice: ``(r_{k-1}, r_k)`` float64 tensors."""
    out = []
    for s in scores:
        v = torch.nan_to_num(s.detach().to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
        out.append(v.reshape(v.shape[0], -1, v.shape[-1]).sum(dim=1))
    return out


def path_capacity(shapes: list[torch.Size]) -> int:
    """How many rank paths a chain with cores of these shapes holds when nothing is pruned
    (the product of the bond ranks ``r_0 · r_1 ⋯ r_{d-1}``)."""
    return math.prod(int(s[0]) for s in shapes)


def candidate_paths(values: list[Tensor], width: int = PATH_BEAM) -> Tensor:
    """The rank paths of a chain, best first: ``(P, d + 1)`` long tensor of rank indices
    ``a_0 .. a_d`` (``a_d = a_0``), sorted by descending summed slice value (stable: ties go
    by index order). A beam of ``width`` partial paths keeps the enumeration bounded."""
    r0 = values[0].shape[0]
    paths = torch.arange(r0).reshape(-1, 1)
    total = torch.zeros(r0, dtype=torch.float64)
    d = len(values)
    for k, v in enumerate(values):
        prev = paths[:, -1]
        # the last core closes the path back to a_0
        nxt = paths[:, :1] if k == d - 1 else torch.arange(v.shape[1]).repeat(len(paths), 1)
        gain = v[prev.reshape(-1, 1), nxt]  # (S, choices)
        cand = (total.reshape(-1, 1) + gain).reshape(-1)
        ext = torch.cat([paths.repeat_interleave(nxt.shape[1], dim=0), nxt.reshape(-1, 1)], dim=1)
        order = torch.sort(cand, descending=True, stable=True).indices[:width]
        paths, total = ext[order], cand[order]
    return paths


def path_entries(path: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
    """Per core, the flat indices (into the core) of every entry of the path's slice."""
    out = []
    for k, sh in enumerate(shapes):
        a, b = int(path[k]), int(path[k + 1])
        mid = math.prod(sh[1:-1])
        idx = torch.arange(mid) * sh[-1] + b + a * mid * sh[-1]
        out.append(idx)
    return out


def best_paths(scores: list[Tensor], k: int) -> list[list[int]]:
    """Flat indices (one per core: the best entry of each slice) of the ``k`` best distinct
    rank paths (summed slice saliency), for the path floor. Fewer if the chain holds fewer."""
    shapes = [s.shape for s in scores]
    paths = candidate_paths(slice_values(scores), max(k, 1))[:k]
    out = []
    for p in paths:
        chosen = []
        for s, idx in zip(scores, path_entries(p, shapes), strict=True):
            fibre = torch.nan_to_num(s.detach().to(torch.float64).reshape(-1)[idx], nan=-math.inf)
            chosen.append(int(idx[int(torch.argmax(fibre))]))
        out.append(chosen)
    return out


class _Chain:
    """One tensorized layer during the structured selection: candidate paths and kept slices."""

    def __init__(self, scores: list[Tensor], offsets: list[int]):
        self.shapes = [s.shape for s in scores]
        self.offsets = offsets
        self.values = slice_values(scores)
        self.sizes = [math.prod(sh[1:-1]) for sh in self.shapes]
        self.paths = candidate_paths(self.values)
        self.kept = [torch.zeros(v.shape, dtype=torch.bool) for v in self.values]
        self.taken = torch.zeros(len(self.paths), dtype=torch.bool)

    def marginal(self) -> tuple[Tensor, Tensor]:
        """(value, cost) of adding each candidate path: its slices not yet kept."""
        val = torch.zeros(len(self.paths), dtype=torch.float64)
        cost = torch.zeros(len(self.paths), dtype=torch.long)
        for k, (v, kept, n) in enumerate(zip(self.values, self.kept, self.sizes, strict=True)):
            a, b = self.paths[:, k], self.paths[:, k + 1]
            new = ~kept[a, b]
            val += torch.where(new, v[a, b], 0.0)
            cost += new.long() * n
        return val, cost

    def best(self, room: int | None) -> tuple[float, int, int]:
        """(saliency per new entry, cost, index) of the best path to add next (cost <= room if
        given); ratio -1 when none is left."""
        val, cost = self.marginal()
        ok = ~self.taken & (cost > 0)
        if room is not None:
            ok &= cost <= room
        if not bool(ok.any()):
            return -1.0, 0, -1
        ratio = torch.where(ok, val / cost.clamp_min(1).to(torch.float64), -1.0)
        i = int(torch.argmax(ratio))  # first maximum: ties go by candidate order
        return float(ratio[i]), int(cost[i]), i

    def take(self, i: int, keep: Tensor) -> None:
        self.taken[i] = True
        p = self.paths[i]
        for k, (idx, off) in enumerate(zip(path_entries(p, self.shapes), self.offsets, strict=True)):
            self.kept[k][int(p[k]), int(p[k + 1])] = True
            keep[off + idx] = True
        # paths whose slices are now all kept are kept too
        _, cost = self.marginal()
        self.taken |= cost == 0


def path_pool(flat: Tensor, chains: list[list[tuple[int, torch.Size]]], dense: list[tuple[int, int]],
              target: int, seeds_per_chain: int, exact_room: bool) -> Tensor:
    """The structured grain's selection over one flat score vector (``flat``, float64, NaN
    already -inf): a boolean keep vector made of whole rank paths of every chain (``chains``:
    per layer, ``(offset, core shape)`` per core) plus single entries of dense tensors
    (``dense``: ``(offset, size)``).

    Every chain first gets its ``seeds_per_chain`` best paths (>= 1: the collapse guard) and
    every dense tensor its best entry; then paths and entries are added greedily by saliency
    per newly kept entry until ``target`` entries are kept. With ``exact_room`` nothing may
    take the count beyond ``target`` (whole paths that do not fit are skipped); otherwise the
    last path may overshoot (the caller then prunes entries within the pool).
    """
    keep = torch.zeros(len(flat), dtype=torch.bool)
    scores = flat.clamp_min(0).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    cs = [_Chain([flat[o:o + math.prod(sh)].reshape(sh) for o, sh in ch], [o for o, _ in ch])
          for ch in chains]
    dense_idx = (torch.cat([torch.arange(o, o + n) for o, n in dense]) if dense
                 else torch.zeros(0, dtype=torch.long))
    for o, n in dense:  # the collapse guard: one weight per dense tensor
        keep[o + int(torch.sort(scores[o:o + n], descending=True, stable=True).indices[0])] = True
    for c in cs:
        for _ in range(max(1, seeds_per_chain)):
            _, _, i = c.best(None)
            if i < 0:
                break
            c.take(i, keep)
    order = dense_idx[torch.sort(scores[dense_idx], descending=True, stable=True).indices]
    pos = 0
    while True:
        n = int(keep.sum())
        if n >= target:
            break
        room = target - n if exact_room else None
        while pos < len(order) and keep[order[pos]]:
            pos += 1
        bests = [c.best(room) for c in cs]
        j = max(range(len(cs)), key=lambda i: bests[i][0]) if cs else -1
        path_ratio = bests[j][0] if j >= 0 else -1.0
        if pos < len(order) and float(scores[order[pos]]) >= path_ratio:
            # every dense entry that beats the best path, up to the target
            stop = pos
            while stop < len(order) and stop - pos < target - n and float(scores[order[stop]]) >= path_ratio:
                stop += 1
            block = order[pos:stop]
            keep[block[~keep[block]]] = True
            pos = stop
            continue
        if j < 0 or path_ratio < 0:
            break  # nothing left that fits
        cs[j].take(bests[j][2], keep)
    return keep
