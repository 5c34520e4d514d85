#!/usr/bin/env bash
# Make a working pale_mm environment in ./.venv on a fresh machine (Python 3.11, x86_64).
#   bash tools/setup_env.sh
# Idempotent: a second run on a ready machine only checks the imports (seconds).
# The one slow step is building mmcv 2.1.0 with ops from the PyPI sdist (~15 min on
# 2 cores). The built wheel is cached in ${PALE_MM_CACHE:-~/.cache/pale_mm}/wheels
# keyed by mmcv, torch and Python versions, so it is built once per machine.
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
STAMP_KEY="$(cat "$ROOT/tools/setup_env.sh" "$ROOT/setup.py" | sha256sum | cut -c1-16)"
STAMP="$VENV/.pale_mm_ready"

check_imports() {
  "$VENV/bin/python" - <<'PYEOF'
import warnings
warnings.filterwarnings('ignore')
import torch, torchvision, mmcv, mmengine, mmdet, mmseg, timm, numpy
from mmcv.ops import nms, RoIAlign  # noqa: F401  (compiled ops present)
import pale_mm  # noqa: F401
assert numpy.__version__.startswith('1.'), numpy.__version__
print(f'torch {torch.__version__}, mmcv {mmcv.__version__}, mmengine {mmengine.__version__}, '
      f'mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, timm {timm.__version__}, '
      f'numpy {numpy.__version__}')
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
trap 'rm -f "$CONSTRAINTS"' EXIT
cat > "$CONSTRAINTS" <<CEOF
numpy<2
setuptools>=77,<82
opencv-python<4.12
torch==$TORCH_VER
torchvision==$TV_VER
CEOF

say "installing torch $TORCH_VER, torchvision $TV_VER and build tools (about 1 minute)"
quiet "${PIP[@]}" install -q -c "$CONSTRAINTS" "torch==$TORCH_VER" "torchvision==$TV_VER" \
  'setuptools>=77,<82' wheel ninja 'numpy<2'

PYTAG="$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')"
TORCH_INSTALLED="$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
WHEEL_DIR="$CACHE/wheels/mmcv-$MMCV_VER-torch$TORCH_INSTALLED-$PYTAG"
mkdir -p "$WHEEL_DIR"

if "$VENV/bin/python" -c "import mmcv, mmcv.ops, sys; sys.exit(mmcv.__version__ != '$MMCV_VER')" 2>/dev/null; then
  say "mmcv $MMCV_VER with ops already installed"
else
  if ! ls "$WHEEL_DIR"/mmcv-*.whl >/dev/null 2>&1; then
    BUILD="$(mktemp -d)"
    say "building mmcv $MMCV_VER with ops from the PyPI sdist in $BUILD (about 10-15 minutes on 2 cores)"
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
    LOG="$WHEEL_DIR/build.log"
    say "compiling (full log: $LOG); progress follows"
    # Show each compiled file as it goes so the long build is visibly progressing.
    ( cd "$SRC" && MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-2}" \
        "${PIP[@]}" wheel -v --no-deps --no-build-isolation -w "$BUILD/dist" . ) 2>&1 \
      | tee "$LOG" \
      | awk '
          /^ *\[[0-9]+\/[0-9]+\]/ { n=$1; f=$NF; for (i=1;i<=NF;i++) if ($i ~ /\.(cpp|cu|cc)$/) f=$i;
                                   sub(/.*\//, "", f); printf("  mmcv build %s %s\n", n, f); fflush(); next }
          /(g\+\+|gcc|c\+\+) .* -c / { for (i=1;i<=NF;i++) if ($i ~ /\.(cpp|cc)$/) { f=$i; sub(/.*\//, "", f); c++;
                                   printf("  mmcv build [%d] %s\n", c, f); fflush() } next }
          /error|Error/ { print; fflush() }'
    if ! ls "$BUILD"/dist/mmcv-*.whl >/dev/null 2>&1; then
      say "mmcv build FAILED; see $LOG"; exit 1
    fi
    cp "$BUILD"/dist/mmcv-*.whl "$WHEEL_DIR/"
    rm -rf "$BUILD"
    say "mmcv wheel cached in $WHEEL_DIR"
  else
    say "using cached mmcv wheel from $WHEEL_DIR"
  fi
  quiet "${PIP[@]}" install -q --no-deps "$WHEEL_DIR"/mmcv-*.whl
fi

say "installing mmengine, mmdet, mmsegmentation, timm and the rest"
quiet "${PIP[@]}" install -q -c "$CONSTRAINTS" 'mmengine==0.10.7' 'mmdet==3.3.0' 'mmsegmentation==1.2.2' \
  'timm>=1.0,<1.1' ftfy regex pytest 'opencv-python<4.12' addict yapf pycocotools
# mmcv's own runtime deps (it was installed with --no-deps)
quiet "${PIP[@]}" install -q -c "$CONSTRAINTS" addict packaging Pillow pyyaml yapf

say "installing pale_mm (editable)"
quiet "${PIP[@]}" install -q -c "$CONSTRAINTS" --no-build-isolation -e "$ROOT"

say "checking imports"
check_imports
# Compile the fused CPU attention kernel now (about 40 s, cached under
# ~/.cache/torch_extensions) rather than at the first forward pass; on CPUs without
# AVX-512 this reports that SDPA is used.
say "building pale_mm's CPU attention kernel"
"$VENV/bin/python" -c "from pale_mm.models import cpu_attention as c; \
print('fused CPU attention kernel:', 'ready' if c.cpu_attention_available() else 'not used on this CPU (SDPA)')"
echo "$STAMP_KEY" > "$STAMP"
say "done: activate with 'source $VENV/bin/activate'"
