#!/usr/bin/env bash
# The GPU check of issue 20, in one go and without network (README: Speed, "GPU check").
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--python PY] [--wheels DIR] [--budget S] [--cpu-smoke]
#
# On a machine with one CUDA GPU and a Python that has torch (CUDA build) and triton:
#   1. env       what is installed; missing packages are installed from the wheels in --wheels
#                (default .whl/ in the repository: fetch them beforehand where pip reaches a
#                registry, see README) into a private directory; still missing: exit 3 and the
#                pip download command that fetches them; no GPU: exit 10
#   2. models    dense random-init ResNet-20 and VGG-11 (CIFAR shape) pruned one shot to 99.5 %
#                (TT cores, data-free SynFlow) on the CPU, in the background while 3-4 run
#   3. tests     tests/test_triton.py and tests/test_cuda.py on the GPU (the Triton kernel vs
#                the float64 torch reference, max relative error <= 1e-4; CUDA fine-tune, bench
#                and export)
#   4. finetune  the sample LeNet-300-100 pruned to 99.5 %, 2 epochs on the GPU, masks checked
#   5. bench     tedepr bench --device cuda for LeNet-300-100, ResNet-20, VGG-11 at batches
#                1, 32, 256 (dense torch, torch chain, Triton, onnxruntime where it has CUDA)
#   6. report    DIR/gpu_check.json and DIR/gpu_check.md (per model and batch: dense torch,
#                tedepr/Triton, speed-up, the Triton engine's max relative error), with
#                gpu_check.log and the three bench JSONs beside them
# DIR defaults to $OUT, else a new /tmp directory; work files go to /tmp, nothing into the
# repository. Every step is time-boxed and the whole run ends within --budget seconds
# (default 450: under 8 minutes with the report). Exit 0 when everything passed, 1 when
# a step failed (the report says which), 3 a package is missing, 10 no GPU.
# --cpu-smoke runs the same steps on the CPU at toy sizes (Triton in its interpreter): the
# test suite runs it (tests/test_gpu_check.py).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUTDIR=${OUT:-}
PY=${PYTHON:-python3}
WHEELS=$REPO/.whl
BUDGET=450
SMOKE=0
while [ $# -gt 0 ]; do
  case $1 in
    --out) OUTDIR=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --cpu-smoke) SMOKE=1; shift ;;
    -h|--help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
abs() { case $1 in /*) echo "$1" ;; */*) echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")" ;; *) echo "$1" ;; esac; }
PY=$(abs "$PY")  # a relative path (.venv/bin/python) must survive the cd below
WHEELS=$(abs "$WHEELS")
[ -n "$OUTDIR" ] || OUTDIR=$(mktemp -d /tmp/tedepr-gpu-check-XXXXXX)
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d /tmp/tedepr-gpu-work-XXXXXX)
LOG=$OUTDIR/gpu_check.log
: > "$LOG"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export TEDEPR_CACHE_DIR=$WORK/kernel-cache
cd "$WORK" || exit 2
START=$(date +%s)
CHECK=("$PY" "$REPO/benchmarks/gpu_check.py")
TEDEPR=("$PY" -m tedepr_cli)
SAMPLE=$REPO/samples

# step NAME LIMIT_S [--stdout FILE] CMD...: run CMD time-boxed (LIMIT_S, cut to what is
# left of --budget); its output (stdout: FILE if given) to the log, its status to steps.jsonl
step() {
  local name=$1 cap=$2 left t0 rc out=$LOG
  shift 2
  if [ "$1" = --stdout ]; then out=$2; shift 2; fi
  left=$(( BUDGET - ($(date +%s) - START) ))
  [ "$cap" -gt "$left" ] && cap=$left
  if [ "$cap" -le 0 ]; then
    echo "{\"step\": \"$name\", \"rc\": 124, \"seconds\": 0, \"cap\": 0}" >> "$WORK/steps.jsonl"
    echo "== $name: skipped, no time left" | tee -a "$LOG"
    return 124
  fi
  echo "== $name (at most $cap s)" | tee -a "$LOG"
  t0=$(date +%s)
  timeout -k 5 "$cap" "$@" >> "$out" 2>> "$LOG"
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 )), \"cap\": $cap}" >> "$WORK/steps.jsonl"
  echo "   $name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
  return $rc
}

finish() {
  "${CHECK[@]}" report "$WORK" "$OUTDIR" > /dev/null 2>> "$LOG"
  local rc=$?
  for f in "$WORK"/bench-*.json; do [ -f "$f" ] && cp "$f" "$OUTDIR/"; done
  echo "gpu_check: report in $OUTDIR/gpu_check.md ($(( $(date +%s) - START )) s)" | tee -a "$LOG"
  exit "${1:-$rc}"
}

# ---- 1. env (and the carried wheels)
smoke_flag=()
[ "$SMOKE" = 1 ] && smoke_flag=(--cpu-smoke)
"${CHECK[@]}" env "${smoke_flag[@]}" > "$WORK/env.json" 2> "$WORK/env.err"
rc=$?
if [ "$rc" = 3 ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
  step install 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$WORK/site" "$WHEELS"/*.whl
  export PYTHONPATH=$PYTHONPATH:$WORK/site
  "${CHECK[@]}" env "${smoke_flag[@]}" > "$WORK/env.json" 2> "$WORK/env.err"
  rc=$?
fi
cat "$WORK/env.err" | tee -a "$LOG" >&2
echo "{\"step\": \"env\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - START )), \"cap\": null}" >> "$WORK/steps.jsonl"
[ "$rc" = 0 ] || finish "$rc"

if [ "$SMOKE" = 1 ]; then  # the same steps at toy sizes, on the CPU, Triton interpreted
  export TRITON_INTERPRET=1
  DEVICE=cpu SPARSITY=0.9 THREADS=1
  RESNET='{"in_channels": 1, "input_size": 8, "width": 0.25}'
  VGG='{"in_channels": 1, "input_size": 32, "width": 0.0625}'
  TESTS=("$REPO/tests/test_triton.py" -k "kernel_matches_the_float64_torch_reference and sparse")
  FT=(--epochs 2 --limit-train 256 --batch-size 64)
  BENCH=(--engines dense-torch,chain-torch,triton --batch 1,2 --iters 1 --warmup 0 --no-memory)
else
  DEVICE=cuda SPARSITY=0.995 THREADS=8
  RESNET='{}' VGG='{}'
  TESTS=("$REPO/tests/test_triton.py" "$REPO/tests/test_cuda.py")
  FT=(--epochs 2)
  BENCH=(--batch 1,32,256 --iters 50 --warmup 10)
fi

# ---- 2. models, in the background (CPU) while the GPU runs the tests and the fine-tune
export PY REPO RESNET VGG SPARSITY THREADS
step models 180 bash -c '
  "$PY" "$REPO/benchmarks/gpu_check.py" checkpoint resnet20 "$RESNET" resnet20.pt &&
  "$PY" "$REPO/benchmarks/gpu_check.py" checkpoint vgg11 "$VGG" vgg11.pt &&
  "$PY" -m tedepr_cli prune resnet20.pt --arch resnet20 --arch-kwargs "$RESNET" --sparsity "$SPARSITY" \
    --threads "$THREADS" -o resnet20-pruned -q &&
  "$PY" -m tedepr_cli prune vgg11.pt --arch vgg11 --arch-kwargs "$VGG" --sparsity "$SPARSITY" \
    --threads "$THREADS" -o vgg11-pruned -q' &
models_pid=$!

# ---- 3. the Triton kernels' correctness (and the CUDA paths) on the device
step tests 180 "$PY" -m pytest -q -p no:cacheprovider -rs --junitxml "$WORK/pytest.xml" "${TESTS[@]}"

# ---- 4. a short fine-tune of the sample on the device, masks checked
step prune-sample 60 "${TEDEPR[@]}" prune "$SAMPLE/lenet300.pt" --arch lenet300 --sparsity 0.995 \
  --data "$SAMPLE/mnist5k.npz" -o lenet300-pruned -q
step finetune 90 --stdout finetune.json "${TEDEPR[@]}" finetune lenet300-pruned --data "$SAMPLE/mnist5k.npz" \
  --device "$DEVICE" "${FT[@]}" -o lenet300-ft --json
step masks 30 --stdout masks.json "${CHECK[@]}" masks lenet300-ft

# ---- 5. bench on the device
wait "$models_pid"
lenet=lenet300-ft/best
[ -e "$lenet" ] || lenet=lenet300-pruned
step bench-lenet300 60 "${TEDEPR[@]}" bench "$lenet" --baseline "$SAMPLE/lenet300.pt" --device "$DEVICE" \
  "${BENCH[@]}" --json-out bench-lenet300.json
step bench-resnet20 80 "${TEDEPR[@]}" bench resnet20-pruned --device "$DEVICE" "${BENCH[@]}" \
  --json-out bench-resnet20.json
step bench-vgg11 80 "${TEDEPR[@]}" bench vgg11-pruned --device "$DEVICE" "${BENCH[@]}" \
  --json-out bench-vgg11.json

# ---- 6. report
finish
