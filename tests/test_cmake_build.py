"""The CMake build (CMakeLists.txt) for C++ users: configure and build it against the venv's libtorch, load
the library with torch.ops.load_library in a fresh interpreter (without importing the xent package, whose
_C registers the same `xent` library) and run one op against PyTorch."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOAD_AND_RUN = textwrap.dedent(
    """
    import sys, torch
    import torch.nn.functional as F
    torch.ops.load_library(sys.argv[1])
    torch.manual_seed(0)
    x = torch.randn(64, 1000, dtype=torch.float64)
    t = torch.randint(0, 1000, (64,))
    loss, lse = torch.ops.xent.cross_entropy_fwd(x, t, None, reduction=1, ignore_index=-100, label_smoothing=0.1)
    ref = F.cross_entropy(x, t, label_smoothing=0.1)
    assert torch.allclose(loss, ref, rtol=1e-12, atol=0), (loss, ref)
    assert torch.allclose(lse, torch.logsumexp(x, 1), rtol=1e-12, atol=0)
    print("cmake library OK")
    """
)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_library_builds_loads_and_runs(tmp_path):
    build = tmp_path / "build"
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "build_cmake.sh"), str(build)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    library = out.stdout.strip().splitlines()[-1]
    assert os.path.exists(library)
    run = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, library], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "cmake library OK" in run.stdout
