"""Speed: `tedepr bench` (side-by-side latency, size and accuracy) and `tedepr plan`
(store the per-layer execution plan in an artifact)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from ..console import print_json, stdout, table
from .common import (
    KEPT_NOTE,
    ConfirmArch,
    DataOpt,
    JsonOut,
    Output,
    Overwrite,
    Quiet,
    Seed,
    Verbose,
    _allow_import,
    command,
)


@command
def bench(
    path: Annotated[Path, typer.Argument(
        help="Compressed artifact, finetune run or export directory (with its model.safetensors).",
        show_default=False)],
    baseline: Annotated[Path | None, typer.Option(
        "--baseline", help="The dense checkpoint it came from (weights into the same architecture); "
        "without it the dense architecture is built with random weights (timing only).")] = None,
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes, e.g. 1,32.")] = "1,32",
    threads: Annotated[int, typer.Option("--threads", help="Threads for every engine (default 1: "
                                         "two threads on two shared cores are noisy).")] = 1,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed rounds first.")] = 10,
    iters: Annotated[int, typer.Option("--iters", help="Timed rounds (each runs every engine once).")] = 100,
    seconds: Annotated[float | None, typer.Option("--time", help="Time budget in seconds instead of "
                                                  "--iters.")] = None,
    engines: Annotated[str | None, typer.Option(
        "--engines", help="Comma list of dense-torch, dense-ort, chain-torch, tedepr, chain-ort, triton, "
        "and on a GPU dense-torch-graph, chain-torch-graph, triton-graph (CUDA-graph replays) "
        "(default: all that can run here).")] = None,
    strict: Annotated[bool, typer.Option("--strict-engines", help="Fail (exit 10) instead of skipping "
                                         "an unavailable engine named in --engines.")] = False,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda (GPU timing with CUDA events; "
                                        "exit 10 without a GPU).")] = "cpu",
    replan: Annotated[bool, typer.Option("--replan", help="Ignore stored execution plans.")] = False,
    memory: Annotated[bool, typer.Option(
        "--memory/--no-memory", help="Measure peak inference memory per engine and batch (on the CPU "
        "one fresh process per figure, about 2 s each).")] = True,
    data: DataOpt = None,
    seed: Seed = 0,
    json_file: Annotated[Path | None, typer.Option(
        "--json-out", help="Also write every figure as JSON to this file (an existing one: only a "
        "previous bench report, with --overwrite).")] = None,
    fail_if_slower: Annotated[float | None, typer.Option(
        "--fail-if-slower", help="Gate (exit 11): fail if the tedepr engine (triton on --device cuda) is "
        "slower than RATIO x the dense baseline on its best runtime (dense-torch or dense-ort, whichever "
        "measured faster), or x the same engine in --compare-to.")] = None,
    compare_to: Annotated[Path | None, typer.Option(
        "--compare-to", help="A saved bench JSON for --fail-if-slower.")] = None,
    max_size: Annotated[int | None, typer.Option(
        "--max-size", help="Gate (exit 12): fail if the compressed artifact exceeds BYTES.")] = None,
    min_speedup: Annotated[float | None, typer.Option(
        "--min-speedup", help="Gate (exit 13): fail if the gated engine's speed-up is below X.")] = None,
    arch: ConfirmArch = None,
    overwrite: Overwrite = False,
    json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False,
) -> None:
    """Honest latency and size: every engine side by side, interleaved, with medians, IQR,
    percentiles, speed-ups with their spread, sizes, peak memory, planner choices and accuracy."""
    import json as _json

    from ..bench.core import BenchOptions, check_gates, load_saved, load_target, run_bench
    from ..console import human_bytes, log
    from ..device import resolve as resolve_device
    from ..errors import UsageError

    try:
        batches = [int(b) for b in batch.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batch takes integers like 1,32; got {batch!r}") from None
    opts = BenchOptions(batches=batches, threads=threads, warmup=warmup, iters=iters, seconds=seconds,
                        engines=[e.strip() for e in engines.split(",")] if engines else None,
                        device=device, strict=strict, replan=replan, seed=seed, memory=memory)
    opts.validate()
    resolve_device(opts.device)  # no GPU: exit 10 before anything is loaded
    if compare_to is not None and fail_if_slower is None:
        raise UsageError("--compare-to is used by --fail-if-slower: give both")
    saved = load_saved(compare_to) if compare_to is not None else None
    if baseline is not None and not baseline.exists():
        from ..errors import InputNotFound

        raise InputNotFound(f"--baseline {baseline} does not exist")
    if json_file is not None:
        from ..bench.core import is_report
        from ..errors import OutputError
        from ..fsutil import check_output

        check_output(json_file, overwrite, directory=False)
        if json_file.is_file() and not is_report(json_file):
            raise OutputError(f"{json_file} is not a tedepr bench report: --overwrite only replaces "
                              "tedepr outputs; name a new path or remove it yourself")
    target = load_target(path, _allow_import(arch))
    with _progress(quiet) as progress:
        report = run_bench(target, opts, baseline, data, progress=progress)
    failures = check_gates(report, fail_if_slower, max_size, min_speedup, saved, opts.gate)
    report["gates"] = {"engine": opts.gate, "fail_if_slower": fail_if_slower, "max_size": max_size,
                       "min_speedup": min_speedup, "failed": [str(f) for f in failures]}
    if json_file is not None:
        from ..fsutil import atomic_output

        with atomic_output(json_file, overwrite=True) as tmp:
            tmp.write_text(_json.dumps(report, indent=2, default=str) + "\n")
        log.info(f"wrote {json_file}")
    if json_out:
        print_json(report)
    else:
        _print_bench(report, human_bytes)
    for w in report["warnings"]:
        log.warning(w)
    noise = report["noise"]
    if noise["noisy_rows"] and not noise["inconclusive"]:  # else it is among the warnings
        log.info(noise["summary"])
    if failures:
        for f in failures[1:]:
            log.error(str(f))
        raise failures[0]


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[str, int, int | None], None] | None]:
    """A rich progress line on stderr while bench runs, on a TTY only (None elsewhere)."""
    from ..console import is_tty

    if quiet or not is_tty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..console import stderr as err_console

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as p:
        task = p.add_task("bench", total=None)

        def update(what: str, done: int, total: int | None) -> None:
            p.update(task, description=what, completed=done, total=total)

        yield update


def _levels_line(levels: dict[str, str]) -> str:
    """The onnxruntime graph optimization level the plan measured fastest per runtime
    (SessionOptions.graph_optimization_level ORT_ENABLE_ALL / _BASIC / _EXTENDED)."""
    return "onnxruntime graph optimization level: " + ", ".join(
        f"{k} {v} (ORT_ENABLE_{v.upper()})" for k, v in sorted(levels.items()))


def _print_bench(report: dict[str, Any], human_bytes) -> None:
    m = report["machine"]
    where = f"{m['gpu']['name']} (CUDA {m['gpu']['cuda']}), " if "gpu" in m else ""
    stdout.print(f"{report['target']} vs dense baseline ({report['baseline_weights']}); {where}{m['cpu']}, "
                 f"{m['threads']} thread(s), torch {m['torch']}, onnxruntime {m['onnxruntime']}, kernels "
                 f"{'on' if m['kernel']['available'] else 'off'}")
    for b, row in report["results"].items():
        rows = []
        for e, s in row.items():
            sp, bd = s["speedup_vs_dense_torch"], s["speedup_vs_best_dense"]
            rows.append([e, 1e6 * s["median_s"], 1e6 * s["iqr_s"], 1e6 * s["p90_s"], 1e6 * s["p99_s"],
                         f"{1e6 * s['mean_s']:.1f} ± {1e6 * s['std_s']:.1f}", s["throughput_per_s"],
                         f"{sp['median']:.2f}x [{sp['q1']:.2f}-{sp['q3']:.2f}]", f"{bd['median']:.2f}x",
                         human_bytes(s["peak_memory_bytes"]) if s["peak_memory_bytes"] is not None else None])
        stdout.print(table(f"batch {b} (µs)", ["engine", "median", "IQR", "p90", "p99", "mean ± σ",
                                               "samples/s", "speed-up vs dense", "vs best dense", "peak mem"],
                           rows))
    srows = [[k, v.get("params"), v.get("kept"), v.get("effective_nonzero"), v.get("other"), v["bytes"],
              human_bytes(v["bytes"]), v["gzip_bytes"]] for k, v in report["sizes"].items()]
    stdout.print(table("size", ["format", "params", "kept", "effective non-zero", "other params", "bytes", "",
                                "gzip bytes"], srows))
    stdout.print(KEPT_NOTE)
    for b, plan in report.get("execution_plans", {}).items():
        f = plan["flops"]
        choices = ", ".join(f"{n}={r['choice']}" for n, r in plan["layers"].items())
        stdout.print(f"plan at batch {b}{' (fresh)' if plan.get('fresh') else ' (stored)'}: runtime "
                     f"{plan.get('runtime', 'layers')} ({(plan.get('runtimes') or {}).get('reason', '-')}); "
                     f"layers {choices}; "
                     f"{100 * f['share_on_sparse_or_factorized']:.1f} % of the compressed layers' FLOPs on "
                     f"sparse/factorized kernels")
        for fu in plan.get("fusions") or []:
            stdout.print(f"  fused: {'+'.join(fu['layers'])} (one compiled call)")
        if (plan.get("runtimes") or {}).get("ort_levels"):
            levels = _levels_line(plan["runtimes"]["ort_levels"])
            stdout.print(f"  {levels}; the onnxruntime engines ran there")
    acc = report.get("accuracy")
    if acc and acc.get("metric") == "cosine":
        got = acc.get("cosine_to_baseline")
        stdout.print(f"mean cosine to the baseline on {acc['data']} (test, no labels): "
                     + (f"{got:.4f}" if got is not None else "unknown (no --baseline)"))
    elif acc:
        base = "unknown (no --baseline)" if acc["baseline"] is None else f"{100 * acc['baseline']:.2f} %"
        stdout.print(f"accuracy on {acc['data']} (test): baseline {base}, compressed "
                     f"{100 * acc['compressed']:.2f} %")
    tri = report.get("triton")
    if tri and tri["max_rel_error"]:
        errs = ", ".join(f"batch {b} {e:.2e}" for b, e in tri["max_rel_error"].items())
        stdout.print(f"triton: {len(tri['layers'])} layer(s) on the Triton kernel"
                     f"{' (interpreted)' if tri['interpreted'] else ''}; max relative error vs "
                     f"{tri['reference']}: {errs}")
    stdout.print(f"peak mem: {report['memory']['method']}")
    for name, why in report.get("skipped_engines", {}).items():
        stdout.print(f"skipped {name}: {why}")


@command
def plan(
    path: Annotated[Path, typer.Argument(help="Compressed artifact (or finetune run).", show_default=False)],
    output: Output,
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes to plan for, e.g. 1,32.")] = "1,32",
    threads: Annotated[int, typer.Option("--threads", help="Threads the plan is made for.")] = 1,
    override: Annotated[list[str] | None, typer.Option(
        "--override", help="Force a layer's engine: name=kernel|dense|torch (globs, repeatable).")] = None,
    runtime: Annotated[str | None, typer.Option(
        "--runtime", help="Force the whole-model runtime: layers, chain-ort (formerly onnx), dense-torch or "
        "dense-ort (default: the fastest measured, never slower than the dense original's best "
        "runtime).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random batch layers are timed on.")] = 0,
    overwrite: Overwrite = False,
    arch: ConfirmArch = None,
    json_out: JsonOut = False, verbose: Verbose = 0, quiet: Quiet = False,
) -> None:
    """Choose, per batch size, how the compressed model runs on this machine: per layer
    (compiled kernel, dense rebuild or torch chain; fused runs of layers), then the whole
    model's runtime (that per-layer plan, the compressed ONNX in onnxruntime, or the dense
    model on torch or onnxruntime when nothing beats the dense original on its best runtime),
    and store the plan in a copy of the artifact; `bench` reuses it on the same machine after a
    quick re-check (`tedepr.accelerate` takes a model, not an artifact, and measures afresh)."""
    import torch

    from ..artifact import load_artifact, save_artifact, single_file
    from ..console import log
    from ..errors import UsageError
    from ..execution import RUNTIMES, Runtimes, plan_execution, runtime_name, store_plan
    from ..execution.runtimes import RENAMED
    from ..fsutil import check_output

    try:
        batches = [int(b) for b in batch.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batch takes integers like 1,32; got {batch!r}") from None
    if not batches or min(batches) < 1 or threads < 1:
        raise UsageError("--batch needs positive sizes and --threads >= 1")
    overrides = {}
    for item in override or []:
        name, eq, choice = item.partition("=")
        if not eq:
            raise UsageError(f"--override takes name=kernel|dense|torch, got {item!r}")
        overrides[name] = choice
    if runtime is not None:
        if runtime not in RUNTIMES and runtime not in RENAMED:
            raise UsageError(f"--runtime takes one of {', '.join(RUNTIMES)}, got {runtime!r}")
        runtime = runtime_name(runtime)  # onnx: the old name of chain-ort, with a deprecation warning
    check_output(output, overwrite, directory=not single_file(output))
    art = load_artifact(path, allow_import=_allow_import(arch))
    torch.set_num_threads(threads)
    plans = {}
    rt = Runtimes(art, threads, seed)
    for b in batches:
        p = plan_execution(art, b, threads, overrides=overrides, seed=seed, runtimes=rt, runtime=runtime)
        store_plan(art, p)
        plans[str(b)] = p
    art.record("plan", {"batch": batches, "threads": threads, "override": overrides, "runtime": runtime},
               seed=seed)
    save_artifact(art, output, overwrite=overwrite)
    log.info(f"wrote {output}")
    if json_out:
        print_json({"output": str(output), "plans": plans})
        return
    for b, p in plans.items():
        rows = [[n, r["choice"], r["reason"], *(r.get("measured_us", {}).get(c) for c in ("kernel", "dense",
                                                                                       "torch"))]
                for n, r in p["layers"].items()]
        stdout.print(table(f"execution plan, batch {b} ({threads} thread(s)); µs measured per layer",
                           ["layer", "choice", "why", "kernel", "dense", "torch"], rows, right={3, 4, 5}))
        for fu in p.get("fusions") or []:
            stdout.print(f"  fused: {'+'.join(fu['layers'])} (one compiled call)")
        rts = p.get("runtimes") or {}
        if rts.get("measured_us"):
            base = rts["baseline"]
            stdout.print(f"  whole model, median µs of {rts['rounds']} interleaved rounds ({rts['clock']}): "
                         + ", ".join(f"{k} {v}" for k, v in rts["measured_us"].items())
                         + f" (dense-*: {base['model']})")
        stdout.print(f"  runtime: {p['runtime']} ({rts.get('reason', '-')})")
        if rts.get("ort_levels"):
            stdout.print(f"  {_levels_line(rts['ort_levels'])}")
