"""`tedepr run`: a whole pipeline from a TOML recipe, overrides, and recipe errors."""

from __future__ import annotations

import json

import pytest
import torch

from tedepr_cli.artifact import load_artifact

from .conftest import ROOT, run_cli

RECIPE = ROOT / "samples" / "recipes" / "lenet300.toml"


def test_sample_recipe_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    r = run_cli("run", RECIPE, "-o", out, "--set", "finetune.epochs=1", "--set", "finetune.limit_train=256",
                "--set", "bench.iters=2", "--set", "bench.warmup=0", "--set", "bench.memory=false",
                "--set", "prune.sparsity=0.99", "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert abs(d["sparsity_vs_dense"] - 0.99) < 1e-9 and set(d["speedup"]) == {"1", "32"}
    for name in ("pruned", "trained", "export", "bench.json", "recipe.json"):
        assert (out / name).exists(), name
    best = load_artifact(out / "trained")
    assert best.meta["recipe"]["prune"]["sparsity"] == 0.99  # the merged recipe travels
    assert best.meta["recipe"]["finetune"]["epochs"] == 1
    assert (out / "export" / "model.onnx").exists()


@pytest.mark.parametrize("text,code,fragment", [
    ('[model]\npath = "samples/lenet300.pt"\narch = "lenet300"\n[prune]\nsparsity = 0.9\n[wat]\n', 2,
     "unknown table"),
    ('[model]\npath = "samples/lenet300.pt"\narch = "lenet300"\n[prune]\nsparsty = 0.9\n', 2,
     "unknown option"),
    ('[model]\narch = "lenet300"\n[prune]\nsparsity = 0.9\n', 2, "path"),
    ('[model]\npath = "samples/lenet300.pt"\narch = "lenet300"\n', 2, "no stage"),
    ('[model]\npath = "samples/lenet300.pt"\narch = "lenet300"\n[finetune]\nepochs = 1\n', 2, "[data]"),
    ('[model]\npath = "samples/lenet300.pt"\narch = "lenet300"\n[prune]\nsparsity = 1.5\n', 2, "(0, 1)"),
    ('[model\npath = 1', 4, "not valid TOML"),
])
def test_recipe_errors_write_nothing(tmp_path, monkeypatch, text, code, fragment):
    monkeypatch.chdir(ROOT)
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    r = run_cli("run", recipe, "-o", tmp_path / "out")
    assert r.exit_code == code, r.stderr
    assert fragment in r.stderr and not (tmp_path / "out").exists()


def test_missing_recipe_and_bad_set(tmp_path):
    assert run_cli("run", tmp_path / "none.toml", "-o", tmp_path / "o").exit_code == 3
    assert run_cli("run", RECIPE, "-o", tmp_path / "o", "--set", "sparsity=1").exit_code == 2


def test_run_prints_a_table_not_a_python_dict(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\npath = "samples/lenet300.pt"\narch = "lenet300"\n'
                      '[prune]\nsparsity = 0.99\ncriterion = "magnitude"\n')
    r = run_cli("run", recipe, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    assert "sparsity vs dense" in r.stdout and "99.00 %" in r.stdout
    assert str(tmp_path / "out" / "pruned") in r.stdout
    assert "{" not in r.stdout and "sparsity_vs_dense:" not in r.stdout


def test_seed_sets_every_stage_and_set_still_wins(tmp_path, monkeypatch):
    """`run --seed N` seeds every stage (same seed: same masks; another: other masks);
    `--set stage.seed` overrides it for one stage."""
    monkeypatch.chdir(ROOT)
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\npath = "samples/lenet300.pt"\narch = "lenet300"\n'
                      '[prune]\nsparsity = 0.99\ncriterion = "random"\nseed = 0\n[export]\n'
                      'formats = ["safetensors"]\n')

    def masks(name, *args):
        r = run_cli("run", recipe, "-o", tmp_path / name, *args, "--json")
        assert r.exit_code == 0, r.stderr
        merged = json.loads((tmp_path / name / "recipe.json").read_text())
        return load_artifact(tmp_path / name / "pruned").masks, merged

    a, merged = masks("a", "--seed", "3")
    assert merged["prune"]["seed"] == 3 and merged["export"]["seed"] == 3
    b, _ = masks("b", "--seed", "3")
    c, _ = masks("c", "--seed", "4")
    d, merged = masks("d", "--seed", "4", "--set", "prune.seed=3")
    assert merged["prune"]["seed"] == 3 and merged["export"]["seed"] == 4
    same = lambda x, y: all(torch.equal(x[k], y[k]) for k in x)  # noqa: E731
    assert same(a, b) and same(a, d) and not same(a, c)
