"""What closes the gap to dense? Variants of TEDEPR on one model and sparsity (issue 9).

    python benchmarks/pai_ablation.py --model lenet300 --sparsity 0.995     # writes docs/pai_ablation.md
    python benchmarks/pai_ablation.py --model lenet5,lenet300 --sparsity 0.995,0.999 \
        --variants "default,rank allocation criterion" --section "NAME"   # one section of it

Every variant changes one knob of the default TEDEPR recipe (TT, rank auto with cores
about 4x the budget, tedepr criterion, linear chain, 30 epochs) and is trained with the
same protocol as benchmarks/pai_compare.py (AdamW, lr in {1e-3, 1e-2} picked on
validation, 2 seeds, test accuracy of the best epoch). Results are cached per model and
sparsity (``--out``), so a rerun only trains what is missing (``--report-only``: nothing,
a variant not cached shows "-"); ``--section NAME`` rewrites
only the section between ``<!-- section: NAME -->`` and ``<!-- end section: NAME -->`` of
``--doc`` (appended if absent), one table per model with a column per sparsity. The
distillation variants (``teacher``) fine-tune with a dense model of the same seed as
``--teacher``, trained once with the same recipe and cached (``--out``/teachers.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "samples" / "mnist5k.npz"

VARIANTS = {
    "default": {},
    "coarse ratio 2": {"coarse_ratio": 2.0},
    "coarse ratio 8": {"coarse_ratio": 8.0},
    "coarse ratio 16": {"coarse_ratio": 16.0},
    "3 modes": {"modes": 3},
    "nonlinear chain": {"chain": "nonlinear"},
    "pretrained init": {"init": "pretrained"},
    "scope normalized": {"scope": "normalized"},
    "criterion synflow": {"criterion": "synflow"},
    "60 epochs": {"epochs": 60},
    "tr format": {"format": "tr"},
    # issue 19: the per-layer path floor and the structured (whole rank path) grain
    "min paths 4": {"min_paths": 4},
    "grain path": {"grain": "path", "path_pool": 2.0},
    "grain path (whole paths only)": {"grain": "path", "path_pool": 1.0},
    "min paths 4 + grain path": {"min_paths": 4, "grain": "path", "path_pool": 2.0},
    "min paths 64": {"min_paths": 64},  # a conv chain's rank 3 (81 paths) rather than 2 (16)
    "min paths 256": {"min_paths": 256},  # rank 4 (256 paths)
    "coarse ratio 8 + scope normalized": {"coarse_ratio": 8.0, "scope": "normalized"},
    # issue 19, item 2: per-layer capacity, the criterion's inner training, the finetune recipe
    "rank allocation criterion": {"rank_allocation": "criterion"},
    "label smoothing 0.1": {"train": {"label_smoothing": 0.1}},
    "rank allocation criterion + label smoothing 0.1": {"rank_allocation": "criterion",
                                                        "train": {"label_smoothing": 0.1}},
    "rank allocation criterion at coarse ratio 8": {"rank_allocation": "criterion", "coarse_ratio": 8.0},
    "rank allocation criterion >= uniform rank": {"allocation_floor": True},
    "rank allocation criterion + tedepr steps 10": {"rank_allocation": "criterion",
                                                    "criterion_options": {"steps": 10}},
    "tedepr steps 10": {"criterion_options": {"steps": 10}},
    # issue 19, LeNet-5 follow-up: distillation from a trained dense model of the same seed,
    # the finetune recipe's weight decay and warmup, the criterion's inner lr, other probes
    "distill": {"teacher": True},
    "rank allocation criterion + distill": {"rank_allocation": "criterion", "teacher": True},
    "rank allocation criterion >= uniform rank + distill": {"allocation_floor": True, "teacher": True},
    "rank allocation criterion probe 2x": {"allocation_probe": 2.0},
    "rank allocation criterion probe 8x": {"allocation_probe": 8.0},
    "tr convs": {"format_overrides": {"conv*": "tr"}},  # tensor-ring conv chains, TT-matrix Linears
    "rank allocation criterion + tr convs": {"rank_allocation": "criterion",
                                             "format_overrides": {"conv*": "tr"}},
    "rank allocation criterion + weight decay 0.01": {"rank_allocation": "criterion",
                                                      "train": {"weight_decay": 0.01}},
    "rank allocation criterion + warmup 2": {"rank_allocation": "criterion", "train": {"warmup_epochs": 2.0}},
    "rank allocation criterion + inner lr 0.03": {"rank_allocation": "criterion",
                                                  "criterion_options": {"inner_lr": 0.03}},
    "rank allocation criterion + inner lr 0.3": {"rank_allocation": "criterion",
                                                 "criterion_options": {"inner_lr": 0.3}},
    # every TEDEPR run above picked 1e-2, the sweep's top: the sweep moved up one step
    "rank allocation criterion + lr sweep 1e-2/3e-2": {"rank_allocation": "criterion", "lrs": (1e-2, 3e-2)},
    "lr sweep 1e-2/3e-2": {"lrs": (1e-2, 3e-2)},
    "rank allocation criterion + distill + lr sweep 1e-2/3e-2": {
        "rank_allocation": "criterion", "teacher": True, "lrs": (1e-2, 3e-2)},
}


def teacher(model: str, seed: int, out: Path, epochs: int = 30) -> tuple[Path, dict]:
    """The dense ``model`` trained with the protocol's recipe (same split, seed, epochs and lr
    sweep as every variant; lr picked on validation), the teacher of the distillation variants:
    its artifact (cached under ``out/runs/teachers``) and its result row (cached in
    ``out/teachers.json``). Seed-matched, so its held-out validation images are the student's."""
    from tedepr_cli.arch import build, parse_arch
    from tedepr_cli.artifact import Artifact
    from tedepr_cli.train import TrainOptions, finetune

    cache, key = out / "teachers.json", f"{model}|{seed}|{epochs}"
    rows = json.loads(cache.read_text()) if cache.exists() else {}
    where = out / "runs" / "teachers" / f"{model}-s{seed}-{epochs}ep"
    if key in rows and (where / f"lr{rows[key]['lr']:g}" / "best").exists():
        return where / f"lr{rows[key]['lr']:g}" / "best", rows[key]
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    best = None
    for lr in (1e-3, 1e-2):
        torch.manual_seed(seed)
        spec = parse_arch(model)
        _, s = finetune(Artifact(model=build(spec).eval(), arch=spec), DATA, where / f"lr{lr:g}",
                        TrainOptions(epochs=epochs, lr=lr, seed=seed), overwrite=True)
        if best is None or s["best_score"] > best[1]["best_score"]:
            best = (lr, s)
    rows[key] = {"test": best[1]["test_accuracy"], "lr": best[0],
                 "seconds": round(time.perf_counter() - t0, 1)}
    cache.write_text(json.dumps(rows, indent=1))
    return where / f"lr{best[0]:g}" / "best", rows[key]


def run(model: str, sparsity: float, seed: int, knobs: dict, out: Path, epochs: int = 30,
        root: Path | None = None) -> dict:
    """One (variant, seed): prune, train at both lrs into ``out``; ``root``: the results folder
    (the teachers' cache)."""
    root = root or out
    from tedepr_cli.arch import build, parse_arch
    from tedepr_cli.artifact import Artifact
    from tedepr_cli.decompose import DecomposeOptions
    from tedepr_cli.loading import load_model
    from tedepr_cli.pruning.criteria import CriterionOptions
    from tedepr_cli.pruning.prune import PruneOptions, prune
    from tedepr_cli.train import TrainOptions, finetune

    train = dict(knobs.get("train", {}))
    if knobs.get("teacher"):  # trained (or read from its cache) first: its time is not the run's
        train["teacher"] = str(teacher(model, seed, root, knobs.get("epochs", epochs))[0])
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    if knobs.get("init") == "pretrained" and model == "lenet300":
        art = load_model(ROOT / "samples" / "lenet300.pt", parse_arch(model))
    else:
        spec = parse_arch(model)
        art = Artifact(model=build(spec).eval(), arch=spec)
    dopts = DecomposeOptions(format=knobs.get("format", "tt"), rank=None, modes=knobs.get("modes", "auto"),
                             chain=knobs.get("chain", "linear"), init=knobs.get("init", "random"), seed=seed,
                             rank_overrides=dict(knobs.get("rank_overrides", {})),
                             format_overrides=dict(knobs.get("format_overrides", {})))
    popts = PruneOptions(sparsity=sparsity, criterion=knobs.get("criterion", "tedepr"), seed=seed,
                         coarse_ratio=knobs.get("coarse_ratio", 4.0), scope=knobs.get("scope", "global"),
                         min_paths=knobs.get("min_paths", 0), grain=knobs.get("grain", "entry"),
                         path_pool=knobs.get("path_pool", 1.0),
                         rank_allocation=knobs.get("rank_allocation", "uniform"),
                         criterion_options=CriterionOptions(**knobs.get("criterion_options", {})))
    t0 = time.perf_counter()
    prototype = knobs.get("allocation_floor") or "allocation_probe" in knobs
    if prototype:  # the criterion's per-layer ranks with another probe, or never below the uniform auto rank
        from dataclasses import replace

        from tedepr_cli.pruning.prune import ALLOCATION_PROBE, allocated_ranks, auto_rank

        uniform = auto_rank(art.model, art.input_shape, dopts, popts)
        ranks, _ = allocated_ranks(art, replace(dopts, rank=uniform), popts, DATA,
                                   probe=knobs.get("allocation_probe", ALLOCATION_PROBE))
        floor = uniform if knobs.get("allocation_floor") else 1
        dopts = replace(dopts, rank=uniform, rank_overrides={n: max(r, floor) for n, r in ranks.items()})
    art, rep = prune(art, popts, DATA, dopts)
    if prototype:
        rep["rank_auto"] = {"rank": dopts.rank, "ranks": dopts.rank_overrides}
    best = None
    for lr in knobs.get("lrs", (1e-3, 1e-2)):
        _, s = finetune(art, DATA, out / f"s{seed}-lr{lr:g}",
                        TrainOptions(epochs=knobs.get("epochs", epochs), lr=lr, seed=seed,
                                                 **train), overwrite=True)
        if best is None or s["best_score"] > best[1]["best_score"]:
            best = (lr, s)
    auto = rep.get("rank_auto") or {}
    return {"test": best[1]["test_accuracy"], "lr": best[0], "rank": auto.get("rank"),
            "ranks": auto.get("ranks") or {},
            "raised": auto.get("raised_for_paths") or {}, "kept": rep["kept"],
            "paths": {r["name"]: r["rank_paths"] for r in rep["layers"] if "rank_paths" in r},
            "epochs": knobs.get("epochs", epochs), "seconds": round(time.perf_counter() - t0, 1)}


def _results(model: str, sparsity: float, args) -> dict:
    """The cached runs of ``model`` at ``sparsity``, training every missing (variant, seed)."""
    suffix = "" if args.epochs == 30 else f"-{args.epochs}ep"
    cache = Path(args.out) / f"{model}-{sparsity:g}{suffix}.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(cache.read_text()) if cache.exists() else {}
    for name in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            key = f"{name}|{seed}"
            if key in results or args.report_only:
                continue
            where = Path(args.out) / "runs" / f"{model}-{sparsity:g}{suffix}" / name
            results[key] = run(model, sparsity, seed, VARIANTS[name], where, args.epochs, Path(args.out))
            cache.write_text(json.dumps(results, indent=1))
            print(name, seed, results[key], flush=True)
    return results


def _acc(rows: list[dict]) -> str:
    accs = [100 * r["test"] for r in rows]
    sd = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else " (1 seed)"
    return f"{statistics.mean(accs):.1f}{sd}"


def _ranks(r: dict) -> str:
    """The ranks a run decomposed with: per layer when allocated, else the uniform auto rank
    with the layers the path floor raised in parentheses."""
    if r.get("ranks"):
        return " ".join(f"{n} {v}" for n, v in r["ranks"].items())
    return str(r["rank"]) + "".join(f" ({n} {v})" for n, v in (r.get("raised") or {}).items())


def _section(model: str, sparsities: list[float], by_sparsity: dict, names: list[str]) -> list[str]:
    heads = " | ".join(f"{100 * s:g} %" for s in sparsities)
    lines = [f"### {model}", "",
             f"| variant | {heads} | ranks ({' / '.join(f'{100 * s:g} %' for s in sparsities)}) | s/run |",
             "|---|" + "---|" * len(sparsities) + "---|---|"]
    for name in names:
        per = [[v for k, v in by_sparsity[s].items() if k.split("|")[0] == name] for s in sparsities]
        if not any(per):
            continue
        accs = " | ".join(_acc(rows) if rows else "-" for rows in per)
        ranks = " / ".join("; ".join(dict.fromkeys(_ranks(r) for r in rows)) or "-" for rows in per)
        secs = " / ".join(", ".join(f"{r['seconds']:.0f}" for r in rows if "seconds" in r) or "-"
                          for rows in per)
        lines.append(f"| {name} | {accs} | {ranks} | {secs} |")
    return lines


def _teachers(model: str, out: Path, epochs: int) -> str:
    """One line on the dense teachers of the distillation rows (from ``out/teachers.json``)."""
    cache = out / "teachers.json"
    rows = json.loads(cache.read_text()) if cache.exists() else {}
    mine = {int(k.split("|")[1]): v for k, v in rows.items()
            if k.split("|")[0] == model and int(k.split("|")[2]) == epochs}
    if not mine:
        return f"Dense teacher of {model}: not trained yet."
    seeds = sorted(mine)
    secs = ", ".join(f"{mine[s]['seconds']:.0f}" for s in seeds)
    return (f"Dense teacher of {model} (distillation rows; the same recipe, {epochs} epochs, seed-matched): "
            f"{_acc([mine[s] for s in seeds])} % test over seeds {', '.join(map(str, seeds))}, lr picked "
            f"{', '.join(format(mine[s]['lr'], 'g') for s in seeds)}, "
            f"{secs} s per seed (both lrs).")


def _write_section(doc: Path, name: str, body: list[str]) -> None:
    """Replace the marked section ``name`` of ``doc`` (append it if absent); temp file + rename."""
    start, end = f"<!-- section: {name} -->", f"<!-- end section: {name} -->"
    text = doc.read_text() if doc.exists() else ""
    block = "\n".join([start, *body, end])
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = doc.with_name(doc.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(doc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lenet300", help="zoo model(s): several (a,b) need --section")
    ap.add_argument("--sparsity", default="0.995", help="sparsity(ies): several need --section")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=int, default=30, help="epochs of every variant (one knob raises it)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ablation"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "pai_ablation.md"))
    ap.add_argument("--section", default=None,
                    help="rewrite only this marked section of --doc (a table per model)")
    ap.add_argument("--report-only", action="store_true", help="train nothing: tables from the cached runs")
    args = ap.parse_args()
    unknown = [n for n in args.variants.split(",") if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s): {', '.join(unknown)}")
    models = args.model.split(",")
    sparsities = [float(s) for s in args.sparsity.split(",")]
    if args.section is not None:
        body: list[str] = []
        for model in models:
            by_sparsity = {s: _results(model, s, args) for s in sparsities}
            body += _section(model, sparsities, by_sparsity, args.variants.split(",")) + [""]
            if any(VARIANTS[n].get("teacher") for n in args.variants.split(",")):
                body += [_teachers(model, Path(args.out), args.epochs), ""]
        _write_section(Path(args.doc), args.section, body[:-1])
        print("\n".join(body))
        return 0
    if len(models) > 1 or len(sparsities) > 1:
        ap.error("several models or sparsities need --section")
    model, sparsity = models[0], sparsities[0]
    results = _results(model, sparsity, args)
    title = f"# TEDEPR ablation: {model} at {100 * sparsity:g} % (`benchmarks/pai_ablation.py`)"
    lines = [title, "",
             "One knob changed per row from the default recipe; test accuracy %, mean ± std over seeds "
             "(lr picked on validation from {1e-3, 1e-2}).", "",
             "| variant | test acc % | rank (auto) | lr picked | s/run |", "|---|---|---|---|---|"]
    for name in VARIANTS:
        rows = [v for k, v in results.items() if k.split("|")[0] == name]
        if not rows:
            continue
        ranks = ", ".join(_ranks(r) for r in rows)
        lrs = ", ".join(format(r["lr"], "g") for r in rows)
        secs = ", ".join(str(r["seconds"]) for r in rows if "seconds" in r) or "-"
        lines.append(f"| {name} | {_acc(rows)} | {ranks} | {lrs} | {secs} |")
    Path(args.doc).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
