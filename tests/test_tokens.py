"""Issue 18 items 5 and 7: token-id data (``input_ids`` [+ ``attention_mask``,
``token_type_ids``, ``labels``] in an ``.npz``) through the one data path, models with
several named inputs, distillation on unlabeled data and cosine-to-reference metrics, via
the CLI on a tiny sentence encoder (tests/token_models.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from tedepr_cli.data import NO_LABEL, load_npz
from tedepr_cli.errors import BadInput
from tedepr_cli.surgery import call_args, feed, input_kind, token_ids

from . import foreign_models as fm
from . import token_models as tm
from .conftest import run_cli

ARCH = ["--arch", "tests.token_models:encoder"]
L = tm.input_shape[0]


def _tokens(path, n: int = 256, seed: int = 0, vocab: int = 64, labels: bool = False, **extra):
    """Random sentences of 4-12 tokens, zero-padded to 12, with their attention mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (n, L))
    mask = (np.arange(L)[None] < rng.integers(4, L + 1, n)[:, None]).astype(np.int64)
    arrays = {"input_ids": ids * mask, "attention_mask": mask, **extra}
    if labels:
        arrays["labels"] = rng.integers(0, 10, n)
    np.savez(path, **arrays)
    return path


def _teacher(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    torch.save(tm.encoder().state_dict(), path)
    return path


def _ok(res, what: str):
    assert res.exit_code == 0, f"{what}: exit {res.exit_code}: {res.stderr}"
    assert "internal error" not in res.stderr
    return res


def _one_line(res, code: int, *words: str):
    """Exit ``code`` with one line on stderr (runs pass ``-q``: no progress lines)."""
    assert res.exit_code == code, (res.exit_code, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tedepr: "), res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


# ---------------------------------------------------------------------------- reading
def test_token_npz_is_stacked_int64_and_unlabeled_without_labels(tmp_path):
    p = _tokens(tmp_path / "t.npz", n=20)
    d = load_npz(p)
    raw = np.load(p)
    assert d.input_names == ("input_ids", "attention_mask") and not d.labeled
    assert d.x.dtype == np.int64 and d.x.shape == (20, 2, L)
    assert np.array_equal(d.x[:, 0], raw["input_ids"]) and np.array_equal(d.x[:, 1], raw["attention_mask"])
    assert (d.y == NO_LABEL).all()
    # token_type_ids without a mask: the mask is filled with ones so the stacking order holds
    np.savez(tmp_path / "tt.npz", input_ids=raw["input_ids"], token_type_ids=np.ones_like(raw["input_ids"]))
    d2 = load_npz(tmp_path / "tt.npz")
    assert d2.input_names == ("input_ids", "attention_mask", "token_type_ids")
    assert (d2.x[:, 1] == 1).all() and (d2.x[:, 2] == 1).all()
    # ids alone stay [N, L]; labels make it labeled
    np.savez(tmp_path / "ids.npz", input_ids=raw["input_ids"], labels=np.arange(20) % 3)
    d3 = load_npz(tmp_path / "ids.npz")
    assert d3.x.shape == (20, L) and d3.labeled and d3.y.max() == 2


@pytest.mark.parametrize("arrays, words", [
    ({"attention_mask": np.full((20, L), 2)}, "0/1"),
    ({"attention_mask": np.ones((20, L + 1), np.int64)}, "shape of input_ids"),
    ({"attention_mask": np.ones((20, L), np.float32)}, "integer array"),
    ({"labels": np.arange(19)}, "labels"),
    ({"extra": np.ones(20)}, "extra"),
])
def test_bad_token_npz_is_bad_input(tmp_path, arrays, words):
    ids = np.random.default_rng(0).integers(0, 64, (20, L))
    np.savez(tmp_path / "b.npz", input_ids=ids, **arrays)
    with pytest.raises(BadInput, match=words):
        load_npz(tmp_path / "b.npz")


def test_token_npz_never_unpickles(tmp_path):
    """An object array (a pickle inside the .npz) is refused, not loaded."""
    np.savez(tmp_path / "o.npz", input_ids=np.array([[1, 2], [3, None]], dtype=object))
    with pytest.raises(BadInput, match=r"object \(pickled\) arrays"):
        load_npz(tmp_path / "o.npz")


# ---------------------------------------------------------------------------- feeding
def test_named_inputs_reach_the_forward_by_name():
    torch.manual_seed(0)
    enc = tm.encoder().eval()
    ids = torch.randint(1, 64, (3, L))
    mask = torch.ones(3, L, dtype=torch.int64)
    mask[:, 6:] = 0
    stacked = torch.stack([ids, mask], 1)
    args, kwargs = call_args(enc, stacked)
    assert args == () and set(kwargs) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        assert torch.equal(feed(enc, stacked), enc(input_ids=ids, attention_mask=mask))
        # the mask matters: without it the padded positions are pooled too
        assert not torch.allclose(feed(enc, stacked), enc(ids))
    # a single-input token model gets the ids only; floats and [N, L] ids pass as they are
    text = fm.text()
    a, k = call_args(text, stacked)
    assert len(a) == 1 and torch.equal(a[0], ids) and k == {}
    assert call_args(enc, ids)[0][0] is ids and torch.equal(token_ids(stacked), ids)
    x = torch.zeros(2, 3, 4)
    assert call_args(nn.Linear(4, 2), x)[0][0] is x


def test_input_kind_is_derived_in_one_place():
    from tedepr_cli.arch import build, parse_arch

    assert input_kind(tm.encoder(), (L,)) == "tokens"
    assert input_kind(nn.Sequential(nn.Linear(4, 2)), (4,)) == "flat"
    assert input_kind(nn.Sequential(nn.Linear(4, 2)), (3, 4)) == "sequence"
    assert input_kind(nn.Sequential(nn.Conv2d(1, 2, 3)), (1, 8, 8)) == "image"
    assert build(parse_arch("tests.token_models:encoder"), allow_import=True).input_kind == "tokens"
    import tedepr_cli as tedepr

    assert tedepr.tensorize(tm.encoder(), example_input=torch.zeros(1, L, dtype=torch.int64)).input_kind \
        == "tokens"


# ---------------------------------------------------------------------------- end to end
def _cosine(path, data, teacher) -> float:
    res = _ok(run_cli("eval", path, *ARCH, "--data", data, "--reference", teacher, "--json"), "eval")
    m = json.loads(res.stdout)
    assert m["samples"] == 51  # the derived 20 % test split of 256
    return m["cosine_mean"]


def test_encoder_pipeline_with_unlabeled_tokens_and_distillation(tmp_path):
    """decompose -> prune --data tokens.npz -> finetune --teacher (no labels) -> eval
    (cosine) -> export (validated on token ids from the data) -> bench --data, via the CLI
    with the import-path architecture; distillation raises the cosine to the original."""
    teacher, data = _teacher(tmp_path), _tokens(tmp_path / "tokens.npz")
    dec, pr, ft, ex = (tmp_path / s for s in ("dec", "pr", "ft", "ex"))
    res = _ok(run_cli("decompose", teacher, *ARCH, "--rank", "4", "--data", data, "-o", dec, "--json"),
              "decompose")
    assert 0 < json.loads(res.stdout)["summary"]["cosine_to_original"] < 0.9
    res = _ok(run_cli("prune", dec, *ARCH, "--sparsity", "0.85", "--data", data, "--batch-size", "32",
                      "-o", pr), "prune")
    report = json.loads((pr / "manifest.json").read_text())["pruning"]
    assert report["criterion"] == "tedepr" and "synflow" not in res.stderr  # scored on the token data
    before = _cosine(pr, data, teacher)
    _ok(run_cli("finetune", pr, *ARCH, "--data", data, "--teacher", teacher, "--epochs", "4",
                "--batch-size", "32", "-o", ft), "finetune")
    metrics = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()]
    assert all("val_cosine" in m and "train_accuracy" not in m for m in metrics)
    after = _cosine(ft, data, teacher)
    assert after > before + 0.15, (before, after)
    manifest = json.loads((ft / "best" / "manifest.json").read_text())
    assert manifest["metrics"]["finetune"]["distill_loss"] == "cosine"
    assert manifest["metrics"]["finetune"]["test_cosine"] == pytest.approx(after, abs=1e-6)
    _ok(run_cli("export", ft, *ARCH, "--data", data, "-o", ex), "export")
    exp = json.loads((ex / "export.json").read_text())
    # the forward takes attention_mask by name: the graph takes it too (test_export_takes_...)
    assert exp["inputs"]["source"] == "data"
    assert exp["inputs"]["graph_inputs"] == ["input_ids", "attention_mask"]
    import onnx

    assert [i.name for i in onnx.load(str(ex / "model.onnx")).graph.input] == ["input_ids", "attention_mask"]
    xs = np.load(ex / "sample_inputs.npy")
    raw = np.load(data)
    assert xs.dtype == np.int64 and xs.shape[1:] == (2, L) and (xs[:, 1] == 0).any()  # padded samples
    assert all(((raw["input_ids"] == r[0]).all(1) & (raw["attention_mask"] == r[1]).all(1)).any() for r in xs)
    res = _ok(run_cli("bench", ex, *ARCH, "--data", data, "--baseline", teacher, "--iters", "2", "--warmup",
                      "1", "--batch", "1", "--no-memory", "--engines", "dense-torch,chain-torch,chain-ort",
                      "--json"), "bench")
    acc = json.loads(res.stdout)["accuracy"]
    assert acc["metric"] == "cosine" and acc["cosine_to_baseline"] == pytest.approx(after, abs=1e-4)


def test_distill_loss_mse_and_labeled_kl_default(tmp_path):
    teacher, data = _teacher(tmp_path), _tokens(tmp_path / "t.npz", n=96)
    _ok(run_cli("decompose", teacher, *ARCH, "--rank", "4", "-o", tmp_path / "d"), "decompose")
    _ok(run_cli("finetune", tmp_path / "d", *ARCH, "--data", data, "--teacher", teacher, "--epochs", "1",
                "--distill-loss", "mse", "-o", tmp_path / "f"), "finetune mse")
    m = json.loads((tmp_path / "f" / "best" / "manifest.json").read_text())["metrics"]["finetune"]
    assert m["distill_loss"] == "mse"
    # unlabeled data cannot use kl: usage error, nothing written
    res = run_cli("finetune", tmp_path / "d", *ARCH, "--data", data, "--teacher", teacher, "--epochs", "1",
                  "--distill-loss", "kl", "-o", tmp_path / "k", "-q")
    _one_line(res, 2, "kl")
    assert not (tmp_path / "k").exists()


def test_labeled_token_data_trains_and_evaluates_a_token_classifier(tmp_path):
    """fm.text (nn.Embedding first, one input): an x/y .npz of integer ids and a token
    .npz with labels both feed prune, finetune (KL distillation by default) and eval."""
    torch.manual_seed(0)
    ckpt = tmp_path / "text.pt"
    torch.save(fm.text().state_dict(), ckpt)
    arch = ["--arch", "tests.foreign_models:text"]
    rng = np.random.default_rng(0)
    xy = tmp_path / "xy.npz"
    np.savez(xy, x=rng.integers(0, 50, (64, 12)), y=rng.integers(0, 10, 64))
    tok = _tokens(tmp_path / "tok.npz", n=64, vocab=50, labels=True)
    for i, data in enumerate((xy, tok)):
        _ok(run_cli("prune", ckpt, *arch, "--no-decompose", "--sparsity", "0.5", "--data", data,
                    "-o", tmp_path / f"p{i}"), "prune")
        _ok(run_cli("finetune", tmp_path / f"p{i}", *arch, "--data", data, "--teacher", ckpt, "--epochs", "1",
                    "-o", tmp_path / f"f{i}"), "finetune")
        res = _ok(run_cli("eval", tmp_path / f"f{i}", *arch, "--data", data, "--json"), "eval")
        m = json.loads(res.stdout)
        assert 0 <= m["accuracy"] <= 1 and m["samples"] > 0


# ---------------------------------------------------------------------------- refusals
def test_token_data_refusals_are_one_line(tmp_path):
    teacher = _teacher(tmp_path)
    bad = _tokens(tmp_path / "big.npz", n=40, vocab=200)  # ids up to 199, the embedding has 64
    res = run_cli("prune", teacher, *ARCH, "--no-decompose", "--sparsity", "0.5", "--data", bad,
                  "-o", tmp_path / "p", "-q")
    _one_line(res, 4, "out of range", "64")
    assert not (tmp_path / "p").exists()
    data = _tokens(tmp_path / "t.npz", n=40)
    # no labels and no teacher / no reference
    res = run_cli("finetune", teacher, *ARCH, "--data", data, "--epochs", "1", "-o", tmp_path / "f", "-q")
    _one_line(res, 4, "no labels", "--teacher")
    assert not (tmp_path / "f").exists()
    _one_line(run_cli("eval", teacher, *ARCH, "--data", data, "-q"), 2, "--reference")
    # token data for a float model, float data for a token model, preprocessing for ids
    lin = tmp_path / "lin.pt"
    torch.save(fm.tied().state_dict(), lin)
    _one_line(run_cli("eval", lin, "--arch", "tests.foreign_models:tied", "--data", data, "-q"), 4,
              "token ids", "not an embedding")
    flt = tmp_path / "f.npz"
    np.savez(flt, x=np.random.default_rng(0).random((40, L)).astype("float32"), y=np.zeros(40, np.int64))
    _one_line(run_cli("eval", teacher, *ARCH, "--data", flt, "--reference", teacher, "-q"), 4, "token ids")
    _one_line(run_cli("eval", teacher, *ARCH, "--data", data, "--reference", teacher, "--normalize",
                      "computed", "-q"), 2, "token ids")
    # a teacher that does not fit the student's architecture
    torch.save(tm.encoder(dim=16).state_dict(), tmp_path / "small.pt")
    _one_line(run_cli("finetune", teacher, *ARCH, "--data", data, "--teacher", tmp_path / "small.pt",
                      "--epochs", "1", "-o", tmp_path / "g", "-q"), 4, "small.pt")
    assert not (tmp_path / "g").exists()


def test_teacher_with_other_outputs_is_refused(tmp_path):
    """Feature distillation needs the teacher's outputs in the student's shape; an artifact
    teacher of the student's import-path architecture loads with the student's --arch."""
    import tedepr_cli as tedepr
    from tedepr_cli.artifact import load_artifact
    from tedepr_cli.distill import load_teacher

    torch.manual_seed(0)
    ids = torch.zeros(1, L, dtype=torch.int64)
    tedepr.save(tm.encoder(), tmp_path / "same", arch="tests.token_models:encoder", example_input=ids)
    tedepr.save(tm.encoder(dim=16), tmp_path / "other", arch="tests.token_models:encoder",
                arch_kwargs={"dim": 16}, example_input=ids)
    student = load_artifact(tmp_path / "same", allow_import="tests.token_models:encoder")
    assert isinstance(load_teacher(tmp_path / "same", student, classes=False), nn.Module)
    with pytest.raises(BadInput, match=r"outputs \(16,\) per sample, the student \(32,\)"):
        load_teacher(tmp_path / "other", student, classes=False)


# ---------------------------------------------------------------------------- item 7: degenerate probes
def test_degenerate_scores_are_named():
    from tedepr_cli.pruning.criteria import degenerate_scores

    g = torch.Generator().manual_seed(0)
    ok = torch.rand(12, 6, generator=g) + 0.1
    block = ok.clone()
    block[0:8] = 0  # the query and key rows of a stacked [q; k; v] projection
    scattered = ok.clone()
    scattered[[1, 4, 7, 10]] = 0  # dead ReLU units: informative zeros
    found = degenerate_scores({"ok": ok, "zeros": torch.zeros(5, 5), "alike": ok[:1].repeat(12, 1),
                               "block": block, "scattered": scattered, "one": torch.ones(1)})
    assert set(found) == {"zeros", "alike", "block"}
    assert "rows 0..7 (8 of 12)" in found["block"] and "all 25 scores" in found["zeros"]


def test_synflow_on_a_token_model_with_attention_warns_once(tmp_path):
    """Without --data the default criterion falls back to SynFlow, whose all-ones probe is
    one token repeated: attention's query/key rows get no signal. One warning says so;
    a plain MLP gets none."""
    from tedepr_cli.pruning.prune import PruneOptions, prune_model

    torch.manual_seed(0)
    report = prune_model(tm.encoder(), PruneOptions(sparsity=0.5), None, (L,))
    degenerate = [w for w in report["warnings"] if "probe is degenerate" in w]
    assert len(degenerate) == 1, report["warnings"]
    assert "encoder.layers.0.self_attn" in degenerate[0] and "in_proj_weight" in degenerate[0]
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    report = prune_model(mlp, PruneOptions(sparsity=0.5), None, (16,))
    assert not [w for w in report["warnings"] if "probe is degenerate" in w], report["warnings"]
    # through the CLI: one line on stderr, in the manifest's pruning report too
    teacher = _teacher(tmp_path)
    res = _ok(run_cli("prune", teacher, *ARCH, "--no-decompose", "--sparsity", "0.5", "-o", tmp_path / "p"),
              "prune")
    assert sum("probe is degenerate" in line for line in res.stderr.splitlines()) == 1


@pytest.mark.parametrize("arch", ["tests.token_models:encoder", "tests.token_models:padded_encoder"])
def test_prune_traces_a_forward_with_an_optional_attention_mask(tmp_path, arch):
    """`prune` on a token model warned "the graph could not be traced" (noise): torch.fx
    traced ``attention_mask`` as a free input, so ``if attention_mask is None`` took the
    mask's branch and the graph failed on the ids alone. Traced for the defaults the check
    runs with, the graph is seen whole (the encoder's residual blocks included)."""
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    torch.save(tm.__dict__[arch.rpartition(":")[2]]().state_dict(), teacher)
    data = _tokens(tmp_path / "tokens.npz", n=64)
    res = _ok(run_cli("prune", teacher, "--arch", arch, "--no-decompose", "--sparsity", "0.5", "--data", data,
                      "--batch-size", "16", "-o", tmp_path / "p", "--json"), "prune")
    reach = json.loads(res.stdout)["reachability"]
    assert reach["checked"] and reach["traced"] and reach["note"] is None, reach
    assert reach["outputs_reached"] == reach["outputs"] == 32
    assert "could not" not in res.stderr and "order they run" not in res.stderr, res.stderr


def test_an_encoder_with_a_padding_mask_and_nested_tensors_decomposes_and_prunes(tmp_path):
    """torch's TransformerEncoder with its defaults (nested tensors on) and a padding mask:
    in eval mode its fast path packs the batch into a NestedTensor, which a tensorized
    layer cannot reshape (was an internal error); tensorizing its attention turns the
    nested path off, so decompose --data, prune --data and eval --reference run."""
    arch = ["--arch", "tests.token_models:padded_encoder"]
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    torch.save(tm.padded_encoder().state_dict(), teacher)
    data = _tokens(tmp_path / "tokens.npz", n=64)
    dec, pr = tmp_path / "dec", tmp_path / "pr"
    res = _ok(run_cli("decompose", teacher, *arch, "--rank", "4", "--data", data, "-o", dec, "--json"),
              "decompose")
    assert 0 < json.loads(res.stdout)["summary"]["cosine_to_original"] <= 1
    _ok(run_cli("prune", dec, *arch, "--sparsity", "0.85", "--data", data, "--batch-size", "16", "-o", pr),
        "prune")
    _ok(run_cli("eval", pr, *arch, "--data", data, "--reference", teacher), "eval")


def test_info_describes_unlabeled_token_data(tmp_path):
    """info --data on token data without labels (was an internal error: np.bincount of the
    -1 placeholders): no class counts, said so, in the table and in JSON."""
    data = _tokens(tmp_path / "tokens.npz", n=40)
    res = _ok(run_cli("info", "--data", data, "--json"), "info --json")
    d = json.loads(res.stdout)
    d = d.get("data", d)
    assert all(s["class_counts"] is None for s in d["splits"].values())
    assert sum(s["count"] for s in d["splits"].values()) == 40
    res = _ok(run_cli("info", "--data", data), "info")
    assert "no labels" in res.stdout


def test_the_planner_runs_a_token_model_in_onnxruntime():
    """The planner's onnxruntime runtimes trace and feed a token model with int64 ids (they
    fed float zeros: both were 'unavailable', so the plan never considered onnxruntime)."""
    from tedepr_cli.arch import build, parse_arch
    from tedepr_cli.artifact import Artifact
    from tedepr_cli.execution.runtimes import Runtimes
    from tedepr_cli.pruning.prune import PruneOptions, prune

    torch.manual_seed(0)
    arch = parse_arch("tests.token_models:encoder")
    art, _ = prune(Artifact(model=build(arch, allow_import=True), arch=arch, meta={"input_shape": [L]}),
                   PruneOptions(sparsity=0.9))
    rt = Runtimes(art, 1)
    ids = torch.randint(0, 64, (3, L), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = art.model.eval()(ids)
        for runtime in ("chain-ort", "dense-ort"):
            mod = rt.module(runtime)
            assert mod is not None, rt.unavailable.get(runtime)
            torch.testing.assert_close(mod(ids), want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- export: the input signature
@pytest.mark.parametrize("name, names", [
    ("padded_encoder", ["input_ids", "attention_mask"]),
    ("typed_encoder", ["input_ids", "attention_mask", "token_type_ids"]),
    ("ids_first_encoder", ["input_ids", "attention_mask"]),  # forward(ids, attention_mask=None)
])
def test_export_takes_the_attention_mask_as_graph_input(tmp_path, name, names):
    """Token data with padding and a forward that takes the mask (and token_type_ids) by
    name: every ONNX file takes them as graph inputs, is validated on the data's own ids and
    masks (padded samples agree with PyTorch within the tolerance), and validate and the
    onnxruntime bench engines feed them by name."""
    import onnx
    import onnxruntime as ort

    from tedepr_cli.artifact import load_artifact
    from tedepr_cli.export import compare

    arch = ["--arch", f"tests.token_models:{name}"]
    torch.manual_seed(0)
    ckpt = tmp_path / "m.pt"
    torch.save(getattr(tm, name)().state_dict(), ckpt)
    rng = np.random.default_rng(1)
    extra = {"token_type_ids": rng.integers(0, 2, (64, L))} if "token_type_ids" in names else {}
    data = _tokens(tmp_path / "t.npz", n=64, **extra)
    _ok(run_cli("prune", ckpt, *arch, "--sparsity", "0.8", "--data", data, "--batch-size", "16",
                "-o", tmp_path / "p"), "prune")
    ex = tmp_path / "e"
    _ok(run_cli("export", tmp_path / "p", *arch, "--data", data, "--to", "safetensors,onnx,onnx-fast",
                "-o", ex), "export")
    exp = json.loads((ex / "export.json").read_text())
    assert exp["inputs"]["graph_inputs"] == names and list(exp["onnx_inputs"]) == names
    assert all(c["ok"] for f in ("onnx", "onnx-fast") for c in exp["validation"][f].values())
    for f in ("model.onnx", "model.fast.onnx"):
        assert [i.name for i in onnx.load(str(ex / f)).graph.input] == names
    # an independent check on the padded samples, by name, against the model in PyTorch
    x = np.load(ex / "sample_inputs.npy")
    assert x.shape[1:] == (len(names), L) and (x[:, 1] == 0).any()
    model = load_artifact(tmp_path / "p", allow_import=f"tests.token_models:{name}").model.eval()
    with torch.no_grad():
        ref = feed(model, torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(ex / "model.onnx"))
    got = sess.run(None, {n: x[:, i] for i, n in enumerate(names)})[0]
    assert compare(got, ref, 1e-5, 1e-4)["ok"]
    # the mask matters: every token attending gives other embeddings for the padded samples
    unmasked = sess.run(None, {n: (np.ones_like(x[:, 1]) if n == "attention_mask" else x[:, i])
                               for i, n in enumerate(names)})[0]
    padded = (x[:, 1] == 0).any(1)
    assert not compare(unmasked[padded], ref[padded], 1e-5, 1e-4)["ok"]
    res = _ok(run_cli("validate", ex, *arch, "--json"), "validate")
    assert res.stdout.count('"ok": true') >= 3  # model.onnx, model.fast.onnx, model.safetensors
    _ok(run_cli("bench", ex, *arch, "--iters", "2", "--warmup", "1", "--batch", "1,3", "--no-memory",
                "--engines", "dense-torch,chain-torch,dense-ort,chain-ort"), "bench")


def test_a_forward_of_the_ids_alone_exports_the_ids_alone(tmp_path):
    """fm.text takes the ids only: token data with a mask still exports one graph input,
    input_ids, and the samples saved beside it are [N, L] ids."""
    import onnx

    torch.manual_seed(0)
    ckpt = tmp_path / "text.pt"
    torch.save(fm.text().state_dict(), ckpt)
    arch = ["--arch", "tests.foreign_models:text"]
    data = _tokens(tmp_path / "t.npz", n=64, vocab=50, labels=True)
    _ok(run_cli("export", ckpt, *arch, "--data", data, "-o", tmp_path / "e"), "export")
    exp = json.loads((tmp_path / "e" / "export.json").read_text())
    assert exp["inputs"]["graph_inputs"] == ["input_ids"]
    assert [i.name for i in onnx.load(str(tmp_path / "e" / "model.onnx")).graph.input] == ["input_ids"]
    assert np.load(tmp_path / "e" / "sample_inputs.npy").shape[1:] == (L,)


def test_ort_feed_fills_inputs_by_name():
    from tedepr_cli.export import ort_feed

    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    stacked = np.stack([ids, mask], 1)
    f = ort_feed(["input_ids", "attention_mask"], stacked)
    assert np.array_equal(f["input_ids"], ids) and np.array_equal(f["attention_mask"], mask)
    f = ort_feed(["input_ids", "attention_mask", "token_type_ids"], ids)  # ids alone: neutral values
    assert (f["attention_mask"] == 1).all() and (f["token_type_ids"] == 0).all()
    assert list(ort_feed(["input_ids"], stacked)) == ["input_ids"]
    x = np.zeros((2, 4), np.float32)
    assert ort_feed(["x"], x)["x"] is not None
    with pytest.raises(BadInput, match="'pixel_mask'"):
        ort_feed(["x", "pixel_mask"], x)


def test_a_dense_encoder_exports_a_symbolic_sequence_axis():
    """A dense encoder traced on 12-token ids + mask runs in onnxruntime on 7 tokens and
    matches PyTorch there (the sequence axis is symbolic)."""
    import onnxruntime as ort

    from tedepr_cli.export import compare, ort_feed, to_onnx

    torch.manual_seed(0)
    model = tm.padded_encoder().eval()
    ids = torch.randint(1, 64, (3, L))
    mask = (torch.arange(L) < torch.tensor([[12], [6], [9]])).long()
    proto = to_onnx(model, torch.stack([ids * mask, mask], 1), 18)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in proto.graph.input}
    assert list(dims) == ["input_ids", "attention_mask"] and all(isinstance(d[1], str) for d in dims.values())
    short_mask = (torch.arange(7) < torch.tensor([[7], [3], [5], [7]])).long()
    short = torch.stack([torch.randint(1, 64, (4, 7)) * short_mask, short_mask], 1)
    sess = ort.InferenceSession(proto.SerializeToString())
    got = sess.run(None, ort_feed([i.name for i in sess.get_inputs()], short.numpy()))[0]
    with torch.no_grad():
        assert compare(got, feed(model, short).numpy(), 1e-5, 1e-4)["ok"]
