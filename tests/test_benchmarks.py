"""The experiment driver's --quick mode runs end to end (CI exercises it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT


def _quick(out):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pai_compare.py"), "--quick", "--epochs", "1",
           "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_pai_compare_quick(tmp_path):
    r = _quick(tmp_path / "pai")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TEDEPR-TT" in r.stdout
    report = (tmp_path / "pai" / "report.md").read_text()
    for method in ("dense", "tt-tedepr", "tt-budget", "snip", "synflow"):
        assert f"| {method} |" in report
    assert len(list((tmp_path / "pai" / "runs").glob("*.json"))) == 5
    r = _quick(tmp_path / "pai")  # cached: a second run trains nothing
    assert r.returncode == 0 and "runs to do" not in r.stdout


def test_pai_plot_draws_every_cached_method(tmp_path):
    """--plot (the optional `plot` extra) draws one line per method from the cached runs."""
    import importlib.util
    import json

    import pytest

    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("the optional `plot` extra is not installed")
    runs = tmp_path / "pai" / "runs"
    runs.mkdir(parents=True)
    cases = [("dense", None, 1000), ("tt-tedepr", 0.99, 10), ("tt-tedepr", 0.995, 5), ("snip", 0.99, 10),
             ("tt-budget", 0.99, 50)]  # the last keeps 5x its budget: left out of the plot, flagged
    for i, (method, s, kept) in enumerate(cases):
        row = {"model": "lenet300", "method": method, "sparsity": s, "test_accuracy": 0.9 - 0.1 * i,
               "kept": kept, "dense_prunable": 1000, "seconds_per_epoch": 1.0, "epochs": 1}
        (runs / f"r{i}.json").write_text(json.dumps(row))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pai_compare.py"), "--report-only",
           "--models", "lenet300", "--out", str(tmp_path / "pai"),
           "--doc", str(tmp_path / "doc" / "r.md"), "--plot"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    svg = (tmp_path / "doc" / "pai_accuracy.svg").read_text()
    assert "tt-tedepr" in svg and "snip" in svg and "dense" in svg
    assert "synflow" not in svg and "tt-budget" not in svg
    md = (tmp_path / "doc" / "r.md").read_text()
    assert "pai_accuracy.svg" in md and "| tt-budget ‡ | 99 % |" in md and "| snip | 99 % |" in md


def test_chain_vs_dense_noise_check_is_opt_in(tmp_path, monkeypatch, capsys):
    """A busy machine must not turn the benchmark into a failure: missing the 1.10x margin
    is a warning, and exit 1 only with --check."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("chain_vs_dense", ROOT / "benchmarks" / "chain_vs_dense.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "SHAPES", [("linear", 64, 32, None)])
    monkeypatch.setattr(bench, "NOISE", 0.0)  # no timing can meet it: the claim fails
    out = str(tmp_path / "r.md")
    assert bench.main(["--iters", "2", "--out", out]) == 0
    assert "warning" in capsys.readouterr().err and "NO" in (tmp_path / "r.md").read_text()
    assert bench.main(["--iters", "2", "--out", out, "--check"]) == 1
    monkeypatch.setattr(bench, "NOISE", float("inf"))
    assert bench.main(["--iters", "2", "--out", out, "--check"]) == 0


def test_speed_table_quick(tmp_path):
    """benchmarks/speed_table.py --quick: every column, both regimes, the speed-up against the
    best dense runtime computed from the figures it prints."""
    import json

    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed_table.py"), "--quick", "--families", "lenet300",
           "--sparsities", "0.995", "--batches", "1,4", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "speed_table.json").read_text())
    assert [row["batch"] for row in rep["rows"]] == [1, 4]
    for row in rep["rows"]:
        assert row["runtime"] in ("layers", "chain-ort", "dense-torch", "dense-ort")
        for regime in ("hot", "cold"):
            g = row["regimes"][regime]
            med = g["median_us"]
            assert set(med) == {"dense-torch", "dense-ort", "tedepr", "chain-ort", "chosen"}
            assert g["best_dense"] == min(("dense-torch", "dense-ort"), key=med.get)
            assert g["speedup_chosen_vs_best_dense"] == pytest.approx(med[g["best_dense"]] / med["chosen"],
                                                                       rel=1e-2)
            if row["runtime"] == "layers":
                assert med["chosen"] == med["tedepr"]
    md = (tmp_path / "speed_table.md").read_text()
    assert md.count("| lenet300 | 99.5 % |") == 4 and "load average" in md


def test_train_speed_quick(tmp_path):
    """benchmarks/train_speed.py --quick: the six engines per family, ratios from the medians
    it reports, and auto's and lighter's choices on the layers measured; an unknown family is one
    line."""
    import json

    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--quick", "--families",
           "lenet300,resnet20", "--json-out", str(tmp_path / "t.json"), "--md-out", str(tmp_path / "t.md")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "t.json").read_text())
    assert [f["family"] for f in rep["families"]] == ["lenet300", "resnet20"]
    for f in rep["families"]:
        ms = f["ms_per_step"]
        assert set(ms) == {"dense", "lighter", "chain", "kernel", "rebuild", "auto"}
        assert all(v > 0 for v in ms.values())
        for e, q in f["ratio_to_dense"].items():
            assert q == pytest.approx(ms[e] / ms["dense"], rel=0.02)
        assert f["layers"] == len(f["auto"]) == len(f["lighter"]) > 0
        assert set(f["auto"].values()) | set(f["lighter"].values()) <= {"chain", "dense", "kernel"}
    assert (tmp_path / "t.md").read_text().count("| resnet20 |") == 1
    r = subprocess.run(cmd[:2] + ["--families", "alexnet"], capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_speed_table_update_replaces_only_the_remeasured_families():
    """--update: the stored table keeps the other families' rows, in zoo order, and says which
    rows came from a later run; a run on another CPU is refused."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import speed_table as st
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def report(cpu, rows, fams, load):
        return {"machine": {"cpu": cpu, "loadavg_before": [load], "loadavg_after": [load + 1]},
                "options": {"families": fams}, "rows": rows}

    def row(f, s, b, t):
        return {"family": f, "sparsity": s, "batch": b, "t": t}

    old = report("X", [row(f, 0.99, b, "old") for f in ("lenet300", "lstm", "vgg11") for b in (1, 32)],
                 ["lenet300", "lstm", "vgg11"], 1.0)
    new = report("X", [row("lstm", 0.99, b, "new") for b in (32, 1)], ["lstm"], 5.0)
    merged = st.merge(old, new, "kernel merged")
    assert [(r["family"], r["batch"], r["t"]) for r in merged["rows"]] == [
        ("lenet300", 1, "old"), ("lenet300", 32, "old"), ("lstm", 1, "new"), ("lstm", 32, "new"),
        ("vgg11", 1, "old"), ("vgg11", 32, "old")]
    assert merged["updates"] == [{"families": ["lstm"], "reason": "kernel merged",
                                  "loadavg_before": [5.0], "loadavg_after": [6.0]}]
    assert old["rows"][2]["t"] == "old"  # the stored report itself is not modified
    with pytest.raises(SystemExit, match="measured on Y"):
        st.merge(old, report("Y", [], ["lstm"], 1.0), "r")


# ---------------------------------------------------------------------------- Fashion-MNIST
def _fashion(tmp_path, *extra):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pai_compare.py"), "--dataset", "fashion-mnist", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_fashion_mnist_quick_on_synthetic_idx(tmp_path):
    """The Fashion-MNIST protocol end to end on tiny IDX files in its file layout (gzipped, the
    Debian package's names): the report gives both counts and the validation-based selection,
    and a second call trains nothing (per-run cache)."""
    import json

    from .test_datasets import make_mnist_idx

    data = make_mnist_idx(tmp_path / "fmnist", n_train=300, n_test=100, gz=True)
    out = tmp_path / "out"
    args = ["--data-dir", str(data), "--quick", "--epochs", "2", "--out", str(out)]
    r = _fashion(tmp_path, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "on Fashion-MNIST" in report and "best-by-validation" in report
    assert "| stored entries (kept) | effective non-zero weights |" in report
    assert "| val acc % (selection) | best epoch | lr |" in report
    for method in ("dense", "tt-tedepr", "snip"):
        assert f"| {method} |" in report
    rows = {p.name.split("__")[1]: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert sorted(rows) == ["dense", "snip", "tt-tedepr"]
    for row in rows.values():
        assert row["dataset"] == "fashion-mnist" and row["epochs"] == 2 and row["wall_seconds"] > 0
        # the selection: the reported epoch is the best validation epoch of the run that was kept
        lines = (Path(row["artifact"]).parent / "metrics.jsonl").read_text().splitlines()
        vals = [json.loads(line)["val_accuracy"] for line in lines]
        assert row["best_val_accuracy"] == max(vals) and row["best_epoch"] == 1 + vals.index(max(vals))
        assert row["best_val_accuracy"] == max(row["val_by_lr"].values())
    dense, tt, snip = rows["dense"], rows["tt-tedepr"], rows["snip"]
    assert dense["kept"] == dense["effective_nonzero"] == dense["dense_prunable"] == 266_200
    assert snip["effective_nonzero"] == snip["kept"] <= round(0.005 * 266_200)
    # a product of masked cores is far denser than the cores: the effective count says so
    assert tt["kept"] <= round(0.005 * 266_200) < tt["effective_nonzero"]
    r = _fashion(tmp_path, *args)
    assert r.returncode == 0 and "runs to do" not in r.stdout


def test_fashion_mnist_missing_data_is_one_line(tmp_path):
    """Without the IDX files: one line saying how to install them, exit 3, no traceback, no output."""
    from .test_datasets import make_mnist_idx

    partial = make_mnist_idx(tmp_path / "partial", gz=True)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    for where in (tmp_path / "nothing-here", partial):
        out = tmp_path / "out"
        r = _fashion(tmp_path, "--data-dir", str(where), "--quick", "--out", str(out))
        assert r.returncode == 3, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert r.stderr.startswith("tedepr: input not found: ") and str(where) in r.stderr
        assert "apt-get install dataset-fashion-mnist" in r.stderr and "--data-dir" in r.stderr
        assert not out.exists()
    assert "t10k-labels" in r.stderr


def test_fashion_mnist_fixed_subset_is_stratified_and_fixed(monkeypatch):
    """The 20,000-image pool of the expensive families: 2,000 per class, the same rows every time."""
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("pai_compare", ROOT / "benchmarks" / "pai_compare.py")
    pai = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "pai_compare", pai)  # its dataclasses look their module up
    spec.loader.exec_module(pai)
    labels = np.random.default_rng(3).permutation(np.repeat(np.arange(10), 6000))
    rows = pai.fixed_subset(labels, pai.SUBSET_SIZE)
    assert len(rows) == 20_000 and (np.bincount(labels[rows]) == 2000).all()
    assert (np.diff(rows) > 0).all() and np.array_equal(rows, pai.fixed_subset(labels, 20_000))
    assert np.array_equal(pai.fixed_subset(labels[:50], 20_000), np.arange(50))


# ---------------------------------------------------------------------------- minilm_distill
def _minilm():
    import importlib.util

    spec = importlib.util.spec_from_file_location("minilm_distill", ROOT / "benchmarks" / "minilm_distill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_minilm_sentences_are_seeded_and_held_out_templates_are_disjoint():
    """The generated data (no download): same seed, same sentences; the held-out sentences and
    pairs come from templates the training sentences never use."""
    import re

    m = _minilm()
    a, b = m.sentences(300, 50, 40, seed=0), m.sentences(300, 50, 40, seed=0)
    assert a == b and m.sentences(300, 50, 40, seed=1)[0] != a[0]
    train, held, para, unrel, hard = a
    assert len(train) == 300 == len(set(train)) and len(held) == 50
    assert len(para) == len(unrel) == len(hard) == 40

    def shape(text):  # the template a sentence came from: its words outside the fillers
        fillers = {w for words in m.SLOTS.values() for f in words for w in f.split()}
        return tuple(w for w in re.findall(r"[a-z]+", text) if w not in fillers)

    train_shapes = {shape(s) for s in train}
    held_shapes = {shape(s) for s in held} | {shape(s) for p in para + unrel + hard for s in p}
    assert train_shapes and held_shapes and not train_shapes & held_shapes
    assert all(x != y for x, y in para)
    # a hard unrelated pair: one shape, and no filler word in common
    fillers = {f for words in m.SLOTS.values() for f in words}
    for x, y in hard:
        assert shape(x) == shape(y)
        words = [{f for f in fillers if f" {f} " in f" {t} "} for t in (x, y)]
        assert not words[0] & words[1], (x, y)


def test_minilm_random_word_sentences_are_seeded_whole_words():
    m = _minilm()
    vocab = ["alpha", "beta", "gamma", "delta"]
    a = m.random_word_sentences(50, vocab, seed=0)
    assert a == m.random_word_sentences(50, vocab, seed=0) != m.random_word_sentences(50, vocab, seed=1)
    assert all(4 <= len(s.rstrip(".").split()) <= 16 and set(s.rstrip(".").split()) <= set(vocab) for s in a)


def test_minilm_auc_is_the_rank_statistic():
    m = _minilm()
    assert m.auc([0.9, 0.8], [0.1, 0.2]) == 1.0 and m.auc([0.1], [0.9]) == 0.0
    assert m.auc([0.5, 0.5], [0.5, 0.5]) == 0.5 and m.auc([0.9, 0.3], [0.5, 0.1]) == 0.75


@pytest.mark.skipif(not __import__("os").environ.get("TEDEPR_MINILM"),
                    reason="opt-in (TEDEPR_MINILM=1 and the minilm extra): loads the 90 MB model")
def test_minilm_smoke(tmp_path):
    m = _minilm()
    r = m.main(["--sentences", "64", "--heldout", "16", "--pairs", "8", "--epochs", "1", "--emb-rank", "8",
                "--work", str(tmp_path / "w"), "--out", str(tmp_path / "minilm")])
    assert r["rows"][0]["cosine_to_original"] == pytest.approx(1.0) and r["rows"][1]["ratio"] < 0.25
def test_fashion_mnist_lstm_sweep_is_the_bench_s_and_the_header_says_what_ran(tmp_path, monkeypatch):
    """The LSTM on Fashion-MNIST trains with the bench's one-lr sweep (1e-2), the MNIST sample's
    LSTM keeps the two-lr sweep, and a table's header names the learning rates its rows ran."""
    import importlib.util
    import json

    from .test_datasets import make_mnist_idx

    spec = importlib.util.spec_from_file_location("pai_compare", ROOT / "benchmarks" / "pai_compare.py")
    pai = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "pai_compare", pai)
    spec.loader.exec_module(pai)
    assert pai.BENCHES["fashion-mnist"].sweep("lstm") == (1e-2,)
    assert pai.BENCHES["mnist-sample"].sweep("lstm") == pai.LRS == (1e-3, 1e-2)
    assert pai.BENCHES["fashion-mnist"].sweep("resnet20") == pai.LRS_BY_MODEL["resnet20"]

    data = make_mnist_idx(tmp_path / "fmnist", n_train=200, n_test=50, gz=True)
    out = tmp_path / "out"
    r = _fashion(tmp_path, "--data-dir", str(data), "--models", "lstm", "--methods", "dense", "--seeds", "0",
                 "--epochs", "1", "--out", str(out), "--doc", str(tmp_path / "r.md"))
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert list(row["val_by_lr"]) == ["0.01"] and row["lr"] == 0.01
    assert "## lstm (1 epochs, lr 0.01)" in (tmp_path / "r.md").read_text()
    # rows cached under another sweep: the header gives the sweep they ran, not today's default
    row["val_by_lr"] = {"0.001": 0.1, "0.01": 0.2}
    (out / "runs" / "lstm__dense__na__s1.json").write_text(json.dumps({**row, "seed": 1}))
    r = _fashion(tmp_path, "--report-only", "--models", "lstm", "--out", str(out),
                 "--doc", str(tmp_path / "r.md"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "## lstm (1 epochs, lr 0.001/0.01)" in (tmp_path / "r.md").read_text()


def test_fashion_mnist_fixed_rank_knob(tmp_path):
    """PAI_TT_RANK=R (experiment knob) decomposes the tensorized methods at rank R, not "auto",
    and the run's note says so."""
    import json
    import os

    from tedepr_cli.artifact import load_artifact

    from .test_datasets import make_mnist_idx

    data = make_mnist_idx(tmp_path / "fmnist", n_train=200, n_test=50, gz=True)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pai_compare.py"), "--dataset", "fashion-mnist",
           "--data-dir", str(data), "--models", "lenet300", "--methods", "tt-tedepr", "--sparsities", "0.99",
           "--seeds", "0", "--epochs", "1", "--out", str(out), "--doc", str(tmp_path / "r.md")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "PAI_TT_RANK": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert row["note"] == "rank 2 (PAI_TT_RANK)"
    art = load_artifact(row["artifact"])
    ranks = {tuple(m.ranks) for m in art.model.modules() if hasattr(m, "cores") and hasattr(m, "ranks")}
    assert ranks and all(max(rk) == 2 for rk in ranks), ranks


def test_fashion_mnist_claims_mark_issue_19_goals_per_model(monkeypatch):
    """The claim check marks issue 19's goals where the issue sets them (>= 3 points over the best
    dense-weight baseline at 99.5 %, not asked of ResNet-20; within 2 points of dense at 99 % for
    the LeNets, 4 for the deep families) and says how many seeds each mean has."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pai_compare", ROOT / "benchmarks" / "pai_compare.py")
    pai = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "pai_compare", pai)
    spec.loader.exec_module(pai)

    def rows(*accs):
        return [{"test_accuracy": a} for a in accs]

    groups = {}
    for model in ("lenet5", "lstm", "resnet20"):
        groups[(model, "dense", None)] = rows(0.90, 0.90)
        groups[(model, "tt-tedepr", 0.99)] = rows(0.87)  # 3 points below dense
        groups[(model, "synflow", 0.99)] = rows(0.80, 0.80)
        groups[(model, "tt-tedepr", 0.995)] = rows(0.85, 0.85)
        groups[(model, "snip", 0.995)] = rows(0.83, 0.81)
        groups[(model, "synflow", 0.995)] = rows(0.84)  # the best baseline: 1 point under TEDEPR
    lines = {(ln.split()[1], ln.split()[3]): ln for ln in pai._claims(groups, goals=True)}
    assert lines[("lenet5", "99")].endswith(
        "goal within 2 points of dense: MISSED (seeds: dense 2, TEDEPR 1, synflow 2)")
    assert lines[("lstm", "99")].endswith(
        "goal within 4 points of dense: met (seeds: dense 2, TEDEPR 1, synflow 2)")
    assert "goal within 4 points of dense: met" in lines[("resnet20", "99")]
    assert "best dense-weight PaI synflow 84.0 %" in lines[("lstm", "99.5")]
    assert "goal >= +3 points over the baseline: MISSED (seeds: dense 2, TEDEPR 2, synflow 1)" in lines[
        ("lstm", "99.5")]
    assert "goal" not in lines[("resnet20", "99.5")]  # issue 19 sets no 99.5 % goal for ResNet-20
    assert all("goal" not in ln for ln in pai._claims(groups))  # the MNIST sample: no goals


def test_pai_ablation_section_rewrites_only_its_section(tmp_path):
    """--section builds one table per model (a column per sparsity) from the cached runs
    (nothing to train here) and replaces only its marked part of the doc, idempotently."""
    import json

    out = tmp_path / "abl"
    out.mkdir()
    for sp, base in ((0.995, 0.94), (0.999, 0.85)):
        runs = {f"{name}|{seed}": {"test": base + 0.01 * i + 0.002 * seed, "lr": 0.01, "rank": 4 - i,
                                   "ranks": {"conv2": 9, "fc1": 2} if i else {}, "raised": {}, "kept": 1,
                                   "seconds": 60.0 + seed}
                for i, name in enumerate(["default", "rank allocation criterion"]) for seed in (0, 1)}
        (out / f"lenet5-{sp:g}.json").write_text(json.dumps(runs))
    doc = tmp_path / "doc.md"
    head, tail = "# title\n\nkept text\n\n", "\n## later\nmore kept text\n"
    doc.write_text(head + "<!-- section: s1 -->\nold\n<!-- end section: s1 -->" + tail)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pai_ablation.py"), "--model", "lenet5",
           "--sparsity", "0.995,0.999", "--variants", "default,rank allocation criterion",
           "--section", "s1", "--out", str(out), "--doc", str(doc)]
    for _ in range(2):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        text = doc.read_text()
        assert text.startswith(head) and text.endswith(tail) and "old" not in text
        assert text.count("<!-- section: s1 -->") == 1
    assert "| variant | 99.5 % | 99.9 % | ranks (99.5 % / 99.9 %) | s/run |" in text
    assert "| default | 94.1 ± 0.1 | 85.1 ± 0.1 | 4 / 4 | 60, 61 / 60, 61 |" in text
    assert "| rank allocation criterion | 95.1 ± 0.1 | 86.1 ± 0.1 | conv2 9 fc1 2 / conv2 9 fc1 2 |" in text
    r = subprocess.run([*cmd[:-4], "--out", str(out), "--doc", str(doc), "--section", "s1",
                        "--variants", "nope"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and "unknown variant" in r.stderr


def test_pai_ablation_distills_from_a_cached_seed_matched_dense_teacher(tmp_path):
    """The distillation variants train the dense model once per (model, seed, epochs) with the
    protocol's recipe, cache it, and fine-tune the student with it as ``--teacher``; a second
    variant reuses the cached teacher instead of training it again."""
    import json

    out = tmp_path / "abl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pai_ablation.py"), "--model", "lenet300",
           "--sparsity", "0.99", "--epochs", "1", "--seeds", "1", "--out", str(out),
           "--doc", str(tmp_path / "doc.md"), "--section", "s"]
    r = subprocess.run([*cmd, "--variants", "distill"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "teachers.json").read_text())
    assert set(rows) == {"lenet300|1|1"} and rows["lenet300|1|1"]["lr"] in (1e-3, 1e-2)
    teacher = out / "runs" / "teachers" / "lenet300-s1-1ep" / f"lr{rows['lenet300|1|1']['lr']:g}" / "best"
    stamp = (teacher / "manifest.json").stat().st_mtime_ns
    trained = json.loads((teacher / "manifest.json").read_text())
    assert "tensorization" not in trained and trained["history"][-1]["options"]["seed"] == 1  # dense, seed 1
    student = out / "runs" / "lenet300-0.99-1ep" / "distill" / "s1-lr0.01" / "best" / "manifest.json"
    assert json.loads(student.read_text())["history"][-1]["options"]["teacher"] == str(teacher)
    r = subprocess.run([*cmd, "--variants", "rank allocation criterion + distill"], capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (teacher / "manifest.json").stat().st_mtime_ns == stamp  # reused, not trained again
    doc = (tmp_path / "doc.md").read_text()
    assert "| rank allocation criterion + distill | " in doc
    acc = f"{100 * rows['lenet300|1|1']['test']:.1f} (1 seed) % test over seeds 1"
    assert f"Dense teacher of lenet300 (distillation rows; the same recipe, 1 epochs, seed-matched): " \
           f"{acc}" in doc


def test_pai_compare_out_reports_next_to_its_runs(tmp_path):
    """An experiment's --out cache must not overwrite the documented report: without --doc it
    reports in OUT/report.md, and docs/pai_results.md keeps its bytes."""
    runs = tmp_path / "exp" / "runs"
    runs.mkdir(parents=True)
    row = {"model": "lenet300", "method": "dense", "sparsity": None, "test_accuracy": 0.9, "kept": 1000,
           "dense_prunable": 1000, "seconds_per_epoch": 1.0, "epochs": 1}
    (runs / "r.json").write_text(json.dumps(row))
    doc = ROOT / "docs" / "pai_results.md"
    before = doc.read_bytes()
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pai_compare.py"), "--report-only",
           "--models", "lenet300", "--out", str(tmp_path / "exp")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    after = doc.read_bytes()
    if after != before:
        doc.write_bytes(before)  # put the documented report back before failing
    assert r.returncode == 0, r.stderr[-3000:]
    assert after == before
    assert "| dense |" in (tmp_path / "exp" / "report.md").read_text()


def test_pai_compare_merges_a_wider_lr_sweep(tmp_path):
    """--merge-from: each run keeps the learning rate with the best validation accuracy over
    both sweeps (its test accuracy with it), records every rate tried, and merging twice
    changes nothing."""
    def row(lr_vals, test, wall):
        lr = max(lr_vals, key=lr_vals.get)
        return {"model": "lenet300", "method": "tt-tedepr", "sparsity": 0.99, "seed": 0, "epochs": 4,
                "test_accuracy": test, "best_val_accuracy": lr_vals[lr], "lr": float(lr), "kept": 10,
                "dense_prunable": 1000, "wall_seconds": wall, "train_seconds": 2.0 * wall / 10,
                "seconds_per_epoch": 0.5, "val_by_lr": lr_vals}
    base, ext = tmp_path / "base", tmp_path / "ext"
    for d in (base, ext):
        (d / "runs").mkdir(parents=True)
    (base / "runs" / "a.json").write_text(json.dumps(row({"0.001": 0.70, "0.01": 0.80}, 0.79, 20.0)))
    (ext / "runs" / "a.json").write_text(json.dumps(row({"0.03": 0.85}, 0.84, 10.0)))
    (base / "runs" / "b.json").write_text(json.dumps(row({"0.001": 0.70, "0.01": 0.80}, 0.79, 20.0)))
    (ext / "runs" / "b.json").write_text(json.dumps(row({"0.03": 0.60}, 0.59, 10.0)))
    (ext / "runs" / "c.json").write_text(json.dumps(row({"0.03": 0.60}, 0.59, 10.0)))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pai_compare.py"), "--report-only",
           "--models", "lenet300", "--out", str(base), "--merge-from", str(ext)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "merged 2 run(s)" in r.stdout and "not in" in r.stdout and "c" in r.stdout
    a = json.loads((base / "runs" / "a.json").read_text())
    b = json.loads((base / "runs" / "b.json").read_text())
    assert a["lr"] == 0.03 and a["test_accuracy"] == 0.84 and a["best_val_accuracy"] == 0.85
    assert b["lr"] == 0.01 and b["test_accuracy"] == 0.79  # the wider sweep lost: the old pick stays
    for m in (a, b):
        assert set(m["val_by_lr"]) == {"0.001", "0.01", "0.03"} and m["wall_seconds"] == 30.0
        assert m["train_seconds"] == 3.33  # (4 s x 2 rates + 2 s x 1) / 3
    assert "lr 0.001/0.01/0.03" in (base / "report.md").read_text()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "merged 0 run(s)" in r.stdout and json.loads((base / "runs" / "a.json").read_text()) == a
