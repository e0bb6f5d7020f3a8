"""The CUDA device code under AddressSanitizer and UBSan: the emulated-CUDA library is rebuilt with
-fsanitize=address,undefined (scripts/build_asan_emulator.sh) and a parity workload
(tests/sanitized/*.py: misaligned rows, split rows, lanes layout, all dtypes, random schedules) runs in a
fresh interpreter with the sanitizer runtimes preloaded. Any out-of-bounds access, misaligned vector
access or undefined behaviour aborts it."""

import os
import subprocess
import sys

import pytest

import xent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _runtime(name):
    out = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return out if os.path.isabs(out) and os.path.exists(out) else None


@pytest.mark.skipif(
    not xent.testing.emulated_cuda_available(), reason="needs the test-only emulator build (XENT_BUILD_EMULATOR=1)"
)
@pytest.mark.parametrize("workload", sorted(os.listdir(os.path.join(ROOT, "tests", "sanitized"))))
def test_emulated_kernels_under_asan_and_ubsan(workload):
    asan, ubsan = _runtime("libasan.so"), _runtime("libubsan.so")
    assert asan and ubsan, "gcc's libasan/libubsan runtimes are required"
    build = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "build_asan_emulator.sh")], capture_output=True, text=True, cwd=ROOT
    )
    assert build.returncode == 0, build.stdout + build.stderr
    asan_root = build.stdout.strip().splitlines()[-1]
    env = dict(os.environ)
    env.update(
        PYTHONPATH=asan_root,
        LD_PRELOAD=f"{asan}:{ubsan}",
        # Python and torch leak by design at exit; the link-order check trips on the preloaded runtime.
        ASAN_OPTIONS="detect_leaks=0:verify_asan_link_order=0:abort_on_error=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
    )
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "sanitized", workload)],
        capture_output=True,
        text=True,
        env=env,
        cwd=asan_root,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "ok" in run.stdout
