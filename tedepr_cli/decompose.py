"""The coarse-grain stage: replace a model's layers by tensorized ones (``tedepr decompose``)."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .artifact import Artifact
from .errors import BadInput, UsageError, opt
from .logs import log
from .tensorized.decomp import VARIANCE_TARGETS, init_module
from .tensorized.layers import tensorized_specs
from .tensorized.plan import PlanOptions, apply_plan, plan_model

INITS = ("pretrained", "random")


@dataclass
class DecomposeOptions(PlanOptions):
    """Plan options plus how to initialize the cores."""

    init: str = "pretrained"
    init_variance: str = "he"
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if self.init not in INITS:
            raise UsageError(f"{opt('init')} must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init_variance not in VARIANCE_TARGETS:
            raise UsageError(f"{opt('init-variance')} must be one of {', '.join(VARIANCE_TARGETS)}")


def decompose(art: Artifact, opts: DecomposeOptions) -> tuple[Artifact, list[dict[str, Any]]]:
    """The ``tedepr decompose`` stage: a new artifact whose planned layers are
    tensor-train/ring chains (:func:`tensorize_model` on a copy), with the plan recorded.

    Returns the artifact and the per-layer report (plan, params, work ratio and, for
    ``init="pretrained"``, the relative reconstruction error of each decomposed matrix).
    """
    opts.validate()
    if art.meta.get("tensorization"):
        raise BadInput(f"{art.source or 'the model'} is already decomposed; start from the dense checkpoint")
    if art.masks:
        raise BadInput(f"{art.source or 'the model'} is already pruned; decompose the dense model first")
    if art.arch is None:
        hint = (art.meta.get("origin") or {}).get("arch_hint") or f"pass {opt('arch')} NAME"
        raise BadInput(f"decompose needs an architecture reference: {hint}")
    model = copy.deepcopy(art.model)
    report = tensorize_model(model, art.input_shape, opts)
    model.eval()
    meta = copy.deepcopy({k: v for k, v in art.meta.items() if k != "origin"})
    options = asdict(opts)
    meta["tensorization"] = {
        **{k: options[k] for k in ("format", "chain", "init", "init_variance", "modes", "rank",
                                   "rank_overrides", "compression", "include", "exclude", "lstm_hh")},
        "variance_target": f"{opts.init_variance} ({'2' if opts.init_variance == 'he' else '1'}/fan_in)"
        if opts.init == "random" else None,
        "layers": tensorized_specs(model),
        "report": report,
    }
    if opts.format_overrides:  # per-layer formats (each layer's spec names its own)
        meta["tensorization"]["format_overrides"] = dict(opts.format_overrides)
    out = Artifact(model=model, arch=art.arch, meta=meta, source="")
    if "origin" in art.meta:
        out.meta["origin"] = art.meta["origin"]
    out.record("decompose", options, seed=opts.seed)
    return out, report


def tensorize_model(model: nn.Module, input_shape: tuple[int, ...], opts: DecomposeOptions
                    ) -> list[dict[str, Any]]:
    """Replace ``model``'s planned layers by tensor-train/ring chains, in place (coarse grain,
    DESIGN §2.1: TT-matrix, Novikov et al. 2015; TR-Nets, Wang et al. 2018).

    ``input_shape`` is one sample's shape (no batch), used to find conv input sizes. Cores are
    initialized from the replaced weights by TT-SVD/TR-SVD (``opts.init="pretrained"``) or
    drawn with a variance-preserving scale (``"random"``, seeded by ``opts.seed``). Returns
    one report row per planned layer. Raises :class:`UsageError` for bad options and
    :class:`BadInput` when nothing can be tensorized.
    """
    opts.validate()
    plans = plan_model(model, tuple(input_shape), opts)
    specs = {p.name: p.spec for p in plans if p.spec is not None}
    if opts.lstm_hh != "dense" and not any(p.type == "lstm" for p in plans if p.spec is not None):
        log.warning(f"{opt('lstm-hh')} {opts.lstm_hh} has no effect: no LSTM is tensorized in this model")
    old = apply_plan(model, specs)
    gen = torch.Generator().manual_seed(opts.seed)
    report = []
    for p in plans:
        row = p.row()
        if p.spec is not None:
            errs = init_module(model.get_submodule(p.name), old[p.name], opts.init,
                               opts.init_variance, gen)
            row["rel_error"] = max(errs) if errs else None
        report.append(row)
    return report


def totals(report: list[dict[str, Any]], model_params_before: int, model_params_after: int
           ) -> dict[str, Any]:
    """Model-level summary of a decomposition report."""
    tens = [r for r in report if r["tensorized"]]
    return {
        "layers_tensorized": len(tens),
        "layers_kept_dense": len(report) - len(tens),
        "params_before": model_params_before,
        "params_after": model_params_after,
        "compression": model_params_before / max(model_params_after, 1),
        "max_rel_error": max((r.get("rel_error") or 0.0) for r in tens) if tens else None,
    }
