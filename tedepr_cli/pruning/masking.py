"""Scores -> masks: global (or per-layer) top-K with collapse guards, and mask mechanics.

The budget ``K = round((1 - sparsity) * D)`` where ``D`` is the dense original's prunable
weight count (DESIGN §2.2). Before the global top-K, the guard reserves for every prunable
tensor its best ``ceil(min_density * numel)`` entries, for every dense layer at least one
weight, and for every tensorized layer the entries of its best-scoring path through the
cores (greedy over rank indices, one entry per core), so no layer can end with its chain
cut. Selection uses a stable descending sort, so ties
resolve by position and the same scores always give the same mask.

Two options work on rank paths (:mod:`tedepr_cli.pruning.paths`): the path floor
(``min_paths``) reserves every tensorized layer's best paths before the top-K, and the
structured grain (``grain="path"``) selects whole paths instead of single entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

import torch
from torch import Tensor

from ..errors import BadInput, CollapseError, opt
from ..logs import log
from .paths import best_paths, path_pool
from .targets import Group


@dataclass
class Budget:
    kept: int  # entries to keep in total
    dense_count: int  # D, the dense original's prunable weights


def budget(sparsity: float, dense_count: int) -> int:
    """``K = round((1 - sparsity) · D)``, computed in decimal from the sparsity as written
    (so 0.999 means exactly 0.999) and rounding halves up: no binary-float surprises."""
    keep = (Decimal(1) - Decimal(repr(float(sparsity)))) * dense_count
    return int(keep.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _clean(s: Tensor) -> Tensor:
    s = s.detach().to(torch.float64).reshape(-1)
    return torch.nan_to_num(s, nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def _best_path(scores: list[Tensor]) -> list[int]:
    """Flat indices (one per core) of a greedy high-score path through cores shaped
    ``(r_in, ..., r_out)`` whose rank indices chain up and close the ring."""
    chosen: list[int] = []
    first = scores[0].reshape(scores[0].shape[0], -1, scores[0].shape[-1])
    flat = int(torch.argmax(_clean(first)))
    a0, _, a = _unravel(flat, first.shape)
    chosen.append(flat)
    for k in range(1, len(scores)):
        core = scores[k].reshape(scores[k].shape[0], -1, scores[k].shape[-1])
        sub = _clean(core[a]).reshape(core.shape[1], core.shape[2])  # (mid, r_out)
        if k == len(scores) - 1:
            mid = int(torch.argmax(sub[:, a0]))
            nxt = a0
        else:
            idx = int(torch.argmax(sub))
            mid, nxt = divmod(idx, core.shape[2])
        chosen.append((a * core.shape[1] + mid) * core.shape[2] + nxt)
        a = nxt
    return chosen


def _unravel(flat: int, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    a, rest = divmod(flat, shape[1] * shape[2])
    m, b = divmod(rest, shape[2])
    return a, m, b


def compared_scores(scores: dict[str, Tensor], groups: list[Group], scope: str) -> dict[str, Tensor]:
    """The scores as the selection compares them: raw for ``global`` and ``layer`` (a layer
    compares only its own), each layer's relative to its own mean for ``normalized``."""
    if scope != "normalized":
        return scores
    # every layer's scores relative to its own mean: layers compete on *relative*
    # importance, so a layer whose entries have small raw scores (many rank paths
    # share each entry, e.g. tensor-ring cores) is not starved by a dense one
    scores = dict(scores)
    for g in groups:
        m = torch.cat([_clean(scores[n]).clamp_min(0) for n in g.params]).mean()
        for n in g.params:
            scores[n] = _clean(scores[n]).reshape(scores[n].shape) / (float(m) if float(m) > 0 else 1.0)
    return scores


def select(scores: dict[str, Tensor], groups: list[Group], kept: int, scope: str = "global",
           min_density: float = 0.0, path_guard: bool = True, connect: bool = True,
           min_paths: int = 0, grain: str = "entry", pool: float = 1.0) -> dict[str, Tensor]:
    """Boolean masks keeping ``kept`` entries (the highest scores, after the guards; with
    ``connect``, only entries on complete paths through each chain's cores).

    ``min_paths``: the path floor, every tensorized layer keeps at least this many rank
    paths (as many as its ranks hold; lowered uniformly, with a warning, when the budget
    cannot hold it). ``grain="path"``: whole rank paths are kept (:func:`paths.path_pool`);
    with ``pool`` 1 the masks are those whole paths (kept <= ``kept``), with ``pool`` > 1
    paths are pooled up to ``pool × kept`` entries and the entry-level selection keeps
    exactly ``kept`` of the pooled entries."""
    if scope == "layer":
        out: dict[str, Tensor] = {}
        for g, k in zip(groups, layer_shares(groups, kept), strict=True):
            out.update(select({n: scores[n] for n in g.params}, [g], k, "global", min_density,
                              path_guard, connect, min_paths, grain, pool))
        return out
    if scope not in ("global", "normalized"):
        raise BadInput(f"scope must be global, normalized or layer, got {scope!r}")
    scores = compared_scores(scores, groups, scope)
    names = [n for g in groups for n in g.params]
    sizes = [scores[n].numel() for n in names]
    total = sum(sizes)
    offsets = dict(zip(names, [sum(sizes[:i]) for i in range(len(sizes))], strict=True))
    flat = torch.cat([_clean(scores[n]) for n in names]) if names else torch.zeros(0, dtype=torch.float64)
    kept = min(kept, total)
    if grain == "path":
        cores = [[(offsets[n], scores[n].shape) for n in g.params] for g in groups if g.kind == "cores"]
        dense = [(offsets[n], scores[n].numel()) for g in groups if g.kind == "dense" for n in g.params]
        # whole paths only: dense tensors' entries compete with the paths for the budget; with
        # a pool, the paths are pooled and dense tensors stay entry-level in the final selection
        whole = path_pool(flat, cores, dense if pool <= 1 else [], math.ceil(pool * kept), max(1, min_paths),
                          exact_room=pool <= 1)
        if pool <= 1:
            if int(whole.sum()) > kept:
                raise CollapseError(f"the budget keeps {kept:,} entries but one whole rank path per "
                                    f"tensorized layer already needs {int(whole.sum()):,}: raise "
                                    f"{opt('path-pool')} (whole paths, then single entries within them) "
                                    "or use a lower sparsity")
            return {n: whole[offsets[n]: offsets[n] + s].reshape(scores[n].shape).clone()
                    for n, s in zip(names, sizes, strict=True)}
        for o, n in dense:
            whole[o:o + n] = True
        flat = torch.where(whole, flat, -math.inf)  # entry-level selection within the kept paths
    elif grain != "entry":
        raise BadInput(f"grain must be entry or path, got {grain!r}")
    views = {n: flat[offsets[n]: offsets[n] + s].reshape(scores[n].shape)
             for n, s in zip(names, sizes, strict=True)}
    keep = torch.zeros(total, dtype=torch.bool)
    # guards: per-tensor floor, and one unbroken path per tensorized layer
    kinds = {n: g.kind for g in groups for n in g.params}
    for n, size in zip(names, sizes, strict=True):
        floor = math.ceil(min_density * size)
        if path_guard and kinds[n] == "dense":
            floor = max(floor, 1)  # a dense layer's "path" is any kept weight
        if floor:
            part = flat[offsets[n]: offsets[n] + size]
            top = torch.sort(part, descending=True, stable=True).indices[:floor]
            keep[offsets[n] + top] = True
    if path_guard:
        for g in groups:
            if g.kind == "cores":
                for n, idx in zip(g.params, _best_path([views[p] for p in g.params]), strict=True):
                    keep[offsets[n] + idx] = True
    reserved = int(keep.sum())
    if reserved > kept:
        raise CollapseError(_guard_message(reserved, kept, min_density, path_guard, kinds))
    if min_paths > 1:
        keep = _path_floor(keep, views, offsets, groups, kept, min_paths)
        reserved = int(keep.sum())
    _take_best(keep, flat, ~keep, kept - reserved)
    if connect:
        shapes = {n: scores[n].shape for n in names}
        chains = [[(offsets[n], sizes[i], shapes[n]) for i, n in enumerate(names) if n in g.params]
                  for g in groups if g.kind == "cores"]
        _connect(keep, flat, chains, kept)
    return {n: keep[offsets[n]: offsets[n] + s].reshape(scores[n].shape).clone()
            for n, s in zip(names, sizes, strict=True)}


def _path_floor(keep: Tensor, views: dict[str, Tensor], offsets: dict[str, int], groups: list[Group],
                kept: int, min_paths: int) -> Tensor:
    """Reserve, on top of ``keep``, the best ``k`` rank paths of every tensorized layer (one entry
    per slice: the fewest entries that make a path survive), for the largest ``k <= min_paths``
    whose reservations fit the budget (a layer holding fewer paths keeps all it holds)."""
    chains = [g for g in groups if g.kind == "cores"]
    best = {g.name: best_paths([views[n] for n in g.params], min_paths) for g in chains}
    for k in range(min_paths, 1, -1):
        trial = keep.clone()
        for g in chains:
            for path in best[g.name][:k]:
                for n, idx in zip(g.params, path, strict=True):
                    trial[offsets[n] + idx] = True
        if int(trial.sum()) <= kept:
            if k < min_paths:
                log.warning(f"the budget of {kept:,} entries holds a floor of {k} rank paths per "
                            f"tensorized layer, not {min_paths}")
            return trial
    log.warning(f"the budget of {kept:,} entries holds no path floor above the collapse guard's one path")
    return keep


def _guard_message(reserved: int, kept: int, min_density: float, path_guard: bool,
                   kinds: dict[str, str]) -> str:
    """Why the budget cannot hold the collapse guard, with the advice that fits."""
    needs = []
    if path_guard:
        if "dense" in kinds.values():
            needs.append("one weight per dense layer")
        if "cores" in kinds.values():
            needs.append("one path through each tensorized layer's cores")
    if min_density > 0:
        needs.append(f"{min_density:g} of every tensor ({opt('min-density')})")
    advice = f"lower {opt('min-density')} or the sparsity" if min_density > 0 else \
        f"use a lower sparsity (one that keeps at least {reserved:,} entries)"
    return (f"the budget keeps {kept:,} entries but the collapse guard alone needs {reserved:,} "
            f"({' and '.join(needs)}), so no path from input to output could survive: {advice}")


def _take_best(keep: Tensor, scores: Tensor, allowed: Tensor, n: int) -> None:
    """Keep the ``n`` best-scored entries among ``allowed`` (stable: ties go by position;
    entries scored -inf/NaN still count, last)."""
    idx = torch.nonzero(allowed).reshape(-1)
    order = torch.sort(scores[idx], descending=True, stable=True).indices[:max(n, 0)]
    keep[idx[order]] = True


def path_connectable(masks: list[Tensor]) -> list[Tensor]:
    """For every core of a chain, the ``(r_in, r_out)`` pairs through which an entry would
    lie on a complete path (ring closed) given the *other* cores' kept entries."""
    rel = [m.reshape(m.shape[0], -1, m.shape[-1]).any(dim=1).to(torch.float64) for m in masks]
    r0 = masks[0].shape[0]
    fwd = [torch.eye(r0, dtype=torch.float64)]  # (start a0, index entering core k)
    for r in rel[:-1]:
        fwd.append(((fwd[-1] @ r) > 0).to(torch.float64))
    bwd = [torch.eye(r0, dtype=torch.float64)]  # (index leaving core k, start a0)
    for r in reversed(rel[1:]):
        bwd.insert(0, ((r @ bwd[0]) > 0).to(torch.float64))
    return [(f.T @ b.T) > 0 for f, b in zip(fwd, bwd, strict=True)]


def _connect(keep: Tensor, flat: Tensor, chains: list[list[tuple[int, int, torch.Size]]], kept: int) -> None:
    """Spend the budget only on entries that lie on complete paths (effective sparsity,
    Vysogorets & Kempe 2023): drop kept core entries no path uses, then refill with the
    best-scored entries that would connect, in rounds so new paths open new candidates."""

    def conn_mask() -> Tensor:
        ok = torch.ones_like(keep)
        for chain in chains:
            masks = [keep[o:o + n].reshape(sh) for o, n, sh in chain]
            for (o, n, sh), c in zip(chain, path_connectable(masks), strict=True):
                view = c.reshape(sh[0], *([1] * (len(sh) - 2)), sh[-1]).expand(sh)
                ok[o:o + n] = view.reshape(-1)
        return ok

    if not chains:
        return
    for _ in range(64):
        ok = conn_mask()
        dead = keep & ~ok
        if dead.any():
            keep[dead] = False
            continue
        need = kept - int(keep.sum())
        if need <= 0:
            return
        avail = int((~keep & ok).sum())
        if avail == 0:
            break
        take = max(1, min(need, avail, math.ceil(need / 4)))  # rounds: new paths, new candidates
        _take_best(keep, flat, ~keep & ok, take)
    need = kept - int(keep.sum())
    if need > 0:  # no entry can join a path any more: keep the exact budget, by score
        _take_best(keep, flat, ~keep, need)


def layer_shares(groups: list[Group], kept: int) -> list[int]:
    """``scope="layer"``: each group's share of the ``kept`` budget, in proportion to the
    dense weights it stands for (so every layer keeps the same fraction of its dense
    layer; a share larger than what the group stores leaves it whole)."""
    return _apportion([g.dense_count for g in groups], kept, sum(g.dense_count for g in groups))


def _apportion(weights: list[int], total: int, denom: int) -> list[int]:
    """Integer shares of ``total`` proportional to ``weights`` (largest remainders)."""
    raw = [total * w / denom for w in weights]
    base = [int(math.floor(x)) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: -(raw[i] - base[i]))[: total - sum(base)]:
        base[i] += 1
    return base


def connected(masks: list[Tensor], kind: str) -> bool:
    """Does any path survive? Dense: any kept weight. Cores: the boolean product of the
    rank-transfer matrices ``R_k[a, b] = any(mask_k[a, ..., b])`` has a non-zero trace."""
    if kind == "dense":
        return bool(masks[0].any())
    prod = None
    for m in masks:
        r = m.reshape(m.shape[0], -1, m.shape[-1]).any(dim=1).to(torch.float64)
        prod = r if prod is None else ((prod @ r) > 0).to(torch.float64)
    return bool(torch.diagonal(prod).any())


def rank_paths(masks: list[Tensor]) -> float:
    """How many chains of rank indices survive through the kept entries (the trace of the
    product of 0/1 rank-transfer matrices). With separate input and output cores (TR
    Linear, the conv chain) every surviving path adds a rank-one term to the layer's
    channel mixing, so this bounds the effective weight's rank."""
    prod = None
    for m in masks:
        r = m.reshape(m.shape[0], -1, m.shape[-1]).any(dim=1).to(torch.float64)
        prod = r if prod is None else prod @ r
    return float(torch.diagonal(prod).sum())


def check_collapse(groups: list[Group], masks: dict[str, Tensor]) -> None:
    """Raise :class:`CollapseError` naming the first layer whose paths are all cut."""
    for g in groups:
        if not connected([masks[n] for n in g.params], g.kind):
            what = "all its weights are pruned" if g.kind == "dense" else \
                "its cores no longer connect input to output"
            raise CollapseError(f"layer {g.name} would collapse: {what}. Lower the sparsity, "
                                f"raise {opt('min-density')}, or keep the path guard on")
