"""Static checks of the CUDA kernels, for machines without a GPU (CI runs this on every submission).

For every csrc/cuda/*.cu and each architecture (default sm_80 and sm_90):
  * compile with `-Xptxas -v` and fail on any register spill or local-memory stack frame in our kernels;
  * disassemble with `cuobjdump -sass` and fail unless the vectorized kernels issue 128-bit global loads
    (LDG.E.128) and stores (STG.E.128).
Prints registers per kernel. Usage:

    python scripts/check_cuda_static.py                       # sm_80, sm_90 (CI)
    python scripts/check_cuda_static.py --arch all            # the whole default list, sm_75 .. sm_120
    python scripts/check_cuda_static.py --only binary_losses  # one source file
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_ARCHS = ["75", "80", "86", "89", "90", "100", "120"]

# Per source file, kernels that must use 128-bit global accesses: name fragment -> required SASS opcodes.
VECTORIZED = {
    "cross_entropy.cu": {
        "fwd_rows_kernel": ["LDG.E.128"],
        "bwd_rows_kernel": ["LDG.E.128", "STG.E.128"],
    },
    "nll_loss.cu": {
        "zero_fill_kernel": ["STG.E.128"],
    },
    "binary_losses.cu": {
        "fwd_vector_kernel": ["LDG.E.128", "STG.E.128"],
        "bwd_vector_kernel": ["LDG.E.128", "STG.E.128"],
    },
}


def find_tool(name):
    import torch  # noqa: F401  (for site-packages location)

    candidates = [shutil.which(name)]
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates.append(os.path.join(cuda_home, "bin", name))
    import site

    for sp in site.getsitepackages():
        candidates += glob.glob(os.path.join(sp, "nvidia", "cu*", "bin", name))
        candidates += glob.glob(os.path.join(sp, "triton", "backends", "nvidia", "bin", name))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def compile_flags():
    from torch.utils.cpp_extension import include_paths

    flags = ["-std=c++20", "-O3", "--expt-relaxed-constexpr", "-Xptxas", "-v", "-I", os.path.join(ROOT, "csrc")]
    for p in include_paths(device_type="cuda"):
        flags += ["-I", p]
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    flags += ["-I", os.path.join(cuda_home, "include")]
    flags += ["-DXENT_WITH_CUDA=1", "-D_GLIBCXX_USE_CXX11_ABI=1", "-DTORCH_EXTENSION_NAME=_C"]
    return flags


def parse_ptxas(log):
    """{kernel: {"registers": int, "stack": int, "spill_stores": int, "spill_loads": int}}"""
    kernels, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line) or re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
            kernels.setdefault(current, {})
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[current]["registers"] = int(m.group(1))
    return kernels


def demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


def short_name(demangled):
    """The demangled name without its parameter list (template arguments such as `(Loss)0` keep theirs)."""
    if not demangled.endswith(")"):
        return demangled
    depth = 0
    for i in range(len(demangled) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(demangled[i], 0)
        if depth == 0:
            return demangled[:i]
    return demangled


def sass_by_kernel(cuobjdump, obj):
    out = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    kernels, current = {}, None
    for line in out.stdout.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = m.group(1)
            kernels[current] = []
        elif current:
            kernels[current].append(line)
    return {k: "\n".join(v) for k, v in kernels.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="80,90", help="comma list like 80,90, or 'all'")
    parser.add_argument("--only", default=None, help="check only the .cu files whose name contains this")
    args = parser.parse_args()
    archs = ALL_ARCHS if args.arch == "all" else args.arch.split(",")
    nvcc = find_tool("nvcc")
    cuobjdump = find_tool("cuobjdump")
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if args.only:
        sources = [s for s in sources if args.only in os.path.basename(s)]
    if nvcc is None:
        print("check_cuda_static: no nvcc; skipping (the CUDA kernels are not built on this machine)")
        return 0
    if not sources:
        print("check_cuda_static: no CUDA sources")
        return 0
    failures = []
    flags = compile_flags()
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            for arch in archs:
                obj = os.path.join(tmp, f"{os.path.basename(src)}.sm{arch}.o")
                cmd = [nvcc, *flags, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c", src, "-o", obj]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    failures.append(f"{src} sm_{arch}: compile failed:\n{out.stderr[-3000:]}")
                    continue
                kernels = parse_ptxas(out.stderr + out.stdout)
                names = demangle(list(kernels))
                print(f"== {os.path.relpath(src, ROOT)} sm_{arch}: {len(kernels)} kernels")
                for k, info in sorted(kernels.items(), key=lambda kv: names[kv[0]]):
                    short = short_name(names[k])
                    print(
                        f"   {info.get('registers', '?'):>3} regs  stack {info.get('stack', 0):>3} B  "
                        f"spill {info.get('spill_stores', 0)}/{info.get('spill_loads', 0)} B  {short}"
                    )
                    if info.get("stack", 0) or info.get("spill_stores", 0) or info.get("spill_loads", 0):
                        failures.append(f"{short} (sm_{arch}): stack frame or register spills: {info}")
                if cuobjdump is None:
                    failures.append("cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
                    continue
                sass = sass_by_kernel(cuobjdump, obj)
                sass_names = demangle(list(sass))
                for fragment, opcodes in VECTORIZED.get(os.path.basename(src), {}).items():
                    matching = [k for k in sass if fragment in sass_names[k]]
                    if not matching:  # a renamed kernel must not silently escape the check
                        failures.append(f"sm_{arch}: no kernel named like '{fragment}' in {os.path.basename(src)}")
                        continue
                    for k in matching:
                        missing = [op for op in opcodes if op not in sass[k]]
                        if missing:
                            failures.append(f"{short_name(sass_names[k])} (sm_{arch}): no {', '.join(missing)} in SASS")
                    print(f"   128-bit accesses checked in {len(matching)} '{fragment}' kernels")
    if failures:
        print("\nCUDA static checks FAILED:")
        for f in failures:
            print(" -", f)
        return 1
    print("CUDA static checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
