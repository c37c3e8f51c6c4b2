"""`tedepr bench`: the report's JSON schema, `--json` / `--json-out`, every gate's exit code,
engine availability, `--seed`, progress, and honest peak-memory figures."""

from __future__ import annotations

import json

import pytest
import torch

from tedepr_cli.artifact import load_artifact, save_artifact
from tedepr_cli.execution.runtimes import ORT_LEVELS

from .conftest import LENET300, MNIST, run_cli

FAST = ["--iters", "3", "--warmup", "1", "--batch", "1,4", "--no-memory"]


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
    r = run_cli("bench", target, "--baseline", LENET300, "--data", MNIST, "--json-out", out, *FAST)
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


def test_json_flag_prints_json_like_every_command(target, tmp_path):
    """`--json` is a flag (stdout holds one JSON document, no table); `--json-out FILE`
    writes the same figures to a file beside the table, or beside `--json`."""
    r = run_cli("bench", target, "--json", "--engines", "dense-torch,chain-torch", *FAST)
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(d["results"]["1"]) == {"dense-torch", "chain-torch"}
    assert d["baseline_weights"].startswith("random")
    out = tmp_path / "both.json"
    r = run_cli("bench", target, "--json", "--json-out", out, "--engines", "dense-torch", *FAST)
    assert r.exit_code == 0, r.stderr
    assert set(json.loads(r.stdout)) == set(json.loads(out.read_text()))
    out2 = tmp_path / "table.json"
    r = run_cli("bench", target, "--json-out", out2, "--engines", "dense-torch", *FAST)
    assert r.exit_code == 0 and "speed-up vs dense" in r.stdout and json.loads(out2.read_text())["results"]
    assert run_cli("bench", target, "--json", "-", *FAST).exit_code == 2  # a flag takes no file
    (tmp_path / "file").write_text("not a directory")
    r = run_cli("bench", target, "--json-out", tmp_path / "file" / "x.json", *FAST)
    assert r.exit_code == 6 and r.stdout == ""  # refused before anything ran


def test_onnxruntime_engines_run_at_the_plans_levels_even_without_the_tedepr_engine(target):
    """The dense baseline on onnxruntime is held to its fastest graph optimization level,
    which only a plan measures: bench plans (or reuses a stored plan) whenever an
    onnxruntime engine runs, and says which level it ran at."""
    r = run_cli("bench", target, "--json", "--engines", "dense-torch,dense-ort", *FAST)
    assert r.exit_code == 0, r.stderr
    plans = json.loads(r.stdout)["execution_plans"]
    assert set(plans) == {"1", "4"}
    assert all(p["runtimes"]["ort_levels"]["dense-ort"] in ORT_LEVELS for p in plans.values())
    r = run_cli("bench", target, "--engines", "dense-torch,dense-ort", *FAST)
    assert r.exit_code == 0 and "onnxruntime graph optimization level: " in r.stdout
    assert "the onnxruntime engines ran there" in r.stdout


@pytest.mark.parametrize("args,code", [
    (["--fail-if-slower", "0.000001"], 11),
    (["--max-size", "10"], 12),
    (["--min-speedup", "1000"], 13),
])
def test_each_gate_has_its_exit_code(target, tmp_path, args, code):
    out = tmp_path / "g.json"
    r = run_cli("bench", target, "--engines", "dense-torch,tedepr", "--json-out", out, *FAST, *args)
    assert r.exit_code == code, r.stderr
    assert "gate" in r.stderr
    assert json.loads(out.read_text())["gates"]["failed"]  # the figures are still written


def test_gates_pass_and_compare_to_saved(target, tmp_path):
    saved = tmp_path / "saved.json"
    r = run_cli("bench", target, "--engines", "dense-torch,tedepr", "--json-out", saved, *FAST,
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
    said = [ln for ln in (r.stdout + r.stderr).splitlines() if "skip" in ln and "triton" in ln]
    assert len(said) == 1, said  # said once, not twice
    r = run_cli("bench", target, "--engines", "dense-torch,triton", "--strict-engines", *FAST)
    assert r.exit_code == 10
    assert run_cli("bench", target, "--engines", "warp-drive", *FAST).exit_code == 2
    assert run_cli("bench", target, "--batch", "0", *FAST[:4]).exit_code == 2
    assert run_cli("bench", target, "--baseline", tmp_path / "none.pt", *FAST).exit_code == 3
    (tmp_path / "bad.pt").write_bytes(b"junk")
    assert run_cli("bench", target, "--baseline", tmp_path / "bad.pt", *FAST).exit_code == 4
    assert run_cli("bench", tmp_path / "missing", *FAST).exit_code == 3


def test_cuda_graph_engines_are_gpu_only(target):
    """On the CPU the CUDA-graph engines are not in the default set, a named one is skipped
    saying why (exit 10 with --strict-engines), and the capture helper refuses a CPU device."""
    from tedepr_cli.bench.engines import cuda_graph_call

    r = run_cli("bench", target, "--json", *FAST)
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert not any(e.endswith("-graph") for e in d["skipped_engines"])
    assert not any(e.endswith("-graph") for row in d["results"].values() for e in row)
    r = run_cli("bench", target, "--engines", "dense-torch,dense-torch-graph", "--json", *FAST)
    assert r.exit_code == 0, r.stderr
    assert "CUDA graph" in json.loads(r.stdout)["skipped_engines"]["dense-torch-graph"]
    r = run_cli("bench", target, "--engines", "dense-torch,triton-graph", "--strict-engines", *FAST)
    assert r.exit_code == 10 and r.stderr.count("\n") == 1
    with pytest.raises(RuntimeError, match="CUDA"):
        cuda_graph_call(lambda: None, torch.device("cpu"))


def test_plan_is_stored_and_reused_and_overridable(target, tmp_path):
    out = tmp_path / "planned"
    r = run_cli("plan", target, "-o", out, "--batch", "1", "--override", "fc3=dense", "--json")
    assert r.exit_code == 0, r.stderr
    plans = json.loads(r.stdout)["plans"]
    assert plans["1"]["layers"]["fc3"]["choice"] == "dense"
    assert plans["1"]["layers"]["fc3"]["reason"] == "override"
    stored = load_artifact(out).meta["execution"]["plans"]["1"]
    assert stored["layers"]["fc3"]["choice"] == "dense" and "fingerprint" in stored
    r = run_cli("bench", out, "--engines", "dense-torch,tedepr", "--json", "--iters", "2",
                "--warmup", "0", "--batch", "1", "--no-memory")
    d = json.loads(r.stdout)
    assert d["execution_plans"]["1"]["fresh"] is False  # same machine: the stored plan is used
    assert run_cli("plan", target, "-o", tmp_path / "x", "--override", "fc3=gpu").exit_code == 2
    assert run_cli("plan", target, "-o", tmp_path / "y", "--override", "fc3").exit_code == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_device_cuda_without_a_gpu_exits_10_in_one_line(target, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "never.json"
    r = run_cli("bench", target, "--device", "cuda", "--json-out", out, *FAST)
    assert r.exit_code == 10
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("tedepr: ") and "--device cuda" in r.stderr
    assert r.stdout == "" and not out.exists()


def test_seed_reaches_the_inputs_the_planner_and_the_random_baseline(target, monkeypatch):
    """`--seed` draws the benchmark batch, the planner's timing batch and (without
    --baseline) the dense baseline's random weights."""
    from tedepr_cli.bench import core, engines
    from tedepr_cli.bench.engines import load_baseline

    seen = []
    real = engines.input_batch
    monkeypatch.setattr(core, "input_batch", lambda art, b, seed: seen.append(seed) or real(art, b, seed))
    plans = []
    import tedepr_cli.execution.planner as ex

    real_plan = ex.plan_execution
    monkeypatch.setattr(ex, "plan_execution",
                        lambda *a, **kw: plans.append(kw["seed"]) or real_plan(*a, **kw))
    r = run_cli("bench", target, "--seed", "7", "--replan", "--engines", "dense-torch,tedepr", "--json",
                *FAST)
    assert r.exit_code == 0, r.stderr
    assert seen == [7, 7] and plans == [7, 7]
    assert json.loads(r.stdout)["options"]["seed"] == 7
    art = load_artifact(target)
    w1, w1_again, w2 = (load_baseline(art, None, s)[0].fc1.weight for s in (1, 1, 2))
    assert torch.equal(w1, w1_again) and not torch.equal(w1, w2)


def test_progress_is_reported_and_shown_on_a_tty_only(target, monkeypatch):
    from tedepr_cli.bench.core import BenchOptions, load_target, run_bench
    from tedepr_cli.commands import bench as cmd

    calls = []
    run_bench(load_target(target), BenchOptions(batches=[2], warmup=0, iters=4, engines=["dense-torch"],
                                                memory=False), progress=lambda *a: calls.append(a))
    assert [c[1:] for c in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)] and "batch 2" in calls[0][0]
    with cmd._progress(quiet=False) as p:
        assert p is None  # pytest's stderr is no terminal
    monkeypatch.setattr("tedepr_cli.console.is_tty", lambda: True)
    with cmd._progress(quiet=True) as p:
        assert p is None
    with cmd._progress(quiet=False) as p:
        assert callable(p)
        p("batch 1: timing", 1, 4)


@pytest.fixture(scope="module")
def resnet_target(tmp_path_factory):
    """A dense ResNet-20 (CIFAR shape) as an artifact: large activations."""
    from tedepr_cli.arch import build, parse_arch
    from tedepr_cli.loading import load_model

    spec = parse_arch("resnet20")
    d = tmp_path_factory.mktemp("resnet")
    torch.save(build(spec).state_dict(), d / "r.pt")
    return save_artifact(load_model(d / "r.pt", spec), d / "art")


def test_peak_memory_is_measured_per_engine_and_scales_with_the_model(target, resnet_target):
    """Before, every figure read 0 B (in one process, memory freed by one engine is reused by
    the next without growing the resident set). A fresh process per figure: LeNet-300-100 at
    batch 256 holds its activations (at least 256 x 300 floats), ResNet-20 at batch 64 holds
    several 64 x 16 x 32 x 32 float maps (4 MiB each): far more."""
    from tedepr_cli.bench.memory import measure_in_subprocess

    def peak(art, engine, batch):
        return measure_in_subprocess({"engine": engine, "batch": batch, "artifact": str(art), "seed": 0,
                                      "baseline": None, "threads": 1, "onnx": None, "plan": None})

    lenet = peak(target, "dense-torch", 256)
    resnet = peak(resnet_target, "dense-torch", 64)
    assert lenet >= 256 * 300 * 4
    assert resnet >= 2 * 64 * 16 * 32 * 32 * 4
    assert resnet > 4 * lenet
    assert peak(target, "chain-torch", 256) > 0


def test_bench_reports_memory_for_every_engine(target):
    """Measured from each engine's first call in a process of its own, a figure includes
    the workspaces the engine keeps (onnxruntime's arena, the kernel's buffers): at batch
    64 every engine holds well over 64 KiB. In one process, after the warm-up, the kept
    workspaces are already resident: figures of 0 B (before) or a page or two."""
    r = run_cli("bench", target, "--engines", "dense-torch,chain-torch,tedepr,dense-ort,chain-ort", "--json",
                "--iters", "2", "--warmup", "1", "--batch", "64")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    mem = {e: s["peak_memory_bytes"] for e, s in d["results"]["64"].items()}
    assert set(mem) == {"dense-torch", "chain-torch", "tedepr", "dense-ort", "chain-ort"}
    assert all(isinstance(v, int) and v >= 64 * 1024 for v in mem.values()), mem
    assert len(set(mem.values())) > 1, mem  # not one constant
    assert "fresh process" in d["memory"]["method"]


def test_plan_seed_draws_the_timing_batch(target, tmp_path, monkeypatch):
    import tedepr_cli.execution.planner as ex

    seen = []
    real = torch.rand

    def rand(*a, generator=None, **kw):
        if generator is not None:
            seen.append(generator.initial_seed())
        return real(*a, generator=generator, **kw)

    monkeypatch.setattr(ex.torch, "rand", rand)
    r = run_cli("plan", target, "-o", tmp_path / "p", "--batch", "1", "--seed", "11", "--json")
    assert r.exit_code == 0, r.stderr
    assert seen == [11]
    assert load_artifact(tmp_path / "p").history[-1]["seed"] == 11


def test_bench_data_and_eval_agree_with_computed_normalization(tmp_path):
    """A run fine-tuned with --normalize computed records its statistics; `bench --data` must
    present the test split as `eval` does (it used to ignore the record: 47.1 vs 63.8 %)."""
    from .conftest import LENET300, MNIST

    pruned, run = tmp_path / "pruned", tmp_path / "run"
    r = run_cli("prune", LENET300, "--arch", "lenet300", "--sparsity", "0.99", "--criterion", "magnitude",
                "-o", pruned)
    assert r.exit_code == 0, r.stderr
    r = run_cli("finetune", pruned, "--data", MNIST, "--epochs", "1", "--limit-train", "512",
                "--normalize", "computed", "-o", run)
    assert r.exit_code == 0, r.stderr
    assert load_artifact(run).meta["data"]["preprocess"]["normalize"] == "computed"
    ev = run_cli("eval", run, "--data", MNIST, "--json")
    assert ev.exit_code == 0, ev.stderr
    be = run_cli("bench", run, "--data", MNIST, "--baseline", LENET300,
                 "--engines", "dense-torch,chain-torch", "--json", *FAST)
    assert be.exit_code == 0, be.stderr
    acc = json.loads(be.stdout)["accuracy"]
    assert acc["compressed"] == pytest.approx(json.loads(ev.stdout)["accuracy"], abs=1e-9)
    # the dense checkpoint was trained on raw pixels: it is evaluated on them, not on the
    # compressed model's statistics
    base = run_cli("eval", LENET300, "--arch", "lenet300", "--data", MNIST, "--json")
    assert acc["baseline"] == pytest.approx(json.loads(base.stdout)["accuracy"], abs=1e-9)


def _row(**medians_us):
    return {e: {"median_s": 1e-6 * v, "speedup_vs_dense_torch": {"median": 1.0}}
            for e, v in medians_us.items()}


def test_slower_gate_judges_against_the_best_dense_runtime():
    """--fail-if-slower compares with the dense model on its best runtime (here onnxruntime),
    not with dense torch: 70 µs passes against dense torch's 100 µs x 1.5 but fails against
    dense onnxruntime's 40 µs x 1.5."""
    from tedepr_cli.bench.core import check_gates
    from tedepr_cli.errors import SlowerGateFailed

    report = {"results": {"1": _row(**{"dense-torch": 100, "dense-ort": 40, "tedepr": 70})}, "sizes": {}}
    (f,) = check_gates(report, 1.5, None, None, None, "tedepr")
    assert isinstance(f, SlowerGateFailed) and "dense-ort" in str(f)
    assert check_gates(report, 2.0, None, None, None, "tedepr") == []
    # without a dense onnxruntime figure the bar is dense torch
    report = {"results": {"1": _row(**{"dense-torch": 100, "tedepr": 70})}, "sizes": {}}
    assert check_gates(report, 1.5, None, None, None, "tedepr") == []


def test_bench_reports_the_speedup_against_the_best_dense_and_the_chosen_runtime(target):
    r = run_cli("bench", target, "--engines", "dense-torch,dense-ort,tedepr", "--json", *FAST)
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    for b, row in d["results"].items():
        best = min(("dense-torch", "dense-ort"), key=lambda e: row[e]["median_s"])
        assert row[best]["speedup_vs_best_dense"]["median"] == pytest.approx(1.0)
        plan = d["execution_plans"][b]
        assert plan["runtime"] in ("layers", "chain-ort", "dense-torch", "dense-ort")
        assert plan["runtimes"]["baseline"]["best"] in ("dense-torch", "dense-ort")


def test_prune_export_bench_and_info_count_kept_weights_alike(tmp_path):
    """`prune` and `export` counted the prunable entries kept, `bench` and `info` every
    parameter not pruned away (biases included): 1,331 vs 1,741 for the same artifact.
    One definition now (pruning.targets.kept_counts), the same numbers in every report:
    stored entries, and the effective non-zero weights the chains multiply out to."""
    art = tmp_path / "p"
    r = run_cli("prune", LENET300, "--arch", "lenet300", "--sparsity", "0.995", "--criterion", "magnitude",
                "-o", art, "--json")
    assert r.exit_code == 0, r.stderr
    pruned = json.loads(r.stdout)
    r = run_cli("export", art, "--to", "safetensors", "-o", tmp_path / "e", "--json")
    assert r.exit_code == 0, r.stderr
    exported = json.loads(r.stdout)["formats"]["safetensors"]
    r = run_cli("bench", art, *FAST, "--engines", "dense-torch,chain-torch", "--json")
    assert r.exit_code == 0, r.stderr
    benched = json.loads(r.stdout)["sizes"]["compressed-safetensors"]
    r = run_cli("info", art, "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)["weights"]
    assert pruned["kept"] == pruned["budget"] == 1331  # round(0.005 x 266,200) stored entries
    for d in (exported, benched, info):
        assert (d["kept"], d["effective_nonzero"], d["other"]) == (1331, pruned["effective_nonzero"], 410), d
    # the TT chains' kept cores multiply out to many more non-zero dense weights, at most all of them
    assert 1331 < pruned["effective_nonzero"] <= 266_200
    loaded = load_artifact(art)
    chains = (loaded.model.get_submodule(n).dense_weight() for n in ("fc1", "fc2"))
    dense = sum(int(torch.count_nonzero(w)) for w in chains)
    fc3 = loaded.model.fc3  # a dense layer, pruned as it is
    assert pruned["effective_nonzero"] == dense + int(torch.count_nonzero(fc3.weight))


def test_an_onnx_only_export_is_refused_saying_what_to_pass(target, tmp_path):
    """`export --to onnx` writes no model.safetensors: bench says in one line what it needs
    (the artifact, whose compressed ONNX is chain-ort; or a safetensors export) instead of
    "not a tedepr artifact"; with model.safetensors beside it the same directory benches."""
    out = tmp_path / "e"
    assert run_cli("export", target, "--to", "onnx", "-o", out, "-q").exit_code == 0
    r = run_cli("bench", out, "--iters", "2", "--warmup", "0", "--no-memory", "-q")
    assert r.exit_code == 4, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "export without model.safetensors (model.onnx only)" in lines[0]
    assert "pass the artifact it was exported from" in lines[0] and "chain-ort" in lines[0]
    both = tmp_path / "both"
    assert run_cli("export", target, "--to", "safetensors,onnx", "-o", both, "-q").exit_code == 0
    r = run_cli("bench", both, "--iters", "2", "--warmup", "0", "--no-memory",
                "--engines", "dense-torch,chain-ort", "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert set(report["results"]["1"]) == {"dense-torch", "chain-ort"}
    assert report["sizes"]["compressed-onnx"]["bytes"] == (both / "model.onnx").stat().st_size
    # with the onnx-fast graph beside it, chain-ort times that one (what it times on an artifact)
    fast = tmp_path / "fast"
    assert run_cli("export", target, "--to", "safetensors,onnx,onnx-fast", "-o", fast, "-q").exit_code == 0
    r = run_cli("bench", fast, "--iters", "2", "--warmup", "0", "--no-memory",
                "--engines", "dense-torch,chain-ort", "--json")
    assert r.exit_code == 0, r.stderr
    sizes = json.loads(r.stdout)["sizes"]
    assert sizes["compressed-onnx"]["bytes"] == (fast / "model.fast.onnx").stat().st_size


def _fake_times(chain_ort_ratio):
    """Times a busy machine could give: every engine's calls alternate between 1x and 3x
    its own base time in the same rounds (IQR far above 10 % of the median, the per-round
    ratios steady), except chain-ort, whose ratio to the dense runtimes follows
    ``chain_ort_ratio(round)``."""
    base = {"dense-torch": 100e-6, "dense-ort": 60e-6, "chain-torch": 300e-6, "tedepr": 20e-6,
            "chain-ort": 50e-6}

    def fake(fns, plan, **kw):
        n = 8
        out = {}
        for e in fns:
            out[e] = [base[e] * (3.0 if i % 2 else 1.0) for i in range(n)]
        if "chain-ort" in out:
            out["chain-ort"] = [60e-6 * (3.0 if i % 2 else 1.0) / chain_ort_ratio(i) for i in range(n)]
        return out

    return fake


@pytest.mark.parametrize("case", ["conclusive", "inconclusive"])
def test_a_noisy_run_warns_once_and_only_when_a_comparison_is_unsettled(target, monkeypatch, case):
    """The sample bench printed one "IQR is N % of the median" warning per engine and batch
    (10 on a busy 2-core machine): a wide IQR with steady paired ratios is summarised on
    one line (no warning); only a speed-up whose quartiles straddle 1x is a warning, once."""
    from tedepr_cli.bench import core

    ratio = (lambda i: 1.5) if case == "conclusive" else (lambda i: (0.7, 1.4, 0.8, 1.3)[i % 4])
    monkeypatch.setattr(core, "interleaved", _fake_times(ratio))
    r = run_cli("bench", target, "--engines", "dense-torch,dense-ort,chain-torch,tedepr,chain-ort",
                "--no-memory", "--batch", "1,32", "--json-out", target.parent / f"{case}.json")
    assert r.exit_code == 0, r.stderr
    report = json.loads((target.parent / f"{case}.json").read_text())
    assert report["noise"]["noisy_rows"] == report["noise"]["rows"] == 10
    assert "IQR is" not in r.stderr
    spread = [ln for ln in r.stderr.splitlines() if "timing spread" in ln]
    assert len(spread) == 1, r.stderr
    if case == "conclusive":
        assert report["noise"]["inconclusive"] == [] and "warning" not in spread[0]
        assert "comparisons hold" in spread[0]
    else:
        assert report["noise"]["inconclusive"] == ["1:chain-ort", "32:chain-ort"]
        assert spread[0].startswith("tedepr: warning: ") and "chain-ort at batch 1" in spread[0]
        assert report["warnings"].count(report["noise"]["summary"]) == 1
