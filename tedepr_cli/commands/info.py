"""`tedepr info` and `tedepr zoo`: describe checkpoints, artifacts, data sets and the zoo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..console import print_json, stdout, table
from .common import (
    Arch,
    ArchKwargs,
    InputShape,
    JsonOut,
    NonStrict,
    Quiet,
    TrustPickle,
    Verbose,
    _load,
    command,
)


@command
def info(path: Annotated[Path | None, typer.Argument(
            help="Checkpoint (.pt/.pth/.safetensors state_dict, .pt2 program) or tedepr artifact "
            "(optional with --data).", show_default=False)] = None,
         data: Annotated[str | None, typer.Option(
             "--data", help="Describe a data set instead (or as well): [reader:]PATH, see README "
             "'Datasets'. With a model, also checks that the data fits it.")] = None,
         arch: Arch = None, arch_kwargs: ArchKwargs = None,
         input_shape: InputShape = None, trust_pickle: TrustPickle = False, non_strict: NonStrict = False,
         json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False) -> None:
    """Describe a checkpoint or artifact (architecture, layers, parameters, size, history)
    and/or a data set (--data: reader, splits, classes, counts, sample shape)."""
    from ..console import human_bytes
    from ..errors import UsageError
    from ..info import describe

    if path is None and data is None:
        raise UsageError("give a model PATH, --data DATA, or both")
    dd = _describe_data(data) if data is not None else None
    if path is None:
        if arch or arch_kwargs or input_shape:
            raise UsageError("--arch/--arch-kwargs/--input-shape describe a model PATH; none was given")
        if json_out:
            print_json(dd[0])
        else:
            _print_data(dd[0])
        return
    art = _load(path, arch, arch_kwargs, input_shape, trust_pickle, non_strict)
    d = describe(art)
    if dd is not None:
        d["data"] = {**dd[0], "fits_model": _fits(dd[1], art)}
    if json_out:
        print_json(d)
        return
    name = d["arch"]["name"] if d["arch"] else d["model_class"]
    stdout.print(f"[bold]{path}[/bold]: {name}  input {tuple(d['input_shape'])} "
                 f"({d['input_kind']})")
    rows = [[r["name"], r["type"], r["shapes"], r["params"], r["kept"]] for r in d["layers"]]
    stdout.print(table(None, ["layer", "type", "shapes", "params", "params kept"], rows,
                       right={3, 4}))
    w = d["weights"]
    stdout.print(f"total params {d['params']:,}; kept {w['kept']:,} stored entries of the prunable tensors "
                 f"({w['effective_nonzero']:,} effective non-zero weights), other params {w['other']:,}; "
                 f"on disk {human_bytes(d['bytes_on_disk'])}")
    for key in ("origin", "tensorization", "pruning", "training"):
        if key in d:
            stdout.print(f"{key}: {_brief(d[key])}")
    if art.meta.get("data"):
        pre = art.meta["data"].get("preprocess") or {}
        stdout.print(f"trained on: {art.meta['data'].get('reader')} data {art.meta['data'].get('path')}; "
                     f"{_brief(pre)}")
    if d["history"]:
        stdout.print(table("history", ["#", "command", "time", "seed", "version"],
                           [[i + 1, h.get("command"), h.get("time"), h.get("seed"),
                             h.get("tool_version")] for i, h in enumerate(d["history"])],
                           right={0}))
    if dd is not None:
        stdout.print("")
        _print_data(d["data"])


def _describe_data(spec: str):
    from ..datasets import describe_dataset, open_dataset

    ds = open_dataset(spec)
    return describe_dataset(ds), ds


def _fits(ds, art) -> dict[str, Any]:
    """Whether the opened dataset ``ds`` can feed ``art``'s model: class count and one
    presented sample, as every command would present it (:mod:`tedepr_cli.model_data`)."""
    import numpy as np

    from ..errors import TedeprError
    from ..model_data import split_for

    try:
        split_for(art, ds, "test").batch(np.arange(1))
    except TedeprError as e:
        return {"ok": False, "reason": str(e)}
    return {"ok": True, "reason": None}


def _print_data(d: dict[str, Any]) -> None:
    names = d.get("class_names")
    shown = f": {', '.join(map(str, names[:10]))}{', ...' if len(names) > 10 else ''}" if names else ""
    labeled = all(s["class_counts"] is not None for s in d["splits"].values())
    what = f"{d['classes']} classes{shown}" if labeled else "no labels"
    stdout.print(f"[bold]{d['path']}[/bold]: {d['reader']} reader ({d['family']}), {what}", markup=True,
                 highlight=False)
    rows = []
    for name, s in d["splits"].items():
        counts = [c for c in s["class_counts"] or [] if c] or [0]
        per_class = f"{min(counts)}-{max(counts)}" if s["class_counts"] else "-"
        rows.append([name, s["count"], per_class, s["from"]])
    stdout.print(table(None, ["split", "samples", "per class", "from"], rows, right={1, 2}))
    shape = tuple(d["sample_shape"]) if d.get("sample_shape") else "?"
    extra = " (sizes vary)" if d.get("sizes_vary") else ""
    extra = " (lengths vary)" if d.get("time_steps_vary") else extra
    stdout.print(f"sample shape {shape}{extra}, {d.get('dtype')}; {d.get('storage')}")
    for n in d.get("notes", []):
        stdout.print(f"note: {n}")
    fit = d.get("fits_model")
    if fit is not None:
        stdout.print("fits the model: yes" if fit["ok"] else f"fits the model: no - {fit['reason']}")


def _brief(section: dict[str, Any]) -> str:
    keys = [k for k, v in section.items() if not isinstance(v, dict | list)]
    return ", ".join(f"{k}={section[k]}" for k in keys[:8])


@command
def zoo(json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False) -> None:
    """List the built-in architectures with their input shapes and parameter counts."""
    from ..zoo import MODELS

    rows = []
    for name in MODELS:
        m = MODELS.get(name)()
        rows.append({"name": name, "input_shape": list(m.input_shape),
                     "input_kind": m.input_kind,
                     "params": sum(p.numel() for p in m.parameters())})
    if json_out:
        print_json(rows)
    else:
        stdout.print(table(None, ["arch", "input", "kind", "params"],
                           [[r["name"], str(tuple(r["input_shape"])), r["input_kind"],
                             r["params"]] for r in rows], right={3}))
