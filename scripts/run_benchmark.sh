#!/usr/bin/env bash
# The main job: correctness report and benchmark of xent against PyTorch eager and torch.compile, on a
# fresh machine (sets up .venv and the build first, skipped when done):
#   1. cross-entropy (benchmarks/bench_cross_entropy.py; extra arguments go to it, e.g. --quick);
#   2. the rest of the loss family, binary losses and softmax focal (benchmarks/bench_losses.py; gets
#      --quick when it is among the arguments).
# Results: benchmarks/results/{results.md,results.json,results.png} and benchmarks/results/losses/.
# Exits non-zero when either benchmark finds xent inaccurate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
quick=()
for arg in "$@"; do [ "$arg" = "--quick" ] && quick=(--quick); done
status=0
.venv/bin/python benchmarks/bench_cross_entropy.py "$@" || status=$?
.venv/bin/python benchmarks/bench_losses.py "${quick[@]}" || status=$?
exit $status
