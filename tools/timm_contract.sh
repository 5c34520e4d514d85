#!/usr/bin/env bash
# timm's model contract: run timm's own tests/test_models.py, from the sdist of the
# installed timm version, on pale_mm's timm models.
#
#   bash tools/timm_contract.sh                       # pale_tiny lit_ti lit_s scalablevit_s
#   TIMM_CONTRACT_MODELS="lit_m scalablevit_b" bash tools/timm_contract.sh
#   bash tools/timm_contract.sh -x -k fx              # extra pytest arguments
#
# The test file is downloaded once per timm version (pip download of the sdist) and
# cached in ~/.cache/pale_mm/timm-tests/<version>/. It runs unchanged except for two
# registrations timm makes in that file for its own model families, which ours need too:
#   - FEAT_INTER_FILTERS += ['timm_models']: the module of our models (they implement
#     forward_intermediates / prune_intermediate_layers), so the intermediates and
#     pruning tests cover them;
#   - NON_STD_FILTERS += ['lit_ti']: LIT-Ti is a class-token model (forward_features
#     returns a token sequence), which timm tests as "non-standard", like ViT / DeiT.
# A conftest imports pale_mm.timm_models (registers the models) and limits timm's
# list_models() to the selected models, so collection does not enumerate all of
# timm's ~1600 models; tests that name timm's own models are deselected by -k.
# TorchScript tests are deselected: TorchScript is not supported (docs/pretraining.md).
# test_prune_intermediate_layers_contract (no marker; timm keeps it out of its own CI as
# slow) runs only with TIMM_CONTRACT_FULL=1: it takes ~2.5 min for the four models on 2
# cores; tests/test_timm_models.py checks pruning more cheaply. The tests that download
# pretrained weights (LIT's official release, from GitHub) run only with
# TIMM_CONTRACT_DOWNLOAD=1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
MODELS="${TIMM_CONTRACT_MODELS:-pale_tiny lit_ti lit_s scalablevit_s}"
VERSION="$("$PY" -c 'import timm; print(timm.__version__)')"
CACHE="${PALE_MM_CACHE:-$HOME/.cache/pale_mm}/timm-tests/$VERSION"
SRC="$CACHE/test_models.py"

if [ ! -s "$SRC" ]; then
  echo "[timm_contract] fetching tests/test_models.py of timm $VERSION (sdist)"
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  "$PY" -m pip download --quiet --no-deps --no-binary :all: "timm==$VERSION" -d "$TMP"
  mkdir -p "$CACHE"
  tar -xzf "$TMP"/timm-"$VERSION".tar.gz -C "$TMP" "timm-$VERSION/tests/test_models.py"
  mv "$TMP/timm-$VERSION/tests/test_models.py" "$SRC.tmp" && mv "$SRC.tmp" "$SRC"
fi

RUN="$CACHE/run"
mkdir -p "$RUN"
"$PY" - "$SRC" "$RUN/test_models.py" <<'EOF'
import sys
src, dst = sys.argv[1:]
text = open(src).read()
edits = [
    ('FEAT_INTER_FILTERS = [\n', "FEAT_INTER_FILTERS = [\n    'timm_models',  # pale_mm\n"),
    ('NON_STD_FILTERS = [\n', "NON_STD_FILTERS = [\n    'lit_ti',  # pale_mm: class-token model\n"),
]
for old, new in edits:
    if text.count(old) != 1:
        sys.exit(f'timm_contract: cannot find {old.strip()!r} in {src}; update the edits '
                 f'in tools/timm_contract.sh for this timm version')
    text = text.replace(old, new)
open(dst, 'w').write(text)
EOF
cat > "$RUN/conftest.py" <<'EOF'
import os

import timm

import pale_mm.timm_models  # noqa: F401  (registers the models)

_SELECTED = set(os.environ['TIMM_CONTRACT_MODELS'].split())
_list_models = timm.list_models


def _selected_models(*args, **kwargs):
    # names may carry a pretrained tag (lit_s.in1k) where timm lists them with tags
    return [m for m in _list_models(*args, **kwargs) if m.split('.')[0] in _SELECTED]


timm.list_models = _selected_models
EOF
cat > "$RUN/pytest.ini" <<'EOF'
[pytest]
addopts = -p no:cacheprovider
filterwarnings = ignore::DeprecationWarning
markers =
    base
    cfg
    cfg_nonstd
    forward
    backward
    features
    fxforward
    fxbackward
    torchscript
    timeout: per-test time limit (enforced only with pytest-timeout)
EOF

EXPR="$(echo $MODELS | sed 's/ / or /g')"
SLOW=" and not test_prune_intermediate_layers_contract"
if [ "${TIMM_CONTRACT_FULL:-0}" = 1 ]; then SLOW=""; fi
# timm's test_model_load_pretrained / test_model_features_pretrained download the
# official weights of the models that have a URL (LIT, from GitHub): only with
# TIMM_CONTRACT_DOWNLOAD=1 (tests/test_weights.py checks that path with a local server)
if [ "${TIMM_CONTRACT_DOWNLOAD:-0}" != 1 ]; then SLOW="$SLOW and not _pretrained"; fi
echo "[timm_contract] timm $VERSION, models: $MODELS"
cd "$RUN"
TIMM_CONTRACT_MODELS="$MODELS" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" \
  exec "$PY" -m pytest -c "$RUN/pytest.ini" --rootdir "$RUN" -q test_models.py \
  -k "($EXPR) and not torchscript$SLOW" "$@"
