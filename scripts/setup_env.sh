#!/usr/bin/env bash
# Prepares everything the test suite and the benchmark need, on a fresh machine with Python 3 and pip:
#   .venv with requirements-dev.txt, then xent built in place (editable) with the CUDA kernels (when a
#   CUDA toolkit is present) and the test-only SIMT-emulator library (XENT_BUILD_EMULATOR=1).
# Each step is skipped when already done (stamps in .venv/ keyed by the hash of its inputs).
# Usage: source-free; run as `bash scripts/setup_env.sh`. Honours XENT_CPU_ONLY, TORCH_CUDA_ARCH_LIST.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV="$ROOT/.venv"

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi

hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
req_hash=$(hash_of requirements-dev.txt)
if [ "$(cat "$VENV/.xent-requirements" 2>/dev/null)" != "$req_hash" ]; then
  echo "[setup] installing requirements-dev.txt (torch 2.14.1: about a minute from the local mirror)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements-dev.txt
  echo "$req_hash" > "$VENV/.xent-requirements"
fi

# Rebuild when any source or build setting changes. The test command and the main command take the same
# settings, so one build serves both.
export XENT_BUILD_EMULATOR=${XENT_BUILD_EMULATOR:-1}
# Without a GPU the CUDA kernels only need to build and link here (the emulated build runs their device
# code; scripts/check_cuda_static.py compiles them for sm_80 and sm_90 with ptxas checks, and `--arch all`
# for the whole default list): one architecture keeps the build short. With a GPU, setup.py's default list.
if ! command -v nvidia-smi > /dev/null 2>&1; then export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0}; fi
build_inputs=$(git ls-files -co --exclude-standard csrc tests/simt setup.py 2>/dev/null || find csrc tests/simt setup.py -type f)
build_hash=$( (hash_of $build_inputs; echo "${XENT_CPU_ONLY:-} ${TORCH_CUDA_ARCH_LIST:-} $XENT_BUILD_EMULATOR ${XENT_EMULATOR_SANITIZE:-}") | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.xent-build" 2>/dev/null)" != "$build_hash" ] || ! "$VENV/bin/python" -c "import xent" 2>/dev/null; then
  echo "[setup] building xent (CUDA kernels when a toolkit is found; this takes a few minutes the first time)"
  start=$(date +%s)
  MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py build_ext --inplace > "$VENV/xent-build.log" 2>&1 || {
    tail -50 "$VENV/xent-build.log"; echo "[setup] build failed (full log: $VENV/xent-build.log)"; exit 1; }
  # Make the in-place build importable from anywhere in the venv (an editable install would build twice).
  site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$ROOT" > "$site/xent-dev.pth"
  echo "[setup] built in $(( $(date +%s) - start )) s"
  echo "$build_hash" > "$VENV/.xent-build"
fi
