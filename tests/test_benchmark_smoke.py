"""Smoke test of benchmarks/bench_cross_entropy.py: a tiny run end to end, in a subprocess.

It checks the script's mechanics (correctness pass, timing of xent / eager / torch.compile, reports and
chart) and, since the script exits non-zero when xent is inaccurate, also its correctness gate on small
shapes. Peak-memory measurement (one subprocess per measurement) is left out to keep it fast.
"""

import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO_ROOT, "benchmarks", "bench_cross_entropy.py")

# One (N, C) shape and one segmentation-style (N, C, H, W) shape, class dim 1.
SHAPES = "64x1000,2x5x8x8"


def test_benchmark_quick_run(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, BENCH, "--quick", "--no-memory", "--repeats", "1", "--shapes", SHAPES,
           "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"benchmark failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")

    for name in ("results.json", "results.md", "results.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"{name} missing or empty"

    data = json.loads((out / "results.json").read_text())
    # 2 shapes x 2 default dtypes, each checked for correctness and timed for every implementation.
    assert len(data["correctness"]) == 4 and all(e["status"] == "ok" for e in data["correctness"])
    assert len(data["results"]) == 4
    for entry in data["results"]:
        for impl in ("xent", "eager"):
            assert entry["impls"][impl]["status"] == "ok", (entry["shape"], entry["dtype"], impl)
            assert entry["impls"][impl]["median_ms"] > 0
        # torch.compile needs a working C++ compiler; where it has none the script records the error and
        # goes on, which is what this checks.
        assert entry["impls"]["compile"]["status"] in ("ok", "error")
    assert data["environment"]["torch"]
    assert "| shape | dtype |" in (out / "results.md").read_text()
