#!/usr/bin/env bash
# Builds the emulated-CUDA library with AddressSanitizer + UBSan into .venv/asan (a copy of the sources,
# so the main build is untouched), skipped when the sources are unchanged. Prints the directory to put on
# PYTHONPATH; run python with LD_PRELOAD of libasan and libubsan (tests/test_emulated_sanitizers.py does).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.venv/asan
files=$(git ls-files -co --exclude-standard csrc tests/simt xent setup.py)
hash=$(cat $files | sha256sum | cut -c1-16)
if [ "$(cat "$OUT/.stamp" 2>/dev/null)" != "$hash" ] || [ ! -f "$OUT/xent/_C_emulated.so" ]; then
  rm -rf "$OUT" && mkdir -p "$OUT"
  tar -cf - $files | tar -xf - -C "$OUT"
  (cd "$OUT" && XENT_CPU_ONLY=1 XENT_BUILD_EMULATOR=1 XENT_EMULATOR_SANITIZE=1 MAX_JOBS=${MAX_JOBS:-2} \
     CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} ../bin/python setup.py build_ext --inplace > build.log 2>&1) || {
    tail -40 "$OUT/build.log"; exit 1; }
  echo "$hash" > "$OUT/.stamp"
fi
echo "$PWD/$OUT"
