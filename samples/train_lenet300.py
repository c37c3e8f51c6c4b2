"""Train the bundled dense checkpoint samples/lenet300.pt on samples/mnist5k.npz.

    python samples/train_lenet300.py            # ~30 s on one core

Recipe (the DESIGN §5 reference): Adam lr 1e-3, batch 128, 30 epochs, seed 0, one thread,
train split only. Writes the state_dict (weights only, loadable with weights_only=True) and
samples/lenet300.json with its test-split accuracy, which the README quotes and a test
re-measures.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tedepr_cli.data import load_split
from tedepr_cli.evaluate import evaluate
from tedepr_cli.zoo import MODELS

HERE = Path(__file__).parent


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MODELS.get("lenet300")()
    data = HERE / "mnist5k.npz"
    x, y = load_split(data, "train", model.input_shape, model.input_kind, 10)
    xt, yt = load_split(data, "test", model.input_shape, model.input_kind, 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 128):
            idx = perm[i:i + 128]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    metrics = evaluate(model, xt, yt)
    torch.save(model.state_dict(), HERE / "lenet300.pt")
    info = {"arch": "lenet300", "data": "samples/mnist5k.npz", "split": "test",
            "samples": metrics["samples"], "correct": metrics["correct"],
            "accuracy": metrics["accuracy"], "loss": metrics["loss"],
            "recipe": "Adam lr=1e-3, batch 128, 30 epochs, seed 0, 1 thread"}
    (HERE / "lenet300.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
