"""Peak inference memory per engine and batch (``tedepr bench``'s "peak mem" column).

What is measured: the most memory an engine's calls hold *on top of* the loaded model,
i.e. activations, workspaces and the buffers an engine allocates on first use and keeps
(onnxruntime's arena, BLAS packing buffers) - not the weights, which ``sizes`` reports.

* **CPU**: the resident-set high-water mark of a fresh process. Timing many engines in
  one process cannot show this: memory one engine frees stays resident in the C
  allocator and the next engine reuses it without a page fault, so every figure after the
  first reads 0 (what ``bench`` printed before). So each (engine, batch) is measured in a
  process of its own (``python -m tedepr_cli.bench.memory``): it builds the engine and
  its input, returns the allocator's free pages to the kernel (glibc ``malloc_trim``),
  resets Linux's high-water mark (``/proc/self/clear_refs``), runs the calls from the
  first (so first-use allocations count) and reports ``VmHWM - VmRSS`` in bytes, at page
  granularity. Costs one process start (about 2 s) per figure; None where ``/proc``
  cannot do this (not Linux).
* **CUDA**: torch's caching allocator counts exactly what is allocated, cached blocks
  excluded: the peak of ``torch.cuda.max_memory_allocated`` over the calls, minus what was
  allocated before them, in-process. onnxruntime's CUDA provider allocates outside torch:
  None (not visible).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

CALLS = 3  # calls per measurement: the first allocates, the others show nothing grows
CPU_METHOD = ("resident-set high-water mark of a fresh process per engine and batch, from before "
              "its first call (allocator trimmed), minus the resident set then: activations and "
              "workspaces kept by the engine, not its weights")
CUDA_METHOD = "torch.cuda.max_memory_allocated over the calls minus the memory allocated before them"
SUBPROCESS_TIMEOUT_S = 600


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")


def _trim_allocator() -> None:
    """Give glibc's free pages back to the kernel, so re-using them faults them back in
    (and counts); a no-op where there is no glibc."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def resident_peak(fn: Callable[[], Any], calls: int = CALLS) -> int:
    """Bytes the resident set of this process grows to above its size before ``calls``
    calls of ``fn`` (Linux; raises OSError where ``/proc/self/clear_refs`` is missing).
    Meaningful in a fresh process only: see the module docstring."""
    gc.collect()
    _trim_allocator()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_kb("VmRSS")
    for _ in range(calls):
        fn()
    return max(0, _status_kb("VmHWM") - before) * 1024


def cuda_peak(fn: Callable[[], Any], device: Any, calls: int = CALLS) -> int:
    """Bytes torch's CUDA allocator holds at most during ``calls`` calls of ``fn`` above
    what it held before (exact: cached, unallocated blocks are not counted)."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    for _ in range(calls):
        fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - before)


def measure_in_subprocess(spec: dict[str, Any], timeout: float = SUBPROCESS_TIMEOUT_S) -> int:
    """Run :func:`main` on ``spec`` in a fresh interpreter; the peak in bytes. ``spec``:
    engine, batch, artifact (path of the compressed artifact), baseline (checkpoint path or
    None), seed, threads, onnx (the engine's ONNX path or None), plan (the tedepr engine's
    execution plan or None), allow_import (the import-path architecture the caller already
    trusts, or None). Raises RuntimeError with one line on failure."""
    try:
        r = subprocess.run([sys.executable, "-m", "tedepr_cli.bench.memory"], input=json.dumps(spec),
                           capture_output=True, text=True, timeout=timeout, env={**os.environ})
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout:.0f} s") from None
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        err = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        raise RuntimeError(err)
    return int(json.loads(lines[-1])["peak_memory_bytes"])


def _measure(spec: dict[str, Any]) -> int:
    import torch

    from ..artifact import load_artifact
    from .engines import Engines, input_batch, load_baseline

    torch.set_num_threads(int(spec["threads"]))
    art = load_artifact(Path(spec["artifact"]), allow_import=spec.get("allow_import"))
    base = None
    if spec["engine"] in ("dense-torch",):
        base, _ = load_baseline(art, Path(spec["baseline"]) if spec.get("baseline") else None,
                                int(spec["seed"]))
    onnx = {spec["engine"]: Path(spec["onnx"])} if spec.get("onnx") else {}
    engines = Engines(art, base, torch.device("cpu"), int(spec["threads"]), onnx)
    x = input_batch(art, int(spec["batch"]), int(spec["seed"]))
    fn = engines.runner(spec["engine"], x, spec.get("plan"))
    with torch.no_grad():
        return resident_peak(fn, int(spec.get("calls", CALLS)))


def main() -> int:
    """``python -m tedepr_cli.bench.memory`` < spec.json: prints ``{"peak_memory_bytes": N}``."""
    spec = json.loads(sys.stdin.read())
    try:
        peak = _measure(spec)
    except Exception as e:  # reported by the parent as one warning line
        print(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 1
    print(json.dumps({"peak_memory_bytes": peak}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
