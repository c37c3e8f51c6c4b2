"""Time and peak memory of `decompose` and `prune` on a 20 M-parameter model (issue 18 item 8).

The model is a MiniLM-shaped text encoder written here in plain torch (all-MiniLM-L6-v2's
shapes: vocabulary 30,522, width 384, 6 layers of torch's own ``nn.TransformerEncoderLayer``,
12 heads, FFN 1,536; mean-pooled, a 10-class head: 22.4 M parameters) with random weights,
so it needs no download; token data is 512 random 32-token sequences with random labels
(timing and memory only: the scores mean nothing). Each stage runs as its own ``tedepr``
process, one thread; its CPU time (user + system), wall time and peak resident set come
from the operating system (``os.wait4``).

    python benchmarks/large_model.py [--out DIR] [--stages decompose,prune-synflow,...]
                                     [--json-out FILE] [--md-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tedepr_cli.fsutil import atomic_output  # noqa: E402

MODULE = "large_model_encoder"
ENCODER = '''
import torch
from torch import nn


class Encoder(nn.Module):
    def __init__(self, vocab=30522, dim=384, layers=6, heads=12, ffn=1536, max_len=128, classes=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_len, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, ffn, dropout=0.0, batch_first=True,
                                           activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        h = self.embed(ids) + self.pos[:, : ids.shape[1]]
        return self.head(self.norm(self.encoder(h)).mean(dim=1))


def classifier():
    m = Encoder()
    m.input_shape = (32,)
    return m
'''
ARCH = f"{MODULE}:classifier"
# stage -> tedepr arguments ({ckpt}, {tokens}, {dec}: paths in the work directory)
STAGES = {
    "decompose": ["decompose", "{ckpt}", "--arch", ARCH, "-o", "{dec}"],
    "prune-synflow": ["prune", "{dec}", "--arch", ARCH, "--sparsity", "0.99", "-o", "p-synflow"],
    "prune-snip": ["prune", "{dec}", "--arch", ARCH, "--sparsity", "0.99", "--criterion", "snip",
                   "--data", "{tokens}", "-o", "p-snip"],
    "prune-tedepr-b16": ["prune", "{dec}", "--arch", ARCH, "--sparsity", "0.99", "--data", "{tokens}",
                         "--batch-size", "16", "-o", "p-tedepr16"],
    "prune-tedepr": ["prune", "{dec}", "--arch", ARCH, "--sparsity", "0.99", "--data", "{tokens}",
                     "-o", "p-tedepr"],
    # the micro-batch trades memory for speed (same scores up to rounding): 128 = the whole batch
    "prune-tedepr-mb8": ["prune", "{dec}", "--arch", ARCH, "--sparsity", "0.99", "--data", "{tokens}",
                         "--micro-batch", "8", "-o", "p-tedepr-mb8"],
    "prune-tedepr-mb128": ["prune", "{dec}", "--arch", ARCH, "--sparsity", "0.99", "--data", "{tokens}",
                           "--micro-batch", "128", "-o", "p-tedepr-mb128"],
    "prune-dense-synflow": ["prune", "{ckpt}", "--arch", ARCH, "--no-decompose", "--sparsity", "0.99",
                            "-o", "p-dense"],
}


def run_stage(args: list[str], work: Path) -> dict[str, float | int]:
    """One tedepr process: exit code, CPU and wall seconds, peak RSS in bytes (Linux: KiB)."""
    env = {**os.environ, "PYTHONPATH": f"{work}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "tedepr_cli", *args, "-q"], cwd=work, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read() if p.stderr else ""
    return {"exit": os.waitstatus_to_exitcode(status), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "wall_s": round(wall, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "stderr": err.strip().splitlines()[-1] if err.strip() else ""}


def markdown(report: dict) -> str:
    lines = ["# decompose / prune on a 22.4 M-parameter encoder", "",
             f"{report['params']:,} parameters; one thread; load average {report['load_before']} before, "
             f"{report['load_after']} after (1 min). CPU = user + system seconds; peak RSS of the process.",
             "", "| stage | exit | CPU s | wall s | peak RSS |", "|---|---|---|---|---|"]
    for name, r in report["stages"].items():
        lines.append(f"| {name} | {r['exit']} | {r['cpu_s']} | {r['wall_s']} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} GiB |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--out", type=Path, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--md-out", type=Path)
    args = ap.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"large_model: unknown stages {', '.join(unknown)}; choose from {', '.join(STAGES)}",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        (work / f"{MODULE}.py").write_text(ENCODER)
        sys.path.insert(0, str(work))
        from large_model_encoder import classifier  # noqa: PLC0415 (written just above)

        torch.manual_seed(0)
        model: nn.Module = classifier()
        torch.save(model.state_dict(), work / "encoder.pt")
        rng = np.random.default_rng(0)
        np.savez(work / "tokens.npz", input_ids=rng.integers(0, 30522, (512, 32)).astype(np.int64),
                 labels=rng.integers(0, 10, 512).astype(np.int64))
        paths = {"ckpt": "encoder.pt", "tokens": "tokens.npz", "dec": "decomposed"}
        load_before = round(os.getloadavg()[0], 2)
        results = {}
        for s in stages:
            results[s] = run_stage([a.format(**paths) for a in STAGES[s]], work)
            print(f"{s}: {results[s]}", file=sys.stderr)
        report = {"params": sum(p.numel() for p in model.parameters()), "load_before": load_before,
                  "load_after": round(os.getloadavg()[0], 2), "stages": results}
    md = markdown(report)
    print(md)
    for path, text in ((args.json_out, json.dumps(report, indent=2) + "\n"), (args.md_out, md)):
        if path is not None:
            with atomic_output(path, overwrite=True) as tmp_file:
                tmp_file.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
