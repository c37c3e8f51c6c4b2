"""Issue 18 item 6: ``nn.Embedding`` as a TT-embedding (Khrulkov et al. 2019): lookup
without the table, TT-SVD from a pretrained table, planning, pruning, export, reachability
and the CLI pipeline on a token-id model (``bag`` below, used as ``--arch``)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from tedepr_cli.artifact import load_artifact
from tedepr_cli.tensorized.decomp import init_module
from tedepr_cli.tensorized.embedding import TTEmbedding, vocab_modes
from tedepr_cli.tensorized.layers import build_layer, to_dense_layer
from tedepr_cli.tensorized.plan import PlanOptions, chain_dims, plan_model, ranks_for

from .conftest import run_cli

ARCH = "tests.test_embedding:bag"
VOCAB, DIM, SEQ = 97, 24, 10  # 97 is prime: the vocab is padded to 10 x 10


class _Bag(nn.Module):
    """Token ids -> embedding -> mean over the sequence -> Linear, ReLU -> Linear."""

    def __init__(self, vocab: int = VOCAB, dim: int = DIM, classes: int = 5,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.fc = nn.Linear(dim, 48)
        self.head = nn.Linear(48, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.embed(ids).mean(1))))


def bag(**kw) -> nn.Module:
    m = _Bag(**kw)
    m.input_shape = (SEQ,)
    return m


def _tt(vocab: int, ins: list[int], outs: list[int], rank: int, padding_idx: int | None = None
        ) -> TTEmbedding:
    spec = {"type": "embedding", "format": "tt", "in_modes": ins, "out_modes": outs,
            "num_embeddings": vocab, "padding_idx": padding_idx}
    spec["ranks"] = ranks_for(chain_dims(spec), rank, ring=False)
    return build_layer(spec)


# ---------------------------------------------------------------------------- the layer
@pytest.mark.parametrize(("vocab", "ins", "outs", "rank"), [
    (60, [3, 4, 5], [2, 2, 3], 4),     # three modes, exact vocab
    (60, [6, 10], [3, 4], 3),          # two modes
    (97, [10, 10], [4, 6], 5),         # prime vocab padded to 100
    (1000, [10, 10, 10], [2, 3, 4], 6),
])
def test_lookup_equals_the_dense_table_row(vocab, ins, outs, rank):
    """TT-SVD of a random table, then the lookup (digits, gathered slices, batched chain)
    equals the row of the TT-matrix it stands for, for every id."""
    torch.manual_seed(0)
    dense = nn.Embedding(vocab, math.prod(outs))
    tt = _tt(vocab, ins, outs, rank)
    err = init_module(tt, dense, "pretrained", "he", None)[0]
    assert 0 < err < 1  # a truncated TT-SVD of a random table: lossy, but fitted
    ids = torch.arange(vocab).reshape(1, -1).repeat(2, 1)
    out = tt(ids)
    assert out.shape == (2, vocab, math.prod(outs))
    table = tt.dense_weight().T  # (padded vocab, dim)
    assert torch.allclose(out[0], table[:vocab], atol=1e-5, rtol=0)
    assert torch.allclose(tt.weight, table[:vocab], atol=1e-6)
    assert tt.weight.shape == (vocab, math.prod(outs)) == tuple(dense.weight.shape)


def test_full_rank_tt_svd_reproduces_the_table_and_padding_row():
    torch.manual_seed(0)
    dense = nn.Embedding(97, 24, padding_idx=3)
    tt = _tt(97, [10, 10], [4, 6], 100, padding_idx=3)
    err = init_module(tt, dense, "pretrained", "he", None)[0]
    assert err < 1e-5
    ids = torch.tensor([[0, 3, 96, 50], [3, 3, 1, 2]])
    assert torch.allclose(tt(ids), dense(ids), atol=1e-5)
    assert bool((tt(ids)[ids == 3] == 0).all())
    # the padding row passes no gradient to the cores (nn.Embedding's padding_idx)
    tt(torch.tensor([[3, 3]])).sum().backward()
    assert all(float(c.grad.abs().sum()) == 0 for c in tt.cores)
    # drop-in attributes and the dense equivalent
    assert (tt.num_embeddings, tt.embedding_dim, tt.padding_idx) == (97, 24, 3)
    back = to_dense_layer(tt)
    assert isinstance(back, nn.Embedding) and back.padding_idx == 3
    assert torch.allclose(back(ids), tt(ids), atol=1e-6)
    with pytest.raises(IndexError):
        tt(torch.tensor([97]))  # a padded row is never looked up
    with pytest.raises(IndexError):
        tt(torch.tensor([-1]))


def test_random_init_has_the_variance_of_nn_embedding():
    """``--init random``: the table's entries have variance 1, as ``nn.Embedding``'s N(0, 1)."""
    tt = _tt(1000, [10, 10, 10], [4, 4, 4], 8)
    init_module(tt, None, "random", "he", torch.Generator().manual_seed(0))
    var = float(tt.weight.detach().var())
    assert 0.6 < var < 1.6, var


def test_vocab_modes_pad_little():
    assert vocab_modes(30522, 3) == [30, 32, 32]  # 30720 rows: 0.6 % padding
    assert vocab_modes(100, 2) == [10, 10]
    for v in (97, 1000, 30522, 50257):
        for d in (2, 3, 4):
            m = vocab_modes(v, d)
            assert math.prod(m) >= v and len(m) == d
            assert max(m) <= math.ceil(v ** (1 / d)) + 1


def test_covering_ids_reach_every_slice():
    tt = _tt(30522, [30, 32, 32], [6, 8, 8], 4)
    ids = tt.covering_ids()
    assert int(ids.max()) < 30522 and len(ids) <= 40
    assert [len(set(d.tolist())) for d in tt.digits(ids)] == [30, 32, 32]


# ---------------------------------------------------------------------------- planning
def test_plan_counts_what_the_spec_says_and_keeps_ties_and_padding_rows():
    torch.manual_seed(0)
    rows = {p.name: p for p in plan_model(bag(), (SEQ,), PlanOptions(rank=4))}
    spec = rows["embed"].spec
    assert spec["type"] == "embedding" and math.prod(spec["in_modes"]) >= VOCAB
    want = sum(r0 * v * m * r1 for v, m, r0, r1 in
               zip(spec["in_modes"], spec["out_modes"], spec["ranks"], spec["ranks"][1:], strict=False))
    assert rows["embed"].params == want == build_layer(spec).core_params()
    assert rows["embed"].dense_params == VOCAB * DIM
    # an embedding tied to the classifier stays dense (the tie is kept), with the reason
    tied = bag()
    tied.decoder = nn.Linear(DIM, VOCAB, bias=False)  # a language-model head sharing the table
    tied.decoder.weight = tied.embed.weight
    rows = {p.name: p for p in plan_model(tied, (SEQ,), PlanOptions(rank=4))}
    assert rows["embed"].spec is None and "tied" in rows["embed"].note
    # a padding row that is not zero would change the forward: kept dense
    odd = bag(padding_idx=0)
    with torch.no_grad():
        odd.embed.weight[0] = 1.0
    rows = {p.name: p for p in plan_model(odd, (SEQ,), PlanOptions(rank=4))}
    assert rows["embed"].spec is None and "padding_idx" in rows["embed"].note
    # TR has no TT-embedding: kept dense with the reason
    rows = {p.name: p for p in plan_model(bag(), (SEQ,), PlanOptions(rank=4, format="tr"))}
    assert rows["embed"].spec is None and "TT only" in rows["embed"].note


def test_explicit_modes_may_pad_the_vocab_but_must_cover_it():
    from tedepr_cli.errors import BadInput

    opts = PlanOptions(rank=4, mode_overrides={"embed": ([4, 5, 5], [2, 3, 4])})
    rows = {p.name: p for p in plan_model(bag(), (SEQ,), opts)}
    assert rows["embed"].spec["in_modes"] == [4, 5, 5] and rows["embed"].spec["num_embeddings"] == VOCAB
    with pytest.raises(BadInput, match="does not factor"):
        plan_model(bag(), (SEQ,), PlanOptions(rank=4, mode_overrides={"embed": ([8, 12], [4, 6])}))


# ---------------------------------------------------------------------------- fine grain
def test_pruned_tt_embedding_keeps_masked_entries_zero_after_training():
    import tedepr_cli as tedepr
    from tedepr_cli.masks import get_masks, plain_named_parameters

    torch.manual_seed(0)
    model = tedepr.tensorize(bag(), rank=6)
    assert isinstance(model.embed, TTEmbedding)
    ids, y = torch.randint(0, VOCAB, (32, SEQ)), torch.randint(0, 5, (32,))
    rep = tedepr.prune(model, sparsity=0.7, batches=[(ids, y)] * 4)
    masks = get_masks(model)
    cores = [n for n in masks if n.startswith("embed.cores")]
    assert cores and any(not bool(masks[n].all()) for n in cores)
    assert any(r["name"] == "embed" for r in rep["layers"])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids), y).backward()
        opt.step()
    for i, n in enumerate(cores):
        assert bool((model.embed.cores[i][~masks[n]] == 0).all()), n
    assert not torch.equal(plain_named_parameters(model)[cores[0]], torch.zeros(()))


def test_synflow_scores_every_slice_of_a_tt_embedding():
    """SynFlow's all-ones input is one token id for a token model; a TT-embedding's probe
    looks up ids covering every slice of every core, so no row of the table is scored 0
    (with the one-id probe only that id's slices were, and pruning kept one row of 97)."""
    import tedepr_cli as tedepr
    from tedepr_cli.pruning.criteria import CRITERIA, CriterionOptions, ScoreContext

    torch.manual_seed(0)
    model = tedepr.tensorize(bag(), rank=4)
    names = [f"embed.cores.{i}" for i in range(len(model.embed.cores))]
    ctx = ScoreContext(model=model, targets=names, batches=None, input_shape=(SEQ,),
                       generator=torch.Generator().manual_seed(0), options=CriterionOptions(rounds=1),
                       kept=100)
    scores = CRITERIA.get("synflow").fn(ctx)
    for n in names:  # every vocab slice G_k[:, v] of every core has some positive score
        per_slice = scores[n].sum(dim=(0, 2, 3))
        assert bool((per_slice > 0).all()), (n, per_slice)


def test_reachability_follows_the_tt_embedding():
    """Cut every path of the TT-embedding to the features and the network is cut; keep one
    path of one real id and it is connected."""
    import tedepr_cli as tedepr
    from tedepr_cli.pruning.reachability import reachability

    torch.manual_seed(0)
    model = tedepr.tensorize(bag(), rank=2)
    names = [f"embed.cores.{i}" for i in range(len(model.embed.cores))]
    full = {n: torch.ones_like(model.embed.cores[i], dtype=torch.bool) for i, n in enumerate(names)}
    full |= {f"{n}.weight": torch.ones_like(getattr(model, n).weight, dtype=torch.bool)
             for n in ("fc", "head") if isinstance(getattr(model, n), nn.Linear)}
    assert reachability(model, (SEQ,), full).connected
    cut = dict(full)
    cut[names[0]] = torch.zeros_like(full[names[0]])
    r = reachability(model, (SEQ,), cut)
    assert r.checked and not r.connected
    # one path through the padded vocab only: id 99 = digits (9, 9) is never looked up
    pad = {n: torch.zeros_like(m) for n, m in full.items() if n in names}
    pad[names[0]][0, 9, 0, 0] = True
    pad[names[1]][0, 9, 0, 0] = True
    r = reachability(model, (SEQ,), {**full, **pad})
    assert not r.connected
    pad[names[1]][0, 6, 0, 0] = True  # id 96 = (9, 6) is a real token
    assert reachability(model, (SEQ,), {**full, **pad}).connected


# ---------------------------------------------------------------------------- CLI
def _ok(res, what: str):
    assert res.exit_code == 0, f"{what}: exit {res.exit_code}: {res.stderr}"
    assert "internal error" not in res.stderr


def test_cli_pipeline_on_a_token_model(tmp_path):
    """decompose (TT-SVD of the table) -> prune (data-free: SynFlow's probe looks up ids
    covering every core slice, not the one id of an all-ones input) -> export (ONNX
    validated in onnxruntime) -> bench, with the embedding tensorized throughout."""
    torch.manual_seed(0)
    ckpt = tmp_path / "bag.pt"
    torch.save(bag().state_dict(), ckpt)
    arch = ["--arch", ARCH]
    res = run_cli("decompose", ckpt, *arch, "--rank", "4", "-o", tmp_path / "d", "--json")
    _ok(res, "decompose")
    rows = {r["name"]: r for r in json.loads(res.stdout)["layers"]}
    assert rows["embed"]["tensorized"] and rows["embed"]["type"] == "embedding"
    dec = load_artifact(tmp_path / "d", allow_import=ARCH).model
    assert isinstance(dec.embed, TTEmbedding)
    assert sum(c.numel() for c in dec.embed.cores) == rows["embed"]["params"]
    _ok(run_cli("prune", tmp_path / "d", *arch, "--sparsity", "0.8", "-o", tmp_path / "p"), "prune")
    art = load_artifact(tmp_path / "p", allow_import=ARCH)
    assert any(n.startswith("embed.cores") for n in art.masks)
    assert isinstance(art.model.embed, TTEmbedding)
    assert not all(bool(m.all()) for n, m in art.masks.items() if n.startswith("embed.cores"))
    rows = art.model.embed.weight.detach().abs().sum(1) > 0
    assert int(rows.sum()) >= VOCAB // 2, f"only {int(rows.sum())} token rows survive pruning"
    _ok(run_cli("export", tmp_path / "p", *arch, "-o", tmp_path / "e"), "export")
    report = json.loads((tmp_path / "e" / "export.json").read_text())
    assert report["validation"]["onnx"]["1"]["ok"] and report["validation"]["onnx"]["7"]["ok"]
    assert report["inputs"]["source"] == "random token ids"
    _ok(run_cli("bench", tmp_path / "e", *arch, "--iters", "2", "--warmup", "1", "--batch", "1",
                "--no-memory", "--engines", "dense-torch,chain-torch,dense-ort"), "bench")
    # a stored execution plan is re-checked and the artifact's onnx-fast graph is built on
    # token ids, not float noise
    _ok(run_cli("plan", tmp_path / "p", *arch, "--batch", "1", "-o", tmp_path / "pl"), "plan")
    _ok(run_cli("bench", tmp_path / "pl", *arch, "--iters", "2", "--warmup", "1", "--batch", "1",
                "--no-memory", "--engines", "tedepr,chain-ort"), "bench planned")
