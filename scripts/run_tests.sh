#!/usr/bin/env bash
# The whole test suite, on a fresh machine: sets up .venv and the build (skipped when done), runs the
# static CUDA checks, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# Register spills, stack frames and 128-bit accesses of the CUDA kernels (sm_80, sm_90), no GPU needed.
.venv/bin/python scripts/check_cuda_static.py
exec .venv/bin/python -m pytest "$@"
