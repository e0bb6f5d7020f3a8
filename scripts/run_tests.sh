#!/usr/bin/env bash
# The whole test suite, on a fresh machine: sets up .venv and the build (skipped when done), runs the
# static CUDA checks, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# Without a GPU the CUDA kernels only need to build and link here (the emulated build runs their device
# code; scripts/check_cuda_static.py compiles them for sm_80 and sm_90 with ptxas checks, and
# `--arch all` for the whole default list): one architecture keeps the build short.
if ! command -v nvidia-smi > /dev/null 2>&1; then export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0}; fi
bash scripts/setup_env.sh
# Register spills, stack frames and 128-bit accesses of the CUDA kernels (sm_80, sm_90), no GPU needed.
.venv/bin/python scripts/check_cuda_static.py
exec .venv/bin/python -m pytest "$@"
