"""Pruning-at-initialization criteria: each scores every prunable entry (higher = keep).

All criteria work the same on core entries of a tensorized model (autograd runs through
the chain) and on dense weights. The caller sets the normalization layers' mode
(``prune --score-mode``) and restores their buffers; iterative criteria re-select masks with the shared
:func:`~tedepr_cli.pruning.masking.select` between rounds.

* ``tedepr`` -- trainability (ProsPr, Alizadeh et al. ICLR 2022): take ``steps``
  differentiable SGD steps on the masked weights ``c ⊙ θ`` and score ``|∂L(θ_M)/∂c|`` at
  ``c = 1``: entries whose removal most changes the loss *after* a little training. The
  meta-gradient is taken step by step backwards (reverse-mode through the unrolled steps
  with each step recomputed), so memory holds one step's graph, not all of them.
* ``snip`` -- connection sensitivity ``|g ⊙ θ|`` (Lee et al. ICLR 2019).
* ``grasp`` -- gradient-signal preservation (Wang et al. ICLR 2020): keep-score
  ``θ ⊙ Hg`` (GraSP removes the largest ``−θ ⊙ Hg``), logits at temperature 200.
* ``synflow`` -- data-free synaptic flow (Tanaka et al. NeurIPS 2020): ``|θ ⊙ ∂R/∂θ|``
  with ``R = 1ᵀ f_{|θ|}(1)``, iterated over ``rounds`` with an exponential schedule.
* ``force`` -- iterative SNIP with resurrection (FORCE, de Jorge et al. ICLR 2021).
* ``magnitude`` -- ``|θ|``; ``random`` -- uniform scores (honest baselines).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import BadInput, opt
from ..logs import log
from ..registry import Registry
from ..surgery import call_args, example_input, first_layer
from ..tensorized.embedding import TTEmbedding


@dataclass
class CriterionOptions:
    steps: int = 3  # tedepr: differentiable SGD steps
    inner_lr: float = 0.1  # tedepr: their learning rate
    rounds: int = 100  # synflow: pruning rounds
    iterations: int = 10  # force: pruning iterations
    temperature: float = 200.0  # grasp
    micro_batch: int = 32  # data-driven criteria: samples differentiated at a time (memory only)


@dataclass
class ScoreContext:
    """Everything a criterion may use."""

    model: nn.Module
    targets: list[str]  # prunable parameter names
    batches: list[tuple[Tensor, Tensor]] | None
    input_shape: tuple[int, ...]
    generator: torch.Generator
    options: CriterionOptions
    kept: int  # final budget (iterative criteria schedule towards it)
    select: Callable[[dict[str, Tensor], int], dict[str, Tensor]] = field(repr=False, default=None)
    warnings: list[str] = field(default_factory=list)  # what a criterion found wrong with its scores


@dataclass(frozen=True)
class Criterion:
    name: str
    needs_data: bool
    fn: Callable[[ScoreContext], dict[str, Tensor]]


CRITERIA: Registry[Criterion] = Registry("criterion")


def _register(name: str, needs_data: bool):
    def deco(fn: Callable[[ScoreContext], dict[str, Tensor]]):
        CRITERIA.register(name)(Criterion(name, needs_data, fn))
        return fn

    return deco


def exponential_keep(total: int, kept: int, k: int, rounds: int) -> int:
    """Entries kept after round ``k`` of ``rounds`` in the exponential schedule of SynFlow
    and FORCE: densities fall geometrically from 1 to ``kept / total``."""
    return int(round(total * (kept / total) ** (k / rounds)))


def _params(ctx: ScoreContext) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in ctx.model.named_parameters()}


def _loss(model: nn.Module, params: dict[str, Tensor], batch: tuple[Tensor, Tensor],
          temperature: float = 1.0) -> Tensor:
    x, y = batch
    args, kwargs = call_args(model, x)  # token arrays by name
    out = functional_call(model, params, args, kwargs)
    out = out[0] if isinstance(out, tuple | list) else out
    return F.cross_entropy(out / temperature, y)


def batch_coupled(model: nn.Module) -> bool:
    """Whether ``model``'s output for one sample depends on the other samples in its batch:
    a BatchNorm normalizing with batch statistics (in training mode, or without running
    statistics). Such a model must be differentiated on the whole batch at once."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
               for m in model.modules())


def micro_batches(model: nn.Module, batch: tuple[Tensor, Tensor], size: int
                  ) -> list[tuple[tuple[Tensor, Tensor], float]]:
    """``batch`` ``(x, y)`` (``x`` of shape ``(B, ...)``, ``y`` of shape ``(B,)``) cut into
    consecutive micro-batches of at most ``size`` samples, each with its weight
    ``len / B``: the batch's mean loss is the weighted sum of the micro-batches' mean
    losses, so gradients and Hessian-vector products add up exactly (up to rounding),
    while autograd holds one micro-batch's graph at a time. The whole batch when
    ``model`` is :func:`batch_coupled` or ``size >= B``."""
    x, y = batch
    n = int(x.shape[0])
    if size >= n or batch_coupled(model):
        return [(batch, 1.0)]
    return [((x[i:i + size], y[i:i + size]), min(size, n - i) / n) for i in range(0, n, size)]


def gradient(ctx: ScoreContext, params: dict[str, Tensor], names: list[str], batch: tuple[Tensor, Tensor],
             temperature: float = 1.0) -> dict[str, Tensor]:
    """``∇ L`` of the mean loss over ``batch`` w.r.t. ``params[n]`` for ``n`` in ``names``
    (the others held fixed), accumulated over micro-batches of ``ctx.options.micro_batch``
    samples; zeros for a parameter the loss does not reach."""
    total = {n: torch.zeros_like(params[n]) for n in names}
    for mb, weight in micro_batches(ctx.model, batch, ctx.options.micro_batch):
        leaves = {n: params[n].detach().requires_grad_(True) for n in names}
        loss = _loss(ctx.model, {**params, **leaves}, mb, temperature) * weight
        for n, g in zip(names, torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True),
                        strict=True):
            if g is not None:
                total[n] += g
    return total


def hessian_vector(ctx: ScoreContext, params: dict[str, Tensor], names: list[str],
                   batch: tuple[Tensor, Tensor], vector: dict[str, Tensor], temperature: float = 1.0
                   ) -> dict[str, Tensor]:
    """``H v``: the Hessian of the mean loss over ``batch`` w.r.t. ``params[names]`` times
    ``vector`` (same names and shapes), by double backprop (Pearlmutter 1994), accumulated
    over micro-batches like :func:`gradient`."""
    total = {n: torch.zeros_like(params[n]) for n in names}
    for mb, weight in micro_batches(ctx.model, batch, ctx.options.micro_batch):
        leaves = {n: params[n].detach().requires_grad_(True) for n in names}
        loss = _loss(ctx.model, {**params, **leaves}, mb, temperature) * weight
        gs = torch.autograd.grad(loss, [leaves[n] for n in names], create_graph=True, allow_unused=True)
        dot = [(g * vector[n]).sum() for n, g in zip(names, gs, strict=True) if g is not None]
        if not dot:
            continue
        hs = torch.autograd.grad(sum(dot), [leaves[n] for n in names], allow_unused=True)
        for n, h in zip(names, hs, strict=True):
            if h is not None:
                total[n] += h
    return total


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Run ``F.scaled_dot_product_attention`` (what ``nn.MultiheadAttention`` and torch's
    Transformer layers call) on its math backend while scoring.

    The fused kernels (flash, memory-efficient) have no double backward ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"), and
    the ``tedepr`` and ``grasp`` criteria differentiate through a gradient. The math
    backend computes the same attention with ordinary differentiable ops.
    ``torch.nn.attention.sdpa_kernel`` restores the previous backend choice on exit.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


# ---------------------------------------------------------------------------- criteria
@_register("magnitude", needs_data=False)
def magnitude(ctx: ScoreContext) -> dict[str, Tensor]:
    p = _params(ctx)
    return {n: p[n].abs() for n in ctx.targets}


@_register("random", needs_data=False)
def random_scores(ctx: ScoreContext) -> dict[str, Tensor]:
    p = _params(ctx)
    return {n: torch.rand(p[n].shape, generator=ctx.generator, dtype=torch.float64) for n in ctx.targets}


@_register("snip", needs_data=True)
def snip(ctx: ScoreContext) -> dict[str, Tensor]:
    p = _params(ctx)
    g = gradient(ctx, p, ctx.targets, ctx.batches[0])
    return {n: (g[n] * p[n]).abs() for n in ctx.targets}


@_register("grasp", needs_data=True)
def grasp(ctx: ScoreContext) -> dict[str, Tensor]:
    p = _params(ctx)
    t = ctx.options.temperature
    stopped = gradient(ctx, p, ctx.targets, ctx.batches[0], t)  # the gradient, held constant
    hg = hessian_vector(ctx, p, ctx.targets, ctx.batches[0], stopped, t)
    return {n: p[n] * hg[n] for n in ctx.targets}


def degenerate_scores(scores: dict[str, Tensor]) -> dict[str, str]:
    """The score tensors that cannot rank their entries, by name, with why: every score
    equal (e.g. all 0: no gradient reached the layer), every row (output unit) of a weight
    matrix scored alike, or a contiguous block of at least a third of its rows scoring 0
    (e.g. the query and key rows of a stacked attention projection when every token is
    the same). Scattered zero rows (dead ReLUs) do not count."""
    out: dict[str, str] = {}
    for n, v in scores.items():
        s = v.detach().double()
        if s.numel() < 2:
            continue
        top = float(s.abs().max())
        if float(s.max()) == float(s.min()):
            out[n] = f"all {s.numel():,} scores are {float(s.max()):.3g}"
            continue
        if s.dim() != 2 or s.shape[0] < 3:
            continue
        rows = s.shape[0]
        if bool((s == s[:1]).all()):
            out[n] = f"all {rows} rows score alike"
            continue
        zero = (s.abs().amax(1) <= 1e-9 * top).tolist()
        run = best = start = best_start = 0
        for i, z in enumerate(zero):
            run, start = (run + 1, start) if z else (0, i + 1)
            if run > best:
                best, best_start = run, start
        if best >= max(2, rows // 3):
            out[n] = f"rows {best_start}..{best_start + best - 1} ({best} of {rows}) all score 0"
    return out


def _attention_modules(model: nn.Module) -> list[str]:
    from ..tensorized.wrappers import TensorizedMHA

    return [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention | TensorizedMHA)]


@_register("synflow", needs_data=False)
def synflow(ctx: ScoreContext) -> dict[str, Tensor]:
    model = copy.deepcopy(ctx.model).double().eval()
    with torch.no_grad():  # linearize: |θ| everywhere (buffers too, as the reference does)
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.abs_()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    ones = example_input(model, ctx.input_shape, 1, "ones", dtype=torch.float64)  # ids for embeddings
    first = first_layer(model)
    if first is not None and isinstance(first[1], TTEmbedding):  # every core slice, not one id's
        ids, per = first[1].covering_ids(), max(1, ones[0].numel())
        n = -(-len(ids) // per) * per  # whole sequences of the input shape, ids wrapped around
        ones = ids.repeat(-(-n // len(ids)))[:n].reshape(-1, *ctx.input_shape)
    total = sum(base[n].numel() for n in ctx.targets)
    rounds = max(1, ctx.options.rounds)
    masks: dict[str, Tensor] | None = None
    scores: dict[str, Tensor] = {}
    for k in range(1, rounds + 1):
        params = dict(base)
        leaves = {n: (base[n] * masks[n] if masks else base[n]).clone().requires_grad_(True)
                  for n in ctx.targets}
        params.update(leaves)
        r = functional_call(model, params, (ones,)).sum()
        gs = torch.autograd.grad(r, [leaves[n] for n in ctx.targets], allow_unused=True)
        scores = {n: ((g if g is not None else torch.zeros_like(leaves[n])) * leaves[n]).detach().abs()
                  for n, g in zip(ctx.targets, gs, strict=True)}
        if k == 1:
            _warn_degenerate(ctx, scores, ones)
        if k < rounds:
            masks = ctx.select(scores, exponential_keep(total, ctx.kept, k, rounds))
    return scores


def _warn_degenerate(ctx: ScoreContext, scores: dict[str, Tensor], probe: Tensor) -> None:
    """SynFlow's all-ones probe carries no information for some layers (Tanaka et al. 2020
    define it for image classifiers): one warning naming them, from the first round's
    scores (before any pruning zeroes entries), and for a token model with attention
    whose probe repeats one token at every position."""
    found = degenerate_scores(scores)
    same_token = (not probe.is_floating_point() and probe.dim() >= 2 and probe.shape[-1] > 1
                  and bool((probe == probe[..., :1]).all()))
    attention = _attention_modules(ctx.model) if same_token else []
    if not found and not attention:
        return
    parts = []
    if found:
        shown = "; ".join(f"{n}: {why}" for n, why in list(found.items())[:4])
        more = f"; and {len(found) - 4} more" if len(found) > 4 else ""
        parts.append(f"its scores cannot rank the entries of {len(found)} tensor(s) ({shown}{more})")
    if attention:
        parts.append(f"its probe repeats one token at every position, so the attention in "
                     f"{', '.join(attention[:3])}{' ...' if len(attention) > 3 else ''} sees identical "
                     "tokens and its query/key projections get no signal")
    ctx.warnings.append(f"synflow (data-free) probe is degenerate for this model: {'; '.join(parts)}. Pass "
                        f"{opt('data')} for a data-driven criterion")


@_register("force", needs_data=True)
def force(ctx: ScoreContext) -> dict[str, Tensor]:
    p = _params(ctx)
    total = sum(p[n].numel() for n in ctx.targets)
    its = max(1, ctx.options.iterations)
    masks: dict[str, Tensor] | None = None
    scores: dict[str, Tensor] = {}
    for k in range(1, its + 1):
        batch = ctx.batches[(k - 1) % len(ctx.batches)]
        eff = {n: p[n] * masks[n] if masks else p[n] for n in ctx.targets}
        g = gradient(ctx, {**p, **eff}, ctx.targets, batch)  # at the pruned network, all entries
        scores = {n: (g[n] * p[n]).abs() for n in ctx.targets}
        if k < its:
            masks = ctx.select(scores, exponential_keep(total, ctx.kept, k, its))
    return scores


@_register("tedepr", needs_data=True)
def tedepr(ctx: ScoreContext) -> dict[str, Tensor]:
    """ProsPr-style trainability: meta-gradient of the loss after ``steps`` SGD steps.

    The inner SGD steps must stay finite for the meta-gradient to mean anything; a deep
    net without working normalization at initialization can blow up at ``inner_lr``, so
    the steps are retried with a 10x smaller learning rate (three times at most)."""
    lr = ctx.options.inner_lr
    for _ in range(4):
        scores = _tedepr_once(ctx, lr)
        if all(bool(torch.isfinite(v).all()) for v in scores.values()):
            if lr != ctx.options.inner_lr:
                log.warning(f"tedepr criterion: the inner SGD steps diverged at {opt('inner-lr')} "
                            f"{ctx.options.inner_lr:g}; scored with {lr:g}")
            return scores
        lr /= 10
    raise BadInput(f"the tedepr criterion diverged (non-finite scores) even at inner lr {lr * 10:g}: "
                   "the model's loss is not finite at initialization; check the data or the weights")


def _tedepr_once(ctx: ScoreContext, inner_lr: float) -> dict[str, Tensor]:
    """``|∂L(θ_T)/∂c|`` at ``c = 1`` for ``θ_0 = c ⊙ θ``, ``θ_{t+1} = θ_t - η ∇L_t(θ_t)``.

    Reverse mode through the unrolled steps, one step at a time: the forward pass keeps
    only the parameters ``θ_t`` of every step; the adjoint ``a_T = ∇L_T(θ_T)`` then goes
    back through each step's Jacobian, ``a_t = a_{t+1} - η H_t(θ_t) a_{t+1}`` (a
    Hessian-vector product on that step's batch, recomputed), and ``∂L/∂c = a_0 ⊙ θ``. The
    same meta-gradient as differentiating the whole unrolled graph at once (up to
    rounding), with one step's graph (of one micro-batch) in memory instead of all of them.
    """
    p = _params(ctx)
    steps, batches = ctx.options.steps, ctx.batches
    trainable = [n for n, q in ctx.model.named_parameters() if q.requires_grad]
    theta = [{n: p[n] for n in trainable}]
    for t in range(steps):
        g = gradient(ctx, {**p, **theta[t]}, trainable, batches[t % len(batches)])
        theta.append({n: theta[t][n] - inner_lr * g[n] for n in trainable})
    adjoint = gradient(ctx, {**p, **theta[steps]}, trainable, batches[steps % len(batches)])
    for t in reversed(range(steps)):
        hv = hessian_vector(ctx, {**p, **theta[t]}, trainable, batches[t % len(batches)], adjoint)
        adjoint = {n: adjoint[n] - inner_lr * hv[n] for n in trainable}
    return {n: (adjoint[n] * p[n]).abs() if n in adjoint else torch.zeros_like(p[n]) for n in ctx.targets}
