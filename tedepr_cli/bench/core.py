"""Side-by-side benchmark of a compressed model against its dense original (``tedepr bench``).

The engines (:mod:`.engines`: dense and compressed, in PyTorch, onnxruntime, the compiled
CPU kernels and Triton) each skipped with a reason when they cannot run here. All engines
of one batch size are timed interleaved (:mod:`tedepr_cli.timing`), single-threaded by default; on
``--device cuda`` with CUDA events (onnxruntime's CUDA provider, which runs on a stream
of its own, with a synchronised wall clock). Sizes, the planner's per-layer choices, the
FLOP share on sparse/factorized kernels, peak inference memory (:mod:`.memory`), the
Triton engine's error against a float64 reference and (with data) accuracy are reported
beside the timings.
"""

from __future__ import annotations

import copy
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..artifact import Artifact, load_artifact, save_artifact
from ..device import exact_fp32
from ..device import resolve as resolve_device
from ..errors import (
    BadInput,
    EngineUnavailable,
    SizeGateFailed,
    SlowerGateFailed,
    SpeedupGateFailed,
    UsageError,
    opt,
)
from ..machine import cpu_model
from ..pruning.targets import kept_counts
from ..storage import byte_sizes
from ..surgery import example_input
from ..timing import NOISY_IQR, Plan, Timer, cuda_event_timer, interleaved, speedup, summarize, wall_timer
from ..version import __version__
from .engines import (
    BASELINE,
    DENSE_ENGINES,
    ENGINES,
    GRAPH_ENGINES,
    ORT_ENGINES,
    Engines,
    input_batch,
    load_baseline,
    ort_provider,
)
from .memory import CPU_METHOD, CUDA_METHOD, cuda_peak, measure_in_subprocess

SCHEMA = "tedepr-bench"
SCHEMA_VERSION = 1
TRITON_REFERENCE = "the compressed model in float64 on the CPU (torch ops)"
Progress = Callable[[str, int, "int | None"], None]  # (what, done, total or None)


@dataclass
class BenchOptions:
    batches: list[int] = field(default_factory=lambda: [1, 32])
    threads: int = 1
    warmup: int = 10
    iters: int = 100
    seconds: float | None = None
    engines: list[str] | None = None  # None: every engine that can run here
    device: str = "cpu"
    strict: bool = False  # an unavailable requested engine fails instead of being skipped
    replan: bool = False
    gate_engine: str | None = None  # None: tedepr on the CPU, triton on CUDA
    seed: int = 0
    memory: bool = True  # measure peak inference memory per engine and batch

    def validate(self) -> None:
        if not self.batches or any(b < 1 for b in self.batches):
            raise UsageError(f"{opt('batch')} takes positive integers, e.g. 1,32")
        if self.threads < 1 or self.warmup < 0 or self.iters < 1:
            raise UsageError(f"{opt('threads')} >= 1, {opt('warmup')} >= 0 and {opt('iters')} >= 1 are "
                             "required")
        if self.seconds is not None and self.seconds <= 0:
            raise UsageError(f"{opt('time')} must be > 0 seconds")
        unknown = [e for e in (self.engines or []) if e not in ENGINES]
        if unknown:
            raise UsageError(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
        if self.device not in ("cpu", "cuda"):
            raise UsageError(f"{opt('device')} must be cpu or cuda")

    @property
    def gate(self) -> str:
        """The engine the CI gates judge."""
        return self.gate_engine or ("triton" if self.device == "cuda" else "tedepr")


# ---------------------------------------------------------------------------- inputs
@dataclass
class Target:
    art: Artifact
    onnx: Path | None  # the compressed model's ONNX, when the target is an export directory
    path: Path


def load_target(path: Path, allow_import: str | None = None) -> Target:
    """An artifact, a finetune run, or an export directory (model.safetensors, and its
    model.fast.onnx, else model.onnx, as the ``chain-ort`` graph).
    ``allow_import``: the import-path architecture the user named (``--arch``), see
    :func:`~tedepr_cli.artifact.load_artifact`. An export directory without
    model.safetensors (``export --to onnx`` only) raises :class:`BadInput` saying what to
    pass: bench measures the compressed model against its dense original, and an ONNX file
    carries neither the architecture nor the model the other engines run."""
    if path.is_dir() and (path / "export.json").is_file() and not (path / "model.safetensors").is_file():
        onnx_files = sorted(p.name for p in path.glob("*.onnx"))
        raise BadInput(
            f"{path} is an export without model.safetensors ({', '.join(onnx_files) or 'no model'} only): "
            "bench times the compressed model against its dense original on every engine, and an ONNX "
            "file carries neither; pass the artifact it was exported from (its compressed ONNX is the "
            "chain-ort engine), or export it with the safetensors format too")
    if path.is_dir() and (path / "model.safetensors").is_file() and not (path / "manifest.json").exists():
        art = load_artifact(path / "model.safetensors", allow_import=allow_import)
        # chain-ort times the onnx-fast graph (of the artifact, when bench exports it itself)
        onnx_path = next((f for f in (path / "model.fast.onnx", path / "model.onnx") if f.is_file()), None)
        return Target(art, onnx_path, path)
    return Target(load_artifact(path, allow_import=allow_import), None, path)


def _onnx_of(model: nn.Module, input_shape: tuple[int, ...], path: Path, fast: bool = False) -> Path:
    """``model`` as ONNX at ``path``; ``fast``: the ``onnx-fast`` graph (each compressed
    layer on the faster of its chain ops and its dense rebuild, measured)."""
    import onnx

    from ..export import fast_onnx, to_onnx

    example = example_input(model, input_shape, 2)
    onnx.save(fast_onnx(model, example, 18)[0] if fast else to_onnx(model, example, 18), str(path))
    return path


# ---------------------------------------------------------------------------- machine
def machine_info(threads: int, device: torch.device) -> dict[str, Any]:
    import onnxruntime

    from ..kernels import build
    from ..kernels import triton as ktriton

    cpu = cpu_model()
    st = build.status()
    commit = None
    try:
        here = Path(__file__).resolve().parents[2]
        r = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                           timeout=5)
        commit = r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "platform": platform.platform(),
            "python": platform.python_version(), "tedepr": __version__, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "kernel": {k: st.get(k) for k in (
                "available", "compiler", "compiler_version", "flags", "reason")},
            "git_commit": commit, "device": str(device), "triton": ktriton.status()["triton"]}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": p.name, "memory_bytes": p.total_memory, "capability": f"{p.major}.{p.minor}",
                       "multiprocessors": p.multi_processor_count, "cuda": torch.version.cuda,
                       "onnxruntime_providers": onnxruntime.get_available_providers()}
    return info


# ---------------------------------------------------------------------------- engines
def unavailable(engine: str, device: torch.device) -> str | None:
    """Why ``engine`` cannot run on ``device`` here, or None."""
    if engine in ORT_ENGINES:
        try:
            import onnxruntime
        except ImportError:
            return "onnxruntime is not installed"
        provider = ort_provider(device)
        if provider not in onnxruntime.get_available_providers():
            return (f"onnxruntime {onnxruntime.__version__} has no {provider} here"
                    + (" (it comes with the onnxruntime-gpu package)" if device.type == "cuda" else ""))
    if engine in GRAPH_ENGINES and device.type != "cuda":
        return f"needs {opt('device')} cuda (it replays a CUDA graph)"
    if engine == "triton-graph":
        return unavailable("triton", device)
    if engine == "tedepr" and device.type == "cuda":
        return (f"the compiled kernels run on the CPU (on {opt('device')} cuda the triton engine runs the "
                "chains)")
    if engine == "triton":
        from ..kernels import triton as ktriton

        st = ktriton.status()
        if st["triton"] is None:
            return str(st["reason"])
        if device.type == "cpu" and not st["interpret"]:
            return (f"needs {opt('device')} cuda (on the CPU only under TRITON_INTERPRET=1, Triton's "
                    "interpreter: "
                    "a correctness check, not a speed)")
    return None


def max_rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference over the largest absolute reference value (the error
    relative to the output's scale; elementwise ratios blow up at outputs near zero)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def triton_error(model: nn.Module, art: Artifact, x: torch.Tensor, device: torch.device) -> float:
    """:func:`max_rel_error` of the Triton engine's output against :data:`TRITON_REFERENCE`."""
    with torch.no_grad():
        with exact_fp32():
            got = model(x.to(device))
        ref = copy.deepcopy(art.model).double().eval()(x.double())
    return max_rel_error(got, ref)


# ---------------------------------------------------------------------------- run
def run_bench(target: Target, opts: BenchOptions, baseline_path: Path | None = None,
              data: Path | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Measure every engine at every batch size; returns the JSON-ready report.
    ``progress(what, done, total)`` hears about each timed round and memory probe.
    Raises EngineUnavailable (``--device cuda`` without a GPU; ``strict`` and a named
    engine that cannot run), BadInput (the baseline cannot run)."""
    opts.validate()
    device = resolve_device(opts.device)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    tmp = Path(tempfile.mkdtemp(prefix="tedepr-bench-"))
    try:
        return _run(target, opts, device, baseline_path, data, progress, tmp)
    finally:
        torch.set_num_threads(threads_before)
        shutil.rmtree(tmp, ignore_errors=True)


def _run(target: Target, opts: BenchOptions, device: torch.device, baseline_path: Path | None,
         data: Path | None, progress: Progress | None, tmp: Path) -> dict[str, Any]:
    from safetensors.torch import save as st_save

    from ..execution import flop_share, plan_for
    from ..kernels import build as kbuild
    from ..masks import tied_parameters

    art = target.art
    base, real_base = load_baseline(art, baseline_path, opts.seed)
    # by default every engine that can run on the device (the CUDA-graph ones only on a GPU)
    wanted = list(opts.engines or [e for e in ENGINES if device.type == "cuda" or e not in GRAPH_ENGINES])
    skipped: dict[str, str] = {}
    warnings: list[str] = []
    report: dict[str, Any] = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
                              "target": str(target.path), "baseline": str(baseline_path) if baseline_path
                              else None, "baseline_weights": "checkpoint" if real_base else
                              "random (same architecture: timing only)", "options": asdict(opts),
                              "machine": machine_info(opts.threads, device)}
    for e in wanted:
        why = unavailable(e, device)
        if why:
            skipped[e] = why
    onnx: dict[str, Path] = {}
    if "dense-ort" in wanted and "dense-ort" not in skipped:
        onnx["dense-ort"] = _onnx_of(base, art.input_shape, tmp / "dense.onnx")
    if "chain-ort" in wanted and "chain-ort" not in skipped:
        onnx["chain-ort"] = target.onnx or _onnx_of(art.model, art.input_shape, tmp / "compressed.onnx",
                                                     fast=True)
    eng = Engines(art, base, device, opts.threads, onnx)
    tri = [e for e in ("triton", "triton-graph") if e in wanted and e not in skipped]
    if tri:
        why = None
        try:
            eng.model("triton")
        except Exception as exc:  # a layer the packer refuses: report it, time the others
            why = f"the Triton model cannot be built: {type(exc).__name__}: {_first_line(exc)}"
        if why is None and not eng.triton_layers:
            why = "no layer of this model runs on the Triton kernel"
        if why is not None:
            skipped.update(dict.fromkeys(tri, why))
        else:
            from ..kernels import triton as ktriton

            report["triton"] = {"layers": eng.triton_layers, "interpreted": ktriton.interpreted(),
                                "reference": TRITON_REFERENCE, "max_rel_error": {}}
            if device.type == "cpu":
                warnings.append("the triton engine runs in Triton's CPU interpreter (TRITON_INTERPRET=1): "
                                "its times check that it runs, they say nothing about GPU speed")
    if "tedepr" in wanted and "tedepr" not in skipped and not kbuild.available():
        warnings.append(f"compiled kernels unavailable ({kbuild.status().get('reason')}): the tedepr "
                        "engine plans with dense and torch paths only")
    if opts.strict and opts.engines:
        for e in opts.engines:
            if e in skipped:
                raise EngineUnavailable(f"{e}: {skipped[e]}")
    engines = [e for e in wanted if e not in skipped]
    if BASELINE not in engines:
        engines.insert(0, BASELINE)
    # the compressed artifact as a file: its size, and what the memory probes load
    compact = save_artifact(copy.copy(art), tmp / "compact.safetensors")
    memory_on = opts.memory
    # the probes reload the artifact in fresh processes: an import-path architecture the
    # user already confirmed here (--arch) is confirmed there too
    trusted = art.arch.name if art.arch is not None and art.arch.is_import else None
    report["memory"] = {"method": (CUDA_METHOD if device.type == "cuda" else CPU_METHOD) if memory_on
                        else f"not measured ({opt('no-memory')})"}
    timers: dict[str, Timer] = {}
    if device.type == "cuda":
        synced = wall_timer(synchronize=torch.cuda.synchronize)
        timers = {e: synced if e in ORT_ENGINES else cuda_event_timer() for e in engines}
    results: dict[str, Any] = {}
    plans: dict[str, Any] = {}
    for b in opts.batches:
        x = input_batch(art, b, opts.seed)
        fns = {}
        with torch.no_grad():
            plan = None
            # first: the tedepr engine runs it, the onnxruntime engines run at the levels it
            # measured (the dense baseline's best level included), with or without the tedepr engine
            if "tedepr" in engines or (device.type == "cpu" and any(e in ORT_ENGINES for e in engines)):
                plan, fresh = plan_for(art, b, opts.threads, replan=opts.replan, seed=opts.seed,
                                       runtimes=eng.runtimes)
                plans[str(b)] = {**plan, "fresh": fresh, "flops": flop_share(art.model, art.masks, plan)}
            for e in engines:
                try:
                    fns[e] = eng.runner(e, x, plan)
                    fns[e]()  # the first call: builds, compiles, and proves the engine takes this batch
                except Exception as exc:  # an engine that cannot be built or cannot take this batch
                    msg = f"{e} cannot run at batch {b}: {type(exc).__name__}: {_first_line(exc)}"
                    if opts.strict:
                        raise BadInput(msg) from None
                    warnings.append(msg)
                    fns.pop(e, None)
            if BASELINE not in fns:
                raise BadInput(f"the dense baseline cannot run at batch {b}")

            def on_round(done: int, total: int | None, what: str = f"batch {b}: timing {len(fns)} engines"
                         ) -> None:
                if progress is not None:
                    progress(what, done, total)

            times = interleaved(fns, Plan(opts.warmup, opts.iters, opts.seconds),
                                timers={e: t for e, t in timers.items() if e in fns}, on_round=on_round)
            if "triton" in fns or "triton-graph" in fns:
                report["triton"]["max_rel_error"][str(b)] = triton_error(eng.model("triton"), art, x, device)
            mem: dict[str, int | None] = {e: None for e in fns}
            if memory_on:
                for i, e in enumerate(fns):
                    if progress is not None:
                        progress(f"batch {b}: peak memory of {e}", i, len(fns))
                    try:
                        mem[e] = _peak(e, fns[e], b, device, opts, compact, baseline_path, onnx,
                                       plans.get(str(b)), trusted)
                    except (OSError, RuntimeError) as exc:
                        warnings.append(f"peak memory of {e} at batch {b} not measured: {_first_line(exc)}")
        row = {}
        best_dense = _best_dense(times)
        for e, ts in times.items():
            s = summarize(ts, b)
            s["speedup_vs_dense_torch"] = speedup(times[BASELINE], ts)
            s["speedup_vs_best_dense"] = speedup(times[best_dense], ts)
            s["peak_memory_bytes"] = mem[e]
            row[e] = s
        results[str(b)] = row
    report["results"] = results
    report["noise"] = noise_summary(results)
    if report["noise"]["inconclusive"]:
        warnings.append(report["noise"]["summary"])
    report["execution_plans"] = plans
    # sizes
    tied = tied_parameters(base)  # a tied tensor is stored once (safetensors refuses shared memory)
    dense_state = {k: v.contiguous() for k, v in base.state_dict().items() if k not in tied}
    sizes = {"dense-safetensors": {**kept_counts(base), **byte_sizes(st_save(dense_state))}}
    sizes["compressed-safetensors"] = {**kept_counts(art.model), **byte_sizes(compact.read_bytes())}
    if "dense-ort" in onnx:
        sizes["dense-onnx"] = byte_sizes(onnx["dense-ort"].read_bytes())
    if "chain-ort" in onnx:
        sizes["compressed-onnx"] = byte_sizes(onnx["chain-ort"].read_bytes())
    report["sizes"] = sizes
    if data is not None:
        report["accuracy"] = _accuracy(art, base, real_base, data, plans, opts)
    report["skipped_engines"] = skipped
    report["warnings"] = warnings
    return report


def noise_summary(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """The timing spread of a bench, summarised once: how many rows (engine x batch) had an
    IQR above :data:`~tedepr_cli.timing.NOISY_IQR` of their median, the largest, and which
    comparisons it leaves unsettled: a compressed engine whose paired speed-up vs the best
    dense runtime has its quartiles on both sides of 1x (``inconclusive``, ``"batch:engine"``).
    A wide IQR alone does not make a comparison unreliable: the speed-ups are medians of
    per-round ratios of interleaved calls, and a busy machine slows both sides of a round.
    ``summary`` is one line saying so."""
    rows = [(b, e, s) for b, row in results.items() for e, s in row.items()]
    noisy = [(b, e, s["iqr_s"] / s["median_s"]) for b, e, s in rows if s["noisy"] and s["median_s"] > 0]
    inconclusive = [f"{b}:{e}" for b, e, s in rows if e not in DENSE_ENGINES
                    and s["speedup_vs_best_dense"]["q1"] < 1.0 < s["speedup_vs_best_dense"]["q3"]]
    worst = max(noisy, key=lambda t: t[2]) if noisy else None
    spread = (f"IQR above {100 * NOISY_IQR:.0f} % of the median in {len(noisy)} of {len(rows)} engine x "
              f"batch rows (up to {100 * worst[2]:.0f} %, batch {worst[0]} {worst[1]})" if worst else
              f"IQR within {100 * NOISY_IQR:.0f} % of the median in every row")
    if inconclusive:
        which = ", ".join(f"{e} at batch {b}" for b, e in (x.split(":", 1) for x in inconclusive))
        summary = (f"timing spread: {spread}; the speed-up vs the best dense runtime of {which} has "
                   "quartiles on both sides of 1x, so this run does not settle whether it is faster: "
                   "rerun with more rounds or on a quieter machine")
    else:
        summary = (f"timing spread: {spread}; every compressed engine's speed-up vs the best dense "
                   "runtime has its quartiles on one side of 1x (paired per-round ratios), so the "
                   "comparisons hold")
    return {"noisy_rows": len(noisy), "rows": len(rows), "max_iqr_ratio": worst[2] if worst else None,
            "inconclusive": inconclusive, "summary": summary}


def _best_dense(times: dict[str, list[float]]) -> str:
    """The dense engine (dense torch or dense onnxruntime) with the lowest median in a row."""
    import statistics

    return min((e for e in DENSE_ENGINES if e in times), key=lambda e: statistics.median(times[e]))


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _peak(engine: str, fn: Callable[[], Any], batch: int, device: torch.device, opts: BenchOptions,
          compact: Path, baseline: Path | None, onnx: dict[str, Path], plan: dict[str, Any] | None,
          trusted: str | None = None) -> int | None:
    """One figure of :mod:`.memory`: in-process on CUDA (None for onnxruntime, which
    allocates outside torch), in a fresh process on the CPU."""
    if device.type == "cuda":  # a graph's buffers live in its private pool, held since capture
        return None if engine in ORT_ENGINES or engine in GRAPH_ENGINES else cuda_peak(fn, device)
    spec = {"engine": engine, "batch": batch, "artifact": str(compact), "seed": opts.seed,
            "baseline": str(baseline) if baseline else None, "threads": opts.threads,
            "onnx": str(onnx[engine]) if engine in onnx else None,
            "plan": plan if engine == "tedepr" or engine in ORT_ENGINES else None, "allow_import": trusted}
    return measure_in_subprocess(spec)


def _accuracy(art: Artifact, base: nn.Module, real_base: bool, data: Path, plans: dict[str, Any],
              opts: BenchOptions) -> dict[str, Any]:
    from ..datasets import open_dataset
    from ..evaluate import evaluate
    from ..execution import build_model
    from ..model_data import split_for, tensors_for

    ds = open_dataset(data)  # once for every model measured (its line is logged once)
    split = split_for(art, ds, "test")
    if not bool((split.labels >= 0).any()):  # unlabeled (token) data
        return _cosine(art, base, real_base, data, split, plans, opts)
    # each model sees the data as it was trained to: the compressed one with the preprocessing
    # its manifest records (as `tedepr eval`), the baseline checkpoint with the family default
    x, y = tensors_for(art, ds, "test")
    out: dict[str, Any] = {"data": str(data), "split": "test", "samples": len(y)}
    out["compressed"] = evaluate(art.model, x, y)["accuracy"]
    if plans:
        plan = plans[max(plans, key=int)]
        out["compressed_tedepr_engine"] = evaluate(build_model(art, plan, opts.threads), x, y)["accuracy"]
    if real_base:
        xb, yb = tensors_for(Artifact(model=base, arch=None), ds, "test")
        out["baseline"] = evaluate(base, xb, yb)["accuracy"]
    else:
        out["baseline"] = None
    if not real_base:
        out["note"] = f"no {opt('baseline')} checkpoint: baseline accuracy unknown"
    return out


def _cosine(art: Artifact, base: nn.Module, real_base: bool, data: Path, split: Any, plans: dict[str, Any],
            opts: BenchOptions) -> dict[str, Any]:
    """For data without labels (an encoder's token data): the mean cosine of the compressed
    model's outputs (and the tedepr engine's) to the ``--baseline`` checkpoint's, its reference."""
    from ..evaluate import cosine_split
    from ..execution import build_model

    out: dict[str, Any] = {"data": str(data), "split": "test", "samples": len(split), "metric": "cosine"}
    if not real_base:
        out["note"] = (f"the data has no labels and no {opt('baseline')} checkpoint was given: the cosine to "
                       "the original is unknown")
        return out
    out["cosine_to_baseline"] = cosine_split(art.model, base, split)["cosine_mean"]
    if plans:
        plan = plans[max(plans, key=int)]
        out["cosine_to_baseline_tedepr_engine"] = cosine_split(build_model(art, plan, opts.threads), base,
                                                               split)["cosine_mean"]
    return out


# ---------------------------------------------------------------------------- gates
def check_gates(report: dict[str, Any], fail_if_slower: float | None, max_size: int | None,
                min_speedup: float | None, compare_to: dict[str, Any] | None, engine: str) -> list[Exception]:
    """Every failed CI gate, as the exception (with its exit code) to raise."""
    failures: list[Exception] = []
    for b, row in report["results"].items():
        e = engine if engine in row else "chain-torch"
        dense = min((d for d in DENSE_ENGINES if d in row), key=lambda d: row[d]["median_s"])
        if e not in row:
            continue
        med = row[e]["median_s"]
        if fail_if_slower is not None:
            if compare_to is not None:
                ref = compare_to.get("results", {}).get(b, {}).get(e, {}).get("median_s")
                if ref is None:
                    failures.append(BadInput(f"the saved benchmark has no {e} result at batch {b}"))
                elif med > fail_if_slower * ref:
                    failures.append(SlowerGateFailed(
                        f"batch {b}: {e} takes {1e6 * med:.1f} µs, more than {fail_if_slower} x the saved "
                        f"{1e6 * ref:.1f} µs"))
            elif med > fail_if_slower * row[dense]["median_s"]:
                failures.append(SlowerGateFailed(
                    f"batch {b}: {e} takes {1e6 * med:.1f} µs, more than {fail_if_slower} x the dense "
                    f"baseline on its best runtime ({dense}: {1e6 * row[dense]['median_s']:.1f} µs)"))
        if min_speedup is not None:
            sp = row[e]["speedup_vs_dense_torch"]["median"]
            if sp < min_speedup:
                failures.append(SpeedupGateFailed(f"batch {b}: {e} speed-up {sp:.2f}x is below "
                                                  f"{opt('min-speedup')} {min_speedup}"))
    if max_size is not None:
        size = report["sizes"]["compressed-safetensors"]["bytes"]
        if size > max_size:
            failures.append(SizeGateFailed(f"compressed artifact is {size:,} bytes, above {opt('max-size')} "
                                           f"{max_size:,}"))
    return failures


def is_report(path: Path) -> bool:
    """Whether the file ``path`` holds a tedepr bench report (JSON with :data:`SCHEMA`):
    what ``--json-out`` may replace with ``--overwrite``."""
    import json

    try:
        d = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("schema") == SCHEMA


def load_saved(path: Path) -> dict[str, Any]:
    import json

    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{opt('compare-to')} {path} does not exist") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{opt('compare-to')} {path} is not a tedepr bench JSON: {e}") from None
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        raise BadInput(f"{opt('compare-to')} {path} is not a tedepr bench JSON")
    return d
