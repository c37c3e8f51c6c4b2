"""Tensor-chain forward vs the dense layer, per mode count (issue 3).

    python benchmarks/chain_vs_dense.py                # writes benchmarks/results/chain_vs_dense.md
    python benchmarks/chain_vs_dense.py --check        # also exit 1 if the claim below fails

For representative shapes (LeNet 784->300, 1024->1024, a CIFAR-VGG 3x3 conv 256->256 on
8x8, VGG FC6 25088->4096), TT rank 8, unpruned cores, one thread, batch 1 and 32: the
median time of the torch chain with 2, 3 and 4 modes per side, the dense layer, and which
mode count `--modes auto` picks. Timings are interleaved medians (tedepr_cli.timing).
The claim checked: auto is never a slow configuration it could have avoided (its time is
within noise of the fastest mode count). A miss is a warning (timings on a busy machine
move by more than the margin); with ``--check`` it is exit code 1.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tedepr_cli.tensorized.plan import PlanOptions, apply_plan, plan_model  # noqa: E402
from tedepr_cli.timing import Plan, interleaved, summarize  # noqa: E402

SHAPES = [("linear", 784, 300, None), ("linear", 1024, 1024, None), ("conv", 256, 256, 8),
          ("linear", 25088, 4096, None)]
NOISE = 1.10  # "within noise": auto may be up to 10 % slower than the fastest measured


def _module(kind: str, n: int, m: int) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.Linear(n, m) if kind == "linear" else nn.Conv2d(n, m, 3, padding=1)
    return nn.Sequential(layer).eval()


def _chain(dense: nn.Module, shape: tuple[int, ...], modes) -> tuple[nn.Module, dict]:
    import copy

    model = copy.deepcopy(dense)
    plans = plan_model(model, shape, PlanOptions(rank=8, modes=modes, include=["0"]))
    apply_plan(model, {p.name: p.spec for p in plans if p.spec})
    layer = model[0]
    with torch.no_grad():
        for c in layer.cores:
            c.normal_(0, 0.1)
    p = plans[0]
    return model.eval(), {"modes": p.note, "params": p.params, "work": p.work_ratio,
                          "in": p.spec["in_modes"], "out": p.spec["out_modes"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chain_vs_dense.md"))
    ap.add_argument("--check", action="store_true",
                    help=f"exit 1 when auto is more than {NOISE:.2f}x slower than the fastest mode count "
                         "(default: a warning; a busy machine's timings move by more than that)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                   platform.processor())
    lines = [f"Chain (torch path, TT rank 8, dense cores) vs dense layer; {cpu}, 1 thread, torch "
             f"{torch.__version__}; median µs of {args.iters} interleaved rounds.", "",
             "| layer | batch | dense | 2 modes | 3 modes | 4 modes | auto picks | auto vs fastest |",
             "|---|---|---|---|---|---|---|---|"]
    ok = True
    for kind, n, m, hw in SHAPES:
        shape = (n,) if kind == "linear" else (n, hw, hw)
        dense = _module(kind, n, m)
        chains = {}
        for d in (2, 3, 4):
            chains[d] = _chain(dense, shape, d)
        auto_model, auto_info = _chain(dense, shape, "auto")
        auto_d = int(auto_info["modes"].split()[0])
        for b in (1, 32):
            x = torch.randn(b, *shape)
            fns = {"dense": lambda x=x, dense=dense: dense(x)}
            fns.update({d: (lambda mdl=mdl, x=x: mdl(x)) for d, (mdl, _) in chains.items()})
            with torch.no_grad():
                t = interleaved(fns, Plan(warmup=3, iters=args.iters))
            med = {k: 1e6 * summarize(v, b)["median_s"] for k, v in t.items()}
            fastest = min(med[d] for d in (2, 3, 4))
            ratio = med[auto_d] / fastest
            ok &= ratio <= NOISE
            name = f"{kind} {n}->{m}" + (f" 3x3 @{hw}x{hw}" if hw else "")
            picked = f"{'x'.join(map(str, auto_info['in']))}->{'x'.join(map(str, auto_info['out']))}"
            lines.append(f"| {name} | {b} | {med['dense']:.1f} | {med[2]:.1f} | {med[3]:.1f} | "
                         f"{med[4]:.1f} | {auto_d} ({picked}) | {ratio:.2f}x |")
            print(lines[-1], flush=True)
    lines += ["", f"auto within {NOISE:.2f}x of the fastest mode count everywhere: {'yes' if ok else 'NO'}"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(lines[-1])
    if not ok and not args.check:
        print(f"warning: auto was more than {NOISE:.2f}x slower than the fastest mode count somewhere "
              "(see the last column); rerun on a quiet machine, or pass --check to fail on it",
              file=sys.stderr)
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
