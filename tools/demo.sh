#!/usr/bin/env bash
# The README's main command: set up .venv if needed (tools/setup_env.sh), then run
# the bundled demo.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup_env.sh
exec .venv/bin/python tools/run_demo.py "$@"
