"""`tedepr prune ARCH --init random`: pruning at initialization from an architecture name
(build a fresh model, tensorize it with random variance-preserving cores, prune), no checkpoint."""

from __future__ import annotations

import torch

from tedepr_cli.arch import parse_arch
from tedepr_cli.artifact import load_artifact
from tedepr_cli.decompose import DecomposeOptions
from tedepr_cli.loading import build_fresh
from tedepr_cli.pruning.prune import PruneOptions, prune

from .conftest import LENET300, MNIST, run_cli

FAST = ["--criterion", "synflow", "--rounds", "5"]  # data-free and quick


def _tensors(art):
    return {k: v.clone() for k, v in art.model.state_dict().items()}


def test_zoo_name_builds_tensorizes_and_prunes_in_one_command(tmp_path):
    r = run_cli("prune", "lenet300", "--init", "random", "--sparsity", "0.995", "--data", MNIST,
                "-o", tmp_path / "a")
    assert r.exit_code == 0, r.stderr
    a = load_artifact(tmp_path / "a")
    assert a.meta["origin"]["kind"] == "fresh" and a.meta["origin"]["arch"] == "lenet300"
    assert a.meta["origin"]["seed"] == 0
    assert a.meta["tensorization"]["init"] == "random" and a.meta["tensorization"]["variance_target"]
    assert [h["command"] for h in a.history] == ["decompose", "prune"]
    assert a.meta["pruning"]["kept"] == 1331 and a.meta["pruning"]["criterion"] == "tedepr"
    # the CLI is the library path: fresh model (seeded) -> random cores -> prune
    fresh = build_fresh(parse_arch("lenet300"), seed=0)
    lib, _ = prune(fresh, PruneOptions(sparsity=0.995, seed=0), MNIST,
                   DecomposeOptions(rank=None, init="random", seed=0))
    for k, v in _tensors(lib).items():
        assert torch.equal(v, a.model.state_dict()[k]), k


def test_same_seed_same_model_other_seed_other_model(tmp_path):
    outs = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        r = run_cli("prune", "lenet300", "--init", "random", "--sparsity", "0.99", *FAST, "--seed", seed,
                    "-o", tmp_path / name)
        assert r.exit_code == 0, r.stderr
        outs[name] = _tensors(load_artifact(tmp_path / name))
    assert all(torch.equal(v, outs["b"][k]) for k, v in outs["a"].items())
    assert not all(torch.equal(v, outs["c"][k]) for k, v in outs["a"].items())


def test_dense_baseline_from_scratch(tmp_path):
    """--no-decompose prunes the fresh dense weights: the PaI baselines' setting."""
    r = run_cli("prune", "lenet300", "--init", "random", "--no-decompose", "--sparsity", "0.995", *FAST,
                "-o", tmp_path / "d")
    assert r.exit_code == 0, r.stderr
    d = load_artifact(tmp_path / "d")
    assert "tensorization" not in d.meta and d.meta["origin"]["kind"] == "fresh"
    assert sum(int(m.sum()) for m in d.masks.values()) == 1331


def test_import_path_architecture_and_its_default_output_name(tmp_path, monkeypatch):
    import sys

    (tmp_path / "scratchnets.py").write_text(
        "import torch\n"
        "def mlp(width=64):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(784, width), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(width, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    try:
        r = run_cli("prune", "scratchnets:mlp", "--init", "random", "--input-shape", "784", "--arch-kwargs",
                    '{"width": 32}', "--sparsity", "0.9", *FAST)
        assert r.exit_code == 0, r.stderr
        a = load_artifact(tmp_path / "scratchnets-mlp-pruned", allow_import="scratchnets:mlp")
    finally:
        sys.modules.pop("scratchnets", None)  # leave no module behind for other tests
    assert a.arch.name == "scratchnets:mlp" and a.arch.kwargs == {"width": 32}
    assert a.meta["origin"]["kind"] == "fresh"


def test_fresh_build_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_fresh(parse_arch("lenet300"), seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(123)  # the weights depend on the seed argument alone
    b = build_fresh(parse_arch("lenet300"), seed=3)
    c = build_fresh(parse_arch("lenet300"), seed=4)
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    assert not torch.equal(a.model.fc1.weight, c.model.fc1.weight)


def test_from_scratch_usage_errors(tmp_path):
    out = tmp_path / "o"
    r = run_cli("prune", "lenet300", "--sparsity", "0.99", "-o", out)  # no --init random
    assert r.exit_code == 2 and "--init random" in r.stderr
    r = run_cli("prune", "lenet300", "--init", "random", "--arch", "lenet300", "--sparsity", "0.99",
                "-o", out)
    assert r.exit_code == 2 and "drop --arch" in r.stderr
    r = run_cli("prune", LENET300, "--arch", "lenet300", "--init", "random", "--no-decompose",
                "--sparsity", "0.99", "-o", out)
    assert r.exit_code == 2 and "kept dense" in r.stderr
    r = run_cli("prune", "lenet301", "--init", "random", "--sparsity", "0.99", "-o", out)
    assert r.exit_code == 3  # neither a file nor an architecture
    assert not out.exists()


def test_a_file_named_like_an_architecture_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lenet300").write_bytes(LENET300.read_bytes())
    r = run_cli("prune", "lenet300", "--arch", "lenet300", "--sparsity", "0.99", *FAST, "-o", tmp_path / "o")
    assert r.exit_code == 0, r.stderr
    assert load_artifact(tmp_path / "o").meta["origin"]["kind"] == "state_dict"


def test_decompose_takes_a_zoo_name_with_init_random_and_says_so_without(tmp_path):
    """The newcomer trial: `tedepr decompose lenet300` said "lenet300 does not exist"; prune
    said what to add. Both now take the name with --init random and say so without it."""
    out = tmp_path / "d"
    r = run_cli("decompose", "lenet300", "-o", out)
    assert r.exit_code == 2 and "add --init random to decompose a freshly initialized lenet300" in r.stderr
    assert not out.exists()
    r = run_cli("decompose", "lenet300", "--init", "random", "--rank", "4", "-o", out, "-q")
    assert r.exit_code == 0, r.stderr
    art = load_artifact(out)
    assert art.arch.name == "lenet300" and art.meta["tensorization"]["summary"]["layers_tensorized"] == 3
    again = tmp_path / "again"
    r = run_cli("decompose", "lenet300", "--init", "random", "--rank", "4", "-o", again, "-q")
    assert r.exit_code == 0, r.stderr
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


def test_a_zoo_name_where_a_file_goes_says_it_is_an_architecture(tmp_path):
    for argv in (["eval", "lenet300", "--data", MNIST], ["info", "resnet20"],
                 ["export", "lenet5", "-o", tmp_path / "e"]):
        r = run_cli(*argv)
        assert r.exit_code == 3, r.stderr
        assert "names an architecture, not a file" in r.stderr and "--init random" in r.stderr, r.stderr
    r = run_cli("info", "lenet301")
    assert r.exit_code == 3 and "names an architecture" not in r.stderr
