"""Training speed of issue 17 item 4: one training step (forward, backward, AdamW step) of
every zoo family, dense vs compressed, side by side in one process, one thread.

Each family's zoo model with random weights (seeded) is compressed one shot with the CLI
defaults (``compress`` of ``speed_table.py``: TT at the auto rank, data-free pruning) and
timed as:

``dense``          the dense zoo model (the bar)
``lighter``        ``finetune``'s default (``--train-path lighter``): per Linear the compiled
                   kernel where it runs, else the path whose backward keeps fewer bytes;
                   convolutions on their chain
``chain``          the compressed model, every tensorized layer on its chain (``--train-path chain``)
``kernel``         every TT/TR Linear forward and backward in one compiled C call over its kept
                   entries (``--train-path kernel``), convolutions on their chain
``rebuild``        every linear chain on its rebuilt dense weight, a pruned TT-matrix only the
                   block its masks keep (``--train-path dense``)
``auto``           per layer the fastest of chain, kernel and rebuild, measured first
                   (``--train-path auto``)

Steps run interleaved (one step of each engine per round, rotating who goes first) on a
fixed random batch (``--batch``, default 128: ``finetune``'s default), after warm-up
rounds; figures are medians of per-step CPU time (``time.thread_time``, so a loaded
machine inflates them less than wall time would) and the ratio to dense of each
engine's median. Masks ride on the cores, so every compressed step is a real masked step.
Every engine trains with ``finetune``'s optimizer (:func:`tedepr_cli.train._optimizer`:
AdamW, torch's default implementation) at lr 1e-3.

    python benchmarks/train_speed.py [--families ...] [--sparsity 0.995] [--rounds 15]
                                     [--json-out FILE] [--md-out FILE] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from speed_table import FAMILIES, compress  # noqa: E402

from tedepr_cli import zoo  # noqa: E402
from tedepr_cli.fsutil import atomic_output  # noqa: E402
from tedepr_cli.machine import cpu_model  # noqa: E402
from tedepr_cli.surgery import example_input  # noqa: E402
from tedepr_cli.tensorized.train_path import leaner, measure, rebuildable, set_train_paths, uniform  # noqa: E402
from tedepr_cli.train import TrainOptions, _optimizer  # noqa: E402

ENGINES = ("dense", "lighter", "chain", "kernel", "rebuild", "auto")


def engines(family: str, sparsity: float, seed: int, x: torch.Tensor) -> tuple[dict[str, Any], dict]:
    """The six models of a family, each with its own optimizer, and the auto and lighter
    choices."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dense = getattr(zoo, family)()
    art = compress(family, sparsity, seed)
    models: dict[str, torch.nn.Module] = {"dense": dense}
    for name in ENGINES[1:]:
        models[name] = copy.deepcopy(art.model)
    set_train_paths(models["chain"], uniform(models["chain"], "chain"))  # every layer, whatever its default
    set_train_paths(models["rebuild"], uniform(models["rebuild"], "dense"))
    set_train_paths(models["kernel"], uniform(models["kernel"], "kernel"))
    lighter = leaner(models["lighter"], x)
    set_train_paths(models["lighter"], lighter)
    timings = measure(models["auto"], x)
    set_train_paths(models["auto"], {n: str(t["path"]) for n, t in timings.items()})
    opts = TrainOptions(lr=1e-3)
    out = {}
    for name, m in models.items():
        m.train()
        out[name] = (m, _optimizer(m, opts))
    return out, timings, lighter


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """CPU seconds of one training step."""
    t0 = time.thread_time()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    return time.thread_time() - t0


def run_family(family: str, args: argparse.Namespace) -> dict[str, Any]:
    g = torch.Generator().manual_seed(args.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        probe = getattr(zoo, family)()
    x = example_input(probe, tuple(probe.input_shape), args.batch, "rand", g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    eng, timings, _ = engines(family, args.sparsity, args.seed, x)
    times: dict[str, list[float]] = {e: [] for e in ENGINES}
    for r in range(args.warmup + args.rounds):
        order = ENGINES[r % len(ENGINES):] + ENGINES[: r % len(ENGINES)]
        for e in order:
            t = step(*eng[e], x, y)
            if r >= args.warmup:
                times[e].append(t)
    med = {e: statistics.median(v) for e, v in times.items()}
    # what each engine trained on: every rebuildable layer's path as set (a layer the choice
    # did not reach keeps its default, e.g. an LSTM's input projections: their rebuild)
    ran = {e: {n: m.train_path for n, m in rebuildable(eng[e][0]).items()} for e in ("lighter", "auto")}
    return {"family": family, "batch": args.batch,
            "ms_per_step": {e: round(1e3 * v, 2) for e, v in med.items()},
            "ratio_to_dense": {e: round(med[e] / med["dense"], 3) for e in ENGINES},
            "auto": ran["auto"], "auto_measured": {n: t["path"] for n, t in timings.items()},
            "auto_rebuilt": sum(p == "dense" for p in ran["auto"].values()), "layers": len(ran["auto"]),
            "lighter": ran["lighter"], "lighter_rebuilt": sum(p == "dense" for p in ran["lighter"].values()),
            "lighter_kernel": sum(p == "kernel" for p in ran["lighter"].values()),
            "auto_kernel": sum(p == "kernel" for p in ran["auto"].values())}


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["# Training speed: compressed vs dense, per step", "",
             f"{m['cpu']}, {m['cores']} cores, 1 thread, torch {m['torch']}; load average {m['load_before']} "
             f"before, {m['load_after']} after (1 min); sparsity {100 * report['sparsity']:g} %, batch "
             f"{report['batch']}, AdamW (finetune's); {report['rounds']} interleaved rounds after "
             f"{report['warmup']} warm-up; medians of per-step CPU time (ms) and their ratio to dense "
             "(< 1: faster than dense). `lighter`: finetune's default, per Linear the compiled "
             "kernel where it runs, else the path whose backward keeps fewer bytes, convolutions on "
             "their chain; `kernel`: every TT/TR Linear on the compiled training chain; `auto`: per "
             "layer the fastest of chain, kernel and rebuild, measured first (layers rebuilt / on the "
             "kernel, of all).", "",
             "| model | dense | lighter | chain | kernel | rebuild | auto | lighter / dense | chain / dense "
             "| kernel / dense | rebuild / dense | auto / dense | lighter rebuilt / kernel "
             "| auto rebuilt / kernel |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["families"]:
        ms, q = r["ms_per_step"], r["ratio_to_dense"]
        lines.append(f"| {r['family']} | {ms['dense']:.1f} | {ms['lighter']:.1f} | {ms['chain']:.1f} | "
                     f"{ms['kernel']:.1f} | {ms['rebuild']:.1f} | {ms['auto']:.1f} | "
                     f"**{q['lighter']:.2f}** | {q['chain']:.2f} | {q['kernel']:.2f} | {q['rebuild']:.2f} | "
                     f"{q['auto']:.2f} | "
                     f"{r['lighter_rebuilt']}/{r['lighter_kernel']} of {r['layers']} | "
                     f"{r['auto_rebuilt']}/{r['auto_kernel']} of {r['layers']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--sparsity", type=float, default=0.995)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="batch 8, 2 rounds: a smoke run, not a measurement")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--md-out", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.rounds, args.warmup = 8, 2, 1
    fams = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in fams if f not in FAMILIES]
    if unknown:
        print(f"train_speed: unknown families {', '.join(unknown)}; choose from {', '.join(FAMILIES)}",
              file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_before = round(os.getloadavg()[0], 2)
        rows = [run_family(f, args) for f in fams]
        report = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                              "python": platform.python_version(), "load_before": load_before,
                              "load_after": round(os.getloadavg()[0], 2)},
                  "sparsity": args.sparsity, "batch": args.batch, "rounds": args.rounds,
                  "warmup": args.warmup, "families": rows}
    finally:
        torch.set_num_threads(threads)
    md = markdown(report)
    print(md)
    for path, text in ((args.json_out, json.dumps(report, indent=2) + "\n"), (args.md_out, md)):
        if path is not None:
            with atomic_output(path, overwrite=True) as tmp_file:
                tmp_file.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
