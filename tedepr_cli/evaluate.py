"""Accuracy and loss of a model on labelled inputs (used by info/decompose/eval/bench)."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
             num_classes: int | None = None) -> dict[str, Any]:
    """Mean cross-entropy, top-1 accuracy, per-class accuracy and examples/s."""
    was_training = model.training
    model.eval()
    n = len(y)
    loss_sum, correct = 0.0, 0
    preds = torch.empty(n, dtype=torch.long)
    t0 = time.perf_counter()
    for i in range(0, n, batch_size):
        out = model(x[i:i + batch_size])
        loss_sum += float(F.cross_entropy(out, y[i:i + batch_size], reduction="sum"))
        preds[i:i + batch_size] = out.argmax(1)
    elapsed = time.perf_counter() - t0
    model.train(was_training)
    correct = int((preds == y).sum())
    k = num_classes or int(max(int(y.max()), int(preds.max())) + 1)
    per_class = {}
    for c in range(k):
        sel = y == c
        if sel.any():
            per_class[c] = float((preds[sel] == c).float().mean())
    return {
        "samples": n,
        "loss": loss_sum / max(n, 1),
        "accuracy": correct / max(n, 1),
        "correct": correct,
        "per_class_accuracy": per_class,
        "examples_per_s": n / elapsed if elapsed > 0 else float("inf"),
    }


def num_outputs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Output width of ``model`` (number of classes), found by one dry run."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, *input_shape))
    model.train(was_training)
    return int(out.shape[-1])
