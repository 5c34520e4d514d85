#!/usr/bin/env bash
# Build mmcv with its compiled ops into a wheel, for the torch of a given Python: the
# slow step of tools/setup_env.sh, also run on its own where setup_env.sh cannot run
# (tools/analysis/gpu_check.sh build, on a GPU machine without network, from a carried sdist).
#   bash tools/build_mmcv.sh PYTHON DEST_DIR [SDIST]
# PYTHON     the interpreter whose torch the ops are built for (it needs setuptools,
#            and ninja on PATH for parallel jobs)
# DEST_DIR   where the checked wheel is copied; its path is written to
#            DEST_DIR/last_built.txt, the build log to DEST_DIR/build.log
# SDIST      mmcv-$MMCV_VER.tar.gz; without it, it is downloaded from PyPI
# CPU or CUDA build: the plan of `tools/cuda_env.py detect` (MMCV_BUILD, MMCV_CUDA_HOME,
# MMCV_ARCH_LIST, MMCV_CPATH, MMCV_MAX_JOBS), taken from the environment when the caller
# exported it (setup_env.sh does), else detected here with PYTHON. MMCV_VER: 2.1.0.
# MAX_JOBS: parallel compile jobs (default: the cores, capped by memory for nvcc).
# Exit status 1: the build failed or made the wrong kind of wheel (nothing is written
# to DEST_DIR but the log); 3: a GPU is here but its CUDA ops cannot be built (detect).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
(( $# >= 2 )) || { echo "usage: bash tools/build_mmcv.sh PYTHON DEST_DIR [SDIST]" >&2; exit 2; }
PY="$1"
# a path is made absolute (the build runs in the sdist's folder); a venv's python
# keeps its venv path, not its link's target
[[ "$PY" != */* ]] || PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
DEST="$2"
SDIST="${3:-}"
MMCV_VER="${MMCV_VER:-2.1.0}"
CUDA_ENV=("$PY" "$ROOT/tools/cuda_env.py")
PIP=("$PY" -m pip)
say() { printf '[build_mmcv %(%H:%M:%S)T] %s\n' -1 "$*"; }
quiet() { "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ -z "${MMCV_BUILD:-}" ]]; then
  say "looking for NVIDIA GPUs and a CUDA toolkit"
  PLAN="$("${CUDA_ENV[@]}" detect)" || exit $?
  eval "$PLAN"
fi
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
rm -f "$DEST/last_built.txt"
TORCH_INSTALLED="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"

# The compiler for mmcv's op files: c++ with torch's headers precompiled once. Every
# op file includes "pytorch_cpp_helper.hpp" (torch/types.h: most of a file's compile
# time), 63 of the 77 as their first line, and all 77 get it first through -include;
# GCC then loads <header>.gch from the header's directory instead of parsing it,
# provided it was made with the same flags. The first
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
# The op files get the header as their first include (-include): the 13 files under
# pytorch/ that include other headers first (<ATen/ATen.h>, <torch/script.h>, <queue>,
# ...) then use the precompiled header too; the header's include guard makes their own
# #include of it a no-op. Checked: the same machine code for each (docs/setup.md).
# Not pybind.cpp (<torch/extension.h> first): GCC then inlines pybind11's templates in
# another order (different, if equivalent, code) and it saves only 7 of its 60 s.
if [[ -n "$hdr" && " $* " == *" -c "* ]]; then
  for a in "$@"; do
    case "$a" in
      */pybind.cpp) ;;
      *.cpp|*.cc|*.cxx) [[ -f "$a" ]] && exec "$real" -include "$hdr" "$@" ;;
    esac
  done
fi
exec "$real" "$@"
WEOF
  chmod +x "$1"
}

BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
if [[ -n "$SDIST" ]]; then
  say "building mmcv $MMCV_VER with ops from $SDIST in $BUILD"
  cp "$SDIST" "$BUILD/mmcv-$MMCV_VER.tar.gz"
else
  say "building mmcv $MMCV_VER with ops from the PyPI sdist in $BUILD"
  quiet "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation -d "$BUILD" "mmcv==$MMCV_VER"
fi
tar -xzf "$BUILD/mmcv-$MMCV_VER.tar.gz" -C "$BUILD"
SRC="$BUILD/mmcv-$MMCV_VER"
# torch >= 2.10 headers need C++20; mmcv 2.1.0 hard-codes -std=c++17.
if "$PY" - <<'PYEOF'
import sys, torch
major, minor = (int(x) for x in torch.__version__.split('+')[0].split('.')[:2])
sys.exit(0 if (major, minor) >= (2, 10) else 1)
PYEOF
then
  say "torch $TORCH_INSTALLED needs C++20: patching mmcv's setup.py"
  sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
fi
write_pch_cxx "$BUILD/g++-pch"
LOG="$DEST/build.log"
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
  | tee "$LOG" | MAX_JOBS="$JOBS" PALE_MM_CUDA_FILES="$NCU" "$PY" -u "$ROOT/tools/build_progress.py"
if ! ls "$BUILD"/dist/mmcv-*.whl >/dev/null 2>&1; then
  say "mmcv build FAILED; see $LOG"; exit 1
fi
BUILT_WHEEL="$(ls "$BUILD"/dist/mmcv-*.whl)"
BUILT="$("${CUDA_ENV[@]}" kind "$BUILT_WHEEL")"
if [[ "$BUILT" != "$MMCV_BUILD" ]]; then
  say "mmcv build FAILED: a $MMCV_BUILD build made a wheel whose ops are '$BUILT' (tools/cuda_env.py kind); not kept (log: $LOG)"; exit 1
fi
if [[ "$MMCV_BUILD" == cuda ]] && ! "${CUDA_ENV[@]}" nvcc-flags "$LOG"; then
  say "mmcv build FAILED: nvcc compiled with debug info; not kept (log: $LOG)"; exit 1
fi
cp "$BUILT_WHEEL" "$DEST/"
echo "$DEST/$(basename "$BUILT_WHEEL")" > "$DEST/last_built.txt"
say "mmcv $MMCV_VER ($MMCV_BUILD ops) built in $SECONDS s: $(cat "$DEST/last_built.txt")"
