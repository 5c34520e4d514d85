#!/usr/bin/env bash
# Make a working pale_mm environment in ./.venv on a fresh machine (Python 3.11, x86_64).
#   bash tools/setup_env.sh
# Idempotent: a second run on a ready machine only checks the imports (seconds).
# The one slow step is building mmcv 2.1.0 with ops from the PyPI sdist (77 C++ files;
# see the README for the measured time). On a machine with an NVIDIA GPU it also builds
# mmcv's CUDA ops (58 .cu files) for the GPUs present, with the CUDA toolkit matching
# torch's CUDA version; without a usable toolkit it stops and says what to install
# (PALE_MM_MMCV_CPU_ONLY=1 builds without CUDA ops instead). See docs/setup.md.
# The built wheel is cached in ${PALE_MM_CACHE:-~/.cache/pale_mm}/wheels keyed by mmcv,
# torch and Python versions and cpu or the CUDA version and GPU architectures (e.g.
# mmcv-2.1.0-torch2.14.1-cp311-cu130-sm90), so it is built once per machine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PALE_MM_VENV:-$ROOT/.venv}"
CACHE="${PALE_MM_CACHE:-$HOME/.cache/pale_mm}"
PY="${PYTHON:-python3}"
TORCH_VER=2.14.1
TV_VER=0.29.1
MMCV_VER=2.1.0

say() { printf '[setup_env %(%H:%M:%S)T] %s\n' -1 "$*"; }

# Everything the environment must satisfy; the stamp records it so reruns are cheap.
STAMP_KEY="$(cat "$ROOT/tools/setup_env.sh" "$ROOT/tools/build_mmcv.sh" "$ROOT/tools/cuda_env.py" "$ROOT/setup.py" | sha256sum | cut -c1-16)"
# GPU detection and cache keys (tools/cuda_env.py, run by the venv's Python)
CUDA_ENV=("$VENV/bin/python" "$ROOT/tools/cuda_env.py")
STAMP="$VENV/.pale_mm_ready"

check_imports() {
  "$VENV/bin/python" - "$ROOT/tools" <<'PYEOF'
import sys
import warnings
warnings.filterwarnings('ignore')
import torch, torchvision, mmcv, mmengine, mmdet, mmseg, timm, numpy, onnx, onnxruntime
import onnxscript, openvino
import xdist  # noqa: F401  (tools/run_tests.sh spreads the tests over the cores)
from mmcv.ops import nms, RoIAlign  # noqa: F401  (compiled ops present)
import pale_mm  # noqa: F401
assert numpy.__version__.startswith('1.'), numpy.__version__
print(f'torch {torch.__version__}, mmcv {mmcv.__version__}, mmengine {mmengine.__version__}, '
      f'mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, timm {timm.__version__}, '
      f'numpy {numpy.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, '
      f'onnxscript {onnxscript.__version__}, openvino {openvino.__version__.split("-")[0]}')
# where torch sees a GPU: mmcv's nms and roi_align on CUDA tensors (nothing without a GPU)
sys.path.insert(0, sys.argv[1])
import cuda_env  # tools/cuda_env.py
sys.exit(cuda_env.check_ops())
PYEOF
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_KEY" ]] && check_imports 2>/dev/null; then
  say "environment in $VENV is ready (nothing to do)"
  exit 0
fi

# Room on disk, checked before anything is written: torch (a CUDA build from PyPI) and
# the rest fill about 6 GB of the venv, and mmcv's build about 1 GB under TMPDIR. A full
# disk otherwise shows up as pip's "[Errno 28] No space left on device" halfway through.
free_mb() {  # free MB on the disk that holds $1 (or the nearest folder above it)
  local dir="$1"
  while [[ ! -d "$dir" ]]; do dir="$(dirname "$dir")"; done
  df -Pm "$dir" | awk 'NR == 2 {print $4}'
}
need_space() {  # need_space DIR MB WHAT
  local free
  free="$(free_mb "$1")"
  if [[ "$free" =~ ^[0-9]+$ && "$free" -lt "$2" ]]; then
    say "ERROR: not enough disk space for $3: it needs about $2 MB free on the disk of $1," \
        "which has $free MB. Free some space, or point PALE_MM_VENV (the venv), TMPDIR (the" \
        "mmcv build) or PALE_MM_CACHE (the wheel cache) at a disk with room, and rerun." >&2
    exit 4
  fi
}
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  need_space "$VENV" 7000 "torch, torchvision and the rest of the venv"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
# pip here warns about every configured local index folder it does not find; hide that noise.
quiet() { "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
export PIP_DISABLE_PIP_VERSION_CHECK=1

CONSTRAINTS="$(mktemp)"
BG_PIDS=()
BG_LOGS=()
cleanup() {
  local pid
  # a background job (a subshell or python) and the processes it started (pip, ninja)
  for pid in "${BG_PIDS[@]}"; do
    pkill -TERM -P "$pid" 2>/dev/null || true
    kill "$pid" 2>/dev/null || true
  done
  rm -f "$CONSTRAINTS" "${BG_LOGS[@]}"
}
trap cleanup EXIT
cat > "$CONSTRAINTS" <<CEOF
numpy<2
setuptools>=77,<82
opencv-python<4.12
torch==$TORCH_VER
torchvision==$TV_VER
CEOF

say "installing torch $TORCH_VER, torchvision $TV_VER and build tools (about 1-2 minutes)"
quiet "${PIP[@]}" install -q -c "$CONSTRAINTS" "torch==$TORCH_VER" "torchvision==$TV_VER" \
  'setuptools>=77,<82' wheel ninja 'numpy<2'

# mmengine, mmdet, mmsegmentation, timm, onnx and the rest: none of them requires mmcv,
# so while mmcv compiles (CPU) they are downloaded and installed alongside (network).
install_rest() {
  # onnxscript: torch.onnx.export's default exporter (dynamo=True since torch 2.9) needs it;
  # openvino: the deploy tests run the exported models in it too (pip install .[deploy])
  quiet "${PIP[@]}" install -q -c "$CONSTRAINTS" 'mmengine==0.10.7' 'mmdet==3.3.0' 'mmsegmentation==1.2.2' \
    'timm>=1.0,<1.1' ftfy regex pytest 'pytest-xdist>=3.5' 'opencv-python<4.12' addict yapf pycocotools \
    'onnx==1.23.2' 'onnxruntime==1.32.0' 'onnxscript==0.7.2' 'openvino==2026.4.1'
  # mmcv's own runtime deps (it is installed with --no-deps)
  quiet "${PIP[@]}" install -q -c "$CONSTRAINTS" addict packaging Pillow pyyaml yapf
}
# pale_mm's fused CPU kernels (pale_mm/ops/kernels.py needs only torch): compiled once,
# cached under ~/.cache/torch_extensions; prints the build it made, or why none.
KERNELS_PY='
import importlib.util, os, sys, warnings
warnings.filterwarnings("ignore")
if os.environ.get("PALE_MM_FAST_PATHS", "1") == "0":
    sys.exit(print("fused CPU kernels: switched off (PALE_MM_FAST_PATHS=0): the reference ops run"))
spec = importlib.util.spec_from_file_location("pale_mm_kernels_build", sys.argv[1])
k = importlib.util.module_from_spec(spec)
spec.loader.exec_module(k)
isa = k.cpu_isa()
if isa is None:
    print("fused CPU kernels: not used here (no AVX2 or AVX-512): the reference ops run")
elif k.load() is None:
    sys.exit(f"fused CPU kernels: the {isa} build FAILED: the reference ops run")
else:
    print(f"fused CPU kernels: {isa} build ready")
'
build_kernels() { "$VENV/bin/python" -c "$KERNELS_PY" "$ROOT/pale_mm/ops/kernels.py"; }
# start_bg NAME CMD...: run CMD in the background, output to a log; wait_bg NAME waits.
declare -A BG_PID BG_LOG
start_bg() {
  local name="$1"; shift
  BG_LOG[$name]="$(mktemp)"; BG_LOGS+=("${BG_LOG[$name]}")
  "$@" >"${BG_LOG[$name]}" 2>&1 &
  BG_PID[$name]=$!; BG_PIDS+=($!)
}
wait_bg() {  # wait_bg NAME WHAT: 0 if it succeeded, else its log and exit 1
  local name="$1" what="$2"
  kill -0 "${BG_PID[$name]}" 2>/dev/null && say "waiting for $what to finish"
  if ! wait "${BG_PID[$name]}"; then
    cat "${BG_LOG[$name]}" >&2
    say "ERROR: $what failed (output above)" >&2
    exit 1
  fi
  grep -v 'is ignored: it is neither a file nor a directory' "${BG_LOG[$name]}" || true
}

PYTAG="$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')"
TORCH_INSTALLED="$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
# CPU or CUDA build: sets MMCV_BUILD (cpu|cuda), MMCV_KEY (cpu, or e.g. cu130-sm90),
# MMCV_CUDA_HOME, MMCV_ARCH_LIST, MMCV_CPATH and MMCV_MAX_JOBS, or stops (exit 3) with
# what is missing when a GPU is here but its CUDA ops cannot be built.
say "looking for NVIDIA GPUs and a CUDA toolkit"
PLAN="$("${CUDA_ENV[@]}" detect)" || exit $?
eval "$PLAN"
# The key names what decides the library: mmcv, torch and Python versions, and cpu or
# the CUDA version and GPU architectures. The build flags below change only the debug
# info and how fast the headers are read, not the code, so a wheel built by an older
# version of this script is reused as it is. Old keys had no cpu/CUDA suffix: their
# wheels are looked into and reused only for a CPU build (tools/cuda_env.py pick-wheel).
WHEEL_BASE="$CACHE/wheels/mmcv-$MMCV_VER-torch$TORCH_INSTALLED-$PYTAG"
WHEEL_DIR="$WHEEL_BASE-$MMCV_KEY"
mkdir -p "$WHEEL_DIR"

if "$VENV/bin/python" -c "import mmcv, mmcv.ops, sys; sys.exit(mmcv.__version__ != '$MMCV_VER')" 2>/dev/null \
   && [[ "$("${CUDA_ENV[@]}" kind installed)" == "$MMCV_BUILD" ]]; then
  say "mmcv $MMCV_VER with ops already installed ($MMCV_BUILD build)"
else
  WHEEL="$("${CUDA_ENV[@]}" pick-wheel --dir "$WHEEL_DIR" --old "$WHEEL_BASE" --kind "$MMCV_BUILD")"
  if [[ -z "$WHEEL" ]]; then
    need_space "${TMPDIR:-/tmp}" 1500 "building mmcv"
    # the one slow step (tools/build_mmcv.sh): the plan detected above, built with
    # this venv's torch, the wheel checked and put into WHEEL_DIR
    export MMCV_VER MMCV_BUILD MMCV_CUDA_HOME MMCV_ARCH_LIST MMCV_CPATH MMCV_MAX_JOBS
    # Meanwhile, in the background: the other packages (mostly download time), and, at
    # the lowest CPU priority (it takes the cores that the build leaves idle; its three
    # files at once need about 4.5 GB of memory), pale_mm's fused CPU kernels.
    say "meanwhile installing mmengine, mmdet, mmsegmentation, timm, onnx and the rest in the background"
    start_bg rest install_rest
    if (( $(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo 2>/dev/null || echo 0) >= 8000 )); then
      start_bg kernels nice -n 19 "$VENV/bin/python" -c "$KERNELS_PY" "$ROOT/pale_mm/ops/kernels.py"
    fi
    bash "$ROOT/tools/build_mmcv.sh" "$VENV/bin/python" "$WHEEL_DIR"
    WHEEL="$(cat "$WHEEL_DIR/last_built.txt")"
    say "mmcv wheel cached in $WHEEL_DIR"
  else
    say "using cached mmcv wheel $WHEEL"
  fi
  quiet "${PIP[@]}" install -q --no-deps --force-reinstall "$WHEEL"
fi

if [[ -n "${BG_PID[rest]:-}" ]]; then
  wait_bg rest "installing mmengine, mmdet, mmsegmentation, timm, onnx and the rest"
else
  say "installing mmengine, mmdet, mmsegmentation, timm, onnx, onnxruntime and the rest"
  install_rest
fi
say "installing pale_mm (editable)"
quiet "${PIP[@]}" install -q -c "$CONSTRAINTS" --no-build-isolation -e "$ROOT"

say "checking imports"
check_imports
# The fused CPU kernels, compiled now (about 40 s, cached under ~/.cache/torch_extensions;
# in the background during an mmcv build) rather than at the first forward pass; on
# CPUs without AVX2 or AVX-512 this reports that the reference ops are used. A kernel
# that cannot be built is a warning, not a failure.
if [[ -n "${BG_PID[kernels]:-}" ]]; then
  kill -0 "${BG_PID[kernels]}" 2>/dev/null && say "waiting for pale_mm's fused CPU kernels to compile"
  if wait "${BG_PID[kernels]}"; then
    say "$(tail -1 "${BG_LOG[kernels]}")"
  else
    cat "${BG_LOG[kernels]}" >&2
    say "WARNING: pale_mm's fused CPU kernels could not be built (output above): the reference ops run"
  fi
else
  say "building pale_mm's fused CPU kernels"
  build_kernels || say "WARNING: pale_mm's fused CPU kernels could not be built: the reference ops run"
fi
echo "$STAMP_KEY" > "$STAMP"
say "done: activate with 'source $VENV/bin/activate'"
