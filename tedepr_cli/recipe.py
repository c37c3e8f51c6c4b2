"""Recipes: a whole pipeline in one TOML file (``tedepr run``), for CI and shell scripts.

A recipe names the input model and data and has one table per stage, in pipeline order;
each table holds that stage's options under the same names as the library's option
dataclasses (``--set stage.option=value`` overrides any of them). Every artifact the run
writes stores the merged recipe in its manifest (``recipe``), so a result always says how
it was made. Stages that are absent are skipped::

    [model]
    path = "samples/lenet300.pt"
    arch = "lenet300"

    [data]
    path = "samples/mnist5k.npz"

    [prune]          # one shot: decomposes first unless decompose = false
    sparsity = 0.995

    [finetune]
    epochs = 30

    [export]
    formats = ["safetensors", "onnx"]

    [bench]
    batches = [1, 32]
"""

from __future__ import annotations

import copy
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from .errors import BadInput, InputNotFound, UsageError, opt

STAGES = ("decompose", "prune", "finetune", "export", "bench")
SECTIONS = ("model", "data", *STAGES)
MODEL_KEYS = {"path", "arch", "arch_kwargs", "input_shape", "trust_pickle"}


def load_recipe(path: Path) -> dict[str, Any]:
    """Parse a TOML recipe (pickle-free, no code)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise UsageError("recipes need Python 3.11+ (tomllib)") from None
    if not path.is_file():
        raise InputNotFound(f"recipe {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"recipe {path} is not valid TOML: {e}") from None


def apply_seed(recipe: dict[str, Any], seed: int) -> dict[str, Any]:
    """``seed`` as every present stage's ``seed`` option (each stage's options have one);
    apply it before :func:`apply_overrides`, so a ``--set stage.seed=N`` still wins."""
    out = copy.deepcopy(recipe)
    for stage in STAGES:
        if isinstance(out.get(stage), dict):
            out[stage]["seed"] = seed
    return out


def apply_overrides(recipe: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """``stage.option=value`` overrides (value parsed as JSON, else a string)."""
    out = copy.deepcopy(recipe)
    for item in sets:
        key, eq, raw = item.partition("=")
        section, dot, option = key.strip().partition(".")
        if not eq or not dot or not option:
            raise UsageError(f"{opt('set')} takes stage.option=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(section, {})[option] = value
    return out


def _options(cls: type, section: str, values: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UsageError(f"recipe [{section}] has unknown option(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(names))}")
    try:
        return cls(**values)
    except TypeError as e:
        raise UsageError(f"recipe [{section}]: {e}") from None


def validate(recipe: dict[str, Any]) -> None:
    unknown = sorted(set(recipe) - set(SECTIONS))
    if unknown:
        raise UsageError(f"recipe has unknown table(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    for s in SECTIONS:
        if s in recipe and not isinstance(recipe[s], dict):
            raise UsageError(f"recipe [{s}] must be a table")
    model = recipe.get("model") or {}
    if "path" not in model:
        raise UsageError("recipe needs [model] path = ...")
    bad = sorted(set(model) - MODEL_KEYS)
    if bad:
        raise UsageError(f"recipe [model] has unknown key(s) {', '.join(bad)}; known: "
                         f"{', '.join(sorted(MODEL_KEYS))}")
    if not any(s in recipe for s in STAGES):
        raise UsageError(f"recipe has no stage: add at least one of {', '.join(STAGES)}")


def run_recipe(recipe: dict[str, Any], out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Run the recipe's stages in order into ``out``; returns a summary per stage."""
    from .arch import parse_arch
    from .artifact import save_artifact
    from .bench.core import BenchOptions, Target, run_bench
    from .decompose import DecomposeOptions, decompose
    from .export import ExportOptions, export
    from .fsutil import atomic_output, check_output, expand_user
    from .loading import load_model
    from .pruning.criteria import CriterionOptions
    from .pruning.prune import PruneOptions, prune
    from .train import TrainOptions, finetune

    validate(recipe)
    check_output(out, overwrite, directory=True)
    base = Path(".")  # relative paths in a recipe are relative to where tedepr runs
    model = recipe["model"]
    data_path = (recipe.get("data") or {}).get("path")
    data = (base / expand_user(data_path)) if data_path else None
    arch = parse_arch(model["arch"], json.dumps(model.get("arch_kwargs") or {}),
                      model.get("input_shape")) if model.get("arch") else None
    # build every stage's options before any work: a typo fails in a second, not an hour
    plan: dict[str, Any] = {}
    if "decompose" in recipe:
        plan["decompose"] = _options(DecomposeOptions, "decompose", recipe["decompose"])
        plan["decompose"].validate()
    if "prune" in recipe:
        p = dict(recipe["prune"])
        copts = {k: p.pop(k) for k in list(p) if k in {f.name for f in fields(CriterionOptions)}}
        plan["prune"] = _options(PruneOptions, "prune", p)
        plan["prune"].criterion_options = _options(CriterionOptions, "prune", copts)
        plan["prune"].validate()
    if "finetune" in recipe:
        if data is None:
            raise UsageError("recipe [finetune] needs [data] path = ...")
        plan["finetune"] = _options(TrainOptions, "finetune", recipe["finetune"])
        plan["finetune"].validate()
    if "export" in recipe:
        plan["export"] = _options(ExportOptions, "export", recipe["export"])
        plan["export"].validate()
    if "bench" in recipe:
        b = dict(recipe["bench"])
        baseline = b.pop("baseline", None)
        plan["bench"] = (_options(BenchOptions, "bench", b), baseline)
        plan["bench"][0].validate()
    merged = dict(recipe)
    art = load_model(base / expand_user(model["path"]), arch, trust_pickle=bool(model.get("trust_pickle")))
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}

    def keep(a, name: str):
        a.meta["recipe"] = merged
        save_artifact(a, out / name, overwrite=True)
        summary[name] = str(out / name)
        return a

    if "decompose" in plan:
        art, _ = decompose(art, plan["decompose"])
        art = keep(art, "decomposed")
    if "prune" in plan:
        art, rep = prune(art, plan["prune"], data)
        art = keep(art, "pruned")
        summary["sparsity_vs_dense"] = rep["sparsity"]["vs_dense"]
    if "finetune" in plan:
        from .logs import log
        from .train import epoch_line

        total = plan["finetune"].epochs
        art, fs = finetune(art, data, out / "trained", plan["finetune"], overwrite=True,
                           on_epoch=lambda e, m: log.info(epoch_line(e, total, m)))
        art.meta["recipe"] = merged
        save_artifact(art, out / "trained" / "best", overwrite=True)
        summary["trained"] = str(out / "trained")
        summary["test_accuracy"] = fs["test_accuracy"]
    if "export" in plan:
        art.meta["recipe"] = merged
        export(art, out / "export", plan["export"], data, overwrite=True)
        summary["export"] = str(out / "export")
    if "bench" in plan:
        opts, baseline = plan["bench"]
        base_path = base / expand_user(baseline) if baseline else None
        rep = run_bench(Target(art, None, out), opts, base_path, data)
        with atomic_output(out / "bench.json", overwrite=True) as tmp:
            tmp.write_text(json.dumps(rep, indent=2, default=str) + "\n")
        summary["bench"] = str(out / "bench.json")
        summary["speedup"] = {b: r["tedepr"]["speedup_vs_dense_torch"]["median"]
                              for b, r in rep["results"].items() if "tedepr" in r}
    with atomic_output(out / "recipe.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(merged, indent=2) + "\n")
    return summary
