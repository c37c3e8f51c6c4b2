"""Shared fixtures: the bundled sample data, small zoo configurations, a CLI runner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tedepr_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
MNIST = SAMPLES / "mnist5k.npz"
LENET300 = SAMPLES / "lenet300.pt"

# Every zoo family, configured for the 28x28 grayscale sample (VGG narrowed for speed).
ZOO_CASES = {
    "lenet300": {},
    "lenet5": {},
    "vgg11": {"in_channels": 1, "width": 0.125},
    "vgg16": {"in_channels": 1, "width": 0.125},
    "resnet20": {"in_channels": 1},
    "resnet32": {"in_channels": 1, "width": 0.5},
    "resnet56": {"in_channels": 1, "width": 0.5},
    "lstm": {"hidden": 32},
    "vit_tiny": {"dim": 32, "depth": 2},
}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_logger():
    """In-process CLI runs configure the global ``tedepr`` logger (``-q`` raises its level to
    ERROR); restore it so that no test sees the verbosity a previous one chose."""
    import logging

    log = logging.getLogger("tedepr")
    saved = (log.level, list(log.handlers), log.propagate)
    yield
    log.setLevel(saved[0])
    log.handlers[:] = saved[1]
    log.propagate = saved[2]


def run_cli(*args):
    """Invoke the CLI in-process; returns typer's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def sample_inputs(model, n: int = 32, split: str = "test"):
    from tedepr_cli.model_data import load_split

    x, y = load_split(MNIST, split, model.input_shape, model.input_kind, 10)
    return x[:n], y[:n]
