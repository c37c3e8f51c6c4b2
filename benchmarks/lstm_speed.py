"""The LSTM of issue 17: inference latency per engine and training time per epoch, dense vs
compressed, measured side by side in one process, one thread, as per-call CPU time
(``time.thread_time``: onnxruntime with one intra-op thread runs in the calling thread), so
a loaded machine inflates the figures less than wall time would.

Inference, batches 1 and 32, engines interleaved (``tedepr_cli.timing.interleaved``):
``dense-torch`` (the dense zoo LSTM), ``dense-ort`` (its ONNX in onnxruntime), ``tedepr``
(the compressed artifact planned and built by the execution planner: the compiled LSTM
recurrence where it measured fastest), ``tedepr-loop`` (the layer choices of the issue's
baseline: the tensorized LSTM's per-step torch loop with the input projections on the chain
kernel), ``chain-ort`` (the compressed model's ONNX in onnxruntime).

Training: one epoch of the sample's train split at batch 128 (Adam, cross-entropy), CPU
seconds, for the dense LSTM and the compressed one with the fused recurrence (default) and
with the per-step loop (the path before issue 17), interleaved per step.

    python benchmarks/lstm_speed.py runs/lstm995 [--rounds 300] [--json-out FILE]

The artifact is any pruned ``lstm`` zoo artifact, e.g. ``tedepr prune lstm --init random
--sparsity 0.995 --data samples/mnist5k.npz -o runs/lstm995``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tedepr_cli.artifact import load_artifact  # noqa: E402
from tedepr_cli.bench.engines import load_baseline, ort_session  # noqa: E402
from tedepr_cli.execution import build_model, plan_execution  # noqa: E402
from tedepr_cli.export import to_onnx  # noqa: E402
from tedepr_cli.kernels.cpu import KernelLinear  # noqa: E402
from tedepr_cli.model_data import load_split  # noqa: E402
from tedepr_cli.timing import Plan, interleaved, wall_timer  # noqa: E402


def ort_engine(model: torch.nn.Module, x: torch.Tensor, tmp: Path, name: str):
    import onnx

    path = tmp / f"{name}.onnx"
    onnx.save(to_onnx(model, torch.rand(2, *x.shape[1:]), 18), str(path))
    sess = ort_session(path, 1, torch.device("cpu"))
    xin = {sess.get_inputs()[0].name: x.numpy()}
    return lambda: sess.run(None, xin)


def inference(art, base: torch.nn.Module, rounds: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (1, 32):
            x = torch.rand(batch, *art.input_shape, generator=torch.Generator().manual_seed(0))
            plan = plan_execution(art, batch, reps=31)
            loop_plan = copy.deepcopy(plan)
            for row in loop_plan["layers"].values():
                if row["type"] == "TensorizedLSTM":  # the baseline: torch loop, chain ih
                    row["choice"] = "torch"
            tedepr = build_model(art, plan)
            looped = build_model(art, loop_plan)
            for m in looped.modules():
                if hasattr(m, "recurrence"):
                    m.recurrence = "loop"
                    m.ih = torch.nn.ModuleList([KernelLinear(p) for p in m.ih])
            fns = {"dense-torch": lambda m=base, x=x: m(x),
                   "dense-ort": ort_engine(base, x, Path(tmp), "dense"),
                   "tedepr": lambda m=tedepr, x=x: m(x), "tedepr-loop": lambda m=looped, x=x: m(x),
                   "chain-ort": ort_engine(art.model, x, Path(tmp), "chain")}
            with torch.no_grad():
                times = interleaved(fns, Plan(warmup=10, iters=rounds, min_iters=1),
                                    timers={n: wall_timer(time.thread_time) for n in fns})
            out[batch] = {"plan": {n: r["choice"] for n, r in plan["layers"].items()},
                          "median_us": {n: round(1e6 * statistics.median(t), 1) for n, t in times.items()}}
    return out


def training(art, base: torch.nn.Module, data: Path, steps: int | None) -> dict:
    x, y = load_split(data, "train", art.input_shape, art.input_kind, 10)
    models = {"dense": copy.deepcopy(base).train(), "compressed-fused": copy.deepcopy(art.model).train(),
              "compressed-loop": copy.deepcopy(art.model).train()}
    for m in models["compressed-loop"].modules():
        if hasattr(m, "recurrence"):
            m.recurrence = "loop"
    opts = {n: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], 1e-3)
            for n, m in models.items()}
    n_batches = (len(x) + 127) // 128
    cpu = {n: 0.0 for n in models}
    order = list(models)
    for i in range(min(n_batches, steps or n_batches)):
        xb, yb = x[i * 128:(i + 1) * 128], y[i * 128:(i + 1) * 128]
        for n in order[i % 3:] + order[:i % 3]:
            t0 = time.thread_time()
            opts[n].zero_grad()
            torch.nn.functional.cross_entropy(models[n](xb), yb).backward()
            opts[n].step()
            cpu[n] += time.thread_time() - t0
    done = min(n_batches, steps or n_batches)
    return {"train_samples": len(x), "batches_timed": done,
            "cpu_s_per_epoch": {n: round(s * n_batches / done, 3) for n, s in cpu.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--data", default=str(ROOT / "samples" / "mnist5k.npz"))
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--train-steps", type=int, default=0, help="batches to time (0: a whole epoch)")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    art = load_artifact(a.artifact)
    base, _ = load_baseline(art, None, seed=0)
    res = {"inference": inference(art, base, a.rounds),
           "training": training(art, base, Path(a.data), a.train_steps or None)}
    for batch, r in res["inference"].items():
        print(f"batch {batch}: " + ", ".join(f"{n} {v:,.1f} us" for n, v in r["median_us"].items())
              + f"  (plan: {r['plan']})")
    per_epoch = res["training"]["cpu_s_per_epoch"]
    print("training, CPU s/epoch: " + ", ".join(f"{n} {v}" for n, v in per_epoch.items()))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
