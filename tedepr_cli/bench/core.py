"""Side-by-side benchmark of a compressed model against its dense original (``tedepr bench``).

Engines (each skipped with a reason when it cannot run here):

``dense-torch``  the dense baseline in PyTorch (the reference every speed-up divides)
``dense-ort``    the dense baseline exported to ONNX, in onnxruntime
``chain-torch``  the compressed model, reference torch chain
``tedepr``       the compressed model with the compiled kernels and the execution planner
``chain-ort``    the compressed model's ONNX in onnxruntime
``triton``       the compressed model's chains in Triton (``--device cuda`` only)

All engines of one batch size are timed interleaved (:mod:`.stats`), single-threaded by
default. Sizes, the planner's per-layer choices, the FLOP share on sparse/factorized
kernels, peak inference memory and (with data) accuracy are reported beside the timings.
"""

from __future__ import annotations

import copy
import gzip
import os
import platform
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..artifact import Artifact, load_artifact, save_artifact
from ..errors import (
    BadInput,
    EngineUnavailable,
    SizeGateFailed,
    SlowerGateFailed,
    SpeedupGateFailed,
    UsageError,
)
from ..logs import log
from ..timing import NOISY_IQR, Plan, interleaved, speedup, summarize
from ..version import __version__

ENGINES = ("dense-torch", "dense-ort", "chain-torch", "tedepr", "chain-ort", "triton")
BASELINE = "dense-torch"
SCHEMA = "tedepr-bench"
SCHEMA_VERSION = 1


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
    gate_engine: str = "tedepr"
    seed: int = 0

    def validate(self) -> None:
        if not self.batches or any(b < 1 for b in self.batches):
            raise UsageError("--batch takes positive integers, e.g. 1,32")
        if self.threads < 1 or self.warmup < 0 or self.iters < 1:
            raise UsageError("--threads >= 1, --warmup >= 0 and --iters >= 1 are required")
        if self.seconds is not None and self.seconds <= 0:
            raise UsageError("--time must be > 0 seconds")
        unknown = [e for e in (self.engines or []) if e not in ENGINES]
        if unknown:
            raise UsageError(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
        if self.device not in ("cpu", "cuda"):
            raise UsageError("--device must be cpu or cuda")


# ---------------------------------------------------------------------------- inputs
@dataclass
class Target:
    art: Artifact
    onnx: Path | None  # the compressed model's ONNX, when the target is an export directory
    path: Path


def load_target(path: Path) -> Target:
    """An artifact, a finetune run, or an export directory (model.safetensors + model.onnx)."""
    if path.is_dir() and (path / "model.safetensors").is_file() and not (path / "manifest.json").exists():
        art = load_artifact(path / "model.safetensors")
        onnx_path = path / "model.onnx"
        return Target(art, onnx_path if onnx_path.is_file() else None, path)
    return Target(load_artifact(path), None, path)


def load_baseline(art: Artifact, baseline: Path | None) -> tuple[nn.Module, bool]:
    """The dense original: from ``--baseline`` (weights into the target's architecture), or
    the architecture freshly built (same shapes: same speed; no accuracy). Returns
    (model, has_real_weights)."""
    from ..arch import build
    from ..loading import load_model

    if art.arch is None:
        raise BadInput("the target has no architecture reference to build its dense baseline from")
    if baseline is not None:
        base = load_model(baseline, art.arch)
        if base.meta.get("tensorization") or base.masks:
            raise BadInput(f"--baseline {baseline} is itself compressed; give the dense checkpoint")
        return base.model.eval(), True
    torch.manual_seed(0)
    return build(art.arch, allow_import=art.arch.is_import).eval(), False


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _onnx_of(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    import onnx

    from ..export import to_onnx

    onnx.save(to_onnx(model, torch.zeros(2, *input_shape), 18), str(path))
    return path


# ---------------------------------------------------------------------------- machine
def machine_info(threads: int) -> dict[str, Any]:
    import onnxruntime

    from ..kernels import build

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    st = build.status()
    commit = None
    try:
        here = Path(__file__).resolve().parents[2]
        r = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                           timeout=5)
        commit = r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "platform": platform.platform(),
            "python": platform.python_version(), "tedepr": __version__, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "kernel": {k: st.get(k) for k in (
                "available", "compiler", "compiler_version", "flags", "reason")},
            "git_commit": commit}


def peak_memory(fn) -> int | None:
    """Extra resident memory (bytes) a few calls of ``fn`` reach, via Linux's resettable
    high-water mark (``/proc/self/clear_refs``); None where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kb("VmRSS")
        for _ in range(3):
            fn()
        return max(0, (_status_kb("VmHWM") - before) * 1024)
    except OSError:
        return None


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(key)


def _sizes_of(data: bytes) -> dict[str, int]:
    return {"bytes": len(data), "gzip_bytes": len(gzip.compress(data, 9, mtime=0))}


# ---------------------------------------------------------------------------- run
def run_bench(target: Target, opts: BenchOptions, baseline_path: Path | None = None,
              data: Path | None = None) -> dict[str, Any]:
    """Measure every engine at every batch size; returns the JSON-ready report."""
    from safetensors.torch import save as st_save

    from ..execution import build_model, flop_share, plan_for
    from ..kernels import build as kbuild

    opts.validate()
    torch.set_num_threads(opts.threads)
    art = target.art
    base, real_base = load_baseline(art, baseline_path)
    wanted = list(opts.engines or ENGINES)
    skipped: dict[str, str] = {}
    warnings: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="tedepr-bench-"))
    report: dict[str, Any] = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
                              "target": str(target.path), "baseline": str(baseline_path) if baseline_path
                              else None, "baseline_weights": "checkpoint" if real_base else
                              "random (same architecture: timing only)", "options": asdict(opts),
                              "machine": machine_info(opts.threads)}
    try:
        sessions: dict[str, Any] = {}
        if "dense-ort" in wanted or "chain-ort" in wanted:
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                for e in ("dense-ort", "chain-ort"):
                    skipped[e] = "onnxruntime is not installed"
        if "dense-ort" in wanted and "dense-ort" not in skipped:
            sessions["dense-ort"] = _ort_session(_onnx_of(base, art.input_shape, tmp / "dense.onnx"),
                                                 opts.threads)
        if "chain-ort" in wanted and "chain-ort" not in skipped:
            onnx_path = target.onnx or _onnx_of(art.model, art.input_shape, tmp / "compressed.onnx")
            sessions["chain-ort"] = _ort_session(onnx_path, opts.threads)
        if "tedepr" in wanted and not kbuild.available():
            warnings.append(f"compiled kernels unavailable ({kbuild.status().get('reason')}): the tedepr "
                            "engine plans with dense and torch paths only")
        if "triton" in wanted:
            from ..kernels import triton as ktriton

            if opts.device != "cuda" or not torch.cuda.is_available():
                skipped["triton"] = "needs --device cuda and a CUDA GPU (none here)"
            elif not ktriton.available():
                skipped["triton"] = "triton is not installed"
        if opts.device == "cuda":  # GPU timing needs a GPU; none was available to build it on
            raise EngineUnavailable("--device cuda: no CUDA device on this machine" if not
                                    torch.cuda.is_available() else "--device cuda is not supported by "
                                    "tedepr bench yet (the Triton kernels are tested, not benchmarked)")
        for e in list(skipped):
            if opts.strict and opts.engines and e in opts.engines:
                raise EngineUnavailable(f"engine {e} unavailable: {skipped[e]}")
            log.info(f"skipping engine {e}: {skipped[e]}")
        engines = [e for e in wanted if e not in skipped]
        if BASELINE not in engines:
            engines.insert(0, BASELINE)
        results: dict[str, Any] = {}
        plans: dict[str, Any] = {}
        for b in opts.batches:
            x = torch.rand(b, *art.input_shape, generator=torch.Generator().manual_seed(opts.seed))
            xn = x.numpy()
            fns = {}
            for e in engines:
                if e == "dense-torch":
                    fns[e] = (lambda m=base, x=x: m(x))
                elif e == "chain-torch":
                    fns[e] = (lambda m=art.model, x=x: m(x))
                elif e == "tedepr":
                    plan, fresh = plan_for(art, b, opts.threads, replan=opts.replan)
                    plans[str(b)] = {**plan, "fresh": fresh, "flops": flop_share(art.model, art.masks, plan)}
                    fast = build_model(art, plan, opts.threads)
                    fns[e] = (lambda m=fast, x=x: m(x))
                elif e in sessions:
                    s = sessions[e]
                    name = s.get_inputs()[0].name
                    fns[e] = (lambda s=s, name=name, xn=xn: s.run(None, {name: xn}))
            with torch.no_grad():
                for e, f in list(fns.items()):
                    try:
                        f()
                    except Exception as exc:  # an engine that cannot take this batch
                        msg = f"{e} cannot run at batch {b}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                        if opts.strict:
                            raise BadInput(msg) from None
                        warnings.append(msg)
                        del fns[e]
                if BASELINE not in fns:
                    raise BadInput(f"the dense baseline cannot run at batch {b}")
                times = interleaved(fns, Plan(opts.warmup, opts.iters, opts.seconds))
                mem = {e: peak_memory(f) for e, f in fns.items()}
            row = {}
            for e, ts in times.items():
                s = summarize(ts, b)
                s["speedup_vs_dense_torch"] = speedup(times[BASELINE], ts)
                s["peak_memory_bytes"] = mem[e]
                row[e] = s
                if s["noisy"]:
                    warnings.append(f"batch {b}, {e}: IQR is {100 * s['iqr_s'] / s['median_s']:.0f} % of the "
                                    f"median (> {100 * NOISY_IQR:.0f} %): the machine was noisy, "
                                    "treat small ratios with care")
            results[str(b)] = row
        report["results"] = results
        report["execution_plans"] = plans
        # sizes
        params = sum(p.numel() for p in art.model.parameters())
        kept = params - sum(int((~m).sum()) for m in art.masks.values())
        dense_state = {k: v.contiguous() for k, v in base.state_dict().items()}
        sizes = {"dense-safetensors": {"params": sum(p.numel() for p in base.parameters()),
                                       **_sizes_of(st_save(dense_state))}}
        compact = save_artifact(copy.copy(art), tmp / "compact.safetensors")
        sizes["compressed-safetensors"] = {"params": params, "kept": kept,
                                           **_sizes_of(compact.read_bytes())}
        if "dense-ort" in sessions:
            sizes["dense-onnx"] = _sizes_of((tmp / "dense.onnx").read_bytes())
        if "chain-ort" in sessions:
            onnx_path = target.onnx or tmp / "compressed.onnx"
            sizes["compressed-onnx"] = _sizes_of(onnx_path.read_bytes())
        report["sizes"] = sizes
        if data is not None:
            report["accuracy"] = _accuracy(art, base, real_base, data, plans, opts)
        report["skipped_engines"] = skipped
        report["warnings"] = warnings
        return report
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _accuracy(art: Artifact, base: nn.Module, real_base: bool, data: Path, plans: dict[str, Any],
              opts: BenchOptions) -> dict[str, Any]:
    from ..evaluate import evaluate
    from ..execution import build_model
    from ..model_data import tensors_for

    # each model sees the data as it was trained to: the compressed one with the preprocessing
    # its manifest records (as `tedepr eval`), the baseline checkpoint with the family default
    x, y = tensors_for(art, data, "test")
    out: dict[str, Any] = {"data": str(data), "split": "test", "samples": len(y)}
    out["compressed"] = evaluate(art.model, x, y)["accuracy"]
    if plans:
        plan = plans[max(plans, key=int)]
        out["compressed_tedepr_engine"] = evaluate(build_model(art, plan, opts.threads), x, y)["accuracy"]
    if real_base:
        xb, yb = tensors_for(Artifact(model=base, arch=None), data, "test")
        out["baseline"] = evaluate(base, xb, yb)["accuracy"]
    else:
        out["baseline"] = None
    if not real_base:
        out["note"] = "no --baseline checkpoint: baseline accuracy unknown"
    return out


# ---------------------------------------------------------------------------- gates
def check_gates(report: dict[str, Any], fail_if_slower: float | None, max_size: int | None,
                min_speedup: float | None, compare_to: dict[str, Any] | None, engine: str) -> list[Exception]:
    """Every failed CI gate, as the exception (with its exit code) to raise."""
    failures: list[Exception] = []
    for b, row in report["results"].items():
        e = engine if engine in row else "chain-torch"
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
            elif med > fail_if_slower * row[BASELINE]["median_s"]:
                failures.append(SlowerGateFailed(
                    f"batch {b}: {e} takes {1e6 * med:.1f} µs, more than {fail_if_slower} x the dense "
                    f"baseline's {1e6 * row[BASELINE]['median_s']:.1f} µs"))
        if min_speedup is not None:
            sp = row[e]["speedup_vs_dense_torch"]["median"]
            if sp < min_speedup:
                failures.append(SpeedupGateFailed(f"batch {b}: {e} speed-up {sp:.2f}x is below "
                                                  f"--min-speedup {min_speedup}"))
    if max_size is not None:
        size = report["sizes"]["compressed-safetensors"]["bytes"]
        if size > max_size:
            failures.append(SizeGateFailed(f"compressed artifact is {size:,} bytes, above --max-size "
                                           f"{max_size:,}"))
    return failures


def load_saved(path: Path) -> dict[str, Any]:
    import json

    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"--compare-to {path} does not exist") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"--compare-to {path} is not a tedepr bench JSON: {e}") from None
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        raise BadInput(f"--compare-to {path} is not a tedepr bench JSON")
    return d
