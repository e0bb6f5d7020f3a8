#!/usr/bin/env bash
# The main job: correctness report and benchmark of xent against PyTorch eager and torch.compile, on a
# fresh machine (sets up .venv and the build first, skipped when done). Extra arguments go to the
# benchmark (e.g. --quick). Results: benchmarks/results/{results.md,results.json,chart.png}.
set -euo pipefail
cd "$(dirname "$0")/.."
XENT_BUILD_EMULATOR=${XENT_BUILD_EMULATOR:-1} bash scripts/setup_env.sh
exec .venv/bin/python benchmarks/bench_cross_entropy.py "$@"
