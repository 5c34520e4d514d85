#!/usr/bin/env bash
# One-shot check of pale_mm's GPU path on one CUDA GPU (each part under a time limit;
# 12.5 minutes at most for the default parts, not yet run on a GPU):
#   bash tools/analysis/gpu_check.sh [OUT_DIR] [PART ...]
# PARTS (default: tests checks bench compile):
#   tests    the GPU path's own tests on CUDA tensors (tests/ops/test_pale_cuda.py:
#            kernel vs the dense oracle in fp32/fp16/bf16, PSAttention and the whole
#            backbone vs the reference, SyncBN, one compiled kernel for every size)
#   checks   tools/analysis/gpu_check.py correctness launches syncbn: Pale-T vs the
#            reference (fp32 with TF32 off, bf16) at 224, 97x130 and 512; kernels and
#            copies per block and per step; SyncBN-converted step time
#   bench    tools/analysis/benchmark.py --device cuda --amp bf16, Pale-T/S/B against
#            mmdet's Swin-T/S/B at 512x512 (batch 16) and 800x1216 (batch 4), with the
#            reference model (PALE_MM_FAST_PATHS=0) in the same interleaved run
#   compile  torch.compile(dynamic=True) of a Pale-T training step: compile time,
#            speed against eager, recompilations over five input sizes
#   siblings the benchmark for LIT-S/ScalableViT-S (vs Swin-T) and LIT-B/ScalableViT-B
#            (vs Swin-B) at the same sizes
# Each part runs under a time limit, writes its log and JSON to OUT_DIR, and the last
# step prints one table of everything that ran (OUT_DIR/table.md).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT_DIR="${1:-work_dirs/gpu_check}"
shift || true
PARTS=("$@")
(( ${#PARTS[@]} )) || PARTS=(tests checks bench compile)
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true

run() {  # run NAME LIMIT_S CMD...: the command's output goes to OUT_DIR/NAME.log
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  echo "[gpu_check] $name: exit $rc after $((SECONDS - t0)) s (limit $limit s)"
  tail -n 4 "$OUT_DIR/$name.log"
}

bench() {  # bench NAME MODELS...: 512x512 batch 16 and 800x1216 batch 4
  local name=$1
  shift
  run "$name-512" 150 "$PY" tools/analysis/benchmark.py --device cuda --amp bf16 \
    --models "$@" --res 512 --batch 16 --reps 10 --sections backbones --no-madds \
    --out "$OUT_DIR/$name-512"
  run "$name-800" 150 "$PY" tools/analysis/benchmark.py --device cuda --amp bf16 \
    --models "$@" --res 800x1216 --batch 4 --reps 10 --sections backbones --no-madds \
    --out "$OUT_DIR/$name-800"
}

for part in "${PARTS[@]}"; do
  case "$part" in
    tests) run tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/ops/test_pale_cuda.py ;;
    checks) run checks 150 "$PY" tools/analysis/gpu_check.py correctness launches syncbn \
              --out "$OUT_DIR" ;;
    bench) bench bench pale:tiny pale:small pale:base ;;
    compile) run compile 150 "$PY" tools/analysis/gpu_check.py compile --out "$OUT_DIR" ;;
    siblings) bench bench-siblings lit:s scalablevit:s lit:b scalablevit:b ;;
    *) echo "gpu_check.sh: unknown part $part" >&2; exit 2 ;;
  esac
done
"$PY" tools/analysis/gpu_check.py table --out "$OUT_DIR"
