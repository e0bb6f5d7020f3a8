"""Build script for xent.

Environment variables:
  XENT_CPU_ONLY=1          build the CPU kernels only, even when a CUDA toolkit and a CUDA torch are present.
  TORCH_CUDA_ARCH_LIST     GPU architectures to compile for (default below: sm_75 through sm_120, plus PTX).
  CUDA_HOME                the CUDA toolkit root (default: /usr/local/cuda when it has bin/nvcc).
  XENT_BUILD_EMULATOR=1    also build xent._C_emulated, the test-only library that runs the CUDA device code
                           on the CPU under the SIMT emulator (tests/simt). Never needed by users.
  XENT_EMULATOR_SANITIZE=1 build xent._C_emulated with AddressSanitizer and UBSan (CI).
  MAX_JOBS                 parallel compile jobs (ninja).
"""

import glob
import os
import shutil
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# torch.utils.cpp_extension reads CUDA_HOME when it is imported, and guesses /usr/local from an nvcc wrapper in
# /usr/local/bin, which has no CUDA headers. Point it at the real toolkit first.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = candidate
            break

# Without a GPU, torch cannot query the architecture to compile for and the build fails; default to every
# architecture we support (Turing through Blackwell) plus PTX for newer ones.
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)



def _compiler_is_gcc():
    """Whether the C++ compiler the extension is built with (CXX, else c++) is GCC."""
    try:
        version = subprocess.run([os.environ.get("CXX", "c++"), "--version"], capture_output=True, text=True)
    except OSError:
        return False
    return "Free Software Foundation" in version.stdout


def _truthy(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def build_cuda():
    if _truthy("XENT_CPU_ONLY"):
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None and shutil.which(
        os.path.join(CUDA_HOME, "bin", "nvcc")
    ) is not None


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


COMMON_CXX = [
    "-O3",
    "-std=c++20",
    "-fvisibility=hidden",
    "-fno-math-errno",  # lets std::exp/log inline; we never read errno
    # at::parallel_for is header-inline over OpenMP (AT_PARALLEL_OPENMP): without -fopenmp it runs serially.
    # Linked as libgomp.so.1, it resolves to the libgomp torch has already loaded: one thread pool.
    "-fopenmp",
]
if _compiler_is_gcc():
    # Each per-ISA file compiles every loss's kernels (csrc/cpu/kernel_tables.h). GCC caps the inlining of a
    # large translation unit by its size; inlining decides which products g++ contracts into fmas, so with the
    # cap one loss's results would depend on the size of the others' kernels. Without it they depend on
    # their own source only.
    COMMON_CXX.append("--param=large-unit-insns=1000000000")
LINK_ARGS = ["-fopenmp"]

host_sources = rel(
    [os.path.join(ROOT, "csrc", "ops.cpp"), os.path.join(ROOT, "csrc", "module.cpp")]
    + glob.glob(os.path.join(ROOT, "csrc", "*_host.cpp"))
    + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
)
cuda_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))

ext_modules = []
if build_cuda():
    ext_modules.append(
        CUDAExtension(
            "xent._C",
            host_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("XENT_WITH_CUDA", "1")],
            extra_link_args=LINK_ARGS,
            extra_compile_args={
                "cxx": COMMON_CXX,
                "nvcc": [
                    "-O3",
                    "-std=c++20",
                    "--expt-relaxed-constexpr",
                    "-lineinfo",
                ],
            },
            py_limited_api=True,
        )
    )
else:
    ext_modules.append(
        CppExtension(
            "xent._C",
            host_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": COMMON_CXX},
            extra_link_args=LINK_ARGS,
            py_limited_api=True,
        )
    )

if _truthy("XENT_BUILD_EMULATOR"):
    if CUDA_HOME is None:
        raise RuntimeError("XENT_BUILD_EMULATOR=1 needs the CUDA toolkit's headers (set CUDA_HOME)")
    # The CUDA host launch code and device code compiled by g++ against tests/simt/simt_emulator.h and
    # registered as CPU kernels of the `xent_emulated` library (same schemas, see csrc/ops.cpp).
    sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if _truthy(
        "XENT_EMULATOR_SANITIZE"
    ) else []
    ext_modules.append(
        CppExtension(
            "xent._C_emulated",
            rel(
                [
                    os.path.join(ROOT, "tests", "simt", "emulated_ops.cpp"),
                    os.path.join(ROOT, "csrc", "module_emulated.cpp"),
                ]
                + glob.glob(os.path.join(ROOT, "csrc", "*_host.cpp"))
            ),
            # cuda_bf16.h / cuda_fp16.h / vector_types.h from the toolkit compile under g++ for the host.
            include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "tests", "simt"), os.path.join(CUDA_HOME, "include")],
            define_macros=[("XENT_EMULATED_BUILD", "1"), ("XENT_SIMT_EMULATOR", "1")],
            extra_compile_args={
                "cxx": COMMON_CXX[:1]
                + ["-O2", "-g", "-std=c++20", "-ffp-contract=fast", "-fopenmp"]
                + sanitize
            },
            extra_link_args=sanitize + LINK_ARGS,
            py_limited_api=True,
        )
    )

setup(
    name="xent",
    version="0.1.0",
    description="Fast, exact, torch.compile-ready loss kernels (cross-entropy family) for CPU and CUDA",
    packages=find_packages(include=["xent", "xent.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    python_requires=">=3.9",
    install_requires=["torch>=2.6"],
)
