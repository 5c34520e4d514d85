#!/usr/bin/env bash
# The full test suite on a fresh machine (what CI runs): sets up .venv
# (tools/setup_env.sh; the first run builds mmcv), then runs pytest twice:
#   1. every test, slow end-to-end ones included, with pale_mm's fast paths on
#      (the default: oneDNN linear, fused CPU kernels where the CPU has AVX-512);
#   2. the tests of the models' forward and backward paths again with every fast
#      path off (PALE_MM_FAST_PATHS=0), so the reference path is tested on every CPU.
# Both runs always run; the exit status is nonzero if either failed.
#   bash tools/run_tests.sh [extra pytest args, passed to both runs]
# For the quick suite only (skips tests marked slow): .venv/bin/python -m pytest
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup_env.sh || exit $?

# The tests whose subject is a model's computation (outputs, gradients, buffers),
# the ones a fast path could change. The kernels' own tests (test_cpu_*.py) and the
# end-to-end ones are not repeated.
REFERENCE_TESTS=(
  tests/test_backbone.py
  tests/test_backbone_interface.py
  tests/test_pale_attention.py
  tests/test_layers.py
  tests/test_lit.py
  tests/test_scalablevit.py
  tests/test_timm.py
)
ref_tests=()
for t in "${REFERENCE_TESTS[@]}"; do [[ -e "$t" ]] && ref_tests+=("$t"); done

t0=$SECONDS
echo "== run 1/2: all tests, fast paths on"
.venv/bin/python -m pytest -m 'slow or not slow' --durations=30 "$@" tests
rc1=$?
t1=$SECONDS
echo "== run 2/2: the model tests with every fast path off (PALE_MM_FAST_PATHS=0)"
PALE_MM_FAST_PATHS=0 PALE_MM_CPU_ATTENTION=0 \
  .venv/bin/python -m pytest -m 'slow or not slow' --durations=10 "$@" "${ref_tests[@]}"
rc2=$?
# extra arguments (-k ...) may leave nothing to run here: not a failure
(( rc2 == 5 && $# > 0 )) && rc2=0
t2=$SECONDS
status() { case "$1" in 0) echo passed ;; 5) echo "no tests collected" ;; *) echo "FAILED (pytest exit $1)" ;; esac; }
echo "== run 1 (fast paths on): $(status $rc1) in $(( (t1 - t0) / 60 ))m$(( (t1 - t0) % 60 ))s;" \
     "run 2 (fast paths off): $(status $rc2) in $(( (t2 - t1) / 60 ))m$(( (t2 - t1) % 60 ))s"
if (( rc1 != 0 )); then exit "$rc1"; fi
exit "$rc2"
