"""The compressed ONNX in onnxruntime: standard ops vs ``onnx-fast`` (issue 17 item 2).

For every zoo family (default sizes, random init) compressed one-shot at 99.5 % (TT,
``rank="auto"``, data-free pruning: SynFlow), exported as ``onnx`` and ``onnx-fast``; then,
one thread, interleaved rounds, per-call CPU time (``time.thread_time``), medians in µs:

* ``onnx``             the plain export (every layer's chain as MatMul/Reshape/Transpose/Conv)
* ``fast``             ``model.fast.onnx`` in stock onnxruntime (the functions' standard ops:
                       per layer the faster of chain ops and dense rebuild)
* ``fast+kernel``      the same file with the custom-op library registered (the compiled
                       chain kernel through onnxruntime-extensions' Python custom ops)

and the max error against the torch model at batch 32, relative to the output scale
(``max |y - ref| / max |ref|``). Usage::

    python benchmarks/ort_sparse_path.py [--families lenet300,lenet5] [--rounds 15] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

FAMILIES = ("lenet300", "lenet5", "lstm", "resnet20", "vgg11", "vit_tiny")
BATCHES = (1, 32)


def compressed(name: str, sparsity: float):
    import tedepr_cli as tedepr
    from tedepr_cli.arch import build, parse_arch
    from tedepr_cli.artifact import Artifact

    spec = parse_arch(name)
    torch.manual_seed(0)
    dense = build(spec).eval()
    shape = tuple(dense.input_shape)
    model = tedepr.tensorize(dense, sparsity=sparsity, example_input=torch.zeros(1, *shape))
    tedepr.prune(model, sparsity=sparsity)
    return Artifact(model=model.eval(), arch=spec)


def measure(name: str, sparsity: float, rounds: int, calls: int) -> dict:
    from tedepr_cli.export import ExportOptions, export
    from tedepr_cli.kernels import ort_ops

    art = compressed(name, sparsity)
    with tempfile.TemporaryDirectory() as d:
        rep = export(art, Path(d) / "e", ExportOptions(formats=["onnx", "onnx-fast"]))
        files = {"onnx": Path(d) / "e" / "model.onnx", "fast": Path(d) / "e" / "model.fast.onnx"}
        sess = {"onnx": ort_ops.session(files["onnx"], sparse=False),
                "fast": ort_ops.session(files["fast"], sparse=False),
                "fast+kernel": ort_ops.session(files["fast"], sparse=True)}
        sizes = {k: v.stat().st_size for k, v in files.items()}
    row: dict = {"family": name, "sparsity": sparsity, "bytes": sizes,
                 "bodies": {r["layer"]: r["body"] for r in rep["fast"]["layers"] if r["ok"]},
                 "us": {}, "max_scaled_error": {}}
    g = torch.Generator().manual_seed(1)
    for b in BATCHES:
        x = torch.rand(b, *art.input_shape, generator=g)
        with torch.no_grad():
            ref = art.model(x).numpy().astype(np.float64)
        xn = x.numpy()
        for k, s in sess.items():
            y = s.run(None, {"x": xn})[0]
            row["max_scaled_error"].setdefault(k, {})[b] = float(np.abs(y - ref).max() / np.abs(ref).max())
        times: dict[str, list[float]] = {k: [] for k in sess}
        names = list(sess)
        for r in range(rounds + 2):
            for k in names[r % len(names):] + names[:r % len(names)]:
                s = sess[k]
                t = time.thread_time()
                for _ in range(calls if b == 1 else max(1, calls // 8)):
                    s.run(None, {"x": xn})
                if r >= 2:
                    times[k].append((time.thread_time() - t) / (calls if b == 1 else max(1, calls // 8)))
        row["us"][b] = {k: round(statistics.median(v) * 1e6, 1) for k, v in times.items()}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--sparsity", type=float, default=0.995)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in a.families.split(","):
        rows.append(measure(name, a.sparsity, a.rounds, a.calls))
        r = rows[-1]
        print(json.dumps(r), file=sys.stderr, flush=True)
    print(f"one thread, {os.cpu_count()} cores (shared, loaded), median per-call CPU time in µs\n")
    print("| model | batch | onnx (standard ops) | onnx-fast, stock ort | onnx-fast + kernel op | "
          "max error vs torch (fast / +kernel) | dense bodies | file bytes (onnx / fast) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        dense = sum(1 for v in r["bodies"].values() if v == "dense")
        for b in BATCHES:
            u, e = r["us"][b], r["max_scaled_error"]
            print(f"| {r['family']} | {b} | {u['onnx']} | {u['fast']} | {u['fast+kernel']} | "
                  f"{e['fast'][b]:.1e} / {e['fast+kernel'][b]:.1e} | {dense}/{len(r['bodies'])} | "
                  f"{r['bytes']['onnx']:,} / {r['bytes']['fast']:,} |")
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
