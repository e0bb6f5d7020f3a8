#!/usr/bin/env bash
# Builds the op library with CMake against the venv's libtorch into $1 (default build-cmake).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build-cmake}
PY=.venv/bin/python
prefix=$($PY -c "import torch.utils; print(torch.utils.cmake_prefix_path)")
site=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
extra=()
if [ -x /usr/local/cuda/bin/nvcc ]; then
  extra+=(-DCUDA_TOOLKIT_ROOT_DIR=/usr/local/cuda -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc)
  nvrtc=$(ls "$site"/nvidia/cu13/lib/libnvrtc.so.13 2>/dev/null || true)
  [ -n "$nvrtc" ] && extra+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}  # no GPU to detect
cmake -S . -B "$OUT" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" -DPython_EXECUTABLE="$PWD/$PY" "${extra[@]}" "${@:2}" > "$OUT.log" 2>&1 || { tail -40 "$OUT.log"; exit 1; }
cmake --build "$OUT" >> "$OUT.log" 2>&1 || { tail -40 "$OUT.log"; exit 1; }
echo "$OUT/libxent_ops.so"
