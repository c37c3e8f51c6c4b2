"""`tedepr bench`: the report's JSON schema, every gate's exit code, engine availability."""

from __future__ import annotations

import json

import pytest

from tedepr_cli.artifact import save_artifact

from .conftest import LENET300, MNIST, run_cli

FAST = ["--iters", "3", "--warmup", "1", "--batch", "1,4"]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from tedepr_cli.arch import parse_arch
    from tedepr_cli.loading import load_model
    from tedepr_cli.pruning.prune import PruneOptions, prune

    art, _ = prune(load_model(LENET300, parse_arch("lenet300")), PruneOptions(sparsity=0.995,
                                                                              criterion="magnitude"))
    return save_artifact(art, tmp_path_factory.mktemp("bench") / "p")


def test_json_schema_and_table(target, tmp_path):
    out = tmp_path / "b.json"
    r = run_cli("bench", target, "--baseline", LENET300, "--data", MNIST, "--json", out, *FAST)
    assert r.exit_code == 0, r.stderr
    assert "speed-up vs dense" in r.stdout and "batch 4" in r.stdout
    d = json.loads(out.read_text())
    assert d["schema"] == "tedepr-bench" and d["schema_version"] == 1
    for key in ("cpu", "threads", "torch", "onnxruntime", "kernel", "git_commit"):
        assert key in d["machine"]
    assert set(d["results"]) == {"1", "4"}
    for row in d["results"].values():
        assert {"dense-torch", "chain-torch", "tedepr"} <= set(row)
        for s in row.values():
            for k in ("median_s", "iqr_s", "p50_s", "p90_s", "p99_s", "mean_s", "std_s", "throughput_per_s",
                      "speedup_vs_dense_torch", "noisy"):
                assert k in s
            assert s["n"] == 3
        assert row["dense-torch"]["speedup_vs_dense_torch"]["median"] == pytest.approx(1.0)
    assert d["sizes"]["compressed-safetensors"]["bytes"] < d["sizes"]["dense-safetensors"]["bytes"]
    assert d["accuracy"]["baseline"] == pytest.approx(0.94)
    plan = d["execution_plans"]["1"]
    assert set(plan["layers"]) == {"fc1", "fc2", "fc3"}
    assert 0 <= plan["flops"]["share_on_sparse_or_factorized"] <= 1
    assert "triton" in d["skipped_engines"]


def test_json_to_stdout(target):
    r = run_cli("bench", target, "--json", "-", "--engines", "dense-torch,chain-torch", *FAST)
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert set(d["results"]["1"]) == {"dense-torch", "chain-torch"}
    assert d["baseline_weights"].startswith("random")


@pytest.mark.parametrize("args,code", [
    (["--fail-if-slower", "0.000001"], 11),
    (["--max-size", "10"], 12),
    (["--min-speedup", "1000"], 13),
])
def test_each_gate_has_its_exit_code(target, tmp_path, args, code):
    out = tmp_path / "g.json"
    r = run_cli("bench", target, "--engines", "dense-torch,tedepr", "--json", out, *FAST, *args)
    assert r.exit_code == code, r.stderr
    assert "gate" in r.stderr
    assert json.loads(out.read_text())["gates"]["failed"]  # the figures are still written


def test_gates_pass_and_compare_to_saved(target, tmp_path):
    saved = tmp_path / "saved.json"
    r = run_cli("bench", target, "--engines", "dense-torch,tedepr", "--json", saved, *FAST,
                "--max-size", "10000000", "--fail-if-slower", "1000")
    assert r.exit_code == 0, r.stderr
    r = run_cli("bench", target, "--engines", "dense-torch,tedepr", *FAST, "--fail-if-slower", "1e-9",
                "--compare-to", saved)
    assert r.exit_code == 11 and "saved" in r.stderr
    (tmp_path / "junk.json").write_text("{nope")
    r = run_cli("bench", target, *FAST, "--fail-if-slower", "2", "--compare-to", tmp_path / "junk.json")
    assert r.exit_code == 4


def test_engine_availability_and_bad_input(target, tmp_path):
    r = run_cli("bench", target, "--engines", "dense-torch,triton", *FAST)
    assert r.exit_code == 0 and "skipped triton" in r.stdout
    r = run_cli("bench", target, "--engines", "dense-torch,triton", "--strict-engines", *FAST)
    assert r.exit_code == 10
    assert run_cli("bench", target, "--engines", "warp-drive", *FAST).exit_code == 2
    assert run_cli("bench", target, "--batch", "0", *FAST[:4]).exit_code == 2
    assert run_cli("bench", target, "--device", "cuda", *FAST).exit_code == 10
    assert run_cli("bench", target, "--baseline", tmp_path / "none.pt", *FAST).exit_code == 3
    (tmp_path / "bad.pt").write_bytes(b"junk")
    assert run_cli("bench", target, "--baseline", tmp_path / "bad.pt", *FAST).exit_code == 4
    assert run_cli("bench", tmp_path / "missing", *FAST).exit_code == 3


def test_plan_is_stored_and_reused_and_overridable(target, tmp_path):
    out = tmp_path / "planned"
    r = run_cli("plan", target, "-o", out, "--batch", "1", "--override", "fc3=dense", "--json")
    assert r.exit_code == 0, r.stderr
    plans = json.loads(r.stdout)["plans"]
    assert plans["1"]["layers"]["fc3"]["choice"] == "dense"
    assert plans["1"]["layers"]["fc3"]["reason"] == "override"
    from tedepr_cli.artifact import load_artifact

    stored = load_artifact(out).meta["execution"]["plans"]["1"]
    assert stored["layers"]["fc3"]["choice"] == "dense" and "fingerprint" in stored
    r = run_cli("bench", out, "--engines", "dense-torch,tedepr", "--json", "-", "--iters", "2",
                "--warmup", "0", "--batch", "1")
    d = json.loads(r.stdout)
    assert d["execution_plans"]["1"]["fresh"] is False  # same machine: the stored plan is used
    assert run_cli("plan", target, "-o", tmp_path / "x", "--override", "fc3=gpu").exit_code == 2
    assert run_cli("plan", target, "-o", tmp_path / "y", "--override", "fc3").exit_code == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
