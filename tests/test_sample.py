"""The bundled checkpoint reproduces the accuracy the README states, from the shipped data."""

from __future__ import annotations

import json

from tedepr_cli.arch import parse_arch
from tedepr_cli.evaluate import evaluate
from tedepr_cli.loading import load_model
from tedepr_cli.model_data import load_split

from .conftest import LENET300, MNIST, ROOT, SAMPLES


def test_sample_checkpoint_accuracy_matches_readme():
    stated = json.loads((SAMPLES / "lenet300.json").read_text())
    art = load_model(LENET300, parse_arch("lenet300"))
    x, y = load_split(MNIST, "test", art.input_shape, art.input_kind, 10)
    m = evaluate(art.model, x, y)
    assert m["correct"] == stated["correct"] and m["samples"] == stated["samples"] == 1000
    assert m["accuracy"] > 0.9
    assert f"{100 * stated['accuracy']:.1f} %" in (ROOT / "README.md").read_text()
