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
STAMP_KEY="$(cat "$ROOT/tools/setup_env.sh" "$ROOT/tools/cuda_env.py" "$ROOT/setup.py" | sha256sum | cut -c1-16)"
# GPU detection and cache keys (tools/cuda_env.py, run by the venv's Python)
CUDA_ENV=("$VENV/bin/python" "$ROOT/tools/cuda_env.py")
STAMP="$VENV/.pale_mm_ready"

check_imports() {
  "$VENV/bin/python" - "$ROOT/tools" <<'PYEOF'
import sys
import warnings
warnings.filterwarnings('ignore')
import torch, torchvision, mmcv, mmengine, mmdet, mmseg, timm, numpy, onnx, onnxruntime
from mmcv.ops import nms, RoIAlign  # noqa: F401  (compiled ops present)
import pale_mm  # noqa: F401
assert numpy.__version__.startswith('1.'), numpy.__version__
print(f'torch {torch.__version__}, mmcv {mmcv.__version__}, mmengine {mmengine.__version__}, '
      f'mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, timm {timm.__version__}, '
      f'numpy {numpy.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}')
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

if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
# pip here warns about every configured local index folder it does not find; hide that noise.
quiet() { "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
export PIP_DISABLE_PIP_VERSION_CHECK=1

CONSTRAINTS="$(mktemp)"
BUILD=""
trap 'rm -f "$CONSTRAINTS"; [[ -z "$BUILD" ]] || rm -rf "$BUILD"' EXIT
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

# The compiler for mmcv's op files: c++ with torch's headers precompiled once. Every
# op file includes "pytorch_cpp_helper.hpp" (torch/types.h: most of a file's compile
# time), 63 of the 77 as their first line; GCC then loads <header>.gch from the header's
# directory instead of parsing it, provided it was made with the same flags. The first
# compile command makes the .gch from its own flags, so the flags match by
# construction. A precompiled header changes nothing in the generated code (checked:
# identical machine code); if making it fails, every file is compiled the ordinary way.
write_pch_cxx() {
  cat > "$1" <<'WEOF'
#!/usr/bin/env bash
real="${PALE_MM_REAL_CXX:-c++}"
hdr="${PALE_MM_PCH_HEADER:-}"
gch="$hdr.gch"
# No debug info: -g0 after Python's -g (the last -g option wins). Same machine code.
[[ " $* " == *" -c "* ]] && set -- "$@" -g0 -Winvalid-pch
# The first compile command makes the .gch; a parallel one that finds it being made
# compiles its file without it rather than wait.
if [[ -n "$hdr" && ! -e "$gch" && ! -e "$gch.failed" && " $* " == *" -c "* ]]; then
  exec 9>"$gch.lock"
  if flock -n 9 && [[ ! -e "$gch" && ! -e "$gch.failed" ]]; then
    args=(); skip=0
    for a in "$@"; do
      if (( skip )); then skip=0; continue; fi
      case "$a" in
        -MF|-o) skip=1 ;;
        -MMD|-c) ;;
        *.cpp|*.cc|*.cxx) [[ -f "$a" ]] || args+=("$a") ;;
        *) args+=("$a") ;;
      esac
    done
    if "$real" "${args[@]}" -x c++-header "$hdr" -o "$gch.tmp" >"$gch.log" 2>&1; then
      mv "$gch.tmp" "$gch"
    else
      touch "$gch.failed"
      echo "precompiled header failed (compiling without it): $(tail -3 "$gch.log")" >&2
    fi
  fi
  exec 9>&-
fi
exec "$real" "$@"
WEOF
  chmod +x "$1"
}

if "$VENV/bin/python" -c "import mmcv, mmcv.ops, sys; sys.exit(mmcv.__version__ != '$MMCV_VER')" 2>/dev/null \
   && [[ "$("${CUDA_ENV[@]}" kind installed)" == "$MMCV_BUILD" ]]; then
  say "mmcv $MMCV_VER with ops already installed ($MMCV_BUILD build)"
else
  WHEEL="$("${CUDA_ENV[@]}" pick-wheel --dir "$WHEEL_DIR" --old "$WHEEL_BASE" --kind "$MMCV_BUILD")"
  if [[ -z "$WHEEL" ]]; then
    BUILD="$(mktemp -d)"
    say "building mmcv $MMCV_VER with ops from the PyPI sdist in $BUILD"
    quiet "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation -d "$BUILD" "mmcv==$MMCV_VER"
    tar -xzf "$BUILD"/mmcv-$MMCV_VER.tar.gz -C "$BUILD"
    SRC="$BUILD/mmcv-$MMCV_VER"
    # torch >= 2.10 headers need C++20; mmcv 2.1.0 hard-codes -std=c++17.
    if "$VENV/bin/python" - <<'PYEOF'
import sys, torch
major, minor = (int(x) for x in torch.__version__.split('+')[0].split('.')[:2])
sys.exit(0 if (major, minor) >= (2, 10) else 1)
PYEOF
    then
      say "torch $TORCH_INSTALLED needs C++20: patching mmcv's setup.py"
      sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
    fi
    write_pch_cxx "$BUILD/g++-pch"
    LOG="$WHEEL_DIR/build.log"
    JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"
    # mmcv's setup.py builds its CUDA ops when FORCE_CUDA=1 or torch sees a GPU, and
    # takes nvcc from torch's CUDA_HOME: both are set here, so the build is the one
    # detected above. A CPU build hides the GPUs (PALE_MM_MMCV_CPU_ONLY=1 on a GPU machine).
    if [[ "$MMCV_BUILD" == cuda ]]; then
      # an nvcc job takes over 1 GB: no more jobs than memory allows, unless MAX_JOBS says
      if [[ -z "${MAX_JOBS:-}" && -n "$MMCV_MAX_JOBS" ]] && (( JOBS > MMCV_MAX_JOBS )); then
        JOBS="$MMCV_MAX_JOBS"
      fi
      NCU="$(ls "$SRC"/mmcv/ops/csrc/pytorch/cuda/*.cu | wc -l)"
      # CPATH: torch's CUDA library headers where the toolkit lacks them (an empty
      # entry would mean the current directory)
      INC="$(IFS=:; paths=($MMCV_CPATH ${CPATH:-}); echo "${paths[*]}")"
      MODE_ENV=(FORCE_CUDA=1 CUDA_HOME="$MMCV_CUDA_HOME" TORCH_CUDA_ARCH_LIST="$MMCV_ARCH_LIST" CPATH="$INC")
      say "compiling $JOBS files at a time: C++ files without debug info (-g0) and with torch's headers precompiled, $NCU CUDA files with nvcc for TORCH_CUDA_ARCH_LIST=$MMCV_ARCH_LIST (full log: $LOG); progress follows"
    else
      NCU=0
      MODE_ENV=(FORCE_CUDA=0 CUDA_VISIBLE_DEVICES=)
      say "compiling $JOBS files at a time, without debug info (-g0) and with torch's headers precompiled (full log: $LOG); progress follows"
    fi
    # The flags are Python's (-DNDEBUG -g -fwrapv -O3 -Wall), mmcv's and torch's, as
    # before, plus -g0 from the wrapper: debug info for torch's templates took half of
    # each file's compile time. (Not through CFLAGS: setuptools >= 72 lets CFLAGS
    # replace Python's flags, -O3 and -DNDEBUG included.) nvcc gets torch's and mmcv's
    # flags, which have no -g or -G (no debug info, host or device; checked below); its
    # host compiler is nvcc's own (gcc), not the wrapper, so no precompiled header there.
    ( cd "$SRC" && env "${MODE_ENV[@]}" MMCV_WITH_OPS=1 MAX_JOBS="$JOBS" \
        PALE_MM_REAL_CXX="${CXX:-c++}" CXX="$BUILD/g++-pch" \
        PALE_MM_PCH_HEADER="$SRC/mmcv/ops/csrc/common/pytorch_cpp_helper.hpp" \
        "${PIP[@]}" wheel -v --no-deps --no-build-isolation -w "$BUILD/dist" . ) 2>&1 \
      | tee "$LOG" | MAX_JOBS="$JOBS" PALE_MM_CUDA_FILES="$NCU" "$VENV/bin/python" -u "$ROOT/tools/build_progress.py"
    if ! ls "$BUILD"/dist/mmcv-*.whl >/dev/null 2>&1; then
      say "mmcv build FAILED; see $LOG"; exit 1
    fi
    BUILT_WHEEL="$(ls "$BUILD"/dist/mmcv-*.whl)"
    BUILT="$("${CUDA_ENV[@]}" kind "$BUILT_WHEEL")"
    if [[ "$BUILT" != "$MMCV_BUILD" ]]; then
      say "mmcv build FAILED: a $MMCV_BUILD build made a wheel whose ops are '$BUILT' (tools/cuda_env.py kind); not cached, not installed (log: $LOG)"; exit 1
    fi
    if [[ "$MMCV_BUILD" == cuda ]] && ! "${CUDA_ENV[@]}" nvcc-flags "$LOG"; then
      say "mmcv build FAILED: nvcc compiled with debug info; not cached, not installed (log: $LOG)"; exit 1
    fi
    cp "$BUILT_WHEEL" "$WHEEL_DIR/"
    WHEEL="$WHEEL_DIR/$(basename "$BUILT_WHEEL")"
    rm -rf "$BUILD"
    BUILD=""
    say "mmcv wheel cached in $WHEEL_DIR"
  else
    say "using cached mmcv wheel $WHEEL"
  fi
  quiet "${PIP[@]}" install -q --no-deps --force-reinstall "$WHEEL"
fi

say "installing mmengine, mmdet, mmsegmentation, timm, onnx, onnxruntime and the rest"
quiet "${PIP[@]}" install -q -c "$CONSTRAINTS" 'mmengine==0.10.7' 'mmdet==3.3.0' 'mmsegmentation==1.2.2' \
  'timm>=1.0,<1.1' ftfy regex pytest 'opencv-python<4.12' addict yapf pycocotools \
  'onnx==1.23.2' 'onnxruntime==1.32.0'
# mmcv's own runtime deps (it was installed with --no-deps)
quiet "${PIP[@]}" install -q -c "$CONSTRAINTS" addict packaging Pillow pyyaml yapf

say "installing pale_mm (editable)"
quiet "${PIP[@]}" install -q -c "$CONSTRAINTS" --no-build-isolation -e "$ROOT"

say "checking imports"
check_imports
# Compile the fused CPU kernels now (about 40 s, cached under ~/.cache/torch_extensions)
# rather than at the first forward pass; on CPUs without AVX2 or AVX-512 this reports that the
# reference ops are used. A kernel that cannot be built is a warning, not a failure.
say "building pale_mm's fused CPU kernels"
"$VENV/bin/python" - <<'PYEOF'
import importlib
for name in ('pale_mm.ops.attention', 'pale_mm.models.cpu_attention'):
    try:
        c = importlib.import_module(name)
        break
    except ImportError:
        c = None
if c is None:
    print('fused CPU kernels: no kernel module found (nothing to build)')
else:
    print('fused CPU kernels:', 'ready' if c.cpu_attention_available()
          else 'not used here (no AVX2 or AVX-512, or switched off): the reference ops run')
PYEOF
echo "$STAMP_KEY" > "$STAMP"
say "done: activate with 'source $VENV/bin/activate'"
