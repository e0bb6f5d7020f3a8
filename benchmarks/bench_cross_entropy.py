#!/usr/bin/env python
"""Benchmark and correctness check of ``xent.cross_entropy`` against PyTorch.

One run does two things:

1. Correctness (first): for every shape and dtype, the loss and the gradient of xent and of PyTorch eager in
   that dtype are compared with PyTorch computed in float64. The run exits non-zero at the end if xent is
   inaccurate (see ``judge_correctness`` for the rules), so this script doubles as a correctness job.
2. Speed and memory: forward+backward time of xent, PyTorch eager (``F.cross_entropy``) and
   ``torch.compile(F.cross_entropy)`` measured in the same process and run (on CUDA also Liger-Kernel's and
   flash-attn's cross-entropy when importable), and the peak extra memory each needs for one fwd+bwd.

Results go to ``--out``: ``results.json`` (everything, including the environment), ``results.md`` (the
tables, pasteable into a README) and ``results.png`` (a bar chart). See benchmarks/README.md for what each
column means and how memory is measured.

    python benchmarks/bench_cross_entropy.py                 # full run (~10 min on 2 CPU cores)
    python benchmarks/bench_cross_entropy.py --quick         # small shapes, a few seconds per config
    python benchmarks/bench_cross_entropy.py --shapes 64x1000,2x5x8x8 --dtypes float32 --no-memory
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when loaded by path (the tests)
import malloc_state  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)

# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------

# (N, C) language-model-like shapes plus one segmentation shape (N, C, H, W) whose class dim is 1.
FULL_SHAPES: Tuple[Tuple[int, ...], ...] = ((4096, 32000), (2048, 128256), (16384, 1000), (8, 21, 512, 512))
QUICK_SHAPES: Tuple[Tuple[int, ...], ...] = ((256, 32000), (64, 1000), (2, 21, 64, 64))
DEFAULT_DTYPES = ("float32", "bfloat16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

# Core implementations, always timed (on every device), in table order. Third-party ones are CUDA-only.
CORE_IMPLS = ("xent", "eager", "compile")
CUDA_EXTRA_IMPLS = ("liger", "flash_attn")

# Correctness: the float64 gradient reference covers every row of tensors up to this many elements, and the
# first GRAD_CHECK_ROWS rows (along dim 0) of bigger ones. The loss reference always covers every row.
GRAD_CHECK_FULL_NUMEL = 1 << 24
GRAD_CHECK_ROWS = 64
# Rows of float64 logits materialized at once when computing the reference loss (bounds its memory).
REF_CHUNK_NUMEL = 1 << 23

# Accuracy rules (see judge_correctness).
FP32_LOSS_RTOL = 1e-6  # xent's float32/float64 loss relative error must not exceed this.
FP32_GRAD_EPS = 1e-6  # xent's float32 gradient error may exceed 2x eager's by at most this.
LOWP_FACTOR = 2.0  # low-precision dtypes: xent's error may be at most this times eager's ...
# ... plus half an ulp of the dtype (the unavoidable rounding of the bf16/fp16 result), added per dtype.

# Peak HBM bandwidth (bytes/s) of known GPUs, matched by substring of the device name, most specific first.
GPU_PEAK_BANDWIDTH = (
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),
    ("H200", 4.8e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
)

MIB = 1024.0 * 1024.0


def log(msg: str = "") -> None:
    """Progress output: one line, flushed at once so long runs show where they are."""
    print(msg, flush=True)


def parse_shape(text: str) -> Tuple[int, ...]:
    """'4096x32000' -> (4096, 32000); '8x21x512x512' -> (8, 21, 512, 512). Class dim is dim 1."""
    try:
        shape = tuple(int(v) for v in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: expected e.g. 4096x32000 or 8x21x512x512")
    if len(shape) < 2 or any(v <= 0 for v in shape):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: need N x C [x d1 ...], all positive")
    return shape


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(v) for v in shape)


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def elem_size(dtype_name: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype_name]).element_size()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------------------
# Inputs and implementations
# --------------------------------------------------------------------------------------------------------------


def import_xent():
    """Imports xent, falling back to the source tree (a script's sys.path[0] is benchmarks/, not the repo)."""
    try:
        import xent  # noqa: F401
    except ImportError:
        sys.path.insert(0, REPO_ROOT)
        import xent  # noqa: F401
    return sys.modules["xent"]


def make_inputs(shape: Sequence[int], dtype_name: str, device: str, seed: int,
                mask_fraction: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seeded logits ``randn * 2`` (a leaf that requires grad) and random class-index targets.

    Values are drawn in float32 on the CPU and then cast, so every dtype and device sees the same numbers
    (up to rounding) and every implementation gets identical inputs. With ``mask_fraction`` > 0 that
    fraction of the non-target logits is -inf, as when invalid classes are masked out.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=gen).mul_(2.0)
    target_shape = (shape[0],) + tuple(shape[2:])
    t = torch.randint(0, shape[1], target_shape, generator=gen)
    if mask_fraction > 0:
        masked = torch.rand(tuple(shape), generator=gen) < mask_fraction
        masked.scatter_(1, t.unsqueeze(1), False)  # a masked target would make the loss inf
        x.masked_fill_(masked, float("-inf"))
        del masked
    x = x.to(device=device, dtype=DTYPES[dtype_name])  # a new tensor: the float32 draw is freed here
    return x.requires_grad_(), t.to(device)


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class Impl:
    """An implementation ready to be timed: ``fn(x, t)`` returns the mean loss, or ``fn`` is None + note."""

    name: str
    fn: Optional[LossFn]
    note: str = ""
    # Liger computes the gradient into the logits during the forward; it must get its own copy of them.
    clobbers_input: bool = False


def build_impl(name: str, shape: Sequence[int]) -> Impl:
    """Builds implementation ``name`` for one shape (a fresh torch.compile per shape and dtype)."""
    if name == "xent":
        return Impl(name, import_xent().cross_entropy)
    if name == "eager":
        return Impl(name, F.cross_entropy)
    if name == "compile":
        # One compilation per (shape, dtype): reset dynamo so earlier shapes neither count toward its
        # recompile limit nor turn this compile dynamic; dynamic=False specializes on the exact shape.
        torch._dynamo.reset()
        return Impl(name, torch.compile(F.cross_entropy, dynamic=False))
    if name == "liger":
        if len(shape) != 2:
            return Impl(name, None, "n/a: (N, C) only")
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy

            return Impl(name, lambda x, t: liger_cross_entropy(x, t), clobbers_input=True)
        except ImportError:
            pass
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss

            return Impl(name, LigerCrossEntropyLoss(), clobbers_input=True)
        except ImportError:
            return Impl(name, None, "not installed")
    if name == "flash_attn":
        if len(shape) != 2:
            return Impl(name, None, "n/a: (N, C) only")
        try:
            from flash_attn.losses.cross_entropy import CrossEntropyLoss
        except ImportError:
            return Impl(name, None, "not installed")
        return Impl(name, CrossEntropyLoss(reduction="mean"))
    raise ValueError(f"unknown implementation {name!r}")


def fwd_bwd(fn: LossFn, x: torch.Tensor, t: torch.Tensor) -> None:
    """The measured unit of work: forward, backward, drop the gradient."""
    loss = fn(x, t)
    loss.backward()
    x.grad = None


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------


def time_fwd_bwd(
    fn: LossFn, x: torch.Tensor, t: torch.Tensor, device: str, warmup: int, max_repeats: int, budget_s: float
) -> List[float]:
    """Seconds per fwd+bwd for each timed repeat, after ``warmup`` untimed ones.

    The number of repeats adapts to the cost of one iteration (measured on the last warm-up) so that a
    config takes about ``budget_s`` seconds: between min(3, max_repeats) and max_repeats repeats.
    """
    estimate = None
    for _ in range(warmup):
        start = time.perf_counter()
        fwd_bwd(fn, x, t)
        sync(device)
        estimate = time.perf_counter() - start
    repeats = max_repeats
    if budget_s > 0 and estimate:
        repeats = max(min(3, max_repeats), min(max_repeats, int(budget_s / estimate)))

    times = []
    if device == "cuda":
        # CUDA events bracket the GPU work of each iteration; one synchronize at the end.
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for begin, end in events:
            begin.record()
            fwd_bwd(fn, x, t)
            end.record()
        torch.cuda.synchronize()
        times = [begin.elapsed_time(end) / 1e3 for begin, end in events]
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            fwd_bwd(fn, x, t)
            times.append(time.perf_counter() - start)
    return times


# --------------------------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------------------------


def _proc_status_kib(*keys: str) -> Dict[str, int]:
    """Fields of /proc/self/status in KiB, e.g. VmRSS and VmHWM (the peak RSS)."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in keys:
                values[key] = int(rest.split()[0])
    return values


def _release_cpu_caches() -> None:
    """Returns cached memory to the OS so the measured fwd+bwd must fault in everything it uses.

    * xent's CPU gradient-buffer cache: capacity 0 frees what it holds; the capacity is then restored so the
      measured run behaves as in normal use (and its own allocation is counted).
    * glibc's free lists (malloc_trim), so allocations below the mmap threshold are not served from heap
      pages that a previous iteration already made resident.
    """
    gc.collect()
    if hasattr(torch.ops.xent, "_cpu_grad_cache"):
        capacity = torch.ops.xent._cpu_grad_cache()[0]
        torch.ops.xent._cpu_grad_cache(0)
        torch.ops.xent._cpu_grad_cache(capacity)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def measure_memory_here(impl_name: str, shape: Sequence[int], dtype_name: str, device: str, seed: int,
                        mask_fraction: float = 0.0) -> dict:
    """Peak extra memory of one fwd+bwd in this process: RSS high-water mark on CPU, allocator peak on CUDA.

    On CPU this must run in a fresh process (see measure_memory_subprocess): the RSS of a long-lived process
    depends on everything it did before.
    """
    import_xent()
    impl = build_impl(impl_name, shape)
    if impl.fn is None:
        return {"status": "skipped", "note": impl.note}
    x, t = make_inputs(shape, dtype_name, device, seed, mask_fraction)
    fwd_bwd(impl.fn, x, t)  # warm-up (and compilation): lazy initializations are not the loss's memory
    sync(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = impl.fn(x, t)
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"status": "ok", "peak_extra_bytes": peak - before, "before_bytes": before, "peak_bytes": peak}

    _release_cpu_caches()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _proc_status_kib("VmRSS")["VmRSS"]
    loss = impl.fn(x, t)
    loss.backward()  # the gradient stays alive: it is part of the peak
    hwm = _proc_status_kib("VmHWM")["VmHWM"]
    del loss
    return {"status": "ok", "peak_extra_bytes": (hwm - before) * 1024, "rss_before_bytes": before * 1024,
            "hwm_bytes": hwm * 1024}


def measure_memory_subprocess(impl_name: str, shape: Sequence[int], dtype_name: str, args) -> dict:
    """Runs this file with the hidden --measure-memory flag in a fresh interpreter and parses its result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--measure-memory", "--impl", impl_name,
           "--shapes", shape_str(shape), "--dtypes", dtype_name, "--device", "cpu",
           "--threads", str(args.threads), "--seed", str(args.seed), "--mask-fraction", str(args.mask_fraction)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {"status": "error", "note": "memory subprocess timed out"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("XENT_BENCH_MEMORY "):
            return json.loads(line[len("XENT_BENCH_MEMORY "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"status": "error", "note": f"memory subprocess failed (rc {proc.returncode}): {tail[0][:200]}"}


# --------------------------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------------------------


def reference_loss_fp64(x: torch.Tensor, t: torch.Tensor) -> float:
    """Mean cross-entropy in float64 over all positions, in row chunks to bound memory."""
    row_numel = x[0].numel()
    rows = max(1, REF_CHUNK_NUMEL // row_numel)
    total = 0.0
    with torch.no_grad():
        for start in range(0, x.shape[0], rows):
            chunk = x[start:start + rows].double()
            total += F.cross_entropy(chunk, t[start:start + rows], reduction="sum").item()
    return total / t.numel()


def reference_grad_fp64(x: torch.Tensor, t: torch.Tensor, rows: int) -> torch.Tensor:
    """Float64 gradient of the mean loss over the whole tensor, for its first ``rows`` rows only."""
    x64 = x[:rows].detach().double().requires_grad_()
    (F.cross_entropy(x64, t[:rows], reduction="sum") / t.numel()).backward()
    return x64.grad


def rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    """max |value - ref| / max |ref| (the relative error in the max-norm); inf if value is not finite."""
    value = value.detach().double()
    if not torch.isfinite(value).all():
        return math.inf
    denom = ref.abs().max().item()
    err = (value - ref).abs().max().item()
    return err / denom if denom > 0 else err


def check_correctness(shape: Sequence[int], dtype_name: str, device: str, seed: int,
                      mask_fraction: float = 0.0) -> dict:
    """Loss and gradient errors of xent and eager (in ``dtype_name``) against PyTorch float64."""
    x, t = make_inputs(shape, dtype_name, device, seed, mask_fraction)
    rows = shape[0] if numel(shape) <= GRAD_CHECK_FULL_NUMEL else min(shape[0], GRAD_CHECK_ROWS)
    ref_loss = torch.tensor(reference_loss_fp64(x, t), dtype=torch.float64)
    ref_grad = reference_grad_fp64(x, t, rows)
    entry = {"shape": list(shape), "dtype": dtype_name, "grad_rows_checked": rows, "rows": shape[0],
             "ref_loss": ref_loss.item()}
    for name in ("xent", "eager"):
        fn = build_impl(name, shape).fn
        try:
            loss = fn(x, t)
            loss.backward()
            sync(device)
            loss = loss.detach().cpu()
            entry[name] = {"loss": float(loss), "loss_rel_err": rel_err(loss, ref_loss),
                           "grad_rel_err": rel_err(x.grad[:rows], ref_grad)}
        except Exception as exc:  # noqa: BLE001 - reported (and fatal for xent) below
            entry[name] = {"error": f"{type(exc).__name__}: {exc}"}
        x.grad = None
    entry["failures"] = judge_correctness(entry)
    entry["status"] = "FAIL" if entry["failures"] else "ok"
    return entry


def judge_correctness(entry: dict) -> List[str]:
    """The accuracy rules; returns why xent fails them (empty list: it passes).

    * float32/float64: the loss's relative error must be <= 1e-6, and the gradient's must be no worse than
      2x PyTorch eager's (same dtype) plus 1e-6.
    * bfloat16/float16: the loss's and the gradient's errors must each be no worse than 2x eager's plus half
      an ulp of the dtype (eps/2: both results are rounded to that dtype, so they may differ by one rounding).
    """
    xent, eager = entry["xent"], entry["eager"]
    if "error" in xent:
        return [f"xent raised {xent['error']}"]
    dtype = DTYPES[entry["dtype"]]
    failures = []
    if dtype in (torch.float32, torch.float64):
        if not xent["loss_rel_err"] <= FP32_LOSS_RTOL:  # `not <=` also catches NaN
            failures.append(f"loss rel err {xent['loss_rel_err']:.3g} > {FP32_LOSS_RTOL:g}")
        checks = [("grad", FP32_GRAD_EPS)]
    else:
        checks = [("loss", torch.finfo(dtype).eps / 2), ("grad", torch.finfo(dtype).eps / 2)]
    if "error" in eager:
        return failures  # no eager errors to compare with: only the absolute rule above applies
    for what, eps in checks:
        mine, theirs = xent[f"{what}_rel_err"], eager[f"{what}_rel_err"]
        limit = LOWP_FACTOR * theirs + eps
        if not mine <= limit:
            failures.append(f"{what} rel err {mine:.3g} > {LOWP_FACTOR:g}x eager + {eps:.3g} = {limit:.3g}")
    return failures


# --------------------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------------------


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cpu_model() -> str:
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpu_peak_bandwidth(name: str) -> Optional[float]:
    for key, bandwidth in GPU_PEAK_BANDWIDTH:
        if key in name:
            return bandwidth
    return None


def environment(args) -> dict:
    """Everything that affects the numbers, recorded with them."""
    xent = import_xent()
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "xent": getattr(xent, "__version__", None),
        "xent_path": os.path.dirname(getattr(xent, "__file__", "") or ""),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        # Other load on the machine skews CPU timings; recorded at the start and (below) the end of the run.
        "loadavg_start": _read("/proc/loadavg"),
        "platform": platform.platform(),
        "xent_cpu_isa": torch.ops.xent._cpu_isa() if hasattr(torch.ops.xent, "_cpu_isa") else None,
        "xent_cpu_grad_cache": (list(torch.ops.xent._cpu_grad_cache())
                                if hasattr(torch.ops.xent, "_cpu_grad_cache") else None),
        "allocator": {
            **{k: v for k, v in sorted(os.environ.items())
               if k.startswith("MALLOC_") or k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF",
                                                   "GLIBC_TUNABLES", "LD_PRELOAD")},
            "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
            "transparent_hugepage_defrag": _read("/sys/kernel/mm/transparent_hugepage/defrag"),
        },
    }
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
        env.update(gpu=name, cuda=torch.version.cuda, gpu_peak_bandwidth=gpu_peak_bandwidth(name))
    return env


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Optional[str] = None) -> str:
    """A Markdown table; ``align`` is one 'l'/'r' per column (default: first two left, the rest right)."""
    align = align or "ll" + "r" * (len(header) - 2)
    sep = ["---" if a == "l" else "--:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_err(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return "inf" if math.isinf(value) else f"{value:.2e}"


def fmt_ms(result: dict) -> str:
    if result.get("status") != "ok":
        return result.get("note") or result.get("status", "—")
    return f"{result['median_ms']:.2f} ({result['min_ms']:.2f})"


def fmt_mib(result: dict) -> str:
    if "peak_extra_bytes" in result:
        return fmt_size(result["peak_extra_bytes"])
    return "—"


def fmt_size(nbytes: float) -> str:
    """MiB with one decimal below 100 MiB (small shapes), whole MiB above."""
    mib = nbytes / MIB
    return f"{mib:.1f}" if abs(mib) < 100 else f"{mib:.0f}"


def correctness_table(entries: Sequence[dict]) -> str:
    rows = []
    for e in entries:
        x, g = e["xent"], e["eager"]
        rows.append([
            shape_str(e["shape"]), e["dtype"],
            f"{e['grad_rows_checked']}/{e['rows']}",
            fmt_err(x.get("loss_rel_err")), fmt_err(g.get("loss_rel_err")),
            fmt_err(x.get("grad_rel_err")), fmt_err(g.get("grad_rel_err")),
            "ok" if not e["failures"] else "**FAIL**: " + "; ".join(e["failures"]),
        ])
    header = ["shape", "dtype", "grad rows checked", "xent loss err", "eager loss err", "xent grad err",
              "eager grad err", "status"]
    return md_table(header, rows, "lllrrrrl")


def results_table(entries: Sequence[dict], impls: Sequence[str], device: str) -> str:
    header = ["shape", "dtype"] + [f"{n} ms" for n in impls]
    header += ["speedup vs eager", "speedup vs compile"]
    if device == "cuda":
        header += [f"{n} GB/s" for n in impls]
    header += [f"{n} peak MiB" for n in impls] + ["grad MiB"]
    rows = []
    for e in entries:
        res = e["impls"]
        row = [shape_str(e["shape"]), e["dtype"]] + [fmt_ms(res[n]) for n in impls]
        row += [f"{e[k]:.2f}x" if e.get(k) else "—" for k in ("speedup_vs_eager", "speedup_vs_compile")]
        if device == "cuda":
            for n in impls:
                r = res[n]
                cell = f"{r['gbps']:.0f}" if "gbps" in r else "—"
                if "peak_fraction" in r:
                    cell += f" ({100 * r['peak_fraction']:.0f}%)"
                row.append(cell)
        row += [fmt_mib(res[n]) for n in impls] + [fmt_size(e["grad_bytes"])]
        rows.append(row)
    return md_table(header, rows)


def environment_md(env: dict) -> str:
    lines = []
    for key, value in env.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "defaults"
        lines.append(f"- **{key}**: `{value}`")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Memory-traffic model of the CUDA kernels (measured by the SIMT emulator, no GPU needed).

H100_BYTES_PER_S = 3.35e12
# PyTorch eager's cross-entropy on CUDA as a kernel sequence, in logit-sized passes (reads + writes):
# log_softmax (read x, write logp) = 2; nll_loss backward (zero-fill grad_logp, scatter) = 1;
# log_softmax backward (read grad_logp and logp, write grad) = 3. The nll forward gather is O(N).
PYTORCH_EAGER_PASSES = 6


def _proxy_shape(shape: Sequence[int]) -> Tuple[int, ...]:
    """A small shape with the same class count and layout, cheap enough for the emulator."""
    return (2, shape[1]) if len(shape) == 2 else (1, shape[1]) + tuple(min(d, 64) for d in shape[2:])


def traffic_model(shapes: Sequence[Sequence[int]], dtypes: Sequence[str]) -> List[dict]:
    """Bytes moved per logit by xent's CUDA forward and backward, counted by the emulator on a proxy
    shape, and the resulting H100 time floor for the real shape next to PyTorch eager's."""
    import xent

    if not xent.testing.emulated_cuda_available():
        return []
    ops = torch.ops.xent_emulated
    rows = []
    for shape in shapes:
        for dtype_name in dtypes:
            proxy = _proxy_shape(shape)
            x, t = make_inputs(proxy, dtype_name, "cpu", 0)
            x = x.detach()
            ops._simt_traffic()
            loss, lse = ops.cross_entropy_fwd(x, t, None, reduction=1)
            fwd = sum(ops._simt_traffic())
            ops.cross_entropy_bwd(torch.ones_like(loss), x, t, None, lse, reduction=1)
            bwd = sum(ops._simt_traffic())
            n, elt = numel(proxy), elem_size(dtype_name)
            per_logit = (fwd + bwd) / n
            full = numel(shape)
            rows.append({
                "shape": list(shape), "dtype": dtype_name, "proxy": list(proxy),
                "fwd_bytes_per_logit": fwd / n, "bwd_bytes_per_logit": bwd / n,
                "xent_h100_floor_ms": per_logit * full / H100_BYTES_PER_S * 1e3,
                "pytorch_bytes_per_logit": PYTORCH_EAGER_PASSES * elt,
                "pytorch_h100_floor_ms": PYTORCH_EAGER_PASSES * elt * full / H100_BYTES_PER_S * 1e3,
            })
    return rows


def traffic_table(rows: Sequence[dict]) -> str:
    header = ["shape", "dtype", "xent fwd B/logit", "xent bwd B/logit", "xent H100 floor ms",
              "PyTorch eager B/logit (model)", "PyTorch H100 floor ms"]
    body = [[shape_str(r["shape"]), r["dtype"], f"{r['fwd_bytes_per_logit']:.2f}", f"{r['bwd_bytes_per_logit']:.2f}",
             f"{r['xent_h100_floor_ms']:.3f}", f"{r['pytorch_bytes_per_logit']}", f"{r['pytorch_h100_floor_ms']:.3f}"]
            for r in rows]
    return md_table(header, body) if rows else "(the emulator build is not available)"


def write_markdown(path: str, data: dict) -> None:
    impls, device = data["settings"]["impls"], data["settings"]["device"]
    timing_unit = "CUDA events" if device == "cuda" else "time.perf_counter"
    parts = [
        "# xent cross-entropy benchmark",
        "",
        "## Correctness",
        "",
        "Relative errors against PyTorch in float64: the loss over all positions, |loss - ref| / |ref|; the "
        "gradient as max |grad - ref| / max |ref| over the rows checked (all rows up to "
        f"{GRAD_CHECK_FULL_NUMEL // (1 << 20)}M elements, else the first {GRAD_CHECK_ROWS} rows along dim 0). "
        "xent and eager run in the listed dtype.",
        "",
        correctness_table(data["correctness"]),
        "",
        "## Forward + backward",
        "",
        f"Time in ms of `loss = f(x, t); loss.backward(); x.grad = None` ({timing_unit}): median (min) of the "
        "timed repeats. Speedups are eager median / xent median and compile median / xent median. "
        "Peak MiB: extra memory of one fwd+bwd beyond the resident inputs "
        + ("(`torch.cuda.max_memory_allocated` delta)" if device == "cuda"
           else "(fresh process, VmHWM - VmRSS before)")
        + "; grad MiB: the gradient's own size."
        + (f" Inputs: {data['settings']['mask_fraction']:g} of the non-target logits are -inf."
           if data["settings"].get("mask_fraction") else ""),
        "",
        results_table(data["results"], impls, device),
        "",
        "## CUDA memory traffic (emulated)",
        "",
        "Global-memory bytes per logit of xent's CUDA forward and backward (fwd+bwd of one mean-reduced loss), "
        "counted by the SIMT emulator on a proxy with the same class count, and the time floor they imply at "
        "the H100's 3.35 TB/s for the full shape; PyTorch eager's bytes are a model of its kernel sequence "
        "(log_softmax, nll_loss, their backwards: 6 logit-sized passes).",
        "",
        traffic_table(data.get("traffic", [])),
        "",
        "## Environment",
        "",
        environment_md(data["environment"]),
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(parts))


def write_chart(path: str, data: dict) -> None:
    """Grouped bars of the median fwd+bwd time per shape/dtype, one bar per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls, entries = data["settings"]["impls"], data["results"]
    labels = [f"{shape_str(e['shape'])}\n{e['dtype']}" for e in entries]
    values = {n: [e["impls"][n].get("median_ms", float("nan")) for e in entries] for n in impls}
    finite = [v for vs in values.values() for v in vs if v == v and v > 0]
    log_scale = bool(finite) and max(finite) / min(finite) > 30

    width = 0.8 / max(1, len(impls))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(entries) + 2), 5.0))
    for i, name in enumerate(impls):
        xs = [j + (i - (len(impls) - 1) / 2) * width for j in range(len(entries))]
        ax.bar(xs, [v if v == v else 0 for v in values[name]], width, label=name)
    if log_scale:
        ax.set_yscale("log")
    ymax = max(finite) if finite else 1.0
    for j, e in enumerate(entries):
        notes = [f"{e[k]:.2f}x vs {k.rsplit('_', 1)[1]}" for k in ("speedup_vs_eager", "speedup_vs_compile")
                 if e.get(k)]
        top = max((values[n][j] for n in impls if values[n][j] == values[n][j]), default=0) or ymax
        ax.annotate("\n".join(notes), (j, top), textcoords="offset points", xytext=(0, 4), ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(range(len(entries)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("fwd+bwd time, median (ms)" + (", log scale" if log_scale else ""))
    ax.set_ylim(top=ymax * (3 if log_scale else 1.25))
    env = data["environment"]
    where = env.get("gpu") or f"{env['cpu_model']}, {env['threads']} threads"
    ax.set_title("cross-entropy fwd+bwd time (annotations: xent speedup = other / xent)\n"
                 f"{where}, torch {env['torch']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------


def benchmark_config(shape, dtype_name, impls, args, progress) -> dict:
    """Times every implementation on one (shape, dtype) and optionally measures its peak memory."""
    device = args.device
    esize = elem_size(dtype_name)
    entry = {"shape": list(shape), "dtype": dtype_name, "grad_bytes": numel(shape) * esize, "impls": {}}
    x, t = make_inputs(shape, dtype_name, device, args.seed, args.mask_fraction)
    peak_bw = gpu_peak_bandwidth(torch.cuda.get_device_name()) if device == "cuda" else None

    for name in impls:
        label = f"{shape_str(shape):>16} {dtype_name:<8} {name:<10}"
        impl = build_impl(name, shape)
        if impl.fn is None:
            entry["impls"][name] = {"status": "skipped", "note": impl.note}
            progress(f"time    {label} skipped ({impl.note})")
            continue
        xi = x.detach().clone().requires_grad_() if impl.clobbers_input else x
        result: dict = {"status": "ok"}
        try:
            if name == "compile":  # compile on the first call, excluded from timing
                start = time.perf_counter()
                fwd_bwd(impl.fn, xi, t)
                sync(device)
                result["compile_s"] = time.perf_counter() - start
            times = time_fwd_bwd(impl.fn, xi, t, device, args.warmup, args.repeats, args.budget)
        except Exception as exc:  # noqa: BLE001 - one failing implementation must not stop the run
            xi.grad = None
            entry["impls"][name] = {"status": "error", "note": f"error: {type(exc).__name__}",
                                    "error": f"{type(exc).__name__}: {exc}"}
            progress(f"time    {label} ERROR {type(exc).__name__}: {str(exc)[:200]}")
            continue
        result.update(median_ms=1e3 * statistics.median(times), min_ms=1e3 * min(times), repeats=len(times),
                      times_ms=[1e3 * v for v in times])
        if device == "cuda":
            # fwd+bwd traffic at best: logits read twice (forward, backward) + gradient written once.
            traffic = 3 * numel(shape) * esize
            result["gbps"] = traffic / (result["median_ms"] / 1e3) / 1e9
            if peak_bw:
                result["peak_fraction"] = result["gbps"] * 1e9 / peak_bw
        entry["impls"][name] = result
        extra = f", compile {result['compile_s']:.1f} s" if "compile_s" in result else ""
        extra += f", {result['gbps']:.0f} GB/s" if "gbps" in result else ""
        progress(f"time    {label} median {result['median_ms']:9.2f} ms  min {result['min_ms']:9.2f} ms  "
                 f"({len(times)} reps{extra})")
        if impl.clobbers_input:
            del xi
    del x, t
    gc.collect()

    if args.memory:
        for name in impls:
            result = entry["impls"][name]
            if result["status"] == "skipped":
                continue
            label = f"{shape_str(shape):>16} {dtype_name:<8} {name:<10}"
            if device == "cuda":
                try:
                    mem = measure_memory_here(name, shape, dtype_name, device, args.seed, args.mask_fraction)
                except Exception as exc:  # noqa: BLE001
                    mem = {"status": "error", "note": f"{type(exc).__name__}: {exc}"}
            else:
                mem = measure_memory_subprocess(name, shape, dtype_name, args)
            if mem.get("status") == "ok":
                result["peak_extra_bytes"] = mem["peak_extra_bytes"]
                progress(f"memory  {label} peak extra {mem['peak_extra_bytes'] / MIB:8.1f} MiB  "
                         f"(grad {entry['grad_bytes'] / MIB:.1f} MiB)")
            else:
                result["memory_error"] = mem.get("note")
                progress(f"memory  {label} {mem.get('status')}: {mem.get('note')}")

    def speedup(other: str) -> Optional[float]:
        a, b = entry["impls"].get("xent", {}), entry["impls"].get(other, {})
        if a.get("status") == "ok" and b.get("status") == "ok":
            return b["median_ms"] / a["median_ms"]
        return None

    entry["speedup_vs_eager"] = speedup("eager")
    entry["speedup_vs_compile"] = speedup("compile")
    return entry


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small shapes and few repeats (" + ", ".join(map(shape_str, QUICK_SHAPES)) + ")")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: %(default)s (cuda when available)")
    p.add_argument("--shapes", type=lambda s: [parse_shape(v) for v in s.split(",") if v.strip()],
                   help="comma-separated N x C [x d1 ...] shapes, class dim 1 (default: "
                        + ", ".join(map(shape_str, FULL_SHAPES)) + ")")
    p.add_argument("--dtypes", type=lambda s: [v.strip() for v in s.split(",") if v.strip()],
                   default=list(DEFAULT_DTYPES),
                   help="comma-separated, of " + ", ".join(DTYPES) + " (default: " + ",".join(DEFAULT_DTYPES) + ")")
    p.add_argument("--impls", type=lambda s: [v.strip() for v in s.split(",") if v.strip()],
                   help="implementations to time (default: xent, eager, compile; on CUDA also liger, flash_attn)")
    p.add_argument("--repeats", type=int, help="maximum timed repeats per measurement (default 25, quick 5)")
    p.add_argument("--warmup", type=int, help="untimed warm-up iterations (default 2, quick 1)")
    p.add_argument("--budget", type=float, default=4.0,
                   help="seconds of timed repeats to aim for per measurement (fewer repeats for slow configs); "
                        "0 always runs --repeats (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="input seed (default: %(default)s)")
    p.add_argument("--mask-fraction", type=float, default=0.0,
                   help="fraction of the non-target logits set to -inf, as when invalid classes are masked "
                        "(default: %(default)s)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak extra memory (CPU: one fresh subprocess per measurement; default: on)")
    p.add_argument("--malloc", choices=malloc_state.MODES, default="default",
                   help="C allocator state while timing on CPU (see benchmarks/malloc_state.py: warm misbehaves "
                   "at these sizes); peak memory is measured in fresh processes with the defaults either way")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"),
                   help="output directory (default: %(default)s)")
    # Internal: measure the memory of one (impl, shape, dtype) in this fresh process and print it as JSON.
    p.add_argument("--measure-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    args.shapes = args.shapes or list(QUICK_SHAPES if args.quick else FULL_SHAPES)
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    known = CORE_IMPLS + (CUDA_EXTRA_IMPLS if args.device == "cuda" else ())
    args.impls = args.impls or list(known)
    for name in args.impls:
        if name not in known:
            p.error(f"unknown implementation {name!r} for {args.device}; choose from {', '.join(known)}")
    args.repeats = args.repeats if args.repeats is not None else (5 if args.quick else 25)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.measure_memory:
        result = measure_memory_here(args.impl, args.shapes[0], args.dtypes[0], args.device, args.seed,
                                     args.mask_fraction)
        print("XENT_BENCH_MEMORY " + json.dumps(result), flush=True)
        return 0

    try:
        import_xent()
    except ImportError as exc:
        log(f"error: cannot import xent ({exc}); build and install it first (pip install -e .)")
        return 2

    started = time.perf_counter()
    env = environment(args)
    log(f"xent benchmark on {args.device}: torch {env['torch']}, {env['threads']} threads, "
        f"{env.get('gpu') or env['cpu_model']}, xent ISA {env['xent_cpu_isa']}")
    configs = [(shape, dtype) for shape in args.shapes for dtype in args.dtypes]

    # 1. Correctness, before any timing.
    log(f"\n== correctness ({len(configs)} configs, against float64) ==")
    correctness = []
    for shape, dtype in configs:
        entry = check_correctness(shape, dtype, args.device, args.seed, args.mask_fraction)
        correctness.append(entry)
        x, g = entry["xent"], entry["eager"]
        log(f"check   {shape_str(shape):>16} {dtype:<8} loss err xent {fmt_err(x.get('loss_rel_err'))} "
            f"eager {fmt_err(g.get('loss_rel_err'))} | grad err xent {fmt_err(x.get('grad_rel_err'))} "
            f"eager {fmt_err(g.get('grad_rel_err'))} | {entry['status']}"
            + (": " + "; ".join(entry["failures"]) if entry["failures"] else ""))
        gc.collect()

    # 2. Speed and memory.
    env["malloc"] = malloc_state.apply(args.malloc) if args.device == "cpu" else "default (timing on cuda)"
    log(f"\nmalloc while timing: {env['malloc']}")
    log(f"\n== fwd+bwd ({len(configs)} configs x {len(args.impls)} implementations"
        + (", with peak memory" if args.memory else "") + ") ==")
    results = [benchmark_config(shape, dtype, args.impls, args, log) for shape, dtype in configs]

    # 3. CUDA memory-traffic model (emulated; no GPU needed).
    traffic = traffic_model(args.shapes, args.dtypes)
    if traffic:
        log("\n== CUDA traffic model (emulated) ==\n" + traffic_table(traffic))

    env["loadavg_end"] = _read("/proc/loadavg")
    data = {
        "environment": env,
        "settings": {"device": args.device, "impls": args.impls, "shapes": [list(s) for s in args.shapes],
                     "dtypes": args.dtypes, "max_repeats": args.repeats, "warmup": args.warmup,
                     "budget_s": args.budget, "threads": args.threads, "seed": args.seed,
                     "mask_fraction": args.mask_fraction, "memory": args.memory,
                     "quick": args.quick, "grad_check_full_numel": GRAD_CHECK_FULL_NUMEL,
                     "grad_check_rows": GRAD_CHECK_ROWS},
        "correctness": correctness,
        "results": results,
        "traffic": traffic,
        "elapsed_s": time.perf_counter() - started,
    }

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(data, f, indent=2, default=str, allow_nan=True)
    write_markdown(os.path.join(args.out, "results.md"), data)
    write_chart(os.path.join(args.out, "results.png"), data)

    log("\n== correctness ==\n" + correctness_table(correctness))
    log("\n== fwd+bwd: ms median (min) ==\n" + results_table(results, args.impls, args.device))
    log(f"\nwrote {args.out}/results.json, results.md, results.png in {data['elapsed_s']:.0f} s")

    # Exit status: non-zero when xent is inaccurate or failed to run.
    failures = [f"{shape_str(e['shape'])} {e['dtype']}: {'; '.join(e['failures'])}"
                for e in correctness if e["failures"]]
    failures += [f"{shape_str(e['shape'])} {e['dtype']}: xent {e['impls']['xent']['error']}"
                 for e in results if e["impls"].get("xent", {}).get("status") == "error"]
    if failures:
        log("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
