#!/usr/bin/env bash
# Speed benchmarks of docs/PERFORMANCE.md on one GPU, in under 8 minutes:
#   swin_tiny -> resnet18 and convnext_tiny -> deit_tiny at 224 px, batch 128:
#   `crossdistill bench` eager (with the teacher-cache variant) and with torch.compile (the first pair
#   with the cache variant: cached vs student-only with both compiled),
#   and the CIFAR-10-at-224 input pipeline alone (benchmarks/loader_bench.py).
# Results: one JSON per run in $RESULTS (default bench_results/), and a summary (summary.json, stdout).
#
# Usage (from the repository root):
#   benchmarks/gpu_bench.sh                       # the GPU run
#   CROSSDISTILL_BENCH_TINY=1 benchmarks/gpu_bench.sh   # seconds on CPU: tiny models, checks the script runs
# Env: PARTS (default "loader eager compile": which of the three to run), PYTHON (default python3, or .venv/bin/python when present), RESULTS, CROSSDISTILL_CIFAR10_TAR
# (the CIFAR-10 JPEG archive; default ../shared/data/cifar10_jpg.tar.gz, else build/bench_data/...;
# without one the loader runs on 50,000 synthetic 32x32 uint8 images, the same work per image).
set -u
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
RESULTS=${RESULTS:-bench_results}
mkdir -p "$RESULTS"

if [ -n "${CROSSDISTILL_BENCH_TINY:-}" ]; then
  PAIRS="test_vit:test_resnet test_resnet:test_vit"
  COMPILE_PAIRS="test_resnet:test_vit"  # inductor on CPU takes minutes: one pair checks the command
  COMMON="--img-size 32 --batch-size 8 --steps 2 --warmup 1 --device cpu --num-classes 10 --max-seconds 30"
  COMPILE_COMMON="$COMMON"
  LOADER="--synthetic 512 --img-size 32 --batch-size 8 --batches 10 --warmup 1 --workers 0 --device cpu --device-augment"
  LIMIT=300; COMPILE_LIMIT=300
else
  PAIRS="swin_tiny_patch4_window7_224:resnet18 convnext_tiny:deit_tiny_patch16_224"
  COMPILE_PAIRS=${COMPILE_PAIRS:-$PAIRS}
  CACHED_COMPILE_PAIR=swin_tiny_patch4_window7_224:resnet18  # missed 0.9x cached/student-only eager (launch-bound)
  COMMON="--img-size 224 --batch-size 128 --steps 25 --warmup 5 --block 4 --max-seconds 20"
  COMPILE_COMMON="--img-size 224 --batch-size 128 --steps 15 --warmup 3 --block 4 --max-seconds 15"
  TAR=${CROSSDISTILL_CIFAR10_TAR:-}
  for candidate in "$TAR" ../shared/data/cifar10_jpg.tar.gz build/bench_data/cifar10_jpg.tar.gz; do
    if [ -n "$candidate" ] && [ -f "$candidate" ]; then TAR=$candidate; break; fi
  done
  if [ -n "$TAR" ] && [ -f "$TAR" ]; then DATA="--root $TAR"; else DATA="--synthetic 50000"; fi
  WORKERS=$($PYTHON -c "import os; print(min(12, max(1, (os.cpu_count() or 2) - 2)))")
  LOADER="$DATA --img-size 224 --batch-size 128 --batches 100 --warmup 10 --workers $WORKERS --uint8 --device-augment"
  LIMIT=90; COMPILE_LIMIT=200
fi

run() {  # name, limit (s), command...: run with a time limit, keep its JSON, never stop the script
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" >&2
  local start=$SECONDS
  timeout "$limit" "$@" > "$RESULTS/$name.json" 2> "$RESULTS/$name.log"
  local rc=$?
  echo "   rc $rc, $((SECONDS - start))s" >&2
  [ $rc -eq 0 ] || tail -5 "$RESULTS/$name.log" >&2
}

$PYTHON -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" >&2

PARTS=${PARTS:-loader eager compile}
has() { case " $PARTS " in *" $1 "*) return 0;; *) return 1;; esac; }

has loader && run loader "$LIMIT" $PYTHON benchmarks/loader_bench.py $LOADER --json
has eager && for pair in $PAIRS; do
  teacher=${pair%%:*}; student=${pair##*:}
  run "eager-$teacher-$student" "$LIMIT" $PYTHON -m crossdistill bench --teacher "$teacher" --student "$student" $COMMON --json
done
has compile && for pair in $COMPILE_PAIRS; do
  teacher=${pair%%:*}; student=${pair##*:}
  run "compile-$teacher-$student" "$COMPILE_LIMIT" $PYTHON -m crossdistill bench --teacher "$teacher" --student "$student" \
    $COMPILE_COMMON $([ "$pair" = "${CACHED_COMPILE_PAIR:-}" ] || echo --no-precomputed) --compile --json
done

$PYTHON benchmarks/summarize.py "$RESULTS" | tee "$RESULTS/summary.txt"
