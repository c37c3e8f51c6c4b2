"""The fine-grain stage: pruning at initialization (``tedepr prune``).

A decomposed artifact has its core entries pruned; a dense checkpoint is first decomposed
with default settings (the one-shot TEDEPR path) unless ``decompose=False`` (the dense
pruning-at-initialization baseline). Masks are kept in the artifact and the pruned
entries are exact zeros in the stored weights.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..artifact import Artifact
from ..decompose import DecomposeOptions, decompose
from ..errors import BadInput, UsageError, opt
from ..logs import log
from ..masks import attach_masks, get_masks
from ..surgery import eval_mode, feed, token_ids
from ..tensorized.embedding import TTEmbedding
from ..tensorized.train_path import lighter, train_paths
from ..tensorized.tt import TTLinear
from .criteria import CRITERIA, CriterionOptions, ScoreContext, differentiable_attention
from .masking import budget, check_collapse, compared_scores, connected, layer_shares, rank_paths, select
from .reachability import (
    Reachability,
    check_reachability,
    reachability,
    reconnect_within_budget,
    repair_paths,
)
from .targets import kept_counts, prunable_groups

DEFAULT_CRITERION = "tedepr"
SCOPES = ("global", "normalized", "layer")
SCORE_MODES = ("eval", "train")
GRAINS = ("entry", "path")
ALLOCATIONS = ("uniform", "criterion")
# rank allocation "criterion": the probe decomposition's cores hold about this x coarse_ratio x the budget
ALLOCATION_PROBE = 4.0
DATA_FREE_FALLBACK = "synflow"


@dataclass
class PruneOptions:
    sparsity: float
    criterion: str | None = None  # None: the default (tedepr, or synflow without data)
    scope: str = "global"
    min_density: float = 0.0
    path_guard: bool = True
    connectivity: bool = True
    batch_size: int = 128
    seed: int = 0
    decompose: bool = True
    coarse_ratio: float = 4.0  # one-shot path, rank "auto": cores hold about this x the budget
    score_mode: str = "eval"  # normalization layers while scoring: eval (running stats) or train (batch)
    repair_paths: bool = False  # a cut network: add the cheapest entries that reconnect it (else refuse)
    # some outputs cut off the input (constant logits): swap in the entries that reconnect them
    # for as many of the lowest-scored kept ones (the kept count stays the budget)
    reconnect: bool = True
    min_paths: int = 0  # path floor: every tensorized layer keeps >= this many rank paths (0/1: off)
    grain: str = "entry"  # entry: single core entries; path: whole rank paths (paths.py)
    path_pool: float = 1.0  # grain path: pool whole paths up to this x the budget, then single entries
    # one-shot path, rank auto: one uniform rank, or per-layer ranks sized to what the criterion keeps
    rank_allocation: str = "uniform"
    criterion_options: CriterionOptions = field(default_factory=CriterionOptions)

    def validate(self) -> None:
        if not (0.0 < self.sparsity < 1.0):
            raise UsageError(f"{opt('sparsity')} must be in (0, 1), got {self.sparsity}")
        if self.scope not in SCOPES:
            raise UsageError(f"{opt('scope')} must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if not (0.0 <= self.min_density < 1.0):
            raise UsageError(f"{opt('min-density')} must be in [0, 1), got {self.min_density}")
        if self.batch_size <= 0:
            raise UsageError(f"{opt('batch-size')} must be positive")
        if not self.coarse_ratio >= 1:
            raise UsageError(f"{opt('coarse-ratio')} must be >= 1, got {self.coarse_ratio}")
        o = self.criterion_options
        for name, ok, rule in (("steps", o.steps >= 0, ">= 0"), ("rounds", o.rounds >= 1, ">= 1"),
                               ("iterations", o.iterations >= 1, ">= 1"), ("inner-lr", o.inner_lr > 0, "> 0"),
                               ("micro-batch", o.micro_batch >= 1, ">= 1")):
            if not ok:
                raise UsageError(f"{opt(name)} must be {rule}, got {getattr(o, name.replace('-', '_')):g}")
        if self.min_paths < 0:
            raise UsageError(f"{opt('min-paths')} must be >= 0, got {self.min_paths}")
        if self.grain not in GRAINS:
            raise UsageError(f"{opt('grain')} must be one of {', '.join(GRAINS)}, got {self.grain!r}")
        if not self.path_pool >= 1:
            raise UsageError(f"{opt('path-pool')} must be >= 1, got {self.path_pool}")
        if self.grain == "path" and self.path_pool <= 1 and self.min_density > 0:
            raise UsageError(f"{opt('min-density')} is a floor of single entries: with {opt('grain')} "
                             f"path it needs {opt('path-pool')} > 1 (entries chosen within the paths)")
        if self.rank_allocation not in ALLOCATIONS:
            raise UsageError(f"{opt('rank-allocation')} must be one of {', '.join(ALLOCATIONS)}, got "
                             f"{self.rank_allocation!r}")
        if self.score_mode not in SCORE_MODES:
            raise UsageError(f"{opt('score-mode')} must be one of {', '.join(SCORE_MODES)}, got "
                             f"{self.score_mode!r}")
        if self.criterion is not None and self.criterion not in CRITERIA:
            raise UsageError(f"unknown criterion {self.criterion!r}; choose one of: "
                             f"{', '.join(CRITERIA.names())}")


@contextmanager
def _score_mode(model: torch.nn.Module, mode: str) -> Iterator[None]:
    """Score with normalization layers in ``mode``; buffers (running stats) and every module's
    train/eval flag are restored afterwards.

    In eval mode an untrained BatchNorm is the identity, so a deep random network's activations
    grow layer by layer; in train mode each layer normalizes with batch statistics, as in the
    first training steps the criteria try to foresee.
    """
    saved = {n: b.clone() for n, b in model.named_buffers()}
    # dropout stays off either way: scores must not depend on dropout draws
    try:
        with eval_mode(model, batch_stats=mode == "train"):
            yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in saved:
                    b.copy_(saved[n])


def _batches(data: Path, art: Artifact, n: int, size: int, gen: torch.Generator
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` seeded random batches from the train split (any ``--data`` layout), presented
    as the model needs (:mod:`tedepr_cli.model_data`: the recorded preprocessing)."""
    from ..model_data import split_for

    train = split_for(art, data, "train")
    out = []
    for _ in range(n):
        idx = torch.randperm(len(train), generator=gen)[: min(size, len(train))].numpy()
        out.append(train.batch(idx))
    return out


OPTION_USERS = {"steps": ("tedepr",), "inner_lr": ("tedepr",), "rounds": ("synflow",),
                "iterations": ("force",), "temperature": ("grasp",)}  # criterion option -> who reads it


def unused_options(criterion: str, options: CriterionOptions, scores_with_data: bool) -> list[str]:
    """The criterion options set away from their defaults that the run will not read: one
    only some criteria read (:data:`OPTION_USERS`) when ``criterion`` is not one of them, and
    ``micro_batch`` when nothing is differentiated on data (``scores_with_data`` false)."""
    default, out = CriterionOptions(), []
    for name, users in OPTION_USERS.items():
        if getattr(options, name) != getattr(default, name) and criterion not in users:
            out.append(f"{opt(name.replace('_', '-'))} is read only by the {' and '.join(users)} criterion, "
                       f"not {criterion!r}")
    if options.micro_batch != default.micro_batch and not scores_with_data:
        reads = "has no data here" if CRITERIA.get(criterion).needs_data else "does not read data"
        out.append(f"{opt('micro-batch')} applies only where a data-driven criterion scores with "
                   f"{opt('data')}; {criterion!r} {reads}")
    return out


def resolve_criterion(requested: str | None, has_data: bool) -> tuple[str, str | None]:
    """(criterion to use, fallback note). The default falls back to a data-free criterion
    without data; an explicitly requested data-driven criterion needs data."""
    name = requested or DEFAULT_CRITERION
    crit = CRITERIA.get(name)
    if crit.needs_data and not has_data:
        if requested is not None:
            free = ", ".join(n for n in CRITERIA if not CRITERIA.get(n).needs_data)
            raise UsageError(f"criterion {name!r} scores with data: pass {opt('data')}, or choose a "
                             f"data-free criterion ({free})")
        return DATA_FREE_FALLBACK, (f"no {opt('data')} given: the default criterion {DEFAULT_CRITERION!r} "
                                    "needs "
                                    f"data, so the data-free {DATA_FREE_FALLBACK!r} was used")
    return name, None


def auto_rank(model: torch.nn.Module, input_shape: tuple[int, ...], dopts: DecomposeOptions,
              opts: PruneOptions, max_rank: int = 64) -> int:
    """The coarse/fine balance of the one-shot path: the largest uniform rank whose
    decomposed model has at most ``coarse_ratio`` x the budget's prunable entries, so the
    coarse grain does most of the compression and the fine grain prunes the last factor
    (rank 1 if even that is too large). A fixed rank often leaves the fine grain to cut
    so deep that chains lose their rank paths (see docs/pai_results.md)."""
    from ..tensorized.plan import plan_model
    from .targets import dense_prunable_count

    dense = dense_prunable_count(model)
    limit = opts.coarse_ratio * budget(opts.sparsity, dense)

    def entries(r: int) -> int:
        plans = plan_model(model, input_shape, replace(dopts, rank=r))
        return dense - sum(p.dense_params - p.params for p in plans if p.spec is not None)

    lo, hi, best = 1, max_rank, 1
    while lo <= hi:
        mid = (lo + hi) // 2
        try:
            fits = entries(mid) <= limit
        except BadInput:  # e.g. above a fixed --modes' full rank
            fits = False
        if fits:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def allocated_ranks(art: Artifact, dopts: DecomposeOptions, opts: PruneOptions, data: Path | None,
                    max_rank: int = 64, probe: float = ALLOCATION_PROBE
                    ) -> tuple[dict[str, int], dict[str, int]]:
    """Per-layer ranks chosen by the criterion (``rank_allocation="criterion"``, issue 19): the
    dense ``art`` is decomposed at the uniform auto rank of a coarse ratio ``probe`` (default
    ``ALLOCATION_PROBE``) times larger and pruned to the same budget with the same criterion,
    scope and seed (the probe); each tensorized layer then gets the largest rank whose cores
    hold at most ``opts.coarse_ratio`` x the entries the criterion kept in it there (at least
    rank 1).

    The per-layer density is most of what pruning-at-initialization methods get right
    (Frankle et al., "Pruning neural networks at initialization: why are we missing the
    mark?", ICLR 2021); one uniform rank gives every layer the same coarse capacity, while
    the criterion wants, e.g., many rank paths in a conv chain (each path one rank-one term of
    its channel mixing) and few, dense cores in a TT-matrix Linear. Returns
    ``({layer: rank}, {layer: entries kept in the probe})``. Raises what :func:`prune` raises
    on the probe (:class:`~tedepr_cli.errors.CollapseError` when even it collapses)."""
    from ..tensorized.plan import plan_model

    probe_opts = replace(opts, coarse_ratio=opts.coarse_ratio * probe, rank_allocation="uniform")
    _, rep = prune(art, probe_opts, data, replace(dopts, rank=None))
    first = plan_model(art.model, art.input_shape, replace(dopts, rank=1))
    held = {p.name: p.params for p in first if p.spec}  # entries at the rank given so far
    layers = list(held)
    kept = {name: sum(r["kept"] for r in rep["layers"] if r["kind"] == "cores"
                      and (r["name"] == name or r["name"].startswith(name + "."))) for name in layers}
    ranks = dict.fromkeys(layers, 1)
    growing = set(layers)  # layers whose next rank may still fit
    for r in range(2, max_rank + 1):
        try:
            plans = {p.name: p for p in plan_model(art.model, art.input_shape, replace(dopts, rank=r))}
        except BadInput:  # e.g. above a fixed --modes' full rank
            break
        for name in sorted(growing):
            p = plans.get(name)
            # over its allocation, or at its full rank (a higher rank adds no entries)
            if p is None or p.spec is None or p.params > opts.coarse_ratio * kept[name] \
                    or p.params <= held[name]:
                growing.discard(name)
            else:
                ranks[name], held[name] = r, p.params
        if not growing:
            break
    return ranks, kept


def _under(given: dict[str, int], chosen: dict[str, int]) -> dict[str, int]:
    """Rank overrides: the caller's ``given`` patterns first (the planner takes the first
    pattern that matches a layer), then the ``chosen`` per-layer ranks of layers none of them
    matches."""
    import fnmatch

    return {**given, **{n: r for n, r in chosen.items()
                        if n not in given and not any(fnmatch.fnmatchcase(n, p) for p in given)}}


def paths_are_rank_one(spec_or_layer: dict[str, Any] | torch.nn.Module) -> bool:
    """Whether each rank path of this chain is one rank-one term of the layer's channel mixing
    (separate input and output cores: tensor-ring Linear, the conv chains), so that a layer
    left with one or two paths passes (almost) nothing on. A TT-matrix Linear's (or
    TT-embedding's) path is a Kronecker product of its cores' slices, of high rank by itself."""
    if isinstance(spec_or_layer, torch.nn.Module):
        return not isinstance(spec_or_layer, TTLinear | TTEmbedding)
    return not (spec_or_layer["type"] in ("linear", "embedding") and spec_or_layer["format"] == "tt")


def path_ranks(model: torch.nn.Module, input_shape: tuple[int, ...], dopts: DecomposeOptions,
               min_paths: int, max_rank: int = 64) -> dict[str, int]:
    """Per-layer ranks for the path floor on the one-shot path: every layer whose paths are
    rank-one terms (:func:`paths_are_rank_one`) and whose planned ranks hold fewer than
    ``min_paths`` rank paths (the product of its bond ranks) gets the smallest rank that holds
    them (``{layer name: rank}``; layers already holding them are left out). A uniform auto rank
    of 1 leaves a conv chain one path: a rank-one channel mixing whatever the fine grain keeps."""
    from ..tensorized.plan import plan_model, sub_specs

    def short(plans) -> dict[str, bool]:
        return {p.name: any(paths_are_rank_one(s) and math.prod(s["ranks"][:-1]) < min_paths
                            for s in sub_specs(p.spec)) for p in plans if p.spec is not None}

    out: dict[str, int] = {}
    base = dopts.rank or 1
    for name in [n for n, bad in short(plan_model(model, input_shape, dopts)).items() if bad]:
        for r in range(base + 1, max_rank + 1):
            trial = replace(dopts, rank_overrides={**dopts.rank_overrides, name: r})
            try:
                still = short(plan_model(model, input_shape, trial)).get(name, False)
            except BadInput:  # above the layer's full rank
                break
            if not still:
                out[name] = r
                break
    return out


def prune(art: Artifact, opts: PruneOptions, data: Path | None = None,
          decompose_opts: DecomposeOptions | None = None) -> tuple[Artifact, dict[str, Any]]:
    """The ``tedepr prune`` stage: a new artifact whose least useful prunable entries are
    masked (the masks ride on its model, :mod:`tedepr_cli.masks`). A dense model is first
    decomposed (the one-shot path) unless ``opts.decompose`` is false; scoring batches come
    from ``data`` (any ``--data`` layout, with the artifact's recorded preprocessing).

    Raises :class:`~tedepr_cli.errors.CollapseError` when a layer, or the whole network
    (:func:`~tedepr_cli.pruning.reachability.check_reachability`: no input unit reaches any
    output), would collapse; with ``opts.repair_paths`` the cheapest reconnecting entries are
    added beyond the budget instead (``report["repair"]``). Where only some outputs are cut
    off the input, ``opts.reconnect`` (the default) swaps the entries that reconnect them
    for as many of the lowest-scored kept ones, so the kept count stays the budget
    (:func:`~tedepr_cli.pruning.reachability.reconnect_within_budget`)."""
    opts.validate()
    if art.masks:
        raise BadInput(f"{art.source or 'the model'} is already pruned; prune the unpruned artifact")
    criterion, fallback = resolve_criterion(opts.criterion, data is not None)
    scores_with_data = data is not None and CRITERIA.get(criterion).needs_data
    why_not = (f" (without {opt('data')} the default {DEFAULT_CRITERION!r} falls back to it)"
               if fallback else "")
    for why in unused_options(criterion, opts.criterion_options, scores_with_data):
        log.warning(f"{why}{why_not}, so it is ignored")
    batches = None
    if scores_with_data:  # read (and refused, if bad) before the decomposition's minutes
        copts = opts.criterion_options
        n_batches = {"tedepr": copts.steps + 1, "force": copts.iterations}.get(criterion, 1)
        gen = torch.Generator().manual_seed(opts.seed)
        batches = _batches(data, art, n_batches, opts.batch_size, gen)
    rank_note = None
    one_shot = not art.meta.get("tensorization") and opts.decompose
    dopts = (decompose_opts or DecomposeOptions(seed=opts.seed, rank=None)) if one_shot else None
    auto = one_shot and dopts.rank is None and dopts.compression is None
    if opts.rank_allocation == "criterion" and not auto:
        why = ("the model is already decomposed" if art.meta.get("tensorization") else
               f"{opt('no-decompose')} prunes dense weights" if not opts.decompose else
               "the rank is given")
        log.warning(f"{opt('rank-allocation')} criterion applies to the one-shot path with "
                    f"{opt('rank')} auto only; {why}, so it is ignored")
    if one_shot:
        if auto:
            dopts = replace(dopts, rank=auto_rank(art.model, art.input_shape, dopts, opts))
            rank_note = {"rank": dopts.rank, "coarse_ratio": opts.coarse_ratio}
            given = dict(dopts.rank_overrides)  # the caller's per-layer ranks win over both rules below
            if opts.rank_allocation == "criterion":
                ranks, probe_kept = allocated_ranks(art, dopts, opts, data)
                dopts = replace(dopts, rank_overrides=_under(given, ranks))
                rank_note.update(allocation="criterion", ranks=dict(dopts.rank_overrides),
                                 probe_kept=probe_kept, probe_ratio=opts.coarse_ratio * ALLOCATION_PROBE)
                log.info("ranks allocated by the criterion (cores about "
                         f"{opts.coarse_ratio:g}x what it keeps per layer): "
                         + ", ".join(f"{n} {r}" for n, r in ranks.items()))
            if opts.min_paths > 1:  # the path floor needs layers that can hold the paths
                raised = path_ranks(art.model, art.input_shape, dopts, opts.min_paths)
                dopts = replace(dopts, rank_overrides=_under(given, {**dopts.rank_overrides, **raised}))
                rank_note["raised_for_paths"] = raised
                if raised:
                    log.info(f"ranks raised to hold {opts.min_paths} rank paths ({opt('min-paths')}): "
                             + ", ".join(f"{n} {r}" for n, r in raised.items()))
        art, _ = decompose(art, dopts)
        how = f" (auto: cores about {opts.coarse_ratio:g}x the budget)" if rank_note else ""
        if rank_note and rank_note.get("allocation"):
            how = f" (auto), per layer {', '.join(f'{n} {r}' for n, r in rank_note['ranks'].items())}"
        log.info(f"decomposed with {dopts.format.upper()} rank {dopts.rank}{how} before pruning "
                 f"(pass a decomposed artifact or {opt('no-decompose')} to control this)")
    out = Artifact(model=copy.deepcopy(art.model).eval(), arch=art.arch, meta=copy.deepcopy(art.meta),
                   source="")
    report = prune_model(out.model, opts, batches, art.input_shape, data_note=str(data) if data else None)
    if rank_note:
        report["rank_auto"] = rank_note
    # the scoring time is for the caller (--json); the manifest keeps only what the same
    # inputs and seed reproduce
    out.meta["pruning"] = {k: v for k, v in report.items() if k != "score_seconds"}
    out.record("prune", {**asdict(opts), "criterion": report["criterion"],
                         "data": str(data) if data else None}, seed=opts.seed)
    return out, report


def pseudo_labeled(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` with every unlabeled sample's label (``-1``, token data without labels)
    replaced by the unpruned model's own top output (its argmax, in eval mode): the
    data-driven criteria then score how much each entry matters to the model's present
    decisions on real inputs (for an encoder, its largest output feature), a loss with a
    gradient where matching the model's own outputs exactly would have none."""
    from ..evaluate import output

    out = []
    for x, y in batches:
        if len(y) and bool((y < 0).any()):
            with eval_mode(model), torch.no_grad():
                top = output(model, x).argmax(1)  # classes on dim 1, as cross-entropy reads them
            y = top if bool((y < 0).all()) or top.shape != y.shape else torch.where(y < 0, top, y)
        out.append((x, y))
    return out


def prune_model(model: torch.nn.Module, opts: PruneOptions,
                batches: list[tuple[torch.Tensor, torch.Tensor]] | None,
                input_shape: tuple[int, ...], data_note: str | None = None) -> dict[str, Any]:
    """Prune ``model`` in place: score every prunable entry with ``opts.criterion``, keep the
    budget ``round((1 - sparsity) * D)`` (``D``: the dense original's prunable weights,
    DESIGN §2.2) after the collapse guards, and attach the masks to the model.

    ``batches``: scoring batches ``(x, y)`` (``x`` of shape ``(B, *input_shape)``, ``y``
    class indices ``(B,)``, or -1 for unlabeled samples: they are scored against the model's own
    top output, see :func:`pseudo_labeled`) for the data-driven criteria, or ``None`` (the default criterion
    then falls back to data-free SynFlow). Returns the pruning report (kept counts, the three
    sparsities, per-layer rows, warnings). Raises :class:`UsageError` for bad options,
    :class:`BadInput` for a model without prunable weights or already pruned, and
    :class:`CollapseError` when a layer would lose every path.
    """
    opts.validate()
    if get_masks(model):
        raise BadInput("the model is already pruned; prune the unpruned model")
    criterion, fallback = resolve_criterion(opts.criterion, batches is not None)
    if fallback:
        log.warning(fallback)
    groups = prunable_groups(model)
    if not groups:
        raise BadInput("the model has no prunable weights")
    names = [n for g in groups for n in g.params]
    params = dict(model.named_parameters())
    dense = sum(g.dense_count for g in groups)
    entries = sum(params[n].numel() for n in names)
    kept = budget(opts.sparsity, dense)
    gen = torch.Generator().manual_seed(opts.seed)
    copts = opts.criterion_options
    if not CRITERIA.get(criterion).needs_data:
        batches = None
    if batches is not None:
        batches = pseudo_labeled(model, batches)

    def selector(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        return select(scores, groups, k, opts.scope, opts.min_density, opts.path_guard, opts.connectivity,
                      opts.min_paths, opts.grain, opts.path_pool)

    t0 = time.perf_counter()
    scores = None
    paths: dict[str, str] = {}
    score_warnings: list[str] = []
    # per-layer scope: each layer keeps its own share, so a layer can be over its share while
    # the whole model is under the budget (a small TT-embedding beside dense Linears)
    whole = all(k >= sum(params[n].numel() for n in g.params)
                for g, k in zip(groups, layer_shares(groups, kept), strict=True)) \
        if opts.scope == "layer" else kept >= entries
    if whole:
        held = (f"every layer's share of the budget ({1 - opts.sparsity:.4g} of its dense weights) holds "
                "all of its stored entries") if opts.scope == "layer" else \
            f"the budget keeps {kept:,} entries but the model has only {entries:,} prunable entries"
        log.warning(f"{held}: nothing pruned (sparsity vs dense already {1 - entries / dense:.4f})")
        masks = {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}
    else:
        ctx = ScoreContext(model=model, targets=names, batches=batches, input_shape=tuple(input_shape),
                           generator=gen, options=copts, kept=kept, select=selector)
        # through data, score each linear chain on its rebuilt weight where autograd then keeps
        # less (a chain's rank intermediates can outweigh the dense layer's input and output
        # many times): same scores up to rounding, a fraction of the memory
        paths = {n: str(t["path"]) for n, t in lighter(model, lambda: feed(model, batches[0][0])).items()} \
            if batches else {}
        with _score_mode(model, opts.score_mode), differentiable_attention(), train_paths(model, paths):
            scores = CRITERIA.get(criterion).fn(ctx)
        masks = selector(scores, kept)
        score_warnings = ctx.warnings
    score_s = time.perf_counter() - t0
    check_collapse(groups, masks)
    added: dict[str, int] = {}
    dropped: dict[str, int] = {}
    cut_before = 0  # outputs the selection left on no input (before any repair)
    # the activity of ReLUs: on real data if given (token ids only)
    samples = token_ids(batches[0][0][:16]) if batches else None
    if opts.repair_paths:  # whole network: reconnect a cut input -> output, say what it cost
        before = reachability(model, input_shape, masks, samples)
        cut_before = before.outputs - before.outputs_reached if before.checked else 0
        fixed = repair_paths(model, input_shape, masks, scores, inputs=samples)
        masks, added, reach = fixed.masks, fixed.added, fixed.reach
    else:  # whole network: refuse (exit 7) when no input unit reaches the output
        reach = check_reachability(model, input_shape, masks, samples)
        partly_cut = reach.connected and reach.outputs_reached < reach.outputs
        cut_before = reach.outputs - reach.outputs_reached if partly_cut else 0
        if opts.reconnect and scores is not None and partly_cut:
            compared = compared_scores(scores, groups, opts.scope)
            pools = [g.params for g in groups] if opts.scope == "layer" else None
            group_of = {n: g for g in groups for n in g.params}

            def keeps(name: str, trial: dict[str, torch.Tensor]) -> bool:  # the per-layer guard holds
                g = group_of[name]
                return connected([trial[n] for n in g.params], g.kind)

            fixed = reconnect_within_budget(model, input_shape, masks, compared, pools, samples, keeps)
            masks, added, dropped, reach = fixed.masks, fixed.added, fixed.dropped, fixed.reach
    attach_masks(model, masks)
    report = _report(model, groups, masks, dense, opts, criterion, fallback, data_note, score_s)
    report["reachability"] = reach.as_dict()
    report["scored_on_rebuild"] = sorted(n for n, p in paths.items() if p == "dense")
    mode = "beyond budget" if opts.repair_paths else "swap" if opts.reconnect else "off"
    report["repair"] = {"mode": mode, "cut_outputs": cut_before, "added": sum(added.values()),
                        "tensors": added, "dropped": sum(dropped.values()), "dropped_tensors": dropped}
    beyond = sum(added.values()) - sum(dropped.values())
    if added and dropped:
        log.info(f"reconnected the {cut_before} output(s) cut off the input within the budget "
                 f"({reach.outputs_reached} of {reach.outputs} now reached): swapped "
                 f"{sum(dropped.values()):,} of the lowest-scored kept entries "
                 f"({', '.join(f'{n} {k}' for n, k in dropped.items())}) for {sum(added.values()):,} that "
                 f"reach the cut ones ({', '.join(f'{n} {k}' for n, k in added.items())})"
                 + (f"; {beyond:,} beyond the budget (nothing else could go)" if beyond else ""))
    elif added:
        log.info(f"path repair: added {sum(added.values()):,} entries beyond the budget of "
                 f"{report['budget']:,} to reconnect the input to every output "
                 f"({', '.join(f'{n} {k}' for n, k in added.items())})")
    report["warnings"] += score_warnings + _reach_warnings(reach, opts.reconnect)
    for w in report["warnings"]:
        log.warning(w)
    return report


def _reach_warnings(reach: Reachability, reconnect: bool = True) -> list[str]:
    """Warnings of the whole-network check that do not refuse the result."""
    out = []
    if not reach.checked:
        out.append(f"the whole-network collapse check could not run: {reach.note}")
    elif not reach.traced:
        out.append(f"the whole-network collapse check followed the layers in the order they run, as "
                   f"{reach.note}: it does not see skip connections (a cut branch with a skip path "
                   "around it counts as cut) nor check that kept paths stay active behind ReLUs")
    if reach.checked and 0 < reach.outputs_reached < reach.outputs:
        out.append(f"{reach.outputs - reach.outputs_reached} of {reach.outputs} outputs depend on no "
                   f"input (constant logits); use a lower sparsity, "
                   + (f"{opt('reconnect')} (swaps entries that reach them in, within the budget), "
                      if not reconnect else "") + f"or {opt('repair-paths')}")
    if reach.cut_layers:
        shown = ", ".join(reach.cut_layers[:6]) + (f" and {len(reach.cut_layers) - 6} more"
                                                   if len(reach.cut_layers) > 6 else "")
        out.append(f"{len(reach.cut_layers)} layer(s) pass nothing on (their branch is cut; another "
                   f"path carries the signal): {shown}")
    return out


def _thin_warning(thin: list[tuple[str, int, int]]) -> str:
    """One warning for every layer left with <= 2 rank paths (a per-layer line each drowns the log).

    Each surviving path adds one rank-one term to the layer's weight, so such a layer passes
    (almost) nothing on. The advice depends on whether a lower rank is still possible.
    """
    shown = ", ".join(f"{n} ({k})" for n, k, _ in thin[:6])
    shown += f" and {len(thin) - 6} more" if len(thin) > 6 else ""
    head = (f"{len(thin)} layer(s) keep at most 2 rank paths through their cores, so their effective "
            f"weights have rank <= 2 and pass almost nothing on: {shown}. ")
    if all(r == 1 for _, _, r in thin):
        return head + ("They are already rank 1: the budget is too small for them; use a lower sparsity "
                       f"or keep them dense (`tedepr decompose {opt('exclude')} NAME`, then prune)")
    return head + f"Try a lower rank (fewer, denser cores), {opt('scope')} normalized, or a lower sparsity"


def _unpruned_weights(model: torch.nn.Module, prunable: set[str]) -> dict[str, int]:
    """Weight tensors (not biases, not normalization parameters) no group prunes, by plain
    name: their entry count (an embedding, a layer type tedepr does not prune)."""
    from ..masks import plain_named_parameters
    from ..tensorized.plan import NORMS

    norms = {n for n, m in model.named_modules() if isinstance(m, NORMS)}
    out = {}
    for n, p in plain_named_parameters(model).items():
        owner, _, leaf = n.rpartition(".")
        if n in prunable or "bias" in leaf or owner in norms or p.dim() < 2:
            continue
        out[n] = p.numel()
    return out


def _report(model, groups, masks, dense: int, opts: PruneOptions, criterion: str,
            fallback: str | None, data: str | None, score_s: float) -> dict[str, Any]:
    counts = kept_counts(model)  # the one definition export, bench and info report too
    kept = counts["kept"]
    entries = sum(m.numel() for m in masks.values())
    all_params = counts["params"]
    layers: list[dict[str, Any]] = []
    warnings: list[str] = []
    thin: list[tuple[str, int, int]] = []  # (layer, rank paths kept, largest rank)
    for g in groups:
        k = sum(int(masks[n].sum()) for n in g.params)
        t = sum(masks[n].numel() for n in g.params)
        row = {"name": g.name, "kind": g.kind, "kept": k, "total": t, "density": k / t,
               "dense_count": g.dense_count, "density_vs_dense": k / g.dense_count,
               "tensors": {n: [int(masks[n].sum()), masks[n].numel()] for n in g.params}}
        if g.kind == "cores":
            row["rank_paths"] = rank_paths([masks[n] for n in g.params])
            separate = paths_are_rank_one(g.module)  # rank-one term per path
            floor = 3  # rank <= 2: the layer passes (almost) nothing on
            if separate and row["rank_paths"] < floor:
                thin.append((g.name, int(row["rank_paths"]), max(g.module.ranks)))
        layers.append(row)
    if thin:
        warnings.append(_thin_warning(thin))
    return {
        "criterion": criterion,
        "criterion_requested": opts.criterion or DEFAULT_CRITERION,
        "fallback": fallback,
        "data": data,
        "sparsity_target": opts.sparsity,
        "scope": opts.scope,
        "min_paths": opts.min_paths,
        "grain": opts.grain,
        "path_pool": opts.path_pool,
        "seed": opts.seed,
        "kept": kept,
        "effective_nonzero": counts["effective_nonzero"],
        "budget": budget(opts.sparsity, dense),
        "dense_prunable": dense,
        "prunable_entries": entries,
        "all_params": all_params,
        "sparsity": {
            "vs_dense": 1 - kept / dense,
            "over_prunable": 1 - kept / entries,
            "over_all_params": (entries - kept) / all_params,
        },
        # what the sparsity covers: the prunable tensors' share of the whole model, and the
        # weight layers left out (embeddings, ...), so "99 % sparsity" cannot hide them
        "coverage": {"prunable_share": entries / all_params,
                     "not_pruned": _unpruned_weights(model, {n for g in groups for n in g.params})},
        "score_seconds": round(score_s, 3),
        "layers": layers,
        "warnings": warnings,
        "criterion_options": asdict(opts.criterion_options),
    }
