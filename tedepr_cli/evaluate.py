"""Accuracy and loss of a model on labelled inputs (used by info/decompose/eval/bench), and
for models that are not classifiers (or data without labels) the mean cosine of the model's
outputs to a reference model's (:func:`cosine_split`).

:func:`evaluate` takes tensors already in memory; :func:`evaluate_split` streams a
:class:`~tedepr_cli.datasets.Split` batch by batch (optionally with DataLoader workers),
so evaluation never needs the whole split in memory. Both give the same numbers on the
same samples and batch size.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .datasets import Split

from .errors import opt
from .logs import log
from .surgery import dry_forward, eval_mode, feed


@torch.no_grad()
def _run(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int | None,
         device: torch.device | None) -> dict[str, Any]:
    loss_sum = 0.0
    preds: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    elapsed = 0.0
    t0 = time.perf_counter()
    with eval_mode(model):
        for x, y in batches:
            if device is not None:
                x, y = x.to(device), y.to(device)
            if len(y):
                out = output(model, x)
                loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
                preds.append(out.argmax(1).cpu())
                labels.append(y.cpu())
    elapsed = time.perf_counter() - t0
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    y = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    n = len(y)
    correct = int((pred == y).sum())
    k = num_classes or (int(max(int(y.max()), int(pred.max())) + 1) if n else 0)
    per_class = {}
    for c in range(k):
        sel = y == c
        if sel.any():
            per_class[c] = float((pred[sel] == c).float().mean())
    return {
        "samples": n,
        "loss": loss_sum / max(n, 1),
        "accuracy": correct / max(n, 1),
        "correct": correct,
        "per_class_accuracy": per_class,
        "examples_per_s": n / elapsed if elapsed > 0 else float("inf"),
    }


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
             num_classes: int | None = None) -> dict[str, Any]:
    """Mean cross-entropy, top-1 accuracy, per-class accuracy and examples/s."""
    return _run(model, ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)),
                num_classes, None)


def evaluate_split(model: nn.Module, split: Split, batch_size: int = 256, num_classes: int | None = None,
                   device: torch.device | None = None, workers: int = 0) -> dict[str, Any]:
    """:func:`evaluate` over a streamed split; unreadable samples (skipped, not strict)
    are counted in ``skipped``. Throughput includes reading and decoding."""
    from .datasets import iterate, sequential

    skipped = [0, None]

    def batches() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for b in iterate(split, sequential(len(split), batch_size), workers=workers):
            if b.skipped:
                skipped[0] += b.skipped
                skipped[1] = skipped[1] or b.error
            yield b.x, b.y

    m = _run(model, batches(), num_classes, device)
    if skipped[0]:
        log.warning(f"skipped {skipped[0]} unreadable sample(s), e.g. {skipped[1]} "
                    f"({opt('strict-data')} makes this an error)")
        m["skipped"] = skipped[0]
    return m


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model``'s output on the batch ``x`` (token arrays by name, :func:`~tedepr_cli.surgery.feed`;
    the first element of a tuple output)."""
    out = feed(model, x)
    return out[0] if isinstance(out, tuple | list) else out


def sample_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each sample's output ``a[i]`` to ``b[i]`` (outputs of any shape
    ``[batch, ...]``, flattened per sample), shape ``[batch]``, in [-1, 1]."""
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1, eps=1e-12).to(a.dtype)


@torch.no_grad()
def cosine_split(model: nn.Module, reference: nn.Module, split: Split, batch_size: int = 256,
                 device: torch.device | None = None, workers: int = 0) -> dict[str, Any]:
    """Agreement of ``model`` with ``reference`` (e.g. the dense original of a compressed
    encoder) on every sample of ``split``, labels unused: ``cosine_mean``/``cosine_min``
    (per-sample cosine of the flattened outputs, :func:`sample_cosine`), ``samples`` and
    ``examples_per_s`` (both models' forwards). Outputs of different shapes are ``ValueError``."""
    from .datasets import iterate, sequential

    cos: list[torch.Tensor] = []
    t0 = time.perf_counter()
    with eval_mode(model), eval_mode(reference):
        for b in iterate(split, sequential(len(split), batch_size), workers=workers):
            x = b.x if device is None else b.x.to(device)
            if not len(x):
                continue
            got, ref = output(model, x), output(reference, x)
            if got.shape != ref.shape:
                raise ValueError(f"outputs of shape {tuple(got.shape[1:])} and {tuple(ref.shape[1:])} differ")
            cos.append(sample_cosine(got, ref).cpu())
    elapsed = time.perf_counter() - t0
    c = torch.cat(cos) if cos else torch.empty(0)
    n = len(c)
    return {"samples": n, "cosine_mean": float(c.double().mean()) if n else float("nan"),
            "cosine_min": float(c.min()) if n else float("nan"),
            "examples_per_s": n / elapsed if elapsed > 0 else float("inf")}


def num_outputs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Output width of ``model`` (number of classes), found by one dry run
    (:func:`~tedepr_cli.surgery.dry_forward`: token ids for an embedding model; a shape the
    model cannot take is :class:`~tedepr_cli.errors.BadInput`)."""
    out = dry_forward(model, input_shape)
    if isinstance(out, tuple | list):
        out = out[0]
    return int(out.shape[-1])
