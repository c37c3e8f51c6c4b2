#!/usr/bin/env bash
# Bring your own model: a torchvision-style ResNet-18 (resnet18.py) through the whole tedepr
# pipeline on the shipped MNIST sample, via the CLI:
#   decompose -> prune -> finetune -> eval -> export (ONNX validated) -> validate -> bench
#
#   bash samples/bring_your_own/resnet18.sh [OUT]      # OUT: runs/bring_your_own/resnet18
#
# Small on purpose (about 1.5 min of CPU on one core): width 16 (torchvision's is 64), 2,000
# training images, one epoch of dense training, two of masked fine-tuning. Knobs: WIDTH,
# TRAIN (images), SPARSITY, EPOCHS,
# TEDEPR (the command, e.g. ".venv/bin/tedepr").
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=$(realpath -m "${1:-runs/bring_your_own/resnet18}")
tedepr=${TEDEPR:-tedepr}
if ! command -v "$tedepr" > /dev/null; then
    echo "resnet18.sh: $tedepr not found: pip install -e . (or set TEDEPR=path/to/tedepr)" >&2
    exit 3
fi
python_bin=${PYTHON:-$(dirname "$(command -v "$tedepr")")/python}  # the python tedepr runs on
[ -x "$python_bin" ] || python_bin=python3
width=${WIDTH:-16}
train=${TRAIN:-2000}
sparsity=${SPARSITY:-0.98}
epochs=${EPOCHS:-2}  # of the masked fine-tuning
data=$(dirname "$here")/mnist5k.npz  # 4,000 train / 1,000 test MNIST digits
mkdir -p "$out"
# `--arch resnet18:resnet18` names resnet18() in ./resnet18.py: tedepr finds a module in the
# current directory, and imports it only because the command line names it
cd "$here"
arch=(--arch resnet18:resnet18)
common=(--seed 0 -q)
export OMP_NUM_THREADS=1  # one core: every command runs single-threaded
run() { echo "+ tedepr $*" >&2; "$tedepr" "$@"; }

# 0. "Your checkpoint": a plain state_dict of the dense network, trained for one epoch here
#    (a model someone else trained would be the starting point instead)
"$python_bin" -c "import torch, resnet18; torch.manual_seed(0); \
torch.save(resnet18.resnet18(width=$width).state_dict(), '$out/resnet18-init.pt')"
run finetune "$out/resnet18-init.pt" "${arch[@]}" --arch-kwargs "{\"width\": $width}" --data "$data" \
    --epochs 1 --limit-train "$train" --batch-size 32 --optimizer adamw --lr 2e-3 "${common[@]}" \
    -o "$out/dense" --overwrite

# 1. coarse grain: every conv and the classifier as a tensor-train chain (rank 8)
run decompose "$out/dense" "${arch[@]}" --rank 8 -o "$out/decomposed" --overwrite "${common[@]}"
# 2. fine grain: keep 2 % of the dense weights' count (--sparsity counts against the dense
#    model; the rank-8 cores hold 4 %, so about half of their entries go), the most
#    trainable ones, scored on real images
run prune "$out/decomposed" "${arch[@]}" --sparsity "$sparsity" --data "$data" --batch-size 32 \
    -o "$out/pruned" --overwrite "${common[@]}"
# 3. recover: masked training (pruned entries stay zero)
run finetune "$out/pruned" "${arch[@]}" --data "$data" --epochs "$epochs" --limit-train "$train" --batch-size 32 \
    --optimizer adamw --lr 2e-3 -o "$out/finetuned" --overwrite "${common[@]}"
# 4. accuracy of the dense original and of the compressed model on the 1,000 test images
run eval "$out/dense" "${arch[@]}" --data "$data" --json -q > "$out/eval-dense.json"
run eval "$out/finetuned" "${arch[@]}" --data "$data" --json -q > "$out/eval-compressed.json"
# 5. compact safetensors + ONNX, each validated against PyTorch on test images
run export "$out/finetuned" "${arch[@]}" --data "$data" -o "$out/exported" --overwrite -q
# 6. re-check the export later, from its saved sample inputs and outputs
run validate "$out/exported" "${arch[@]}" -q
# 7. latency and size against the dense original, every engine side by side
run bench "$out/exported" "${arch[@]}" --baseline "$out/dense" --data "$data" --batch 1 --iters 5 \
    --warmup 1 --no-memory --engines dense-torch,chain-torch,chain-ort --json -q \
    > "$out/bench.json"
echo "done: $out (eval-*.json, exported/export.json, bench.json)" >&2
