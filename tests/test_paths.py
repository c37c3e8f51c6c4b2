"""Rank paths as units of the fine grain (issue 19): the path floor (``min_paths``), the rank
raise of the one-shot path, and the structured grain (``grain="path"``)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from tedepr_cli.arch import parse_arch
from tedepr_cli.artifact import Artifact
from tedepr_cli.decompose import DecomposeOptions, decompose
from tedepr_cli.errors import CollapseError
from tedepr_cli.pruning.masking import path_connectable, rank_paths, select
from tedepr_cli.pruning.paths import candidate_paths, path_capacity, path_pool, slice_values
from tedepr_cli.pruning.prune import PruneOptions, prune
from tedepr_cli.pruning.targets import prunable_groups
from tedepr_cli.zoo import MODELS

from .conftest import MNIST, run_cli


def _lenet5(rank: int = 2):
    """LeNet-5 decomposed at a fixed TT rank: conv1 stays dense, conv2 a TT conv chain (5
    cores, paths are rank-one terms), fc1/fc2 TT-matrix Linears."""
    torch.manual_seed(0)
    art = Artifact(model=MODELS.get("lenet5")().eval(), arch=parse_arch("lenet5"))
    dec, _ = decompose(art, DecomposeOptions(rank=rank, init="random", seed=0))
    return dec


def _scores(model, starve: str, seed: int = 0):
    """Random scores for every prunable tensor; the layer ``starve`` scores 1000x lower, so a
    global top-K gives it nothing beyond the collapse guard."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for grp in prunable_groups(model):
        for n in grp.params:
            p = dict(model.named_parameters())[n]
            scale = 1e-3 if grp.name == starve else 1.0
            out[n] = torch.rand(p.shape, generator=g, dtype=torch.float64) * scale
    return out


def _slices_whole(mask: torch.Tensor) -> bool:
    """Every (r_in, r_out) slice of a core mask is kept entirely or not at all."""
    m = mask.reshape(mask.shape[0], -1, mask.shape[-1])
    return bool(((m.all(dim=1)) | (~m.any(dim=1))).all())


# ---------------------------------------------------------------------------- enumeration
@pytest.mark.parametrize("shapes", [
    [(1, 3, 2), (2, 4, 3), (3, 2, 1)],  # TT: r_0 = r_d = 1
    [(2, 3, 3), (3, 4, 2)],  # ring: a_d = a_0
])
def test_candidate_paths_are_every_rank_path_best_first(shapes):
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(s, generator=g, dtype=torch.float64) for s in shapes]
    vals = slice_values(scores)
    paths = candidate_paths(vals)
    assert len(paths) == path_capacity([torch.Size(s) for s in shapes])
    # brute force over every rank-index sequence that closes
    ranks = [s[0] for s in shapes]
    brute = {}
    for a in itertools.product(*[range(r) for r in ranks]):
        seq = (*a, a[0])
        brute[seq] = sum(float(vals[k][seq[k], seq[k + 1]]) for k in range(len(shapes)))
    got = [tuple(int(x) for x in p) for p in paths]
    assert set(got) == set(brute)
    assert [brute[p] for p in got] == sorted(brute.values(), reverse=True)


# ---------------------------------------------------------------------------- path floor
def test_path_floor_keeps_min_paths_in_every_tensorized_layer():
    dec = _lenet5(rank=2)
    groups = prunable_groups(dec.model)
    scores = _scores(dec.model, starve="conv2")
    conv = [g for g in groups if g.name == "conv2"][0]
    assert path_capacity([scores[n].shape for n in conv.params]) == 16
    plain = select(scores, groups, 300)
    assert rank_paths([plain[n] for n in conv.params]) < 4  # the global top-K starves conv2
    floored = select(scores, groups, 300, min_paths=4)
    assert sum(int(m.sum()) for m in floored.values()) == 300  # still exactly the budget
    for g in groups:
        if g.kind == "cores":
            cap = path_capacity([scores[n].shape for n in g.params])
            assert rank_paths([floored[n] for n in g.params]) >= min(4, cap), g.name


def test_path_floor_is_lowered_to_what_the_budget_holds(caplog):
    dec = _lenet5(rank=2)
    groups = prunable_groups(dec.model)
    scores = _scores(dec.model, starve="conv2")
    masks = select(scores, groups, 14, min_paths=16)  # 16 paths of 5 cores cannot fit in 14 entries
    assert sum(int(m.sum()) for m in masks.values()) == 14
    assert "holds a floor of" in caplog.text or "holds no path floor" in caplog.text


def test_min_paths_raises_the_rank_of_a_starved_conv_chain_on_the_one_shot_path():
    art = Artifact(model=MODELS.get("lenet5")().eval(), arch=parse_arch("lenet5"))
    dopts = DecomposeOptions(rank=None, init="random", seed=0)
    _, base = prune(art, PruneOptions(sparsity=0.999, criterion="magnitude", repair_paths=True), None, dopts)
    _, rep = prune(art, PruneOptions(sparsity=0.999, criterion="magnitude", repair_paths=True, min_paths=4),
                   None, dopts)
    paths = {r["name"]: r.get("rank_paths") for r in rep["layers"]}
    assert base["rank_auto"]["rank"] == rep["rank_auto"]["rank"] == 1
    assert {r["name"]: r.get("rank_paths") for r in base["layers"]}["conv2"] == 1
    # only the conv chain (a path = a rank-one term) is raised; TT-matrix Linears keep rank 1
    assert rep["rank_auto"]["raised_for_paths"] == {"conv2": 2}
    assert paths["conv2"] >= 4 and paths["fc1"] == paths["fc2"] == 1
    assert rep["kept"] == rep["budget"] + rep["repair"]["added"]
    assert rep["min_paths"] == 4 and not [w for w in rep["warnings"] if "rank paths" in w]


# ---------------------------------------------------------------------------- rank allocation
def test_rank_allocation_sizes_each_layer_to_what_the_criterion_keeps():
    """``rank_allocation="criterion"``: the probe (uniform auto rank at 4x the coarse ratio)
    is pruned with the criterion, and every tensorized layer gets the largest rank whose cores
    hold at most ``coarse_ratio`` x what the criterion kept in it there."""
    from dataclasses import replace

    from tedepr_cli.tensorized.plan import plan_model

    art = Artifact(model=MODELS.get("lenet5")().eval(), arch=parse_arch("lenet5"))
    dopts = DecomposeOptions(rank=None, init="random", seed=0)
    opts = PruneOptions(sparsity=0.995, seed=0, rank_allocation="criterion")
    out, rep = prune(art, opts, MNIST, dopts)
    auto = rep["rank_auto"]
    _, probe = prune(art, replace(opts, coarse_ratio=16.0, rank_allocation="uniform"), MNIST, dopts)
    assert probe["rank_auto"]["rank"] > auto["rank"]
    assert auto["probe_kept"] == {r["name"]: r["kept"] for r in probe["layers"] if r["kind"] == "cores"}

    def entries(name: str, r: int) -> int:
        plans = plan_model(art.model, art.input_shape, replace(dopts, rank=r))
        return {p.name: p.params for p in plans}[name]

    ranks = auto["ranks"]
    assert set(ranks) == {"conv2", "fc1", "fc2"}
    for name, r in ranks.items():
        limit = opts.coarse_ratio * auto["probe_kept"][name]
        assert r == 1 or entries(name, r) <= limit, name
        assert entries(name, r + 1) > limit, name  # the largest rank that fits
    # the conv chain wants many rank paths, the TT-matrix fc1 few: not one uniform rank
    assert ranks["conv2"] > auto["rank"] > ranks["fc1"]
    built = out.meta["tensorization"]["layers"]
    assert {n: max(built[n]["ranks"]) for n in ranks} == ranks
    assert rep["kept"] == rep["budget"]


def test_allocation_probe_sets_the_probe_decompositions_coarse_ratio():
    """``allocated_ranks(..., probe=P)`` prunes a probe decomposed at P x the coarse ratio
    (the default P is ``ALLOCATION_PROBE``): what it reports kept per layer is what a uniform
    prune at that coarse ratio keeps."""
    from dataclasses import replace

    from tedepr_cli.pruning.prune import allocated_ranks

    art = Artifact(model=MODELS.get("lenet5")().eval(), arch=parse_arch("lenet5"))
    dopts = DecomposeOptions(rank=None, init="random", seed=0)
    opts = PruneOptions(sparsity=0.995, seed=0)
    _, kept = allocated_ranks(art, dopts, opts, MNIST, probe=2.0)
    _, at8 = prune(art, replace(opts, coarse_ratio=8.0), MNIST, dopts)
    assert kept == {r["name"]: r["kept"] for r in at8["layers"] if r["kind"] == "cores"}
    _, at16 = prune(art, replace(opts, coarse_ratio=16.0), MNIST, dopts)
    assert kept != {r["name"]: r["kept"] for r in at16["layers"] if r["kind"] == "cores"}  # not the default


# ---------------------------------------------------------------------------- structured grain
def test_path_grain_keeps_whole_paths_within_the_budget():
    dec = _lenet5(rank=2)
    groups = prunable_groups(dec.model)
    scores = _scores(dec.model, starve="none")
    masks = select(scores, groups, 2000, grain="path", pool=1.0)
    assert sum(int(m.sum()) for m in masks.values()) <= 2000
    for g in groups:
        if g.kind != "cores":
            continue
        ms = [masks[n] for n in g.params]
        assert all(_slices_whole(m) for m in ms), g.name
        assert rank_paths(ms) >= 1
        for m, ok in zip(ms, path_connectable(ms), strict=True):  # every kept slice is on a kept path
            rel = m.reshape(m.shape[0], -1, m.shape[-1]).any(dim=1)
            assert not (rel & ~ok).any(), g.name


def test_path_grain_with_a_pool_keeps_exactly_the_budget_inside_whole_paths():
    dec = _lenet5(rank=2)
    groups = prunable_groups(dec.model)
    scores = _scores(dec.model, starve="none", seed=1)
    masks = select(scores, groups, 1500, grain="path", pool=2.0)
    assert sum(int(m.sum()) for m in masks.values()) == 1500
    # every kept core entry lies in a slice of the pooled whole paths
    names = [n for g in groups for n in g.params]
    sizes = [scores[n].numel() for n in names]
    offs = dict(zip(names, itertools.accumulate([0, *sizes[:-1]]), strict=True))
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    cores = [[(offs[n], scores[n].shape) for n in g.params] for g in groups if g.kind == "cores"]
    pool = path_pool(flat, cores, [], 3000, 1, exact_room=False)
    for g in groups:
        if g.kind == "cores":
            for n in g.params:
                inside = pool[offs[n]: offs[n] + scores[n].numel()].reshape(scores[n].shape)
                assert not (masks[n] & ~inside).any(), n


def test_path_grain_prefers_the_path_with_the_highest_saliency_per_entry():
    dec = _lenet5(rank=2)
    groups = [g for g in prunable_groups(dec.model) if g.name == "fc2"]
    c0, c1 = (dict(dec.model.named_parameters())[n] for n in groups[0].params)
    s0, s1 = torch.full(c0.shape, 0.1, dtype=torch.float64), torch.full(c1.shape, 0.1, dtype=torch.float64)
    s0[..., 1] = 1.0  # rank index 1 carries the saliency
    s1[1] = 1.0
    masks = select({"fc2.cores.0": s0, "fc2.cores.1": s1}, groups, c0[..., 0].numel() + c1[0].numel(),
                   grain="path")
    assert masks["fc2.cores.0"][..., 1].all() and not masks["fc2.cores.0"][..., 0].any()
    assert masks["fc2.cores.1"][1].all() and not masks["fc2.cores.1"][0].any()


def test_whole_paths_that_cannot_fit_are_a_collapse_with_advice():
    art = Artifact(model=MODELS.get("lenet5")().eval(), arch=parse_arch("lenet5"))
    with pytest.raises(CollapseError, match="whole rank path .* path_pool"):
        prune(art, PruneOptions(sparsity=0.999, criterion="magnitude", grain="path"), None,
              DecomposeOptions(rank=None, init="random"))


# ---------------------------------------------------------------------------- interfaces
def test_cli_prune_with_path_options(tmp_path):
    out = tmp_path / "p"
    r = run_cli("prune", "lenet5", "--init", "random", "--sparsity", "0.999", "--min-paths", "4",
                "--grain", "path", "--path-pool", "2", "--repair-paths", "--json", "-o", out)
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["grain"] == "path" and rep["path_pool"] == 2.0 and rep["min_paths"] == 4
    assert rep["kept"] == rep["budget"] + rep["repair"]["added"]
    assert {x["name"]: x.get("rank_paths") for x in rep["layers"]}["conv2"] >= 4


@pytest.mark.parametrize("args", [["--grain", "row"], ["--path-pool", "0.5"], ["--min-paths", "-1"],
                                  ["--grain", "path", "--min-density", "0.01"],
                                  ["--rank-allocation", "layer"]])
def test_cli_bad_path_options(tmp_path, args):
    r = run_cli("prune", "lenet5", "--init", "random", "--sparsity", "0.99", "-o", tmp_path / "o", *args)
    assert r.exit_code == 2 and r.stderr.startswith("tedepr: ") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_rank_allocation_leaves_the_callers_rank_patterns_in_charge():
    """A ``rank_overrides`` pattern the caller gave (``fc*``) wins over the allocated ranks of
    the layers it matches (the planner takes the first matching pattern, so it must come
    first); the other layers keep their allocated ranks."""
    art = Artifact(model=MODELS.get("lenet5")().eval(), arch=parse_arch("lenet5"))
    opts = PruneOptions(sparsity=0.999, criterion="magnitude", repair_paths=True, rank_allocation="criterion")
    plain, base = prune(art, opts, None, DecomposeOptions(rank=None, init="random", seed=0))
    out, rep = prune(art, opts, None, DecomposeOptions(rank=None, init="random", seed=0,
                                                       rank_overrides={"fc*": 2}))
    ranks = {n: max(s["ranks"]) for n, s in out.meta["tensorization"]["layers"].items()}
    assert {n: max(s["ranks"]) for n, s in plain.meta["tensorization"]["layers"].items()} == \
        base["rank_auto"]["ranks"] and base["rank_auto"]["ranks"]["fc1"] == 1
    assert ranks["fc1"] == ranks["fc2"] == 2 and ranks["conv2"] == rep["rank_auto"]["ranks"]["conv2"] > 1
    assert list(rep["rank_auto"]["ranks"]) == ["fc*", "conv2"]


def test_cli_prune_rank_allocation_criterion(tmp_path):
    out = tmp_path / "p"
    r = run_cli("prune", "lenet5", "--init", "random", "--sparsity", "0.995", "--data", MNIST,
                "--rank-allocation", "criterion", "--json", "-o", out)
    assert r.exit_code == 0, r.stderr
    auto = json.loads(r.stdout)["rank_auto"]
    assert auto["allocation"] == "criterion" and auto["probe_ratio"] == 16.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {n: max(s["ranks"]) for n, s in manifest["tensorization"]["layers"].items()} == auto["ranks"]
    assert "per layer " + ", ".join(f"{n} {k}" for n, k in auto["ranks"].items()) in r.stderr


@pytest.mark.parametrize("extra, why", [(["--rank", "2"], "the rank is given"),
                                        (["--no-decompose"], "prunes dense weights")])
def test_cli_rank_allocation_says_when_it_does_not_apply(tmp_path, extra, why):
    r = run_cli("prune", "lenet5", "--init", "random", "--sparsity", "0.9", "--criterion", "magnitude",
                "--rank-allocation", "criterion", *extra, "-o", tmp_path / "p")
    assert r.exit_code == 0, r.stderr
    assert "--rank-allocation criterion applies to the one-shot path" in r.stderr and why in r.stderr


def test_api_prune_passes_the_path_options():
    import tedepr_cli as tedepr

    dec = _lenet5(rank=2)
    rep = tedepr.prune(dec.model, sparsity=0.995, criterion="magnitude", min_paths=4, grain="path",
                       path_pool=2.0, example_input=torch.zeros(1, 1, 28, 28))
    assert rep["grain"] == "path" and rep["kept"] == rep["budget"]
    assert all(x["rank_paths"] >= 2 for x in rep["layers"] if x["kind"] == "cores")
