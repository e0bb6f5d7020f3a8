"""Builds and runs the SIMT emulator's self-test (tests/simt/test_simt_emulator.cpp), plain and under
AddressSanitizer + UBSan (the configuration CI runs the emulated kernels in)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_HOME = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"

# The emulator needs only CUDA's headers (dim3, __half, __nv_bfloat16), not a GPU or the CUDA runtime.
FLAGS = [
    "-std=c++20",
    "-O2",
    "-ffp-contract=fast",
    "-pthread",
    "-I", os.path.join(ROOT, "tests", "simt"),
    "-I", os.path.join(ROOT, "csrc", "cuda"),
    "-I", os.path.join(CUDA_HOME, "include"),
]
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]


def build_and_run(tmp_path, extra_flags, env=None):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed: the emulator self-test is a standalone C++ program")
    exe = tmp_path / "test_simt_emulator"
    source = os.path.join(ROOT, "tests", "simt", "test_simt_emulator.cpp")
    build = subprocess.run(
        [gxx, *FLAGS, *extra_flags, source, "-o", str(exe)], capture_output=True, text=True
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, env=env)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert run.stdout.strip().splitlines()[-1].endswith(" 0 failed"), output
    return run


def test_emulator_self_test(tmp_path):
    build_and_run(tmp_path, [])


def test_emulator_self_test_sanitized(tmp_path):
    env = dict(os.environ)
    # UBSan only prints by default; make a finding fail the run. ASan keeps its defaults, leak checking
    # included: the emulator tells ASan about every fiber switch and leaks nothing, even when a planted
    # bug abandons a block's fibers mid-kernel.
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
    run = build_and_run(tmp_path, SANITIZE, env)
    assert "runtime error" not in run.stderr and "AddressSanitizer" not in run.stderr, run.stderr
