"""Microbenchmark of the compiled sparse chain kernel (issue #7), one thread, side by side.

Cases (all 1024 -> 1024, fp32, kept entries = 0.5 % of the dense 1024 x 1024 weight):
  tt-r16 / tt-r8   TT-matrix layer, modes 32x32, rank 16 / 8, cores pruned at random to
                   5,243 kept entries; against the torch chain (layer.forward), the dense
                   F.linear of its equivalent weight and the compiled kernel.
  sparse           dense-pruned 1024 x 1024 at 99.5 % (random): the kernel (batch-major
                   (B, N) -> (B, M), and feature-major (N, B) -> (M, B)) against torch CSR
                   ``W.to_sparse_csr() @ x`` (x: (N, B), "torch_csr"; and on a batch-major x
                   as ``(W_csr @ x.T).T``, "torch_csr_bm") and dense F.linear.
Times are medians (and IQR) over many calls after warm-up, all in one process with
``torch.set_num_threads(1)``; GFLOP/s counts the kernel's own FLOPs (kept entries only,
2 per multiply-add). "% peak" is against the FP32 peak this script *measures* on this core
(a register-only loop of 12 independent FMA chains on 8-float (AVX2) and 16-float
(AVX-512, where present) vectors, compiled with the kernel's compiler and flags; the
widest is the core's peak), or against --peak when given (DESIGN §4 quotes 102 GFLOP/s,
the AVX2 figure of another machine). ``benchmarks/kernel_targets.py`` checks issue #7's
targets side by side; this script is the per-kernel view.

    .venv/bin/python benchmarks/kernels_micro.py [--batch 1,32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tedepr_cli.kernels import build
from tedepr_cli.kernels.cpu import SparseChainKernel
from tedepr_cli.tensorized.layers import build_layer

KEEP_FRACTION = 0.005  # 99.5 % sparsity vs the dense 1024 x 1024


def bench(fn: Callable[[], object], min_time: float = 0.3, min_reps: int = 20) -> dict[str, float]:
    """Median and IQR of one call, in microseconds."""
    for _ in range(5):
        fn()
    times: list[float] = []
    t_end = time.perf_counter() + min_time
    while len(times) < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t0) / 1e3)
    q = statistics.quantiles(times, n=4)
    return {"median_us": statistics.median(times), "iqr_us": q[2] - q[0], "reps": len(times)}


def tt_layer(rank: int, keep: int, seed: int = 0) -> torch.nn.Module:
    """A 32x32 TT-matrix 1024 -> 1024 with ``keep`` entries kept over both cores (random)."""
    spec = {"type": "linear", "format": "tt", "in_modes": [32, 32], "out_modes": [32, 32],
            "ranks": [1, rank, 1], "bias": True, "chain": "linear"}
    layer = build_layer(spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        scores = torch.cat([torch.rand(c.numel(), generator=g) for c in layer.cores])
        kept = torch.zeros_like(scores, dtype=torch.bool)
        kept[scores.topk(keep).indices] = True
        off = 0
        for c in layer.cores:
            m = kept[off:off + c.numel()].reshape(c.shape)
            c.copy_(torch.randn(c.shape, generator=g) * m / rank ** 0.5)
            off += c.numel()
        layer.bias.normal_(generator=g)
    return layer.eval()


def sparse_weight(n: int, keep: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(n * n)
    w[torch.randperm(n * n, generator=g)[:keep]] = torch.randn(keep, generator=g)
    return w.reshape(n, n)


def run(batches: list[int], peak: float | None) -> dict:
    torch.set_num_threads(1)
    n = 1024
    keep = round(KEEP_FRACTION * n * n)
    st = build.status()
    if not st["available"]:
        raise SystemExit(f"compiled kernel unavailable: {st['reason']}")
    measured = measure_peak()
    peak = peak or max(measured.values())
    out: dict = {"machine": {"cpu": _cpu_name(), "python": sys.version.split()[0],
                             "torch": torch.__version__, "threads": 1,
                             "vector_floats": st["vector_floats"], "flags": st["flags"],
                             "compiler": st["compiler_version"], "peak_gflops": peak,
                             "measured_peak_gflops": measured},
                 "cases": []}
    for rank in (16, 8):
        out["cases"] += [_tt_case(tt_layer(rank, keep), rank, b, peak) for b in batches]
    w = sparse_weight(n, keep)
    out["cases"] += [_sparse_case(w, b, peak) for b in batches]
    return out


def _tt_case(layer: torch.nn.Module, rank: int, b: int, peak: float) -> dict:
    kern = SparseChainKernel.from_layer(layer)
    w = layer.dense_weight().detach()
    x = torch.randn(b, kern.n_in)
    xt = x.t().contiguous()
    with torch.no_grad():
        ref = layer(x)
        assert float((kern(x) - ref).norm() / ref.norm()) < 1e-5
        row = {"case": f"tt-r{rank}", "batch": b, "nnz": kern.layout.nnz, "flops": kern.flops(b),
               "kernel": bench(lambda: kern(x)),
               "kernel_fm": bench(lambda: kern.feature_major(xt)),
               "torch_chain": bench(lambda: layer(x)),
               "dense_linear": bench(lambda: F.linear(x, w, layer.bias))}
    _rates(row, peak)
    return row


def _sparse_case(w: torch.Tensor, b: int, peak: float) -> dict:
    kern = SparseChainKernel.from_dense(w)
    csr = w.to_sparse_csr()
    x = torch.randn(b, w.shape[1])
    xt = x.t().contiguous()
    ref = x @ w.t()
    assert float((kern(x) - ref).norm() / ref.norm()) < 1e-5
    row = {"case": "sparse", "batch": b, "nnz": kern.layout.nnz, "flops": kern.flops(b),
           "kernel": bench(lambda: kern(x)),
           "kernel_fm": bench(lambda: kern.feature_major(xt)),
           "torch_csr": bench(lambda: csr @ xt),
           "torch_csr_bm": bench(lambda: (csr @ x.t()).t()),
           "dense_linear": bench(lambda: F.linear(x, w))}
    _rates(row, peak)
    return row


PEAK_C = r"""
#include <stdio.h>
#include <time.h>
typedef float vf __attribute__((vector_size(W * 4)));
int main(void) {
    vf a[12], x = (vf){0} + 1.0000001f, y = (vf){0} + 0.9999999f;
    for (int i = 0; i < 12; i++) a[i] = (vf){0} + (float)i;
    const long n = 100000000L / W;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long k = 0; k < n; k++) {
        for (int i = 0; i < 12; i++) a[i] = a[i] * x + y;
        __asm__ volatile("" : "+x"(x));
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    float s = 0;
    for (int i = 0; i < 12; i++) s += a[i][0];
    double dt = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("%f %f\n", 2.0 * 12 * W * n / dt / 1e9, s);
    return 0;
}
"""


def measure_peak() -> dict[str, float]:
    """FP32 FMA peak of one core (GFLOP/s) for 8- and 16-float vectors, best of 3 runs."""
    import subprocess
    import tempfile
    from pathlib import Path

    st = build.status()
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "peak.c"
        src.write_text(PEAK_C)
        for w in (8, 16):
            if w == 16 and "avx512f" not in build.cpu_features():
                continue
            exe = Path(d) / f"peak{w}"
            flags = [f for f in st["flags"] if f not in build.REQUIRED_FLAGS]
            subprocess.run([st["compiler"], *flags, f"-DW={w}", "-o", str(exe), str(src)], check=True)
            runs = [float(subprocess.run([str(exe)], capture_output=True, text=True, check=True)
                          .stdout.split()[0]) for _ in range(3)]
            out[f"fma_{w}_floats"] = round(max(runs), 1)
    return out


def _rates(row: dict, peak: float) -> None:
    for key in ("kernel", "kernel_fm"):
        gf = row["flops"] / row[key]["median_us"] / 1e3
        row[key]["gflops"] = round(gf, 2)
        row[key]["pct_peak"] = round(100 * gf / peak, 1)
    for other in ("torch_chain", "dense_linear", "torch_csr", "torch_csr_bm"):
        if other in row:
            row[f"speedup_vs_{other}"] = round(row[other]["median_us"] / row["kernel"]["median_us"], 2)
            row[f"speedup_fm_vs_{other}"] = round(row[other]["median_us"] / row["kernel_fm"]["median_us"], 2)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    ap.add_argument("--peak", type=float, default=None,
                    help="FP32 peak of one core, GFLOP/s (default: measured here)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    res = run([int(b) for b in a.batch.split(",")], a.peak)
    print(f"{res['machine']['cpu']}, 1 thread, torch {res['machine']['torch']}, "
          f"{res['machine']['vector_floats']}-float vectors; measured FMA peak (GFLOP/s): "
          f"{res['machine']['measured_peak_gflops']}; %peak below is against "
          f"{res['machine']['peak_gflops']:g}")
    print(f"{'case':8} {'B':>4} {'nnz':>6} {'kernel us':>10} {'fm us':>8} {'GFLOP/s':>8} {'%peak':>6}  "
          "others: us (kernel speed-up, batch-major / feature-major)")
    for r in res["cases"]:
        others = "  ".join(f"{k}={r[k]['median_us']:.1f} ({r['speedup_vs_' + k]}x / "
                           f"{r['speedup_fm_vs_' + k]}x)"
                           for k in ("torch_chain", "torch_csr", "torch_csr_bm", "dense_linear") if k in r)
        print(f"{r['case']:8} {r['batch']:>4} {r['nnz']:>6} {r['kernel']['median_us']:>10.1f} "
              f"{r['kernel_fm']['median_us']:>8.1f} {r['kernel']['gflops']:>8.1f} "
              f"{r['kernel']['pct_peak']:>6.1f}  {others}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
