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
# What a GPU user runs end to end (tools/analysis/gpu_e2e.py; docs/setup.md):
#   build    mmcv 2.1.0 with its CUDA ops for the GPUs here (tools/build_mmcv.sh, the
#            build of tools/setup_env.sh), timed, for the torch of $PYTHON, installed
#            into its environment or into $PALE_MM_SITE (pip --target: an environment
#            made of wheels, on a machine without network); MMCV_SDIST: a local
#            mmcv-2.1.0.tar.gz instead of PyPI's
#   ops      mmcv's CUDA ops against its CPU ops (roi_align forward and backward, nms,
#            batched_nms)
#   demo     the README's demo configs through tools/train.py --amp (float16): the
#            demo's metrics against its floors, time per iteration, peak memory
#   detector whole Mask R-CNN training, Pale-T and mmdet's Swin-T, batch 2 at
#            800x1216, bf16 AMP: time per iteration, ratio, peak memory
# Each part runs under a time limit, writes its log and JSON to OUT_DIR, and the last
# step prints one table of everything that ran (OUT_DIR/table.md, and
# OUT_DIR/table-e2e.md for the end-to-end parts).
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
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true

run() {  # run NAME LIMIT_S CMD...: the command's output goes to OUT_DIR/NAME.log
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  echo "[gpu_check] $name: exit $rc after $((SECONDS - t0)) s (limit $limit s)"
  tail -n 4 "$OUT_DIR/$name.log"
  return $rc
}

build() {  # mmcv with CUDA ops: built, installed, its ops checked; OUT_DIR/build.json
  local t0=$SECONDS rc wheel=""
  run build 420 bash tools/build_mmcv.sh "$PY" "$OUT_DIR/wheel" ${MMCV_SDIST:+"$MMCV_SDIST"}
  rc=$?
  if (( rc == 0 )); then
    wheel="$(cat "$OUT_DIR/wheel/last_built.txt")"
    if [[ -n "${PALE_MM_SITE:-}" ]]; then
      "$PY" -m pip install -q --no-deps --no-index --upgrade --target "$PALE_MM_SITE" "$wheel"
    else
      "$PY" -m pip install -q --no-deps --no-index --force-reinstall "$wheel"
    fi
    rc=$?
    "$PY" tools/cuda_env.py check-ops >> "$OUT_DIR/build.log" 2>&1 || rc=$?
  fi
  printf '{"exit": %d, "seconds": %d, "wheel": "%s"}\n' "$rc" "$((SECONDS - t0))" \
    "$(basename "$wheel")" > "$OUT_DIR/build.json"
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
    build) build ;;
    ops) run ops 60 "$PY" tools/analysis/gpu_e2e.py ops --out "$OUT_DIR" ;;
    demo) run demo 300 "$PY" tools/analysis/gpu_e2e.py demo --out "$OUT_DIR" ;;
    detector) run detector 240 "$PY" tools/analysis/gpu_e2e.py detector --out "$OUT_DIR" ;;
    *) echo "gpu_check.sh: unknown part $part" >&2; exit 2 ;;
  esac
done
"$PY" tools/analysis/gpu_check.py table --out "$OUT_DIR"
"$PY" tools/analysis/gpu_e2e.py table --out "$OUT_DIR"
