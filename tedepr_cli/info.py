"""``tedepr info``: what a checkpoint or artifact holds, as data (the CLI renders it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from .artifact import Artifact
from .masks import plain_named_parameters
from .pruning.targets import kept_counts


def bytes_on_disk(path: str | Path) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.exists() else 0


def layer_rows(model: nn.Module, masks: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per module that owns parameters: name, type, shapes, params, kept (masked
    parameters under their plain names, e.g. ``fc1.cores.0``)."""
    owners: dict[str, list[tuple[str, Any]]] = {}
    for full, p in plain_named_parameters(model).items():
        mname, _, pname = full.rpartition(".")
        owners.setdefault(mname, []).append((pname, p))
    rows = []
    for mname, mod in model.named_modules():
        own = owners.get(mname)
        if not own:
            continue
        total = sum(p.numel() for _, p in own)
        kept = 0
        for pname, p in own:
            full = f"{mname}.{pname}" if mname else pname
            kept += int(masks[full].sum()) if full in masks else p.numel()
        shapes = ", ".join(f"{n}{list(p.shape)}" for n, p in own)
        rows.append({"name": mname or "(root)", "type": type_before_parametrizations(mod).__name__,
                     "shapes": shapes, "params": total, "kept": kept})
    return rows


def describe(art: Artifact) -> dict[str, Any]:
    """A JSON-ready description of ``art``: architecture, layers, totals, history."""
    rows = layer_rows(art.model, art.masks)
    total = sum(p.numel() for p in art.model.parameters())
    kept = sum(r["kept"] for r in rows)
    out: dict[str, Any] = {
        "path": art.source,
        "arch": art.arch.to_json() if art.arch else None,
        "model_class": type(art.model).__name__,
        "input_shape": list(art.input_shape),
        "input_kind": art.input_kind,
        "params": total,
        "kept_params": kept,  # every parameter entry not pruned away: weights below + other
        "weights": kept_counts(art.model),  # kept (stored entries), effective_nonzero, other
        "bytes_on_disk": bytes_on_disk(art.source) if art.source else 0,
        "layers": rows,
        "history": art.history,
    }
    for key in ("origin", "tensorization", "pruning", "training", "metrics"):
        if art.meta.get(key):
            out[key] = art.meta[key]
    return out
