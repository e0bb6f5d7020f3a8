#!/usr/bin/env python
"""Benchmark and correctness check of xent's loss family (NLL, binary losses, softmax focal loss) against
PyTorch on the CPU.

Losses: ``nll_loss`` (log-probabilities and class indices), ``binary_cross_entropy`` (probabilities),
``binary_cross_entropy_with_logits``,
``sigmoid_focal_loss`` (torchvision's) and ``softmax_focal_loss`` (multi-class focal loss with class-index
targets, gamma = 2; its PyTorch reference is the usual composition -(1 - p_y)^gamma log p_y from
log_softmax and gather), each with reduction='mean' (the usual training setup). For every loss, shape and
dtype one run does:

1. Correctness (first): the loss and the gradient of xent and of PyTorch eager, both in the benchmarked
   dtype, against PyTorch in float64 on the same values. The script exits non-zero at the end when xent is
   inaccurate (float32: loss relative error above 1e-6; bfloat16/float16: more than twice eager's error plus
   half an ulp), so it doubles as a correctness job.
2. Speed: forward+backward time of xent, PyTorch eager and ``torch.compile`` of the PyTorch / torchvision
   function (dynamic=False, one compilation per configuration), in the same process. The implementations
   are timed round-robin (one iteration of each in turn, repeated), so that a change in machine load
   during the run hits all of them alike; the table reports medians and the ratios of medians. The same
   rounds also time a memory floor (below). glibc is
   told to keep freed memory while timing (``--malloc warm``, benchmarks/malloc_state.py), so that the
   baselines' temporaries are not page-faulted back in on every call.

The memory floor: the bytes that any forward+backward returning a dense gradient must move (write the
(N, C) gradient; read the input and a target shaped like it; NLL's gradient is zero off the targets and
needs no read of its input), moved by PyTorch's own fill / copy / add kernels into a preallocated buffer.
It is not a bound on every machine state (non-temporal stores can beat it when the buffers are cold), but
``eager / floor`` says how far ahead of eager any implementation can get: where it is below the 4x target,
no kernel can meet that target on this machine.

Results go to ``--out`` (default benchmarks/results/losses): ``results.json`` (everything, including the
environment and every repeat) and ``results.md`` (the tables).

    python benchmarks/bench_losses.py                      # (65536, 80) and (4096, 1000), float32 + bfloat16
    python benchmarks/bench_losses.py --quick              # small shapes, a few repeats
    python benchmarks/bench_losses.py --losses focal --dtypes float32 --impls xent,compile
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when loaded by path (the tests)
import malloc_state  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)

FULL_SHAPES = ((65536, 80), (4096, 1000))  # detection-like (anchors x COCO classes); multi-label classification
QUICK_SHAPES = ((4096, 80), (512, 1000))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
LOSSES = ("nll", "bce", "bce_with_logits", "focal", "softmax_focal")
CLASS_INDEX_LOSSES = ("nll", "softmax_focal")  # the others take a target shaped like the input
IMPLS = ("xent", "eager", "compile")
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float64": 2.0**-53, "bfloat16": 2.0**-8, "float16": 2.0**-11}
TARGETS = {"eager": 4.0, "compile": 2.0}  # the project's speed targets: xent at least this many times faster


def log(msg: str = "") -> None:
    print(msg, flush=True)


def import_xent():
    """Imports xent, falling back to the source tree (a script's sys.path[0] is benchmarks/)."""
    try:
        import xent  # noqa: F401
    except ImportError:
        sys.path.insert(0, REPO_ROOT)
        import xent  # noqa: F401
    return sys.modules["xent"]


def parse_shape(text: str) -> Tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: expected e.g. 65536x80")
    if not shape or any(v <= 0 for v in shape):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: sizes must be positive")
    return shape


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


# --------------------------------------------------------------------------------------------------------------
# Inputs and implementations
# --------------------------------------------------------------------------------------------------------------


def make_inputs(loss: str, shape, dtype: torch.dtype, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits randn * 2 (probabilities sigmoid(randn * 2) for BCE) and sparse binary targets (10% ones, as
    in detection), drawn in float32 and cast so that every dtype sees the same values up to rounding."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=gen).mul_(2.0)
    if loss in CLASS_INDEX_LOSSES:  # logits (log-probabilities for nll) (N, C) and class indices (N)
        x = torch.log_softmax(z, dim=1) if loss == "nll" else z
        return x.to(dtype), torch.randint(0, shape[1], shape[:1], generator=gen)
    x = torch.sigmoid(z) if loss == "bce" else z
    y = (torch.rand(shape, generator=gen) < 0.1).float()
    return x.to(dtype), y.to(dtype)


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def softmax_focal_torch(x: torch.Tensor, y: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """The multi-class focal loss as commonly written with PyTorch ops (mean over the batch)."""
    logp_t = F.log_softmax(x, dim=1).gather(1, y.unsqueeze(1)).squeeze(1)
    return (-((1 - logp_t.exp()) ** gamma) * logp_t).mean()


def torch_fn(loss: str) -> LossFn:
    if loss == "softmax_focal":
        return softmax_focal_torch
    if loss == "nll":
        return lambda x, y: F.nll_loss(x, y)
    if loss == "bce":
        return lambda x, y: F.binary_cross_entropy(x, y)
    if loss == "bce_with_logits":
        return lambda x, y: F.binary_cross_entropy_with_logits(x, y)
    from torchvision.ops import sigmoid_focal_loss

    return lambda x, y: sigmoid_focal_loss(x, y, alpha=0.25, gamma=2.0, reduction="mean")


def xent_fn(loss: str) -> LossFn:
    xent = import_xent()
    if loss == "softmax_focal":
        return lambda x, y: xent.softmax_focal_loss(x, y, gamma=2.0)
    if loss == "nll":
        return lambda x, y: xent.nll_loss(x, y)
    if loss == "bce":
        return lambda x, y: xent.binary_cross_entropy(x, y)
    if loss == "bce_with_logits":
        return lambda x, y: xent.binary_cross_entropy_with_logits(x, y)
    return lambda x, y: xent.sigmoid_focal_loss(x, y, alpha=0.25, gamma=2.0, reduction="mean")


def build_impl(name: str, loss: str) -> LossFn:
    if name == "xent":
        return xent_fn(loss)
    if name == "eager":
        return torch_fn(loss)
    if name == "compile":
        # A fresh compilation per configuration, specialized on its shape.
        torch._dynamo.reset()
        return torch.compile(torch_fn(loss), dynamic=False)
    raise ValueError(f"unknown implementation {name!r}")


FLOOR = "floor"  # the memory-floor reference's key in the results (not an implementation)


def memory_floor_unit(loss: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """The memory floor (module docstring) of one configuration, as a callable timed beside the losses."""
    out = torch.empty_like(x)
    if loss == "nll":
        return lambda: out.zero_()
    if loss in CLASS_INDEX_LOSSES:
        return lambda: out.copy_(x)
    return lambda: torch.add(x, y, out=out)


def fwd_bwd(fn: LossFn, x: torch.Tensor, y: torch.Tensor) -> None:
    """The measured unit of work: forward, backward into x.grad, drop the gradient."""
    fn(x, y).backward()
    x.grad = None


# --------------------------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------------------------


def _errors(fn: LossFn, x: torch.Tensor, y: torch.Tensor, loss64: float, grad64: torch.Tensor) -> Dict[str, float]:
    xl = x.detach().clone().requires_grad_()
    value = fn(xl, y)
    (g,) = torch.autograd.grad(value, xl)
    loss_err = abs(value.double().item() - loss64) / max(abs(loss64), 1e-300)
    grad_err = ((g.double() - grad64).abs().max() / grad64.abs().max().clamp_min(1e-300)).item()
    return {"loss_rel_err": loss_err, "grad_rel_err": grad_err}


def check_correctness(loss: str, shape, dtype_name: str, seed: int) -> dict:
    x, y = make_inputs(loss, shape, DTYPES[dtype_name], seed)
    x64 = x.double().requires_grad_()
    value64 = torch_fn(loss)(x64, y if loss in CLASS_INDEX_LOSSES else y.double())
    (grad64,) = torch.autograd.grad(value64, x64)
    entry = {"loss": loss, "shape": list(shape), "dtype": dtype_name}
    for name in ("xent", "eager"):
        entry[name] = _errors(xent_fn(loss) if name == "xent" else torch_fn(loss), x, y, value64.item(), grad64)
    entry["problems"] = judge(entry)
    return entry


def judge(entry: dict) -> List[str]:
    """xent's accuracy rules (see the module docstring)."""
    problems = []
    u = UNIT_ROUNDOFF[entry["dtype"]]
    for key, exact_rule in (("loss_rel_err", 1e-6), ("grad_rel_err", 1e-5)):
        ours, eager = entry["xent"][key], entry["eager"][key]
        if entry["dtype"] in ("float32", "float64"):
            limit = exact_rule if entry["dtype"] == "float32" else 1e-12
        else:
            limit = 2.0 * eager + u
        if not ours <= limit:
            problems.append(f"{key} {ours:.3e} > {limit:.3e}")
    return problems


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------


def time_round_robin(fns: Dict[str, LossFn], x: torch.Tensor, y: torch.Tensor, warmup: int, repeats: int,
                     budget_s: float, extra: Optional[Dict[str, Callable[[], None]]] = None) -> Dict[str, List[float]]:
    """Seconds per fwd+bwd of each implementation, timed in turn (one iteration each per round), and per
    call of each ``extra`` callable (the memory floor) in the same rounds."""
    units = {}
    for name, fn in fns.items():
        leaf = x.detach().clone().requires_grad_()
        units[name] = lambda fn=fn, leaf=leaf: fwd_bwd(fn, leaf, y)
    units.update(extra or {})
    estimate = 0.0
    for _ in range(warmup):  # includes torch.compile's compilation on the first call
        round_time = 0.0
        for unit in units.values():
            start = time.perf_counter()
            unit()
            round_time += time.perf_counter() - start
        estimate = round_time
    if budget_s > 0 and estimate > 0:
        repeats = max(min(3, repeats), min(repeats, int(budget_s / estimate)))
    times: Dict[str, List[float]] = {name: [] for name in units}
    for _ in range(repeats):
        for name, unit in units.items():
            start = time.perf_counter()
            unit()
            times[name].append(time.perf_counter() - start)
    return times


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    sep = ["---" if i < 3 else "--:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def results_table(results: List[dict], impls: Sequence[str]) -> str:
    """Medians, xent's speed-ups, and (when timed) the memory floor with eager / floor: the most that any
    implementation could gain over eager on this machine."""
    floor = any(FLOOR in r["median_ms"] for r in results)
    header = ["loss", "shape", "dtype"] + [f"{i} (ms)" for i in impls] + ([f"{FLOOR} (ms)"] if floor else [])
    header += [f"xent vs {i}" for i in impls if i != "xent" and "xent" in impls]
    header += ["eager / floor"] if floor and "eager" in impls else []
    rows = []
    for r in results:
        m = r["median_ms"]
        row = [r["loss"], shape_str(r["shape"]), r["dtype"]]
        row += [f"{m[i]:.2f}" if i in m else "error" for i in impls]
        row += [f"{m[FLOOR]:.2f}" if FLOOR in m else "—"] if floor else []
        for i in impls:
            if i == "xent" or "xent" not in impls:
                continue
            if i in r["median_ms"] and "xent" in r["median_ms"]:
                ratio = r["median_ms"][i] / r["median_ms"]["xent"]
                mark = "" if ratio >= TARGETS.get(i, 0) else " (below target)"
                row.append(f"{ratio:.2f}x{mark}")
            else:
                row.append("—")
        if floor and "eager" in impls:
            row.append(f"{m['eager'] / m[FLOOR]:.2f}x" if "eager" in m and FLOOR in m else "—")
        rows.append(row)
    return md_table(header, rows)


def correctness_table(entries: List[dict]) -> str:
    header = ["loss", "shape", "dtype", "xent loss err", "eager loss err", "xent grad err", "eager grad err", "ok"]
    rows = [[e["loss"], shape_str(e["shape"]), e["dtype"], f"{e['xent']['loss_rel_err']:.1e}",
             f"{e['eager']['loss_rel_err']:.1e}", f"{e['xent']['grad_rel_err']:.1e}",
             f"{e['eager']['grad_rel_err']:.1e}", "yes" if not e["problems"] else "; ".join(e["problems"])]
            for e in entries]
    return md_table(header, rows)


def environment(args) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    loadavg = None
    if os.path.exists("/proc/loadavg"):
        with open("/proc/loadavg") as f:
            loadavg = f.read().strip()
    xent = import_xent()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "xent": getattr(xent, "__version__", None),
        "threads": torch.get_num_threads(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "xent_cpu_isa": torch.ops.xent._cpu_isa(),
        "loadavg_start": loadavg,
    }


def write_markdown(path: str, data: dict) -> None:
    env = data["environment"]
    lines = [
        "# xent losses (binary, softmax focal): CPU benchmark",
        "",
        f"Forward + backward, reduction='mean', {env['threads']} threads, {env['cpu_model']}, xent ISA "
        f"{env['xent_cpu_isa']}, torch {env['torch']}, {env['date']}. Median of "
        f"{data['settings']['repeats']} round-robin repeats (load average at start {env['loadavg_start']}, "
        f"at end {env.get('loadavg_end')}); malloc {env.get('malloc')}. Targets: xent >= {TARGETS['compile']:.0f}x torch.compile and "
        f">= {TARGETS['eager']:.0f}x eager. {FLOOR}: the memory floor (the gradient written, the input and a "
        "same-shaped target read, by PyTorch's copy kernels into a preallocated buffer); eager / floor bounds "
        "what any implementation can gain over eager on this machine.",
        "",
        results_table(data["results"], data["settings"]["impls"]),
        "",
        "## Correctness (relative error against PyTorch in float64: loss, and max |grad error| / max |grad|)",
        "",
        correctness_table(data["correctness"]),
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    p.add_argument("--shapes", type=lambda s: [parse_shape(v) for v in s.split(",")], default=None)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--losses", default=",".join(LOSSES), help=f"subset of {','.join(LOSSES)}")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None, help="maximum timed rounds (default 15, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2, quick 1)")
    p.add_argument("--budget", type=float, default=6.0, help="seconds of timed rounds per config (0: always --repeats)")
    p.add_argument("--no-floor", dest="floor", action="store_false", help="do not time the memory floor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malloc", choices=malloc_state.MODES, default="warm",
                   help="C allocator state while timing (see benchmarks/malloc_state.py)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "losses"))
    args = p.parse_args(argv)
    args.shapes = args.shapes or list(QUICK_SHAPES if args.quick else FULL_SHAPES)
    args.repeats = args.repeats or (3 if args.quick else 15)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.losses = [l for l in args.losses.split(",") if l]
    args.impls = [i for i in args.impls.split(",") if i]
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d}")
    for l in args.losses:
        if l not in LOSSES:
            p.error(f"unknown loss {l}")
    for i in args.impls:
        if i not in IMPLS:
            p.error(f"unknown implementation {i}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(args)
    log(f"xent losses benchmark: {env['threads']} threads, {env['cpu_model']}, ISA {env['xent_cpu_isa']}")

    correctness = []
    for loss in args.losses:
        for shape in args.shapes:
            for dtype_name in args.dtypes:
                entry = check_correctness(loss, shape, dtype_name, args.seed)
                correctness.append(entry)
                log(f"correctness {loss:16s} {shape_str(shape):>10s} {dtype_name:9s} xent loss "
                    f"{entry['xent']['loss_rel_err']:.1e} grad {entry['xent']['grad_rel_err']:.1e} | eager loss "
                    f"{entry['eager']['loss_rel_err']:.1e} grad {entry['eager']['grad_rel_err']:.1e}"
                    + ("" if not entry["problems"] else "  PROBLEM: " + "; ".join(entry["problems"])))

    env["malloc"] = malloc_state.apply(args.malloc)
    log(f"malloc while timing: {env['malloc']}")
    results = []
    for loss in args.losses:
        for shape in args.shapes:
            for dtype_name in args.dtypes:
                x, y = make_inputs(loss, shape, DTYPES[dtype_name], args.seed)
                fns, errors = {}, {}
                for name in args.impls:
                    try:
                        fns[name] = build_impl(name, loss)
                        fwd_bwd(fns[name], x.detach().clone().requires_grad_(), y)  # compiles / fails here
                    except Exception as e:  # noqa: BLE001  (e.g. torch.compile without a C++ compiler)
                        fns.pop(name, None)
                        errors[name] = f"{type(e).__name__}: {e}"[:300]
                extra = {FLOOR: memory_floor_unit(loss, x, y)} if args.floor else {}
                times = time_round_robin(fns, x, y, args.warmup, args.repeats, args.budget, extra)
                median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
                results.append({"loss": loss, "shape": list(shape), "dtype": dtype_name, "median_ms": median,
                                "times_ms": {k: [v * 1e3 for v in t] for k, t in times.items()}, "errors": errors})
                ratios = "  ".join(f"{n} {median[n] / median['xent']:.1f}x" for n in median
                                   if n not in ("xent", FLOOR) and "xent" in median)
                log(f"timing {loss:16s} {shape_str(shape):>10s} {dtype_name:9s} "
                    + "  ".join(f"{n} {m:.2f} ms" for n, m in median.items()) + (f"  | {ratios}" if ratios else "")
                    + "".join(f"  [{n}: {e}]" for n, e in errors.items()))

    if os.path.exists("/proc/loadavg"):
        with open("/proc/loadavg") as f:
            env["loadavg_end"] = f.read().strip()
    data = {
        "environment": env,
        "settings": {"shapes": [list(s) for s in args.shapes], "dtypes": args.dtypes, "losses": args.losses,
                     "impls": args.impls, "repeats": args.repeats, "warmup": args.warmup, "budget": args.budget,
                     "seed": args.seed},
        "correctness": correctness,
        "results": results,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(data, f, indent=1)
    write_markdown(os.path.join(args.out, "results.md"), data)
    log("")
    log(results_table(results, args.impls))
    log("")
    log(f"results: {os.path.join(args.out, 'results.md')}, {os.path.join(args.out, 'results.json')}")
    failed = [e for e in correctness if e["problems"]]
    if failed:
        log(f"{len(failed)} configuration(s) failed the accuracy rules")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
