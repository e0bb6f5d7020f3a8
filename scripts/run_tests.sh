#!/usr/bin/env bash
# The whole test suite, on a fresh machine: sets up .venv and the build (skipped when done), runs the
# static CUDA checks, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if [ -x scripts/check_cuda_static.sh ]; then bash scripts/check_cuda_static.sh; fi
exec .venv/bin/python -m pytest "$@"
