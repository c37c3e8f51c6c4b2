"""The Python half of ``benchmarks/gpu_check.sh`` (issue 20): one GPU check, no network.

    python benchmarks/gpu_check.py env [--cpu-smoke]        # what is installed (JSON); exit 3: a package
                                                           # is missing (says which wheels to carry),
                                                           # exit 10: no CUDA device (unless --cpu-smoke)
    python benchmarks/gpu_check.py checkpoint NAME KWARGS OUT   # random-init dense checkpoint of a zoo model
    python benchmarks/gpu_check.py masks RUN                # pruned entries exactly zero after fine-tuning
    python benchmarks/gpu_check.py report WORK OUT          # OUT/gpu_check.json + OUT/gpu_check.md

``env`` uses the standard library only (it runs before anything is known to import).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

# import name -> distribution name: what tedepr, its tests and the check need
REQUIRED = {"torch": "torch", "triton": "triton", "numpy": "numpy", "typer": "typer", "rich": "rich",
            "onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript", "tensorly": "tensorly",
            "safetensors": "safetensors", "PIL": "pillow", "pytest": "pytest"}
FAMILIES = ("lenet300", "resnet20", "vgg11")
MAX_REL_ERROR = 1e-4  # the Triton engine against the float64 reference
DOWNLOAD = ("python3 -m pip download --no-deps --only-binary=:all: --python-version {py} --implementation cp "
            "--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 "
            "--platform manylinux2014_x86_64 -d .whl {names}")


def missing(modules: dict[str, str] = REQUIRED) -> list[str]:
    """Distribution names of the modules in ``modules`` that cannot be found (not imported)."""
    return [dist for mod, dist in modules.items() if importlib.util.find_spec(mod) is None]


def download_hint(names: list[str], python: str | None = None) -> str:
    """The command that fetches the wheels of ``names`` for this Python, run where pip reaches
    a registry, in the repository root (``.whl/`` is git-ignored)."""
    py = python or f"{sys.version_info.major}.{sys.version_info.minor}"
    return DOWNLOAD.format(py=py, names=" ".join(names))


def env(cpu_smoke: bool) -> int:
    out: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                           "missing": missing()}
    out["versions"] = {}
    for dist in REQUIRED.values():
        try:
            out["versions"][dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out["versions"][dist] = None
    if out["missing"]:
        print(json.dumps(out, indent=2))
        print(f"gpu_check: missing for {sys.executable} (Python {out['python']}): "
              f"{', '.join(out['missing'])}. This machine reaches no registry: on one that does, in the "
              f"repository root, run\n  "
              f"{download_hint(out['missing'])}\n(add each wheel's own missing requirements: "
              "unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist), bring .whl/ along with the "
              "working tree and run this script again.", file=sys.stderr)
        return 3
    import torch

    out["cuda"] = torch.cuda.is_available()
    out["torch_cuda"] = torch.version.cuda
    if out["cuda"]:
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": p.name, "memory_bytes": p.total_memory, "capability": f"{p.major}.{p.minor}"}
    print(json.dumps(out, indent=2))
    if not out["cuda"] and not cpu_smoke:
        print(f"gpu_check: torch {torch.__version__} sees no CUDA device "
              f"({'a CPU build' if torch.version.cuda is None else 'no GPU visible'}); use --cpu-smoke "
              "to run the steps on the CPU", file=sys.stderr)
        return 10
    return 0


def checkpoint(name: str, kwargs: str, out: Path) -> int:
    import torch

    from tedepr_cli.arch import build, parse_arch

    torch.manual_seed(0)
    torch.save(build(parse_arch(name, kwargs)).state_dict(), out)
    return 0


def masks(run: Path) -> int:
    """Every masked entry of the fine-tuned weights is exactly zero (JSON; exit 1 if not).

    Read from the run's resume state (``state.pt``: the raw trained tensors), not from its
    artifacts: an artifact stores only the kept entries of a masked tensor, so any weight
    loaded from one is zero where pruned whatever training did."""
    import torch

    from tedepr_cli.artifact import load_artifact

    mask = load_artifact(run / "last").masks
    state = torch.load(run / "state.pt", map_location="cpu", weights_only=True)["model"]
    pruned = sum(int((~m).sum()) for m in mask.values())
    nonzero = sum(int(torch.count_nonzero(state[n][~m])) for n, m in mask.items())
    kept_nonzero = sum(int(torch.count_nonzero(state[n][m])) for n, m in mask.items())
    ok = nonzero == 0 and kept_nonzero > 0 and pruned > 0
    print(json.dumps({"pruned_entries": pruned, "pruned_but_nonzero": nonzero, "kept_nonzero": kept_nonzero,
                      "ok": ok}))
    return 0 if ok else 1


# ---------------------------------------------------------------------------- report
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tests(path: Path) -> dict[str, Any] | None:
    """Counts from pytest's JUnit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {**n, "failed": failed}


def _us(row: dict[str, Any], engine: str) -> float | None:
    s = row.get(engine)
    return None if s is None else 1e6 * s["median_s"]


def summarize(work: Path) -> dict[str, Any]:
    """Everything the check found, from the files its steps left in ``work``."""
    steps = [json.loads(ln) for ln in (work / "steps.jsonl").read_text().splitlines() if ln.strip()] \
        if (work / "steps.jsonl").is_file() else []
    out: dict[str, Any] = {"env": _read_json(work / "env.json"), "steps": steps,
                           "tests": _tests(work / "pytest.xml"), "finetune": None, "bench": {}}
    ft = _read_json(work / "finetune.json")
    if ft:
        out["finetune"] = {"epochs_run": ft.get("epochs_run"), "test_accuracy": ft.get("test_accuracy"),
                           "seconds": [e.get("seconds") for e in ft.get("epochs", [])],
                           "masks": _read_json(work / "masks.json")}
    rows = []
    for fam in FAMILIES:
        rep = _read_json(work / f"bench-{fam}.json")
        if not rep:
            continue
        tri = rep.get("triton") or {}
        out["bench"][fam] = {"machine": rep["machine"], "skipped_engines": rep.get("skipped_engines"),
                             "warnings": rep.get("warnings"), "sizes": rep.get("sizes"),
                             "triton_layers": len(tri.get("layers", []))}
        for b, row in rep["results"].items():
            t = row.get("triton")
            # the compressed model on its fastest GPU engine against the dense model on its fastest
            best = min((e for e in ("triton", "triton-graph") if e in row), default=None,
                       key=lambda e: row[e]["median_s"])
            rows.append({"family": fam, "batch": int(b), "dense_torch_us": _us(row, "dense-torch"),
                         "dense_graph_us": _us(row, "dense-torch-graph"),
                         "chain_torch_us": _us(row, "chain-torch"),
                         "chain_graph_us": _us(row, "chain-torch-graph"),
                         "triton_us": _us(row, "triton"), "triton_graph_us": _us(row, "triton-graph"),
                         "dense_ort_us": _us(row, "dense-ort"), "chain_ort_us": _us(row, "chain-ort"),
                         "speedup_triton_vs_dense": None if t is None else t["speedup_vs_dense_torch"],
                         "best_triton": best,
                         "speedup_best_vs_best_dense": None if best is None
                         else row[best]["speedup_vs_best_dense"],
                         "triton_max_rel_error": tri.get("max_rel_error", {}).get(b),
                         "peak_memory_dense": row["dense-torch"]["peak_memory_bytes"],
                         "peak_memory_triton": None if t is None else t["peak_memory_bytes"]})
    out["rows"] = rows
    errs = [r["triton_max_rel_error"] for r in rows]
    problems = [f"step {s['step']} exited {s['rc']}" for s in steps if s["rc"] != 0]
    if out["tests"] is None or out["tests"]["failures"] or out["tests"]["errors"]:
        problems.append("the Triton/CUDA tests did not all pass")
    if not out["finetune"] or not (out["finetune"]["masks"] or {}).get("ok"):
        problems.append("the fine-tune did not finish with every masked entry exactly zero")
    missing_fams = [f for f in FAMILIES if f not in out["bench"]]
    if missing_fams:
        problems.append(f"no bench for {', '.join(missing_fams)}")
    if any(e is None or e > MAX_REL_ERROR for e in errs) or not errs:
        problems.append(f"the Triton engine's max relative error is not <= {MAX_REL_ERROR} everywhere")
    out["max_triton_rel_error"] = max((e for e in errs if e is not None), default=None)
    out["problems"] = problems
    out["ok"] = not problems
    return out


def _f(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(s: dict[str, Any]) -> str:
    env_ = s.get("env") or {}
    gpu = (env_.get("gpu") or {}).get("name", "no GPU (CPU smoke run)")
    v = env_.get("versions") or {}
    lines = [f"# tedepr GPU check: {'passed' if s['ok'] else 'FAILED'}", "",
             f"{gpu}; Python {env_.get('python')}, torch {v.get('torch')} (CUDA {env_.get('torch_cuda')}), "
             f"triton {v.get('triton')}, onnxruntime {v.get('onnxruntime')}.", ""]
    for p in s["problems"]:
        lines.append(f"- problem: {p}")
    if s["problems"]:
        lines.append("")
    lines += ["Median µs per call (interleaved rounds; on a GPU timed with CUDA events); *graph*: the "
              "same engine captured once in a CUDA graph and replayed; speed-up = median of the paired "
              "per-round ratios dense / Triton [quartiles], eager against eager, and the faster Triton "
              "engine against the dense model's fastest engine (eager, graph or onnxruntime); error = "
              "max |Triton − reference| / max |reference|, reference the compressed model in float64 "
              "on the CPU.", "",
              "| model | batch | dense torch | dense graph | torch chain | chain graph | Triton "
              "| Triton graph | speed-up (eager) | best vs best dense | dense ORT | chain ORT | Triton max "
              "rel. error |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(sp: dict[str, Any] | None) -> str:
        return "-" if sp is None else f"{sp['median']:.2f}× [{sp['q1']:.2f}–{sp['q3']:.2f}]"

    for r in s["rows"]:
        lines.append(f"| {r['family']} | {r['batch']} | {_f(r['dense_torch_us'])} | "
                     f"{_f(r.get('dense_graph_us'))} | {_f(r['chain_torch_us'])} | "
                     f"{_f(r.get('chain_graph_us'))} | {_f(r['triton_us'])} | "
                     f"{_f(r.get('triton_graph_us'))} | {ratio(r['speedup_triton_vs_dense'])} | "
                     f"{ratio(r.get('speedup_best_vs_best_dense'))} | {_f(r['dense_ort_us'])} | "
                     f"{_f(r['chain_ort_us'])} | {_f(r['triton_max_rel_error'], '.2e')} |")
    ft = s.get("finetune")
    lines.append("")
    if ft:
        m = ft["masks"] or {}
        acc = ft["test_accuracy"]
        lines.append(f"Fine-tune of the sample (LeNet-300-100, 99.5 %): {ft['epochs_run']} epochs "
                     f"({', '.join(_f(x, '.2f') for x in ft['seconds'])} s), test accuracy "
                     f"{_f(None if acc is None else 100 * acc, '.2f')} %; {m.get('pruned_entries')} pruned "
                     f"entries, {m.get('pruned_but_nonzero')} of them non-zero.")
    t = s.get("tests")
    if t:
        lines.append(f"Triton/CUDA tests: {t['passed']} passed, {t['failures'] + t['errors']} failed, "
                     f"{t['skipped']} skipped{': ' + ', '.join(t['failed']) if t['failed'] else ''}.")
    for fam, b in s["bench"].items():
        if b["skipped_engines"]:
            why = "; ".join(f"{e} ({r})" for e, r in b["skipped_engines"].items())
            lines.append(f"{fam}: skipped {why}")
    lines += ["", "| step | exit | seconds | limit |", "|---|---|---|---|"]
    lines += [f"| {st['step']} | {st['rc']} | {st['seconds']} | {st.get('cap', '-')} |" for st in s["steps"]]
    return "\n".join(lines) + "\n"


def report(work: Path, out: Path) -> int:
    s = summarize(work)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(s, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(s))
    print(markdown(s))
    return 0 if s["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env")
    e.add_argument("--cpu-smoke", action="store_true")
    c = sub.add_parser("checkpoint")
    c.add_argument("name")
    c.add_argument("kwargs")
    c.add_argument("out", type=Path)
    m = sub.add_parser("masks")
    m.add_argument("run", type=Path)
    r = sub.add_parser("report")
    r.add_argument("work", type=Path)
    r.add_argument("out", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "env":
        return env(a.cpu_smoke)
    if a.cmd == "checkpoint":
        return checkpoint(a.name, a.kwargs, a.out)
    if a.cmd == "masks":
        return masks(a.run)
    return report(a.work, a.out)


if __name__ == "__main__":
    sys.exit(main())
