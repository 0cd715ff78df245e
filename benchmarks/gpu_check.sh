#!/usr/bin/env bash
# The GPU checks of the project in one script (docs/development.md, docs/paper.md): what a
# session with a GPU runs, as one command, and what it reports. Under 8 minutes on one H100
# (planned: CUDA tests ~1 min, train_throughput ~1 min, paper_cost ~3 min with the 1-epoch run,
# the random-weight paper run ~2 min).
#
#   benchmarks/gpu_check.sh [OUT_DIR]             # on a GPU machine (default OUT_DIR: gpu_check_out)
#   DEVICE=cpu benchmarks/gpu_check.sh /tmp/out   # the same steps on the CPU, smaller (a dry run here)
#
# Steps, each printed and its output kept in OUT_DIR/<step>.log; figures in OUT_DIR/figures.txt
# (and paper_cost.json):
#   1. every CUDA test: tests/*/test_cuda.py with SPARC_TEST_DEVICE=cuda (on the CPU: their
#      portable-kernel comparison);
#   2. benchmarks/train_throughput.py --device cuda --quick: the training step against its floor;
#   3. benchmarks/paper_cost.py --device cuda --epoch-rows 1700000: the paper streams' extraction at
#      their real size (random weights), the training step, encode and evaluate, one training epoch
#      on synthetic features of the paper's size (1.7M x 1024/768/768), and the projected paper run;
#   4. tests/test_paper_random.py: the paper setting end to end with random weights on the local
#      Open Images fixture, extraction of the three ViT-L streams on the GPU (extract.device auto).
# The script goes on after a failed step and exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
DEVICE=${DEVICE:-cuda}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"
FIG="$OUT/figures.txt"
: >"$FIG"
export PYTHONUNBUFFERED=1
failed=()

# step NAME COMMAND...: run it, keep its output in $OUT/NAME.log, print its wall time
step() {
  local name=$1
  shift
  echo "=== $name: $*" | tee -a "$FIG"
  local start=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then
    echo "--- $name: ok in $((SECONDS - start)) s" | tee -a "$FIG"
  else
    echo "--- $name: FAILED (status $?) after $((SECONDS - start)) s; see $OUT/$name.log" | tee -a "$FIG"
    failed+=("$name")
  fi
}

{
  echo "gpu_check on $(hostname), $(date -u +%FT%TZ), device $DEVICE, git $(git rev-parse --short HEAD 2>/dev/null)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} | tee -a "$FIG"

if [ "$DEVICE" = cuda ]; then
  EPOCH_ROWS=1700000 WORKERS=12 SIZES=()
else  # the CPU stand-in: the same code paths, sizes a 2-core machine runs in minutes
  EPOCH_ROWS=20000 WORKERS=1 SIZES=(--train-steps 8 --evaluate-rows 1000 2000 --prepared-rows 20000 40000)
fi

step cuda_tests env SPARC_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider \
  tests/model/test_cuda.py tests/train/test_cuda.py tests/evaluate/test_cuda.py
tail -n 3 "$OUT/cuda_tests.log" | tee -a "$FIG"

step train_throughput "$PY" benchmarks/train_throughput.py --device "$DEVICE" --quick
grep -E "^ *(sparse|dense|floor) |floor|speed-up" "$OUT/train_throughput.log" | tee -a "$FIG"

step paper_cost "$PY" benchmarks/paper_cost.py --device "$DEVICE" --workers "$WORKERS" \
  --epoch-rows "$EPOCH_ROWS" --json "$OUT/paper_cost.json" "${SIZES[@]}"
sed -n '/^extract@dino:/,$p' "$OUT/paper_cost.log" | tee -a "$FIG"

step paper_random "$PY" -m pytest -q -p no:cacheprovider tests/test_paper_random.py
tail -n 3 "$OUT/paper_random.log" | tee -a "$FIG"

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED: ${failed[*]}" | tee -a "$FIG"
  exit 1
fi
echo "gpu_check: all steps passed; figures in $FIG" | tee -a "$FIG"
