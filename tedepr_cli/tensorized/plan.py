"""The tensorization planner: which layers, which modes, which ranks (DESIGN §2.1, §4).

Compression likes many small modes; speed likes few large ones: chain work relative to
dense is about ``r · (1/m̄ + 1/n̄)`` for two modes per side and grows with every extra
mode. ``--modes auto`` therefore takes the fewest modes (2, then 3, 4) that meet the
parameter budget, choosing by the chain-FLOP model; a fixed ``--modes N`` is honoured as
asked. Ranks come from ``--rank`` (with per-layer ``name=R`` overrides) or from
``--compression X`` (the largest uniform rank whose cores are ``X`` times smaller than the
dense layer). Default layer selection follows the literature (Novikov 2015; Garipov
2016; TR-Nets 2018; Khrulkov et al. 2019): every Linear, Conv2d (groups=1), LSTM input
projection (and hidden-to-hidden matrix with ``lstm_hh="tensorized"``), MultiheadAttention
projection and Embedding (as a TT-embedding: vocab modes
in, dim modes out; the vocab padded up to a product of near-balanced modes), except a
conv with fewer than 4 input channels (the stem on raw pixels) and any layer whose
factorized form would not be smaller than it is.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from torch import nn

from ..errors import BadInput, UsageError, opt
from ..surgery import dry_forward, swap_module
from .embedding import vocab_modes
from .layers import FORMATS, build_layer, to_dense_layer

SUPPORTED = (nn.Linear, nn.Conv2d, nn.LSTM, nn.MultiheadAttention, nn.Embedding)
MAX_AUTO_MODES = 4
MIN_STEM_CHANNELS = 4
# Each chain step costs a fixed overhead besides its FLOPs (a call, a permute): about 2 µs
# at 30 GFLOP/s on one core (DESIGN §4), so `--modes auto` does not trade a few FLOPs for
# an extra step.
STEP_COST_FLOPS = 60_000
LSTM_HH = ("dense", "tensorized")


@dataclass
class PlanOptions:
    """Everything ``tedepr decompose`` can be told about the plan."""

    format: str = "tt"
    # per-layer format: {name pattern: "tt" | "tr"}, the first pattern matching a layer wins over ``format``
    format_overrides: dict[str, str] = field(default_factory=dict)
    rank: int | None = 8
    rank_overrides: dict[str, int] = field(default_factory=dict)
    compression: float | None = None
    modes: str | int = "auto"
    mode_overrides: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    chain: str = "linear"
    # an LSTM's hidden-to-hidden W_hh: "dense" (the TT-LSTM protocol: pruned entry by entry) or
    # "tensorized" (a TT/TR-matrix H -> 4H in the layer's format, like W_ih; spec key "hh")
    lstm_hh: str = "dense"

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise UsageError(f"{opt('format')} must be one of {', '.join(FORMATS)}, got {self.format!r}")
        for k, v in self.format_overrides.items():
            if v not in FORMATS:
                raise UsageError(f"{opt('format')} {k}={v}: the format must be one of {', '.join(FORMATS)}")
        if self.lstm_hh not in LSTM_HH:
            raise UsageError(f"{opt('lstm-hh')} must be one of {', '.join(LSTM_HH)}, got {self.lstm_hh!r}")
        if self.chain not in ("linear", "nonlinear"):
            raise UsageError(f"{opt('chain')} must be linear or nonlinear, got {self.chain!r}")
        if self.compression is not None and self.rank_overrides and self.rank is None:
            pass
        if self.compression is not None and not self.compression > 1:
            raise UsageError(f"{opt('compression')} must be > 1 (dense/compressed), got {self.compression}")
        if self.rank is not None and self.rank <= 0:
            raise UsageError(f"{opt('rank')} must be a positive integer, got {self.rank}")
        for k, v in self.rank_overrides.items():
            if v <= 0:
                raise UsageError(f"{opt('rank')} {k}={v}: ranks must be positive")
        if self.modes != "auto" and (not isinstance(self.modes, int) or not 1 <= self.modes <= 8):
            raise UsageError(f"{opt('modes')} must be 'auto' or an integer 1..8, got {self.modes!r}")


@dataclass
class LayerPlan:
    """One layer's decision, as printed in the plan table and stored in the manifest."""

    name: str
    type: str
    shape: list[int]
    spec: dict[str, Any] | None
    params: int
    dense_params: int
    work_ratio: float | None
    note: str = ""

    @property
    def compression(self) -> float:
        return self.dense_params / self.params if self.params else float("inf")

    def row(self) -> dict[str, Any]:
        s = self.spec or {}
        main = s.get("in_proj") or (s.get("ih") or [s])[0] if s else {}
        return {"name": self.name, "type": self.type, "shape": self.shape,
                "tensorized": self.spec is not None,
                "in_modes": main.get("in_modes"), "out_modes": main.get("out_modes"),
                "ranks": main.get("ranks"), "params": self.params,
                "dense_params": self.dense_params,
                "compression": round(self.compression, 3) if self.spec else 1.0,
                "work_ratio": None if self.work_ratio is None else round(self.work_ratio, 4),
                "note": self.note,
                # an LSTM's chain W_hh (lstm_hh="tensorized"): its own modes and ranks; its cores
                # are counted in this row's params
                **({"hh": {k: s["hh"][0].get(k) for k in ("in_modes", "out_modes", "ranks")}}
                   if s.get("hh") else {})}


# ---------------------------------------------------------------------------- modes
def _partitions(n: int, d: int, lo: int):
    """Non-decreasing ``d``-tuples of factors >= ``lo`` whose product is ``n``."""
    if d == 1:
        if n >= lo:
            yield (n,)
        return
    f = lo
    while f ** d <= n:
        if n % f == 0:
            for rest in _partitions(n // f, d - 1, f):
                yield (f, *rest)
        f += 1


@lru_cache(maxsize=4096)
def factorize(n: int, d: int) -> tuple[int, ...]:
    """``n`` as ``d`` ascending factors, as balanced as possible (least squared log-spread);
    a prime gives ``(1, ..., n)``."""
    if n < 1 or d < 1:
        raise ValueError(f"cannot factor {n} into {d} modes")
    target = math.log(n) / d
    return min(_partitions(n, d, 1), key=lambda c: (sum((math.log(x) - target) ** 2 for x in c), c))


def _gate_modes(n: int, d: int, fold: int) -> list[int]:
    """Modes of ``fold × n`` with the ``fold`` gates/projections folded into the first mode."""
    modes = list(factorize(n, d))
    modes[0] *= fold
    return modes


# ---------------------------------------------------------------------------- ranks
def chain_dims(spec: dict[str, Any]) -> list[int]:
    """The mode size of every core in chain order (TT-matrix: ``n_k · m_k``)."""
    ins, outs = spec["in_modes"], spec["out_modes"]
    if spec["type"] in ("linear", "embedding") and spec["format"] == "tt":
        return [n * m for n, m in zip(ins, outs, strict=True)]
    if spec["type"] == "conv2d":
        return list(ins) + [math.prod(spec["kernel_size"])] + list(outs)
    return list(ins) + list(outs)


def full_rank(dims: list[int]) -> int:
    """The largest rank any bond of a chain over ``dims`` can use (beyond it: exact)."""
    return max(min(math.prod(dims[:k]), math.prod(dims[k:])) for k in range(1, len(dims)))


def ranks_for(dims: list[int], r: int, ring: bool) -> list[int]:
    """Uniform rank ``r`` per bond, clipped where a bond cannot use it (TT ends are 1)."""
    n = len(dims)
    out = [1] * (n + 1)
    r0 = min(r, max(dims)) if ring else 1
    out[0] = out[n] = r0
    for k in range(1, n):
        cap = min(math.prod(dims[:k]), math.prod(dims[k:])) * (r0 if ring else 1)
        out[k] = max(1, min(r, cap))
    return out


def _linear_spec(fmt: str, n: int, m: int, d: int, r: int, chain: str, bias: bool,
                 out_modes: list[int] | None = None) -> dict[str, Any]:
    ins = list(factorize(n, d))
    outs = out_modes if out_modes is not None else list(factorize(m, d))
    spec = {"type": "linear", "format": fmt, "in_modes": ins, "out_modes": outs, "chain": chain,
            "bias": bias}
    spec["ranks"] = ranks_for(chain_dims(spec), r, ring=fmt == "tr")
    return spec


def _spec_params(spec: dict[str, Any]) -> int:
    dims, r = chain_dims(spec), spec["ranks"]
    own = sum(r[k] * dims[k] * r[k + 1] for k in range(len(dims)))
    return own


def _spec_for(kind: str, mod: nn.Module, fmt: str, d: int, r: int, chain: str,
              hw: tuple[int, int] | None, lstm_hh: str = "dense") -> dict[str, Any]:
    if kind == "linear":
        return _linear_spec(fmt, mod.in_features, mod.out_features, d, r, chain, mod.bias is not None)
    if kind == "embedding":  # a TT-matrix with vocab modes in, dim modes out (TT only)
        spec = {"type": "embedding", "format": "tt", "in_modes": vocab_modes(mod.num_embeddings, d),
                "out_modes": list(factorize(mod.embedding_dim, d)), "chain": "linear", "bias": False,
                "num_embeddings": mod.num_embeddings, "padding_idx": mod.padding_idx}
        spec["ranks"] = ranks_for(chain_dims(spec), r, ring=False)
        return spec
    if kind == "conv2d":
        spec = {"type": "conv2d", "format": fmt, "in_modes": list(factorize(mod.in_channels, d)),
                "out_modes": list(factorize(mod.out_channels, d)), "chain": chain,
                "bias": mod.bias is not None, "kernel_size": list(mod.kernel_size),
                "stride": list(mod.stride), "padding": list(mod.padding),
                "dilation": list(mod.dilation), "input_hw": list(hw or (1, 1))}
        spec["ranks"] = ranks_for(chain_dims(spec), r, ring=fmt == "tr")
        return spec
    if kind == "lstm":
        dirs = 2 if mod.bidirectional else 1
        h = mod.hidden_size
        ih = []
        for layer in range(mod.num_layers):
            n = mod.input_size if layer == 0 else h * dirs
            for _ in range(dirs):
                ih.append(_linear_spec(fmt, n, 4 * h, d, r, chain, mod.bias,
                                       out_modes=_gate_modes(h, d, 4)))
        spec = {"type": "lstm", "input_size": mod.input_size, "hidden_size": h,
                "num_layers": mod.num_layers, "bidirectional": mod.bidirectional,
                "batch_first": mod.batch_first, "bias": mod.bias, "ih": ih}
        if lstm_hh == "tensorized":  # H -> 4H, the gates folded into the first output mode as for W_ih;
            # always a linear chain (the recurrence runs on the rebuilt W_hh); b_hh stays the LSTM's
            spec["hh"] = [_linear_spec(fmt, h, 4 * h, d, r, "linear", False, out_modes=_gate_modes(h, d, 4))
                          for _ in ih]
        return spec
    e = mod.embed_dim
    return {"type": "mha", "embed_dim": e, "num_heads": mod.num_heads,
            "batch_first": mod.batch_first, "dropout": float(mod.dropout),
            "in_proj": _linear_spec(fmt, e, 3 * e, d, r, chain, mod.in_proj_bias is not None,
                                    out_modes=_gate_modes(e, d, 3)),
            "out_proj": _linear_spec(fmt, e, e, d, r, chain, mod.out_proj.bias is not None)}


def _sub_specs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    if spec["type"] == "lstm":
        return [*spec["ih"], *spec.get("hh", [])]
    if spec["type"] == "mha":
        return [spec["in_proj"], spec["out_proj"]]
    return [spec]


def sub_specs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The chains a layer spec consists of (an LSTM's input matrices, attention's projections)."""
    return _sub_specs(spec)


def _dense_weight_params(kind: str, mod: nn.Module, lstm_hh: str = "dense") -> int:
    """Entries of the matrices the plan replaces (what the cores stand in for)."""
    if kind == "lstm":
        mats = ("ih", "hh") if lstm_hh == "tensorized" else ("ih",)
        return sum(getattr(mod, f"weight_{w}_l{k}{s}").numel() for k in range(mod.num_layers)
                   for s in (["", "_reverse"] if mod.bidirectional else [""]) for w in mats)
    if kind == "mha":
        return mod.in_proj_weight.numel() + mod.out_proj.weight.numel()
    return mod.weight.numel()


def _work(spec: dict[str, Any]) -> tuple[int, int]:
    """(chain FLOPs, dense FLOPs) at batch 1 for the replaced matrices."""
    chain = dense = 0
    for s in _sub_specs(spec):
        layer = build_layer(s)
        chain += layer.chain_flops(1)
        dense += layer.dense_flops(1)
    return chain, dense


# ---------------------------------------------------------------------------- planning
def _kind(mod: nn.Module) -> str | None:
    if isinstance(mod, nn.MultiheadAttention):
        return "mha"
    if isinstance(mod, nn.LSTM):
        return "lstm"
    if isinstance(mod, nn.Conv2d):
        return "conv2d"
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, nn.Embedding):
        return "embedding"
    return None


def _why_unsupported(mod: nn.Module) -> str | None:
    if isinstance(mod, nn.Conv2d) and (mod.groups != 1 or mod.padding_mode != "zeros"
                                       or isinstance(mod.padding, str)):
        return "grouped/depthwise or non-zero-padded conv"
    if isinstance(mod, nn.LSTM) and (mod.proj_size or not isinstance(mod.input_size, int)):
        return "LSTM with projections"
    if isinstance(mod, nn.MultiheadAttention) and not mod._qkv_same_embed_dim:
        return "MultiheadAttention with separate q/k/v dimensions"
    if isinstance(mod, nn.Embedding):
        if mod.max_norm is not None or mod.sparse or mod.scale_grad_by_freq:
            return "embedding with max_norm, sparse or scale_grad_by_freq"
        if mod.padding_idx is not None and bool(mod.weight[mod.padding_idx].detach().ne(0).any()):
            return "embedding whose padding_idx row is not zero (a TT-embedding outputs zeros there)"
    return None


NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _untensorized_row(name: str, mod: nn.Module, why: str | None = None) -> LayerPlan | None:
    """The plan row of a layer tedepr leaves dense: every module with a weight of its own
    (not a normalization layer) is accounted for, with the reason. None for modules without
    weights of their own (containers, activations, norms)."""
    own = dict(mod.named_parameters(recurse=False))
    if not own or isinstance(mod, NORMS):
        return None
    weights = {n: p for n, p in own.items() if "bias" not in n}
    if not weights:
        return None
    first = next(iter(weights.values()))
    count = sum(p.numel() for p in weights.values())
    if why is None:
        kind = type(mod).__name__
        why = {nn.EmbeddingBag: "EmbeddingBag (not tensorized; its weight can be pruned dense)",
               nn.GRU: "GRU (not tensorized yet; its weights can be pruned dense)",
               nn.RNN: "RNN (not tensorized yet; its weights can be pruned dense)",
               nn.Conv1d: "Conv1d (not tensorized yet; its weight can be pruned dense)"}.get(
            type(mod), f"{kind}: not a layer type tedepr tensorizes")
    return LayerPlan(name, type(mod).__name__.lower(), [int(x) for x in first.shape], None, count, count,
                     None, f"kept dense: {why}")


def _tied_layers(model: nn.Module) -> dict[str, str]:
    """Layers whose weight is tied to another layer's (``masks.tied_parameters``), with the
    reason they stay dense: tensorizing one side would untie the pair (the other keeps the
    dense tensor), and tedepr keeps ties."""
    from ..masks import tied_parameters

    out: dict[str, str] = {}
    for alias, canonical in tied_parameters(model).items():
        for mine, other in ((alias, canonical), (canonical, alias)):
            owner = mine.rpartition(".")[0]
            out.setdefault(owner, f"weight tied to {other} (kept dense to keep the tie)")
    return out


def _conv_input_sizes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    sizes: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, name=name: sizes.__setitem__(name, tuple(a[0].shape[-2:]))))
    try:
        dry_forward(model, input_shape)  # a shape the model cannot take: BadInput naming it
    finally:
        for h in hooks:
            h.remove()
    return sizes


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _format_for(name: str, opts: PlanOptions) -> str:
    """The layer's tensor format: the first ``format_overrides`` pattern matching ``name``, else
    ``format``."""
    for pat, fmt in opts.format_overrides.items():
        if fnmatch.fnmatchcase(name, pat):
            return fmt
    return opts.format


def _rank_for(name: str, opts: PlanOptions) -> int | None:
    for pat, r in opts.rank_overrides.items():
        if fnmatch.fnmatchcase(name, pat):
            return r
    return opts.rank


def _largest_rank_within(build, budget: float, cap: int) -> int | None:
    """Largest uniform rank whose params fit ``budget`` (params grow with rank)."""
    lo, hi, best = 1, max(cap, 1), None
    while lo <= hi:
        mid = (lo + hi) // 2
        if sum(_spec_params(s) for s in _sub_specs(build(mid))) <= budget:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def plan_model(model: nn.Module, input_shape: tuple[int, ...], opts: PlanOptions) -> list[LayerPlan]:
    """Decide the tensorization of every supported layer of ``model``."""
    opts.validate()
    for flag, pats in ((f"{opt('rank')}", opts.rank_overrides), (f"{opt('modes')}", opts.mode_overrides),
                       (f"{opt('format')}", opts.format_overrides)):
        for pat in pats:
            if not any(fnmatch.fnmatchcase(n, pat) for n, _ in model.named_modules()):
                raise BadInput(f"{flag} {pat}=...: no layer matches {pat!r}")
    hw = _conv_input_sizes(model, input_shape)
    plans: list[LayerPlan] = []
    inside_mha = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            inside_mha.update(f"{name}.{c}" if name else c for c, _ in mod.named_modules() if c)
    explicit = bool(opts.include)
    tied = _tied_layers(model)
    for name, mod in model.named_modules():
        if not name or name in inside_mha:
            continue
        kind = _kind(mod)
        wanted = _matches(name, opts.include) if explicit else kind is not None
        if kind is None and not explicit and not _matches(name, opts.exclude):
            other = _untensorized_row(name, mod)  # every weight layer gets a row, with the reason
            if other is not None:
                plans.append(other)
            continue
        if not wanted or _matches(name, opts.exclude):
            continue
        if kind is None:
            raise BadInput(f"{opt('include')} matched {name} ({type(mod).__name__}): tedepr tensorizes "
                           "Linear, Conv2d, LSTM, MultiheadAttention and Embedding layers")
        why = _why_unsupported(mod) or tied.get(name)
        fmt = _format_for(name, opts)
        if not why and kind == "embedding" and fmt != "tt":
            why = f"embedding ({opt('format')} {fmt}: a TT-embedding is TT only)"
        if why:
            if explicit:
                raise BadInput(f"{name} is a {why}, which tedepr cannot tensorize")
            plans.append(_untensorized_row(name, mod, why))
            continue
        dense = _dense_weight_params(kind, mod, opts.lstm_hh)
        shape = [int(s) for s in getattr(mod, "weight", getattr(mod, "in_proj_weight", None)).shape] \
            if kind in ("linear", "conv2d", "mha", "embedding") else [4 * mod.hidden_size, mod.input_size]
        if kind == "conv2d" and mod.in_channels < MIN_STEM_CHANNELS and not explicit:
            plans.append(LayerPlan(name, kind, shape, None, dense, dense, None,
                                   "kept dense: stem conv on raw channels"))
            continue
        lopts = opts if fmt == opts.format else replace(opts, format=fmt)
        plans.append(_plan_layer(name, kind, mod, shape, dense, hw.get(name), lopts, explicit))
    if not any(p.spec for p in plans):
        raise BadInput(f"no layer to tensorize: check {opt('include')}/{opt('exclude')} and the ranks")
    return plans


def _plan_layer(name: str, kind: str, mod: nn.Module, shape: list[int], dense: int,
                hw: tuple[int, int] | None, opts: PlanOptions, explicit: bool) -> LayerPlan:
    rank = _rank_for(name, opts)
    fixed = _modes_for(name, kind, mod, opts)
    mode_choices = [len(fixed[0])] if fixed else (
        range(2, MAX_AUTO_MODES + 1) if opts.modes == "auto" else [int(opts.modes)])
    candidates: list[tuple[int, int, dict[str, Any]]] = []
    for d in mode_choices:
        def build(r: int, d: int = d) -> dict[str, Any]:
            spec = _spec_for(kind, mod, opts.format, d, r, opts.chain, hw, opts.lstm_hh)
            if fixed:
                spec["in_modes"], spec["out_modes"] = list(fixed[0]), list(fixed[1])
                spec["ranks"] = ranks_for(chain_dims(spec), r, ring=opts.format == "tr")
            return spec

        base = build(1)
        subs = _sub_specs(base)
        if any(len(set(s["in_modes"])) == 1 and s["in_modes"][0] == 1 for s in subs):
            continue
        cap = max(full_rank(chain_dims(s)) for s in subs)
        if opts.compression is not None and name not in _overridden(name, opts):
            r = _largest_rank_within(build, dense / opts.compression, cap)
            if r is None:
                continue
        else:
            r = rank if rank is not None else 8
            if r > cap and opts.modes != "auto":
                raise BadInput(f"rank {r} for {name} exceeds the full rank {cap} of its "
                               f"{d}-mode factorization; use {opt('rank')} {name}=<= {cap}")
            if r > cap:
                r = cap
        spec = build(r)
        params = sum(_spec_params(s) for s in _sub_specs(spec))
        if params >= dense:
            continue
        chain, dense_f = _work(spec)
        steps = sum(len(chain_dims(s)) for s in _sub_specs(spec))
        candidates.append((chain + STEP_COST_FLOPS * steps, d, spec))
    if not candidates:
        if rank is not None and opts.compression is None and not explicit:
            return LayerPlan(name, kind, shape, None, dense, dense, None,
                             "kept dense: factorized form would not be smaller")
        if explicit or opts.compression is not None:
            why = (f"cannot reach {opt('compression')} {opts.compression}" if opts.compression
                   else f"rank {rank} gives no compression")
            if explicit:
                raise BadInput(f"{name}: {why} with {opts.modes} modes")
            return LayerPlan(name, kind, shape, None, dense, dense, None, f"kept dense: {why}")
    _, d, spec = min(candidates, key=lambda c: (c[0], c[1]))
    params = sum(_spec_params(s) for s in _sub_specs(spec))
    chain, dense_f = _work(spec)
    return LayerPlan(name, kind, shape, spec, params, dense, chain / dense_f, f"{d} modes")


def _modes_for(name: str, kind: str, mod: nn.Module, opts: PlanOptions
               ) -> tuple[list[int], list[int]] | None:
    """Explicit ``--modes name=IN:OUT`` for a Linear/Conv2d/Embedding, checked against its dims
    (an embedding's vocab modes may cover more than its vocab: the rest is padding)."""
    for pat, (ins, outs) in opts.mode_overrides.items():
        if not fnmatch.fnmatchcase(name, pat):
            continue
        if kind not in ("linear", "conv2d", "embedding"):
            raise BadInput(f"{opt('modes')} {pat}=...: explicit modes are for Linear/Conv2d/Embedding, "
                           f"{name} is {kind}")
        n, m = {"linear": lambda: (mod.in_features, mod.out_features),
                "conv2d": lambda: (mod.in_channels, mod.out_channels),
                "embedding": lambda: (mod.num_embeddings, mod.embedding_dim)}[kind]()
        vocab_ok = math.prod(ins) >= n if kind == "embedding" else math.prod(ins) == n
        if not vocab_ok or math.prod(outs) != m:
            raise BadInput(f"{opt('modes')} for {name}: {'x'.join(map(str, ins))} does not factor its "
                           f"{n} inputs or {'x'.join(map(str, outs))} its {m} outputs")
        if kind in ("linear", "embedding") and opts.format == "tt" and len(ins) != len(outs):
            raise BadInput(f"{opt('modes')} for {name}: a TT-matrix needs as many input as output modes")
        if any(x < 1 for x in (*ins, *outs)):
            raise BadInput(f"{opt('modes')} for {name}: modes must be positive")
        return list(ins), list(outs)
    return None


def _overridden(name: str, opts: PlanOptions) -> set[str]:
    return {name} if any(fnmatch.fnmatchcase(name, p) for p in opts.rank_overrides) else set()


# ---------------------------------------------------------------------------- apply
def apply_plan(model: nn.Module, specs: dict[str, dict[str, Any]]) -> dict[str, nn.Module]:
    """Replace the named layers with (uninitialized) tensorized modules; returns the
    replaced dense modules by name."""
    old: dict[str, nn.Module] = {}
    names = dict(model.named_modules())
    for name, spec in specs.items():
        if name not in names:
            raise BadInput(f"tensorization plan names {name!r}, which the model does not have")
        kind = _kind(names[name])
        if kind != spec.get("type"):
            raise BadInput(f"tensorization plan says {name} is {spec.get('type')!r}, the model "
                           f"has {type(names[name]).__name__}")
        old[name] = swap_module(model, name, build_layer(spec))
    if any(s.get("type") == "mha" for s in specs.values()):
        for m in model.modules():
            # with a padding mask, the encoder's nested-tensor fast path would hand the
            # tensorized layers a NestedTensor, which their chains cannot reshape
            if isinstance(m, nn.TransformerEncoder):
                m.enable_nested_tensor = False
                m.use_nested_tensor = False
    return old


def rebuild(model: nn.Module, tensorization: dict[str, Any]) -> None:
    """Re-create the tensorized layers an artifact's manifest describes."""
    layers = tensorization.get("layers")
    if not isinstance(layers, dict):
        raise BadInput("manifest tensorization.layers must be an object")
    apply_plan(model, layers)


def densify(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every linear-chain tensorized Linear/Conv2d replaced by the
    dense layer of its equivalent weight (:func:`~.layers.to_dense_layer`)."""
    import copy

    from .base import TensorizedLayer

    out = copy.deepcopy(model)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, TensorizedLayer) and mod.chain == "linear":
            swap_module(out, name, to_dense_layer(mod))
    return out
