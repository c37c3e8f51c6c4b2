"""The compressed model against the dense model on its best runtime, every zoo family (issue 17).

    python benchmarks/speed_table.py            # writes benchmarks/results/speed_table.{md,json}
    python benchmarks/speed_table.py --quick --families lenet300 --out /tmp/st   # a smoke run
    python benchmarks/speed_table.py --families lstm --update "why"   # re-measure one family

For each zoo family (lenet300, lenet5, lstm, resnet20, vgg11, vit_tiny; the zoo's default
shapes, random init with a seed: speed does not depend on training), compressed one-shot
with the CLI defaults (``tedepr prune ARCH --sparsity S``: TT decomposition at the auto rank,
then the default criterion, which without data is SynFlow) at 99 % and 99.5 %, and for
batches 1 and 32, one thread, this script plans with ``tedepr plan``'s planner and times,
interleaved (A B C D E A B C ...), medians of per-call CPU time (``time.thread_time``: torch
and one-thread onnxruntime run on the calling thread, so time the scheduler gives to other
tenants of a shared machine is not counted):

- ``dense torch``: the original dense model in PyTorch
- ``dense ort``: the original dense model exported to ONNX, in onnxruntime
- ``tedepr engine``: the compressed model on the planner's per-layer plan (compiled kernels,
  dense rebuilds, torch chains, fused runs: the ``layers`` runtime)
- ``compressed ONNX``: the compressed model's ONNX (``tedepr export``) in onnxruntime
- ``chosen``: what the planner chose (one of the above for the compressed model, or the
  compressed model rebuilt dense on the dense original's best runtime when nothing beats it)

in two regimes: ``hot`` (every timed call right after an untimed call of the same engine,
so its weights and buffers are in cache whatever ran before) and ``cold`` (before every
call a buffer twice the last-level cache is written, evicting the weights; outside the
timed region). When the planner chose a compressed runtime, the ``chosen`` column is that
column's measurement (the same module: timing it twice in a row would time it hot). The
baseline is the best dense runtime (the lower of dense torch and dense ort);
the speed-up is its median over the chosen runtime's median.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tedepr_cli import zoo  # noqa: E402
from tedepr_cli.arch import ArchSpec  # noqa: E402
from tedepr_cli.artifact import Artifact  # noqa: E402
from tedepr_cli.execution import Runtimes, build_model, plan_execution  # noqa: E402
from tedepr_cli.machine import cpu_model  # noqa: E402
from tedepr_cli.pruning.prune import PruneOptions, prune  # noqa: E402
from tedepr_cli.timing import Plan, interleaved, speedup, wall_timer  # noqa: E402

FAMILIES = ("lenet300", "lenet5", "lstm", "resnet20", "vgg11", "vit_tiny")
COLUMNS = ("dense-torch", "dense-ort", "tedepr", "chain-ort", "chosen")
LABELS = {"dense-torch": "dense torch", "dense-ort": "dense ort", "tedepr": "tedepr engine",
          "chain-ort": "compressed ONNX", "chosen": "chosen"}
REGIMES = ("hot", "cold")


def llc_bytes() -> int:
    """The last-level cache of CPU 0 in bytes (32 MiB if the kernel does not say)."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (d / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1024, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        best = max(best, int(size.rstrip("KMG")) * mult)
    return best or 32 << 20


class Evictor:
    """Writes a buffer twice the last-level cache: afterwards the weights are out of cache."""

    def __init__(self) -> None:
        self.buf = np.zeros(2 * llc_bytes() // 8, dtype=np.float64)

    def __call__(self) -> None:
        self.buf += 1.0


def compress(family: str, sparsity: float, seed: int) -> Artifact:
    """``tedepr prune`` in-process on the zoo model with random weights (``seed``): one-shot
    decomposed (TT-SVD at the auto rank) and pruned with the CLI defaults (no data)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(zoo, family)().eval()
    opts = PruneOptions(sparsity=sparsity, seed=seed)
    art, _ = prune(Artifact(model=model, arch=ArchSpec(family, {})), opts)
    art.model.eval()
    return art


def measure(fns: dict[str, Any], regime: str, warmup: int, rounds: int, evict: Evictor
            ) -> dict[str, list[float]]:
    """Per-call CPU seconds of every callable, interleaved. Hot: each timed call right after an
    untimed call of the same engine (its weights and buffers in cache, whatever ran before);
    cold: each timed call right after the cache was flushed."""
    cpu = wall_timer(time.thread_time)

    def timer(fn: Any) -> float:
        if regime == "hot":
            fn()
        else:
            evict()
        return cpu(fn)

    return interleaved(fns, Plan(warmup=warmup, iters=rounds, min_iters=1), clock=time.thread_time,
                       timers={k: timer for k in fns})


def run_config(art: Artifact, rt: Runtimes, batch: int, args: argparse.Namespace, evict: Evictor
               ) -> dict[str, Any]:
    plan = plan_execution(art, batch, 1, seed=args.seed, runtimes=rt, reps=args.plan_reps,
                          rounds=args.plan_rounds)
    mods = {"dense-torch": rt.baseline("dense-torch"), "dense-ort": rt.baseline("dense-ort"),
            "tedepr": build_model(art, plan, 1, runtime="layers", runtimes=rt),
            "chain-ort": rt.module("chain-ort")}
    same = {"layers": "tedepr", "chain-ort": "chain-ort"}.get(plan["runtime"])
    if same is None:  # the dense fallback: the compressed model rebuilt dense, timed as its own column
        mods["chosen"] = build_model(art, plan, 1, runtimes=rt)
    x = torch.rand(batch, *art.input_shape, generator=torch.Generator().manual_seed(args.seed))
    fns = {k: (lambda m=m: m(x)) for k, m in mods.items() if m is not None}
    out: dict[str, Any] = {"batch": batch, "runtime": plan["runtime"],
                           "reason": plan["runtimes"].get("reason"),
                           "ort_levels": plan["runtimes"].get("ort_levels"),
                           "planner_us": plan["runtimes"].get("measured_us"),
                           "unavailable": {k: v for k, v in rt.unavailable.items()}, "regimes": {}}
    for regime in REGIMES:
        with torch.no_grad():
            times = measure(fns, regime, args.warmup, args.rounds, evict)
        if same is not None:  # the chosen runtime is a compressed column: the same module, same times
            times["chosen"] = times[same]
        med = {k: statistics.median(v) for k, v in times.items()}
        dense = min((k for k in ("dense-torch", "dense-ort") if k in med), key=med.get)
        out["regimes"][regime] = {
            "median_us": {k: round(1e6 * v, 2) for k, v in med.items()},
            "iqr_us": {k: round(1e6 * (float(np.percentile(v, 75)) - float(np.percentile(v, 25))), 2)
                       for k, v in times.items()},
            "best_dense": dense, "speedup_chosen_vs_best_dense": round(med[dense] / med["chosen"], 3),
            "paired_speedup_chosen": speedup(times[dense], times["chosen"]),
            "speedup_vs_best_dense": {k: round(med[dense] / v, 3) for k, v in med.items()}}
    return out


def fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# Speed: compressed vs dense on its best runtime ({m['cpu']})", "",
             f"{m['cores']} cores, 1 thread, torch {m['torch']}, onnxruntime {m['onnxruntime']}; "
             "load average "
             f"{m['loadavg_before'][0]:.2f} before, {m['loadavg_after'][0]:.2f} after (1 min); "
             f"{report['options']['rounds']} interleaved rounds after {report['options']['warmup']} warm-up, "
             "medians of per-call CPU time (µs); hot: each timed call right after an untimed call of the "
             f"same engine; cold: a buffer of 2x the last-level cache ({m['llc_bytes'] >> 20} MiB) written "
             "before every call. Speed-up: the best dense runtime (**bold**) over the planner's chosen "
             "runtime (`dense-*`: nothing beat dense, the compressed model runs rebuilt dense there).", "",
             "| model | sparsity | batch | regime | dense torch | dense ort | tedepr engine | "
             "compressed ONNX | chosen runtime | chosen | speed-up vs best dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        for regime, g in r["regimes"].items():
            med = g["median_us"]
            cells = []
            for k in ("dense-torch", "dense-ort", "tedepr", "chain-ort"):
                c = fmt_us(med.get(k))
                cells.append(f"**{c}**" if k == g["best_dense"] else c)
            lines.append(f"| {r['family']} | {100 * r['sparsity']:g} % | {r['batch']} | {regime} | "
                         + " | ".join(cells) + f" | {r['runtime']} | {fmt_us(med['chosen'])} | "
                         f"{g['speedup_chosen_vs_best_dense']:.2f}x |")
    for u in report.get("updates", []):
        lines += ["", f"Rows of {', '.join(u['families'])} re-measured in a later run "
                  f"({u['reason']}; load average {u['loadavg_before'][0]:.2f} before, "
                  f"{u['loadavg_after'][0]:.2f} after)."]
    lines += ["", "Planner's reasons:", ""]
    for r in report["rows"]:
        levels = r.get("ort_levels")  # absent in runs before the planner measured levels
        lv = ("; onnxruntime levels " + ", ".join(f"{k} {v}" for k, v in sorted(levels.items()))
              if levels else "")
        lines.append(f"- {r['family']} {100 * r['sparsity']:g} % batch {r['batch']}: {r['runtime']} "
                     f"({r['reason']}{lv})")
    return "\n".join(lines) + "\n"


def merge(old: dict[str, Any], new: dict[str, Any], reason: str) -> dict[str, Any]:
    """``old`` with the rows of ``new``'s families replaced by ``new``'s, the later run's
    machine load recorded under ``updates`` (rows of one report stay comparable only
    within a run: the update says which rows came later)."""
    fams = set(new["options"]["families"])
    if new["machine"]["cpu"] != old["machine"]["cpu"]:
        raise SystemExit(f"cannot update: measured on {new['machine']['cpu']}, "
                         f"the table on {old['machine']['cpu']}")
    rows = [r for r in old["rows"] if r["family"] not in fams] + new["rows"]
    order = {f: i for i, f in enumerate(FAMILIES)}
    rows.sort(key=lambda r: (order.get(r["family"], len(order)), r["sparsity"], r["batch"]))
    upd = [u for u in old.get("updates", []) if not fams.issuperset(u["families"])]
    upd.append({"families": sorted(fams), "reason": reason,
                "loadavg_before": new["machine"]["loadavg_before"],
                "loadavg_after": new["machine"]["loadavg_after"]})
    return {**old, "rows": rows, "updates": upd}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--sparsities", default="0.99,0.995")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--rounds", type=int, default=41, help="interleaved timed rounds per regime")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--plan-reps", type=int, default=25, help="the planner's rounds per layer decision")
    ap.add_argument("--plan-rounds", type=int, default=25, help="the planner's whole-model rounds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny iterations: a smoke run, not a measurement")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--update", metavar="REASON",
                    help="replace only these families' rows in the table already in --out "
                         "(REASON: why they were re-measured, printed under the table)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.plan_reps, args.plan_rounds = 3, 1, 3, 3
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    logging.getLogger("tedepr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    import onnxruntime

    report: dict[str, Any] = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                    "llc_bytes": llc_bytes(), "loadavg_before": list(os.getloadavg())},
        "options": {"families": families, "sparsities": sparsities, "batches": batches, "rounds": args.rounds,
                    "warmup": args.warmup, "plan_reps": args.plan_reps, "plan_rounds": args.plan_rounds,
                    "seed": args.seed, "quick": args.quick, "threads": 1, "clock": "time.thread_time"},
        "rows": []}
    evict = Evictor()
    for family in families:
        for s in sparsities:
            t0 = time.time()
            art = compress(family, s, args.seed)
            rt = Runtimes(art, 1, args.seed)
            for b in batches:
                row = {"family": family, "sparsity": s, **run_config(art, rt, b, args, evict)}
                report["rows"].append(row)
                hot = row["regimes"]["hot"]
                print(f"{family} {100 * s:g} % batch {b}: chosen {row['runtime']}, hot "
                      + ", ".join(f"{k} {fmt_us(v)}" for k, v in hot["median_us"].items())
                      + f" µs; {hot['speedup_chosen_vs_best_dense']:.2f}x vs best dense "
                      f"({time.time() - t0:.0f} s)", flush=True)
    report["machine"]["loadavg_after"] = list(os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    if args.update:
        report = merge(json.loads((args.out / "speed_table.json").read_text()), report, args.update)
    (args.out / "speed_table.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (args.out / "speed_table.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
