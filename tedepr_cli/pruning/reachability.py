"""Whole-network reachability: does any input unit still reach the output through the kept entries?

The per-layer guard (:func:`~tedepr_cli.pruning.masking.check_collapse`) sees one layer at a
time, and every layer can keep a path while the network is cut: ``fc1`` keeps its one
entry into hidden unit 7, ``fc2`` keeps entries that read only unit 12, and the output is
a constant. This is *layer collapse* (Tanaka et al., "Pruning neural networks without any
data by iteratively conserving synaptic flow", NeurIPS 2020) seen as a graph property:
the "disconnected" units of effective sparsity (Vysogorets & Kempe, "Connectivity
matters: neural network pruning through the lens of effective sparsity", JMLR 2023).

:func:`reachability` answers it structurally. The input units are marked "reached"; each
layer passes the marks on through its *effective connectivity* (input unit -> output unit
where a kept entry, or for tensorized layers a kept path through the cores, links them):
the boolean product ``B_L ∘ ... ∘ B_1`` of every layer's kept pattern along the model's
data flow. The data flow is the model's ``torch.fx`` graph, so residual adds, concats
and skip branches count: a block whose branch is cut still passes the signal on through
its skip path. Marks are propagated per element, so convolutions are followed per
channel and position, grouped and depthwise convolutions per group. Each operation has a
rule (a layer: its kept pattern; ``add``: either operand; ``softmax``/``LayerNorm``: the
whole normalized dimension; an operation without a rule: conservatively, everything it
reads reaches everything it writes). A path must also be active: behind a ReLU, a unit
passes the marks on only if the pruned model lifts it above zero for some sample input
(BatchNorm on batch statistics, as in training); a lone kept path whose weights sum to a
negative value at a ReLU carries nothing, and gradient descent never reaches it. Where
the graph cannot be traced the layers are followed in the order they run (structure
only), which does not see skip connections; the result says so.

:func:`repair_paths` adds the cheapest entries that reconnect a cut network: a layered
search where the gradient of the reached outputs with respect to the kept pattern marks
exactly the entries that alone would complete a path (highest score first); when no single
entry can, a relaxed pattern (unkept entries at ``ε``) orders entries by how few others a
path through them still needs. :func:`reconnect_within_budget` makes that a swap: as many
of the lowest-scored kept entries that no reached output needs are dropped again.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import functional_call

from ..errors import CollapseError, opt
from ..masks import plain_named_parameters
from ..surgery import eval_mode, example_input, is_token_model
from ..tensorized.base import TensorizedLayer
from ..tensorized.chain import ring_dense, ring_input, ring_output, tt_matrix_dense, tt_matrix_forward
from ..tensorized.conv import ChainConv2d
from ..tensorized.embedding import TTEmbedding
from ..tensorized.tr import TRLinear
from ..tensorized.tt import TTLinear
from ..tensorized.wrappers import TensorizedLSTM, TensorizedMHA

_F64 = torch.float64
_EPS = 1e-3  # relaxed weight of an unkept entry when ordering multi-entry repairs
_SAMPLES = 16  # random sample inputs for the activity of ReLUs when no batch is given
_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, TensorizedLayer, nn.RNNBase, TensorizedLSTM,
           nn.MultiheadAttention, TensorizedMHA)

# operations applied to the marks as they are (shape changes, and sums/averages of
# non-negative values, which are positive exactly where some input is)
_SAME = {"reshape", "view", "flatten", "unflatten", "permute", "transpose", "t", "contiguous",
         "squeeze", "unsqueeze", "expand", "expand_as", "repeat", "getitem", "cat", "concat",
         "concatenate", "stack", "hstack", "vstack", "split", "chunk", "unbind", "narrow", "flip",
         "roll", "movedim", "moveaxis", "swapaxes", "swapdims", "view_as", "reshape_as", "tile",
         "select", "index_select", "repeat_interleave", "tensor_split", "split_with_sizes",
         "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "unfold", "fold", "diagonal",
         "sum", "nansum", "mean", "nanmean", "cumsum", "trace", "avg_pool1d", "avg_pool2d",
         "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
         "interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "getattr"}
# element-wise operations: an output element is reached where any operand's element is
_ELEMENTWISE = {"add", "sub", "mul", "div", "truediv", "floordiv", "mod", "pow", "neg", "pos",
                "abs", "relu", "relu6", "gelu", "silu", "mish", "sigmoid", "tanh", "softplus",
                "elu", "selu", "celu", "leaky_relu", "hardtanh", "hardswish", "hardsigmoid",
                "logsigmoid", "softsign", "tanhshrink", "threshold", "prelu", "rrelu", "glu_",
                "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                "feature_alpha_dropout", "exp", "expm1", "log", "log1p", "log2", "sqrt", "rsqrt",
                "square", "reciprocal", "sign", "sin", "cos", "erf", "clamp", "clip",
                "clamp_min", "clamp_max", "where", "maximum", "minimum", "fmax", "fmin",
                "masked_fill", "lerp", "addcmul", "addcdiv", "floor", "ceil", "round", "trunc",
                "eq", "ne", "lt", "le", "gt", "ge", "logical_not", "logical_and", "logical_or",
                "and_", "or_", "xor", "iadd", "isub", "imul", "itruediv", "ifloordiv", "ipow"}
# the first operand's values, converted or copied (other operands give only a type/device)
_IDENTITY = {"to", "type", "type_as", "float", "double", "half", "bfloat16", "int", "long", "bool",
             "detach", "clone", "cpu", "cuda", "requires_grad_", "batch_norm", "instance_norm_"}
# reductions along dimensions: an output element is reached where any reduced element is
_REDUCE = {"amax", "amin", "max", "min", "logsumexp", "std", "var", "norm", "prod", "argmax",
           "argmin", "all", "any", "median", "count_nonzero"}
# element-wise over every element but normalizing along one dimension
_SPREAD = {"softmax", "log_softmax", "softmin", "normalize", "cumprod", "logcumsumexp",
           "cummax", "cummin"}
# values that do not depend on any input
_CONST = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
          "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "zeros", "ones",
          "empty", "full", "arange", "linspace", "eye", "randn", "rand", "tensor"}


# ---------------------------------------------------------------------------- results
@dataclass
class Reachability:
    """What survives of the paths from the model's input to its output.

    ``outputs`` counts the output units (the class dimension: dim 1 of ``(B, C)`` and
    ``(B, C, H, W)`` outputs, the last dimension otherwise) and ``outputs_reached`` those
    that depend on at least one input unit through kept entries; the network is
    ``connected`` when that is at least one. ``breaks`` is ``(upstream, layer)``: the
    point where the last path from the input dies (``layer`` reads none of the
    ``reached_units`` units ``upstream`` -- a layer name, or ``"the input"`` -- still
    reaches). ``cut_layers`` are layers whose output depends on no input (a cut branch
    that a skip path may bypass). ``traced`` is False when the graph could not be traced
    with ``torch.fx`` and the layers were followed in the order they run (skip paths
    unseen; ``note`` says why). ``checked`` is False if the model could not be run at all.
    ``unknown_ops``: operations without a rule, followed conservatively (all to all).
    ``reached``: indices of the reached output units.
    """

    outputs: int
    outputs_reached: int
    traced: bool
    checked: bool = True
    note: str | None = None
    breaks: tuple[str, str] | None = None
    reached_units: int = 0
    break_kind: str = "layer"  # layer | activation (a ReLU that never fires) | op
    cut_layers: list[str] = field(default_factory=list)
    unknown_ops: list[str] = field(default_factory=list)
    reached: list[int] = field(default_factory=list)  # indices of the reached output units

    @property
    def connected(self) -> bool:
        return not self.checked or self.outputs_reached > 0

    def describe_break(self) -> str:
        """One sentence naming the broken layer pair."""
        if self.breaks is None:
            return "no input unit reaches any output unit"
        up, layer = self.breaks
        if self.break_kind == "activation":
            return (f"it dies after {up}: none of the {self.reached_units:,} unit(s) {up} still "
                    "reaches ever passes the ReLU that follows (with the kept weights their "
                    "pre-activations stay <= 0 on every sample input)")
        if self.break_kind == "op":
            return f"it breaks at {layer} after {up}, which keeps none of the reached units"
        if up == "the input":
            return (f"it breaks at {layer}: its kept entries read none of the input's "
                    f"{self.reached_units:,} units")
        return (f"it breaks between {up} and {layer}: {layer} reads none of the "
                f"{self.reached_units:,} unit(s) {up} still reaches")

    def as_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "traced": self.traced, "outputs": self.outputs,
                "outputs_reached": self.outputs_reached, "cut_layers": list(self.cut_layers),
                "conservative_ops": list(self.unknown_ops), "note": self.note}


@dataclass
class Repair:
    """Masks after :func:`repair_paths` (``added`` entries per tensor, beyond the budget) or
    :func:`reconnect_within_budget` (as many ``dropped`` as added: the kept count unchanged)."""

    masks: dict[str, Tensor]
    added: dict[str, int]
    reach: Reachability
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def total_added(self) -> int:
        return sum(self.added.values())

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())


# ---------------------------------------------------------------------------- public API
def reachability(model: nn.Module, input_shape: tuple[int, ...],
                 masks: dict[str, Tensor] | None = None, inputs: Tensor | None = None) -> Reachability:
    """Which output units still depend on the input, given the kept pattern ``masks``.

    ``model``: any module (its train/eval mode and weights are left as they were);
    ``input_shape``: one sample's shape, e.g. ``(1, 28, 28)``; ``masks``: boolean kept
    pattern per parameter name (shape of the parameter); a weight without a mask counts
    its non-zero entries as kept. A tensorized layer connects input unit ``i`` to output
    unit ``j`` where a chain of kept core entries links them (the boolean product of the
    cores' patterns, :mod:`tedepr_cli.tensorized.chain`); a dense layer where its kept
    entry does; a convolution per channel and position, respecting ``groups``; an LSTM
    through its kept input-to-hidden and hidden-to-hidden entries over time.

    A path must also be *active*: a unit behind a ReLU passes the marks on only if the
    pruned model lifts it above zero for at least one of the sample ``inputs`` (a batch
    ``(N, *input_shape)``; default 16 seeded normal samples), with BatchNorm on batch
    statistics as in training. A kept path whose weights sum to a negative value at
    every ReLU carries nothing, and no training step reaches it.

    The marks are propagated along the ``torch.fx`` graph (residual adds, concats and skip
    branches included); a model that cannot be traced is followed in the order its layers
    run (structure only), and :attr:`Reachability.note` says so. Costs two forward passes
    (batch 1 and the samples) and one pass of 0/1 marks in float64. Raises nothing for a
    cut network (see :func:`check_reachability`); a model that cannot run gives
    ``checked=False``.
    """
    prog = _program(model, input_shape, inputs)
    if prog.failed:
        return Reachability(0, 0, traced=False, checked=False, note=prog.failed)
    return prog.evaluate(_Patterns(model, masks))


def check_reachability(model: nn.Module, input_shape: tuple[int, ...],
                       masks: dict[str, Tensor] | None = None, inputs: Tensor | None = None
                       ) -> Reachability:
    """:func:`reachability`, raising :class:`~tedepr_cli.errors.CollapseError` (exit 7)
    with one line naming the broken layer pair when no input unit reaches any output."""
    reach = reachability(model, input_shape, masks, inputs)
    if not reach.connected:
        raise CollapseError(collapse_message(reach))
    return reach


def collapse_message(reach: Reachability, added: int = 0) -> str:
    """The one-line refusal for a cut network."""
    how = "" if reach.traced else " (followed the layers in the order they run: " \
        f"{reach.note}; skip connections unseen)"
    tried = f" even after adding {added:,} entries" if added else ""
    return (f"no path from the input to the output survives the pruning{tried}: "
            f"{reach.describe_break()}{how}, so every input gives the same output. Use a "
            f"lower sparsity, or {opt('repair-paths')} to add the few entries that reconnect it")


def repair_paths(model: nn.Module, input_shape: tuple[int, ...], masks: dict[str, Tensor],
                 scores: dict[str, Tensor] | None = None, every_output: bool = True,
                 inputs: Tensor | None = None) -> Repair:
    """Add the cheapest kept entries that reconnect the input to the output.

    ``masks``: boolean kept pattern per prunable parameter (not modified; the result holds
    new masks); ``scores``: the criterion's scores of the same shapes (higher = keep;
    without them ties go by position); ``inputs``: the sample batch of
    :func:`reachability`. Greedy, one entry at a time: the gradient of the reached
    outputs with respect to the 0/1 kept pattern is positive exactly at the unkept entries
    that alone would complete an active input-to-output path, and the best-scored of them
    is added; when none can, unkept entries are relaxed to ``ε`` and the entry on the
    paths needing the fewest further entries is added. With ``every_output`` the repair
    goes on until every output unit depends on the input, not just one. Entries added on
    the way that the final paths do not need are dropped again (last added first). Raises
    :class:`~tedepr_cli.errors.CollapseError` if the network cannot be reconnected.
    """
    prog = _program(model, input_shape, inputs)
    masks = {n: m.clone().bool() for n, m in masks.items()}
    if prog.failed:
        return Repair(masks, {}, Reachability(0, 0, traced=False, checked=False, note=prog.failed))
    added: list[tuple[str, int]] = []
    reach = prog.evaluate(_Patterns(model, masks))
    flat_scores = {n: _clean(scores[n]) if scores is not None and n in scores
                   else torch.zeros(masks[n].numel(), dtype=_F64) for n in masks}
    for _ in range(16 + 4 * (len(masks) + reach.outputs)):
        if reach.connected and (not every_output or reach.outputs_reached == reach.outputs):
            break
        target = ~prog.reached_units if reach.connected else torch.ones_like(prog.reached_units)
        pick = _pick(prog, model, masks, target, flat_scores, soft=False) or \
            _pick(prog, model, masks, target, flat_scores, soft=True)
        if pick is None:
            break
        masks[pick[0]].view(-1)[pick[1]] = True
        added.append(pick)
        reach = prog.evaluate(_Patterns(model, masks))
    goal = reach.outputs_reached
    for name, idx in reversed(list(added)):  # drop what the final paths do not need
        masks[name].view(-1)[idx] = False
        trial = prog.evaluate(_Patterns(model, masks))
        if trial.connected and trial.outputs_reached >= goal:
            added.remove((name, idx))
        else:
            masks[name].view(-1)[idx] = True
    reach = prog.evaluate(_Patterns(model, masks))
    if not reach.connected:
        raise CollapseError(collapse_message(reach, len(added)))
    per: dict[str, int] = {}
    for name, _ in added:
        per[name] = per.get(name, 0) + 1
    return Repair(masks, per, reach)


def reconnect_within_budget(model: nn.Module, input_shape: tuple[int, ...], masks: dict[str, Tensor],
                            scores: dict[str, Tensor], pools: list[list[str]] | None = None,
                            inputs: Tensor | None = None,
                            keeps: Callable[[str, dict[str, Tensor]], bool] | None = None) -> Repair:
    """Reconnect the outputs a selection left depending on no input, keeping its size.

    A swap: :func:`repair_paths` (every output) adds the fewest best-scored entries that
    reach the cut outputs, then as many kept entries are dropped again, lowest score first,
    skipping the entries added here and any whose loss would lower the number of reached
    outputs. The drops come from the same ``pools`` as the additions (lists of parameter
    names, e.g. one per layer for a per-layer budget; ``None``: the whole model, the global
    top-K's own order), so the kept count, and each pool's, is what the selection kept.

    ``masks``: boolean kept pattern per prunable parameter (not modified); ``scores``: the
    selection's scores of the same shapes, comparable within a pool (higher = keep);
    ``inputs``: the sample batch of :func:`reachability`; ``keeps(name, masks)``: whether
    the masks after a drop from tensor ``name`` are still acceptable (e.g. its layer keeps a
    path: the per-layer collapse guard). Where no droppable entry is left
    the result keeps the remainder beyond the budget (``total_added > total_dropped``).
    Raises :class:`~tedepr_cli.errors.CollapseError` if the network cannot be reconnected.
    Costs one :func:`reachability` evaluation per added entry and per tried drop.
    """
    fixed = repair_paths(model, input_shape, masks, scores, inputs=inputs)
    if not fixed.total_added:
        return fixed
    prog = _program(model, input_shape, inputs)
    new = {n: fixed.masks[n] & ~masks[n].bool() for n in masks}
    goal = fixed.reach.outputs_reached
    pools = pools or [list(masks)]
    dropped: dict[str, int] = {}
    out = {n: m.clone() for n, m in fixed.masks.items()}
    for pool in pools:
        owed = sum(int(new[n].sum()) for n in pool if n in new)
        if not owed:
            continue
        cand = [(float(v), n, int(i)) for n in pool if n in out
                for i, v in zip(torch.nonzero(masks[n].bool().reshape(-1)).reshape(-1).tolist(),
                                _clean(scores[n])[masks[n].bool().reshape(-1)].tolist(), strict=True)]
        cand.sort(key=lambda t: (t[0], t[1], t[2]))  # lowest score first; ties by name and position
        for _, n, i in cand[:64 + 8 * fixed.total_added]:
            if not owed:
                break
            out[n].view(-1)[i] = False
            if keeps is not None and not keeps(n, out):
                out[n].view(-1)[i] = True
                continue
            trial = prog.evaluate(_Patterns(model, out))
            if trial.connected and trial.outputs_reached >= goal:
                dropped[n] = dropped.get(n, 0) + 1
                owed -= 1
            else:
                out[n].view(-1)[i] = True
    return Repair(out, fixed.added, prog.evaluate(_Patterns(model, out)), dropped)


# ---------------------------------------------------------------------------- patterns
class _Patterns:
    """0/1 kept pattern (float64) of every weight, by parameter name: the mask where one is
    given (optionally relaxed to ``eps`` at unkept entries, optionally a leaf that collects
    gradients), else the weight's non-zero entries."""

    def __init__(self, model: nn.Module, masks: dict[str, Tensor] | None, eps: float | None = None,
                 grad: bool = False) -> None:
        self.params = plain_named_parameters(model)
        self.masks = masks or {}
        self.eps = eps
        self.grad = grad
        self.cache: dict[str, Tensor] = {}
        self.leaves: dict[str, Tensor] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.params

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.cache:
            if name in self.masks:
                p = self.masks[name].to(_F64)
                if self.eps is not None:
                    p = p + self.eps * (1 - p)
                if self.grad:
                    p.requires_grad_(True)
                    self.leaves[name] = p
            else:
                p = (self.params[name].detach() != 0).to(_F64)
            self.cache[name] = p
        return self.cache[name]


class _Bin(torch.autograd.Function):
    """0/1 marks forward, 0/1 "some path onwards" backward (exact boolean semantics)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        return (g > 0).to(g.dtype)


def _clean(s: Tensor) -> Tensor:
    s = s.detach().to(_F64).reshape(-1)
    return torch.nan_to_num(s, nan=-math.inf, posinf=math.inf, neginf=-math.inf)


# ---------------------------------------------------------------------------- structures
def _tmap(fn: Callable[[Tensor], Any], r: Any) -> Any:
    """Map the tensors of a (nested tuple/list/dict) value; everything else becomes None."""
    if isinstance(r, Tensor):
        return fn(r)
    if isinstance(r, torch.Size):
        return None
    if isinstance(r, tuple | list):
        return tuple(_tmap(fn, x) for x in r)
    if isinstance(r, dict):
        return {k: _tmap(fn, v) for k, v in r.items()}
    return None


def _leaves(t: Any) -> Iterator[Tensor]:
    if isinstance(t, Tensor):
        yield t
    elif isinstance(t, tuple | list):
        for x in t:
            yield from _leaves(x)
    elif isinstance(t, dict):
        for x in t.values():
            yield from _leaves(x)


def _zip2(fn: Callable[[Tensor, Tensor | None], Any], r: Any, t: Any) -> Any:
    """Walk a real value and its marks together, calling ``fn(real, marks)`` on tensors."""
    if isinstance(r, Tensor):
        return fn(r, t)
    if isinstance(r, torch.Size) or t is None:
        return r
    if isinstance(r, tuple | list):
        out = [_zip2(fn, a, b) for a, b in zip(r, t, strict=False)]
        return type(r)(out) if isinstance(r, list) else tuple(out)
    if isinstance(r, dict):
        return {k: _zip2(fn, v, t.get(k)) for k, v in r.items()}
    return r


def _zeros(r: Any) -> Any:
    return _tmap(lambda x: torch.zeros(x.shape, dtype=_F64), r)


def _total(ts: Any) -> Tensor:
    total = torch.zeros((), dtype=_F64)
    for x in _leaves(ts):
        total = total + x.sum()
    return total


def _spread(r: Any, ts: Any) -> Any:
    """Conservative: every element of ``r`` is reached if any mark in ``ts`` is."""
    total = _total(ts)
    return _tmap(lambda x: total.expand(x.shape), r)


def _shapes_match(r: Any, t: Any) -> bool:
    rs, ts = list(_leaves(_tmap(lambda x: x, r))), list(_leaves(t))
    return len(rs) == len(ts) and all(a.shape == b.shape for a, b in zip(rs, ts, strict=True))


def _unit_counts(t: Tensor, dim: int) -> tuple[int, int]:
    """(reached, total) units along ``dim`` of a marks tensor."""
    if t.dim() == 0:
        return int(t > 0), 1
    dim = dim % t.dim()
    u = t.detach().transpose(0, dim).reshape(t.shape[dim], -1).sum(1)
    return int((u > 0).sum()), u.numel()


def output_units(t: Tensor) -> Tensor:
    """Marks per output unit: the class dimension (dim 1 of (B, C) and (B, C, H, W)
    outputs, the last dimension otherwise), summed over every other dimension."""
    if t.dim() <= 1:
        return t.sum().reshape(1)
    dim = 1 if t.dim() in (2, 4, 5) else t.dim() - 1
    return t.transpose(0, dim).reshape(t.shape[dim], -1).sum(1)


# ---------------------------------------------------------------------------- layer rules
def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _chain(mod: TensorizedLayer, q: str, x: Tensor, pats: _Patterns) -> Tensor:
    """Marks through a tensorized layer: its chain of contractions on the cores' kept
    patterns (no bias, no nonlinearity between steps: BN and ReLU act per rank channel)."""
    cores = [pats[f"{q}.cores.{i}"] for i in range(len(mod.cores))]
    spec = mod._spec
    if isinstance(mod, ChainConv2d):
        k = ring_dense(cores[: mod.n_in], cores[mod.n_in + 1:], cores[mod.n_in])
        k = k.reshape(mod.out_features, mod.in_features, *mod.kernel_size)
        return F.conv2d(x, k, None, mod.stride, mod.padding, mod.dilation)
    flat = x.reshape(-1, x.shape[-1])
    if isinstance(mod, TTLinear):
        y = tt_matrix_forward(flat, cores, spec["in_modes"])
    elif isinstance(mod, TRLinear):
        y = ring_output(ring_input(flat, cores[: mod.n_in], spec["in_modes"]), cores[mod.n_in:])
    else:
        raise _NoRule(type(mod).__name__)
    return y.reshape(*x.shape[:-1], -1)


def _embedding(mod: TTEmbedding, q: str, x: Tensor, pats: _Patterns) -> Tensor:
    """Marks through a TT-embedding, followed like the ``nn.Embedding`` it replaces: a
    token position passes its marks on to feature ``j`` when some id that can be looked up
    (``[0, num_embeddings)`` without ``padding_idx``; never the padded vocab) has a kept
    path through the cores to ``j``."""
    table = tt_matrix_dense([pats[f"{q}.cores.{i}"] for i in range(len(mod.cores))])
    rows = table[:, : mod.num_embeddings]
    if mod.padding_idx is not None:
        keep = torch.ones(mod.num_embeddings, dtype=rows.dtype)
        keep[mod.padding_idx] = 0
        rows = rows * keep
    return x[..., None] * rows.sum(1)


def _dense(mod: nn.Module, q: str, x: Tensor, pats: _Patterns) -> Tensor:
    """Marks through a Linear/Conv/ConvTranspose: its own forward on the kept pattern
    (groups, stride, padding modes and all), without bias."""
    params = {"weight": pats[f"{q}.weight"]}
    if getattr(mod, "bias", None) is not None:
        params["bias"] = torch.zeros(mod.bias.shape, dtype=_F64)
    return functional_call(mod, params, (x,))


def _project(mod: nn.Module, q: str, x: Tensor, pats: _Patterns) -> Tensor:
    if isinstance(mod, TensorizedLayer):
        return _chain(mod, q, x, pats)
    if isinstance(mod, nn.Linear | nn.modules.conv._ConvNd):
        return _dense(mod, q, x, pats)
    raise _NoRule(type(mod).__name__)


def _recurrent(mod: nn.Module, q: str, targs: tuple, args: tuple, kwargs: dict, pats: _Patterns,
               hard: bool) -> Any:
    """Marks through an LSTM/GRU/RNN: hidden unit ``k`` at step ``t`` is reached from the
    features its gates read (kept input-to-hidden entries, summed over the gates), from the
    hidden units its kept hidden-to-hidden entries read at ``t - 1`` and, for LSTM/GRU,
    from its own cell/state at ``t - 1``."""
    if isinstance(mod, TensorizedLSTM):
        gates, carry, dirs = 4, True, 2 if mod.bidirectional else 1
        layers, hidden, batch_first = mod.num_layers, mod.hidden_size, mod.batch_first
        names = mod._suffixes()
    else:
        if getattr(mod, "proj_size", 0) or not isinstance(args[0], Tensor):
            raise _NoRule("projected or packed RNN")
        gates = {"LSTM": 4, "GRU": 3}.get(mod.mode, 1)
        carry = mod.mode in ("LSTM", "GRU")
        dirs = 2 if mod.bidirectional else 1
        layers, hidden, batch_first = mod.num_layers, mod.hidden_size, mod.batch_first
        names = [f"l{k}{d}" for k in range(layers) for d in (["", "_reverse"][:dirs])]
    x = targs[0]
    if x.dim() == 2:
        raise _NoRule("unbatched RNN input")
    x = x if batch_first else x.transpose(0, 1)
    b, steps = x.shape[0], x.shape[1]
    h0 = _arg(targs, {}, 1, "hx")
    if isinstance(h0, tuple):
        h0 = h0[0] + h0[1] if len(h0) > 1 and h0[1] is not None else h0[0]
    layer_in, hn = x, []
    for idx, name in enumerate(names):
        d = idx % dirs
        if isinstance(mod, TensorizedLSTM):
            gx = _chain(mod.ih[idx], f"{q}.ih.{idx}", layer_in, pats)
        else:
            gx = layer_in @ pats[f"{q}.weight_ih_{name}"].T
        gx = gx.reshape(b, steps, gates, hidden).sum(2)
        if isinstance(mod, TensorizedLSTM) and mod.hh_tensorized:  # the chain's pattern, (4H, H)
            w_hh = _chain(mod.hh[idx], f"{q}.hh.{idx}", torch.eye(hidden, dtype=_F64), pats).T
        else:
            w_hh = pats[f"{q}.weight_hh_{name}"]
        a_hh = w_hh.reshape(gates, hidden, hidden).sum(0)
        h = h0[idx] if isinstance(h0, Tensor) else torch.zeros(b, hidden, dtype=_F64)
        outs: list[Tensor] = [h] * steps
        for t in (range(steps) if d == 0 else range(steps - 1, -1, -1)):
            h = gx[:, t] + h @ a_hh.T + (h if carry else 0)
            if hard:
                h = _Bin.apply(h)
            outs[t] = h
        hn.append(h)
        if d == 0:
            fwd = torch.stack(outs, dim=1)
        if d == dirs - 1:
            layer_in = fwd if dirs == 1 else torch.cat([fwd, torch.stack(outs, dim=1)], dim=2)
    out = layer_in if batch_first else layer_in.transpose(0, 1)
    hstack = torch.stack(hn)
    if isinstance(mod, TensorizedLSTM) or mod.mode == "LSTM":
        return out, (hstack, hstack)
    return out, hstack


def _attention(mod: nn.Module, q: str, targs: tuple, tkw: dict, out_r: Any, pats: _Patterns) -> Any:
    """Marks through multi-head attention: query ``i``'s output in head ``h`` is reached
    from query ``i``'s head-``h`` projection, every key's and every value's (kept rows of
    the packed projection), then mixed by the output projection."""
    tq, tk, tv = (_arg(targs, tkw, i, n) for i, n in enumerate(("query", "key", "value")))
    e, nh = mod.embed_dim, mod.num_heads
    if not mod.batch_first:
        tq, tk, tv = (t.transpose(0, 1) for t in (tq, tk, tv))
    if isinstance(mod, TensorizedMHA):
        proj = [_chain(mod.in_proj, f"{q}.in_proj", t, pats)[..., i * e:(i + 1) * e]
                for i, t in enumerate((tq, tk, tv))]
    elif mod.in_proj_weight is not None:
        w = pats[f"{q}.in_proj_weight"]
        proj = [t @ w[i * e:(i + 1) * e].T for i, t in enumerate((tq, tk, tv))]
    else:
        proj = [t @ pats[f"{q}.{n}_proj_weight"].T for t, n in zip((tq, tk, tv), "qkv", strict=True)]
    b, lq, lk = tq.shape[0], tq.shape[1], tk.shape[1]
    hq = proj[0].reshape(b, lq, nh, e // nh).sum(-1)  # (B, Lq, heads)
    hk = proj[1].reshape(b, lk, nh, e // nh).sum((1, 3))  # (B, heads)
    hv = proj[2].reshape(b, lk, nh, e // nh).sum(1)  # (B, heads, dh)
    mixed = (hq[..., None] + hk[:, None, :, None] + hv[:, None]).reshape(b, lq, e)
    out = _project(mod.out_proj, f"{q}.out_proj", mixed, pats)
    if not mod.batch_first:
        out = out.transpose(0, 1)
    weights = out_r[1] if isinstance(out_r, tuple) and len(out_r) > 1 else None
    if isinstance(weights, Tensor):  # the averaged or per-head weights: from queries and keys
        weights = (hq.sum() + hk.sum()).expand(weights.shape)
    return out, weights


class _NoRule(Exception):
    """No structural rule for this operation: it is treated conservatively."""


def _module_marks(mod: nn.Module, q: str, targs: tuple, tkw: dict, args: tuple, kwargs: dict,
                  out: Any, pats: _Patterns, hard: bool) -> Any:
    """Marks of a leaf module's output from the marks of its inputs."""
    x = targs[0] if targs else None
    if isinstance(mod, TTEmbedding):
        return _embedding(mod, q, x, pats)
    if isinstance(mod, TensorizedLayer | nn.Linear | nn.modules.conv._ConvNd) and \
            not isinstance(mod, nn.modules.conv._ConvTransposeNd):
        return _project(mod, q, x, pats)
    if isinstance(mod, nn.RNNBase | TensorizedLSTM):
        return _recurrent(mod, q, targs, args, kwargs, pats, hard)
    if isinstance(mod, nn.MultiheadAttention | TensorizedMHA):
        return _attention(mod, q, targs, tkw, out, pats)
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):
        return _dense(mod, q, x, pats)
    if isinstance(mod, nn.Softmax | nn.LogSoftmax | nn.Softmin) and mod.dim is not None:
        return x.sum(mod.dim, keepdim=True).expand(x.shape)
    if isinstance(mod, nn.LayerNorm | nn.RMSNorm):
        dims = tuple(range(-len(mod.normalized_shape), 0))
        return x.sum(dims, keepdim=True).expand(x.shape)
    if isinstance(mod, nn.GroupNorm):
        g = x.reshape(x.shape[0], mod.num_groups, -1)
        return g.sum(-1, keepdim=True).expand(g.shape).reshape(x.shape)
    if isinstance(mod, nn.modules.instancenorm._InstanceNorm):
        dims = tuple(range(2, x.dim())) if x.dim() > 2 else (-1,)
        return x.sum(dims, keepdim=True).expand(x.shape)
    if isinstance(mod, nn.modules.batchnorm._NormBase | nn.Identity | nn.modules.dropout._DropoutNd):
        return x
    if type(mod).__module__ == "torch.nn.modules.activation" and not isinstance(
            mod, nn.Softmax | nn.LogSoftmax | nn.Softmin | nn.Softmax2d | nn.GLU | nn.MultiheadAttention):
        return x
    if isinstance(mod, nn.modules.pooling._MaxPoolNd):
        if _single(mod.dilation) == 1:
            avg = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[x.dim() - 2]
            return avg(x, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode)
        return mod(x)
    if isinstance(mod, nn.modules.pooling._AdaptiveMaxPoolNd):
        avg = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
        return avg[x.dim() - 2](x, mod.output_size)
    if isinstance(mod, nn.modules.padding._ConstantPadNd):
        return F.pad(x, mod.padding)
    if isinstance(mod, nn.modules.pooling._AvgPoolNd | nn.modules.pooling._AdaptiveAvgPoolNd
                  | nn.Flatten | nn.Unflatten | nn.Upsample | nn.PixelShuffle | nn.PixelUnshuffle
                  | nn.ChannelShuffle | nn.modules.padding._ReflectionPadNd
                  | nn.modules.padding._ReplicationPadNd | nn.modules.padding._CircularPadNd):
        return mod(x)
    if isinstance(mod, nn.Embedding):
        return _tmap(lambda r: x[..., None].expand(r.shape), out)
    raise _NoRule(type(mod).__name__)


def _single(v: Any) -> int:
    return max(v) if isinstance(v, tuple | list) else int(v)


# ---------------------------------------------------------------------------- programs
@dataclass
class _Record:
    """One layer call as a marks pass saw it."""

    name: str
    node: Any
    inputs: tuple[int, int]  # (reached, total) units
    outputs: tuple[int, int]


class _Program:
    """The model's data flow, run once on a real batch-1 input so that every node's shape
    (and every non-tensor value: sizes, flags) is known; :meth:`run` then propagates marks."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.failed: str | None = None
        self.note: str | None = None
        self.traced = False
        self.gm: fx.GraphModule | None = None
        self.real: dict[Any, Any] = {}
        self.calls: list[tuple[str, nn.Module, tuple, dict, Any]] = []  # fallback: layer calls
        self.output: Any = None
        self.reached_units = torch.zeros(0, dtype=torch.bool)
        self.inputs: Tensor | None = None  # sample batch for the activity of ReLUs
        self.relus: set[Any] = set()  # ReLU nodes of the graph

    def fires(self, masks: dict[str, Tensor]) -> dict[Any, Tensor]:
        """Per ReLU node, the elements that may pass the input on: positive for at least
        one sample input of the pruned model (kept entries only, BatchNorm on batch
        statistics as in training), or not depending on the input yet (a constant, which an
        added entry may still lift). A unit that varies with the input but never rises
        above zero passes nothing on."""
        if not self.traced or not self.relus or self.inputs is None:
            return {}
        runner = _EnvRunner(self.gm)
        own = dict(runner.named_parameters()) | dict(runner.named_buffers())
        state: dict[str, Tensor] = {}
        for n, p in self.model.named_parameters():
            if f"gm.{n}" in own:
                state[f"gm.{n}"] = p.detach() * masks[n].to(p.dtype) if n in masks else p.detach()
        for n, b in self.model.named_buffers():
            if f"gm.{n}" in own:
                state[f"gm.{n}"] = b.detach().clone()  # running statistics stay untouched
        with torch.no_grad(), eval_mode(self.model, batch_stats=True):
            env = functional_call(runner, state, (self.inputs,))
        out = {}
        for node in self.relus:
            v, r = env.get(node), self.real.get(node)
            pre = env.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
            if isinstance(v, Tensor) and isinstance(r, Tensor) and isinstance(pre, Tensor) and r.dim() \
                    and r.shape[0] == 1 and v.shape[1:] == r.shape[1:] and pre.shape == v.shape:
                varies = (pre != pre[:1]).any(0, keepdim=True)
                out[node] = ((v > 0).any(0, keepdim=True) | ~varies).to(_F64)
        return out

    # -- one marks pass -----------------------------------------------------------------
    def run(self, pats: _Patterns, hard: bool) -> tuple[Tensor, list[_Record], dict[str, Any]]:
        """(output marks, layer calls in order, break info)."""
        if self.traced:
            return self._run_graph(pats, hard)
        return self._run_order(pats, hard)

    def evaluate(self, pats: _Patterns) -> Reachability:
        with torch.no_grad():
            out, records, info = self.run(pats, hard=True)
        units = output_units(out) > 0
        self.reached_units = units
        dead = [r.name for r in records if r.inputs[0] > 0 and r.outputs[0] == 0]
        reach = Reachability(outputs=units.numel(), outputs_reached=int(units.sum()),
                             traced=self.traced, note=self.note, cut_layers=sorted(set(dead)),
                             unknown_ops=sorted(info.get("unknown", set())),
                             reached=torch.nonzero(units).reshape(-1).tolist())
        if not reach.connected:
            reach.breaks, reach.reached_units, reach.break_kind = info["breaks"]
        return reach

    def _finish(self, t: Any, hard: bool) -> Any:
        if hard:
            return _tmap(_Bin.apply, t)
        return _tmap(lambda x: x / x.detach().max() if x.numel() and x.detach().max() > 1e100 else x, t)

    # -- along the fx graph -------------------------------------------------------------
    def _run_graph(self, pats: _Patterns, hard: bool) -> tuple[Tensor, list[_Record], dict[str, Any]]:
        marks: dict[Any, Any] = {}
        records: list[_Record] = []
        layer_nodes: dict[Any, str] = {}
        unknown: set[str] = set()
        fires = self.fires(pats.masks)
        first = True
        out = None
        for node in self.gm.graph.nodes:
            r = self.real.get(node)
            if node.op == "placeholder":
                marks[node] = _tmap(lambda x: torch.ones(x.shape, dtype=_F64), r) if first else _zeros(r)
                first = False
                continue
            if node.op == "get_attr":
                marks[node] = _zeros(r)
                continue
            if node.op == "output":
                out = next(iter(_leaves(fx.node.map_arg(node.args[0], lambda n: marks[n]))), None)
                out_node = node
                break
            if next(iter(_leaves(_tmap(lambda x: x, r))), None) is None:
                marks[node] = None  # sizes, flags, ...: no marks
                continue
            try:
                t = self._node_marks(node, r, marks, pats, hard)
                if not _shapes_match(r, t):
                    raise _NoRule(f"{_op_name(node)} (shape)")
            except _NoRule as e:
                unknown.add(str(e))
                t = _spread(r, [marks[n] for n in node.all_input_nodes])
            except Exception as e:  # noqa: BLE001 -- a rule that does not fit: stay conservative
                unknown.add(f"{_op_name(node)} ({type(e).__name__})")
                t = _spread(r, [marks[n] for n in node.all_input_nodes])
            if node in fires:
                t = t * fires[node]
            t = self._finish(t, hard)
            marks[node] = t
            if node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), _LAYERS):
                mod = self.gm.get_submodule(node.target)
                dim = 1 if isinstance(mod, nn.modules.conv._ConvNd | ChainConv2d) else -1
                tin = next(iter(_leaves([marks[n] for n in node.args if isinstance(n, fx.Node)])),
                           None)
                tout = next(iter(_leaves(t)))
                if tin is not None:
                    records.append(_Record(node.target, node, _unit_counts(tin, dim),
                                           _unit_counts(tout, dim)))
                    layer_nodes[node] = node.target
        if out is None:
            raise _NoRule("no tensor output")
        info: dict[str, Any] = {"unknown": unknown}
        if hard and not bool((out > 0).any()):
            info["breaks"] = self._graph_break(marks, out_node, layer_nodes, records)
        return out, records, info

    def _node_marks(self, node: fx.Node, r: Any, marks: dict, pats: _Patterns, hard: bool) -> Any:
        args_r = fx.node.map_arg(node.args, lambda n: self.real[n])
        kwargs_r = fx.node.map_arg(node.kwargs, lambda n: self.real[n])
        targs = fx.node.map_arg(node.args, lambda n: marks[n])
        tkw = fx.node.map_arg(node.kwargs, lambda n: marks[n])
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            return _module_marks(mod, node.target, tuple(targs), dict(tkw), tuple(args_r),
                                 dict(kwargs_r), r, pats, hard)
        return _function_marks(_op_name(node), node, r, args_r, kwargs_r, targs, tkw, pats, self.real)

    def _graph_break(self, marks: dict, out_node: fx.Node, layer_nodes: dict, records: list[_Record]
                     ) -> tuple[tuple[str, str] | None, int, str]:
        """Where the last path dies: the last node that reads marks but writes none (a
        layer, a ReLU that never fires, or another operation), the nearest layer upstream of
        it that still reaches something, and the units that reach it."""

        def reached(n: Any) -> bool:
            return isinstance(n, fx.Node) and any(bool((x > 0).any()) for x in _leaves(marks.get(n)))

        deaths = [n for n in self.gm.graph.nodes if n in marks and marks[n] is not None
                  and n.op not in ("placeholder", "get_attr")
                  and not reached(n) and any(reached(a) for a in n.all_input_nodes)]
        if not deaths:
            return None, 0, "op"
        dead = deaths[-1]
        kind = "layer" if dead in layer_nodes else "activation" if dead in self.relus else "op"
        rec = next((r for r in records if r.node is dead), None)
        if rec is not None:
            units = rec.inputs[0]
        else:
            tin = next(iter(_leaves([marks.get(a) for a in dead.all_input_nodes if reached(a)])))
            units = _unit_counts(tin, 1 if tin.dim() == 4 else -1)[0]
        seen, queue = set(), deque(a for a in dead.all_input_nodes if reached(a))
        while queue:
            n = queue.popleft()
            if n in seen:
                continue
            seen.add(n)
            if n in layer_nodes:
                return (layer_nodes[n], layer_nodes.get(dead, _op_name(dead))), units, kind
            if n.op == "placeholder":
                continue
            queue.extend(a for a in n.all_input_nodes if reached(a))
        return ("the input", layer_nodes.get(dead, _op_name(dead))), units, kind

    # -- in the order the layers run (untraceable models) --------------------------------
    def _run_order(self, pats: _Patterns, hard: bool) -> tuple[Tensor, list[_Record], dict[str, Any]]:
        prev = torch.ones(self.input_shape, dtype=_F64)
        records: list[_Record] = []
        unknown: set[str] = set()
        last_live, breaks = "the input", None
        for q, mod, args, kwargs, out in self.calls:
            present = functools.partial(_present, prev)
            targs = _zip2(present, args, _tmap(lambda x: x, args))
            tkw = _zip2(present, kwargs, _tmap(lambda x: x, kwargs))
            try:
                t = _module_marks(mod, q, tuple(targs), dict(tkw), args, kwargs, out, pats, hard)
                if not _shapes_match(out, t):
                    raise _NoRule(f"{q} (shape)")
            except Exception as e:  # noqa: BLE001 -- conservative, as on the graph
                unknown.add(f"{q} ({type(e).__name__})")
                t = _spread(out, targs)
            t = self._finish(t, hard)
            dim = 1 if isinstance(mod, nn.modules.conv._ConvNd | ChainConv2d) else -1
            tin = next(iter(_leaves(targs)))
            tout = next(iter(_leaves(t)))
            rec = _Record(q, None, _unit_counts(tin, dim), _unit_counts(tout, dim))
            records.append(rec)
            if rec.inputs[0] and not rec.outputs[0]:
                breaks = ((last_live, q), rec.inputs[0], "layer")
            elif rec.outputs[0]:
                last_live = q
            prev = tout
        out = _adapt(prev, self.output)
        info: dict[str, Any] = {"unknown": unknown, "breaks": breaks or (None, 0, "layer")}
        return out, records, info


def _present(prev: Tensor, r: Tensor, _marks: Any) -> Tensor:
    return _adapt(prev, r)


def _adapt(prev: Tensor, r: Tensor) -> Tensor:
    """The previous layer's output marks presented as the next layer's input ``r``: as they
    are when the shapes agree, else conservatively everything if anything is reached."""
    if prev.shape == r.shape:
        return prev
    return prev.sum().expand(r.shape)


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_module":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def _struct(node: Any, real: dict, pats: _Patterns) -> Tensor | None:
    """Kept pattern of an operand that does not depend on the input (a weight read with
    ``get_attr``, possibly reshaped), or None (treat every entry as non-zero)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr" and node.target in pats:
        return pats[node.target]
    if node.op in ("call_method", "call_function") and _op_name(node) in (
            "t", "transpose", "permute", "reshape", "view", "contiguous", "flatten") and node.args:
        inner = _struct(node.args[0], real, pats)
        if inner is not None:
            rest = fx.node.map_arg(node.args[1:], lambda n: real[n])
            fn = getattr(torch.Tensor, "reshape" if _op_name(node) == "view" else _op_name(node))
            return fn(inner, *rest, **fx.node.map_arg(node.kwargs, lambda n: real[n]))
    return None


def _function_marks(op: str, node: fx.Node, r: Any, args_r: Any, kwargs_r: Any, targs: Any, tkw: Any,
                    pats: _Patterns, real: dict) -> Any:
    """Marks of a call_function / call_method output (see the module docstring)."""
    base = op[:-1] if op.endswith("_") and not op.endswith("__") and op[:-1] in _SAME else op
    tensors = [t for t in _leaves([targs, tkw])]
    if base in _CONST:
        return _zeros(r)
    if base in _IDENTITY:
        return targs[0]
    if base in _ELEMENTWISE:
        total = torch.zeros(r.shape, dtype=_F64)
        for t in tensors:
            total = total + torch.broadcast_to(t, r.shape)
        return total
    if base in _SAME:
        def mixed(rv: Tensor, tv: Tensor | None) -> Any:
            return tv if (rv.is_floating_point() or rv.is_complex()) and tv is not None else rv
        a = _zip2(mixed, args_r, targs)
        kw = {k: v for k, v in _zip2(mixed, kwargs_r, tkw).items() if k != "dtype"}
        name = "reshape" if base == "view" else base
        if node.op == "call_method":
            fn = getattr(torch.Tensor, name)
        elif base == "getattr":
            fn = getattr
        else:
            fn = node.target if name == base else getattr(torch, name)
        out = fn(*a, **kw)
        extra = [t for rv, t in zip(_leaves(_tmap(lambda x: x, args_r)), _leaves(targs), strict=False)
                 if not (rv.is_floating_point() or rv.is_complex())]
        if extra:  # integer indices computed from the input: their marks spread too
            s = _total(extra)
            out = _tmap(lambda x: x + s, out)
        return out
    if base in ("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices"):
        x = targs[0]
        k = _arg(args_r, kwargs_r, 1, "kernel_size")
        stride = _arg(args_r, kwargs_r, 2, "stride") or k
        pad = _arg(args_r, kwargs_r, 3, "padding", 0)
        dil = _arg(args_r, kwargs_r, 4, "dilation", 1)
        ceil = _arg(args_r, kwargs_r, 5, "ceil_mode", False)
        if _single(dil) != 1:
            raise _NoRule(base)
        avg = {3: F.avg_pool1d, 4: F.avg_pool2d, 5: F.avg_pool3d}[x.dim()]
        y = avg(x, k, stride, pad, ceil)
        return _tmap(lambda _: y, r) if isinstance(r, tuple) else y
    if base in ("adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d"):
        x = targs[0]
        avg = {3: F.adaptive_avg_pool1d, 4: F.adaptive_avg_pool2d, 5: F.adaptive_avg_pool3d}[x.dim()]
        y = avg(x, _arg(args_r, kwargs_r, 1, "output_size"))
        return _tmap(lambda _: y, r) if isinstance(r, tuple) else y
    if base == "pad":
        mode = _arg(args_r, kwargs_r, 2, "mode", "constant")
        return F.pad(targs[0], _arg(args_r, kwargs_r, 1, "pad"), mode)
    if base in _REDUCE and not (len(args_r) > 1 and isinstance(args_r[1], Tensor)):
        x = targs[0]
        dim = _arg(args_r, kwargs_r, 1, "dim")
        keep = bool(_arg(args_r, kwargs_r, 2, "keepdim", False))
        y = x.sum() if dim is None else x.sum(dim, keepdim=keep)
        return _tmap(lambda rv: y.reshape(rv.shape), r)
    if base in _REDUCE:
        return _function_marks("add", node, r, args_r, kwargs_r, targs, tkw, pats, real)
    if base in _SPREAD:
        x = targs[0]
        default = 1 if base == "normalize" else None
        dim = _arg(args_r, kwargs_r, 2 if base == "normalize" else 1, "dim", default)
        if dim is None:
            raise _NoRule(base)
        y = x.sum(dim, keepdim=True).expand(x.shape)
        return _tmap(lambda _: y, r) if isinstance(r, tuple) else y
    if base in ("layer_norm", "rms_norm"):
        x = targs[0]
        dims = tuple(range(-len(tuple(_arg(args_r, kwargs_r, 1, "normalized_shape"))), 0))
        return x.sum(dims, keepdim=True).expand(x.shape)
    if base == "group_norm":
        x = targs[0]
        g = x.reshape(x.shape[0], int(_arg(args_r, kwargs_r, 1, "num_groups")), -1)
        return g.sum(-1, keepdim=True).expand(g.shape).reshape(x.shape)
    if base in ("matmul", "mm", "bmm", "__matmul__"):
        a, b = node.args[0], node.args[1]
        sa = _struct(a, real, pats)
        sb = _struct(b, real, pats)
        ra, rb = args_r[0], args_r[1]
        sa = sa if sa is not None else torch.ones(ra.shape, dtype=_F64)
        sb = sb if sb is not None else torch.ones(rb.shape, dtype=_F64)
        return torch.matmul(targs[0], sb) + torch.matmul(sa, targs[1])
    if base == "linear":
        sw = _struct(_arg(node.args, node.kwargs, 1, "weight"), real, pats)
        w = _arg(args_r, kwargs_r, 1, "weight")
        sw = sw if sw is not None else torch.ones(w.shape, dtype=_F64)
        out = F.linear(targs[0], sw) + F.linear(torch.ones(args_r[0].shape, dtype=_F64),
                                                _arg(targs, tkw, 1, "weight"))
        bias = _arg(targs, tkw, 2, "bias")
        return out + bias if isinstance(bias, Tensor) else out
    if base in ("conv1d", "conv2d", "conv3d"):
        sw = _struct(_arg(node.args, node.kwargs, 1, "weight"), real, pats)
        w = _arg(args_r, kwargs_r, 1, "weight")
        sw = sw if sw is not None else torch.ones(w.shape, dtype=_F64)
        rest = [_arg(args_r, kwargs_r, i, n, d) for i, n, d in
                ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1))]
        conv = getattr(F, base)
        return conv(targs[0], sw, None, *rest) + conv(torch.ones(args_r[0].shape, dtype=_F64),
                                                      _arg(targs, tkw, 1, "weight"), None, *rest)
    if base == "einsum":
        eq = args_r[0]
        packed = len(args_r) == 2 and isinstance(args_r[1], list | tuple)
        ops_r = list(args_r[1]) if packed else list(args_r[1:])
        ops_t = list(targs[1]) if packed else list(targs[1:])
        ones = [torch.ones(o.shape, dtype=_F64) for o in ops_r]
        return sum(torch.einsum(eq, *[ops_t[j] if j == i else ones[j] for j in range(len(ones))])
                   for i in range(len(ones)))
    if base == "scaled_dot_product_attention":
        tq, tk, tv = targs[0], targs[1], targs[2]
        y = tq.sum(-1, keepdim=True) + tk.sum((-2, -1), keepdim=True) + tv.sum(-2, keepdim=True)
        return y.expand(r.shape)
    if base == "embedding":
        idx = targs[0]
        return idx[..., None].expand(r.shape)
    raise _NoRule(op)


# ---------------------------------------------------------------------------- building
class _EnvRunner(nn.Module):
    """Runs a GraphModule and returns every node's value (for ``functional_call``)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, x: Tensor) -> dict[Any, Any]:
        interp = fx.Interpreter(self.gm, garbage_collect_values=False)
        interp.run(x)
        return interp.env


def _is_relu(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU | nn.ReLU6)
    return node.op in ("call_function", "call_method") and _op_name(node) in ("relu", "relu_", "relu6")


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps every layer the rules know (tensorized ones too) whole."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LAYERS) or super().is_leaf_module(m, qualname)


def _optional_inputs(model: nn.Module) -> dict[str, Any]:
    """The forward's parameters after its first that have a default, with it (a Hugging
    Face-style ``forward(input_ids, attention_mask=None)``): the check feeds the first input
    only, so the graph is traced for the defaults (``concrete_args``). Traced as free
    inputs, ``if attention_mask is None`` would take the branch a given mask takes, and
    the graph would fail on the one input it is run with."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no introspectable signature: trace every input as given
        return {}
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return {p.name: p.default for p in named[1:] if p.default is not p.empty}


def _program(model: nn.Module, input_shape: tuple[int, ...], inputs: Tensor | None = None) -> _Program:
    prog = _Program(model)
    prog.input_shape = (1, *tuple(int(s) for s in input_shape))
    p = next(iter(model.parameters()), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)
    if is_token_model(model):  # token ids in [0, vocab), as the model's embedding expects
        x = example_input(model, prog.input_shape[1:], 1, "rand", gen)
        sample = example_input(model, prog.input_shape[1:], _SAMPLES, "rand", gen)
    else:
        x = torch.randn(prog.input_shape, generator=gen, dtype=dtype)
        sample = torch.randn((_SAMPLES, *prog.input_shape[1:]), generator=gen, dtype=dtype)
    prog.inputs = inputs if inputs is not None and len(inputs) > 1 else sample
    try:
        tracer = _Tracer()
        graph = tracer.trace(model, concrete_args=_optional_inputs(model) or None)
        gm = fx.GraphModule(tracer.root, graph)
        interp = fx.Interpreter(gm, garbage_collect_values=False)
        with torch.no_grad(), eval_mode(model):
            interp.run(x)
        prog.gm, prog.real, prog.traced = gm, dict(interp.env), True
        prog.relus = {n for n in gm.graph.nodes if _is_relu(n, gm)}
        return prog
    except Exception as e:  # noqa: BLE001 -- any tracing failure: follow the module order
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        prog.note = f"torch.fx could not trace the model's graph ({type(e).__name__}: {first[:120]})"
    _record_calls(prog, model, x)
    return prog


def _record_calls(prog: _Program, model: nn.Module, x: Tensor) -> None:
    """The outermost layer calls of one real forward, in the order they run."""
    names = {m: n for n, m in model.named_modules()}
    depth = [0]
    handles = []

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        depth[0] += 1

    def post(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        depth[0] -= 1
        if depth[0] == 0 and args and isinstance(args[0], Tensor):
            prog.calls.append((names[mod], mod, args, kwargs, out))

    for m in model.modules():
        if isinstance(m, _LAYERS):
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(x)
        prog.output = next(iter(_leaves(_tmap(lambda t: t, out))))
    except Exception as e:  # noqa: BLE001 -- cannot run: say so, do not block
        prog.failed = f"the model could not be run on one sample ({type(e).__name__}: {e})"
    finally:
        for h in handles:
            h.remove()
    if not prog.failed and not prog.calls:
        prog.failed = "no layer call was seen"


def _pick(prog: _Program, model: nn.Module, masks: dict[str, Tensor], target: Tensor,
          scores: dict[str, Tensor], soft: bool) -> tuple[str, int] | None:
    """The best unkept entry to add: one that alone completes a path to a ``target``
    output (hard), or lies on the paths needing the fewest further entries (soft)."""
    pats = _Patterns(model, masks, eps=_EPS if soft else None, grad=True)
    with torch.enable_grad():
        out, _, _ = prog.run(pats, hard=not soft)
        units = output_units(out)
        obj = units[target].sum()
        names = [n for n in masks if n in pats.leaves]
        if not obj.requires_grad or not names:
            return None
        grads = torch.autograd.grad(obj, [pats.leaves[n] for n in names], allow_unused=True)
    cands = []
    for n, g in zip(names, grads, strict=True):
        if g is None:
            continue
        g = g.detach().reshape(-1).to(_F64) * (~masks[n].reshape(-1)).to(_F64)
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0)
        cands.append((n, g))
    if not cands:
        return None
    top = max(float(g.max()) for _, g in cands)
    if not top > 0:
        return None
    floor = 0.5 * top if soft else 0.0
    best: tuple[float, str, int] | None = None
    for n, g in cands:
        ok = torch.nonzero(g > floor if not soft else g >= floor).reshape(-1)
        if ok.numel() == 0:
            continue
        s = scores[n][ok]
        i = int(torch.argmax(s))  # first of the best: ties go by position
        if best is None or float(s[i]) > best[0]:
            best = (float(s[i]), n, int(ok[i]))
    return None if best is None else (best[1], best[2])


__all__ = ["Reachability", "Repair", "check_reachability", "collapse_message", "output_units",
           "reachability", "reconnect_within_budget", "repair_paths"]
