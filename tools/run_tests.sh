#!/usr/bin/env bash
# The full test suite on a fresh machine: sets up .venv (tools/setup_env.sh; the
# first run builds mmcv, ~15 min), then runs every test, slow end-to-end ones included.
#   bash tools/run_tests.sh [extra pytest args]
# For the quick suite only (skips tests marked slow): .venv/bin/python -m pytest
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup_env.sh
exec .venv/bin/python -m pytest -m 'slow or not slow' "$@" tests
