"""Hashes of every xent loss's outputs over a fixed grid of configurations: the check that a refactor or a
kernel change that should not alter results alters no bits.

Each configuration (a loss, shape, memory layout, dtype, options and reduction) runs its forward op, its
backward op with a fixed upstream gradient, and the public API's forward and backward (which takes the
fused forward + gradient op on the CPU), and hashes the raw bytes of every output. The grid reaches every
kernel path: short rows, long rows split into chunks, few long rows, the lanes layout (K-dim, transposed),
layouts that need a copy, stride-0 inputs, streamed gradients, every dtype and option.

    python scripts/output_hashes.py --out before.json            # CPU, every instruction set the CPU has
    python scripts/output_hashes.py --backend emulated --out e.json
    python scripts/output_hashes.py --compare before.json        # exits 1 and lists the configurations that differ

The CPU runs every instruction set the machine has (and on AVX512_BF16 machines both AVX-512 tables); the
emulated backend runs the CUDA kernels under the SIMT emulator (test-only build), on a smaller grid.
"""

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time

import torch

import xent

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DTYPES = {"f32": F32, "f64": F64, "bf16": BF16, "f16": F16}
REDUCTIONS = ["none", "mean", "sum"]


def _generator(name):
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:6], "little")
    return torch.Generator().manual_seed(seed)


# Layouts: the same values in another memory layout (the test suite's, tests/inputs.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from inputs import ALL_LAYOUTS  # noqa: E402

LAYOUTS = {name: ALL_LAYOUTS[name] for name in ("contiguous", "transposed", "class_sliced", "batch_sliced",
                                                "channels_last", "misaligned", "expanded")}
LAYOUTS["last_sliced"] = ALL_LAYOUTS["last_dim_sliced"]


# ------------------------------------------------------------------------------------------------
# The grids.

# (shape, layout) of the softmax losses' logits. Rows (short, long, chunked, few long rows split across
# threads), lanes (K-dim, transposed), layouts that are copied, stride 0, an empty and a one-class input.
SOFTMAX_SHAPES = [
    ((64, 80), "contiguous"),
    ((33, 1000), "contiguous"),
    ((9, 5000), "contiguous"),
    ((3, 20000), "contiguous"),
    ((40, 200), "transposed"),
    ((40, 200), "class_sliced"),
    ((40, 200), "batch_sliced"),
    ((40, 200), "misaligned"),
    ((40, 200), "expanded"),
    ((4, 7, 33), "contiguous"),
    ((2, 5, 3, 11), "contiguous"),
    ((2, 300, 9), "contiguous"),
    ((4, 7, 33), "channels_last"),
    ((3, 6, 5, 4), "channels_last"),
    ((4, 7, 33), "last_sliced"),
    ((3, 6, 5, 4), "misaligned"),
    ((5, 1), "contiguous"),
    ((0, 7), "contiguous"),
    ((2, 7, 0), "contiguous"),
    ((8, 3, 1), "contiguous"),
]
# Large enough for the streamed-gradient kernels (CPU only).
SOFTMAX_LARGE = [((4096, 1000), "contiguous"), ((2048, 5000), "contiguous")]

SOFTMAX_OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore": True},
    "smooth": {"label_smoothing": 0.1},
    "all": {"weight": True, "ignore": True, "label_smoothing": 0.2},
    "prob": {"prob": True},
    "prob_weight_smooth": {"prob": True, "weight": True, "label_smoothing": 0.1},
}

BINARY_SHAPES = [
    ((300, 80), "contiguous"),
    ((17,), "contiguous"),
    ((2, 3, 5, 7), "contiguous"),
    ((4099,), "contiguous"),
    ((64, 33), "transposed"),
    ((64, 33), "last_sliced"),
    ((64, 33), "misaligned"),
    ((0, 5), "contiguous"),
    ((), "contiguous"),
]
BINARY_LARGE = [((1024, 1000), "contiguous")]
# weight / pos_weight shapes for an input (..., C): absent, scalar, per class, per row, full.
BINARY_OPERANDS = {
    "plain": (None, None),
    "weight_class": ("class", None),
    "weight_row": ("row", None),
    "weight_full": ("full", None),
    "weight_scalar": ("scalar", None),
    "pos_class": (None, "class"),
    "both": ("full", "class"),
}
FOCAL_GAMMAS = {"g2": (0.25, 2.0), "g1.5": (0.25, 1.5), "g0": (0.25, 0.0), "noalpha_g3": (-1.0, 3.0)}


def _softmax_inputs(name, shape, layout, dtype, options):
    g = _generator(name)
    x = (torch.randn(shape, generator=g, dtype=F64) * 3).to(dtype)
    C = shape[1]
    positions = (shape[0],) + tuple(shape[2:])
    weight = (torch.rand(C, generator=g, dtype=F64) + 0.5).to(dtype) if options.get("weight") else None
    if options.get("prob"):
        t = torch.softmax(torch.randn(shape, generator=g, dtype=F64) * 2, 1).to(dtype)
        t = LAYOUTS[layout](t) if layout != "expanded" else t
    else:
        t = torch.randint(0, max(C, 1), positions, generator=g)
        if options.get("ignore"):
            t[torch.rand(positions, generator=g) < 0.25] = -100
    x = LAYOUTS[layout](x)
    return x, t, weight


def _binary_inputs(name, kind, shape, layout, dtype, operands):
    g = _generator(name)
    x = torch.randn(shape, generator=g, dtype=F64) * 3
    if kind == "bce":
        x = torch.sigmoid(x).clamp(0.002, 0.998)
    y = (torch.rand(shape, generator=g, dtype=F64) < 0.3).to(F64)
    if y.dim() >= 1 and y.shape[0] > 1:
        y[::4] = torch.rand(y[::4].shape, generator=g, dtype=F64)  # soft targets in every fourth row
    C = shape[-1] if len(shape) else 1
    rows = shape[:-1] + (1,) if len(shape) else ()

    def operand(what):
        if what is None:
            return None
        size = {"class": (C,), "row": rows, "full": shape, "scalar": ()}[what]
        return (torch.rand(size, generator=g, dtype=F64) + 0.5).to(dtype)

    weight, pos_weight = operand(operands[0]), operand(operands[1])
    return LAYOUTS[layout](x.to(dtype)), LAYOUTS[layout](y.to(dtype)), weight, pos_weight


# ------------------------------------------------------------------------------------------------
# Running one configuration.


def _upstream(loss, g):
    return (torch.rand(loss.shape, generator=g, dtype=F64) - 0.3).to(loss.dtype)


def _api_outputs(call, x, others, g):
    """The public API: forward with requires_grad (the fused op on the CPU), backward with grad_loss 1 and
    with another upstream gradient, then a forward without grad."""
    out = []
    leaf = x.detach().requires_grad_(True)
    loss = call(leaf, *others)
    go = torch.ones_like(loss) if loss.dim() == 0 else _upstream(loss, g)
    (grad,) = torch.autograd.grad(loss, [leaf], go)
    out += [loss.detach(), grad]
    loss = call(leaf, *others)
    (grad,) = torch.autograd.grad(loss, [leaf], go * 0.75)
    out.append(grad)
    with torch.no_grad():
        out.append(call(x, *others))
    return out


def _softmax_config(ops, loss_name, name, shape, layout, dtype, options, reduction, gamma):
    g = _generator(name + "/upstream")
    x, t, w = _softmax_inputs(name, shape, layout, dtype, options)
    prob = options.get("prob", False)
    eps = options.get("label_smoothing", 0.0)
    code = {"none": 0, "mean": 1, "sum": 2}[reduction]
    kw = {"reduction": code, "label_smoothing": eps}
    if loss_name == "softmax_focal_loss":
        kw["gamma"] = gamma
    base = f"{loss_name}_prob" if prob else loss_name
    if not prob:
        kw["ignore_index"] = -100
    loss, lse = getattr(ops, f"{base}_fwd")(x, t, w, **kw)
    go = _upstream(loss, g)
    grad = getattr(ops, f"{base}_bwd")(go, x, t, w, lse, **kw)
    out = [loss, lse, grad]
    if loss_name == "cross_entropy":
        api = lambda a, t_, w_: xent.cross_entropy(a, t_, w_, reduction=reduction, label_smoothing=eps)
    else:
        api = lambda a, t_, w_: xent.softmax_focal_loss(a, t_, w_, reduction=reduction, label_smoothing=eps,
                                                        gamma=gamma)
    return out + _api_outputs(api, x, (t, w), g)


def _nll_config(ops, name, shape, layout, dtype, options, reduction):
    g = _generator(name + "/upstream")
    x, t, w = _softmax_inputs(name, shape, layout, dtype, options)
    code = {"none": 0, "mean": 1, "sum": 2}[reduction]
    loss, total_weight = ops.nll_loss_fwd(x, t, w, reduction=code, ignore_index=-100)
    go = _upstream(loss, g)
    grad = ops.nll_loss_bwd(go, x, t, w, total_weight, reduction=code, ignore_index=-100)
    api = lambda a, t_, w_: xent.nll_loss(a, t_, w_, reduction=reduction)
    return [loss, total_weight, grad] + _api_outputs(api, x, (t, w), g)


BINARY_NAMES = {"bce": "binary_cross_entropy", "logits": "binary_cross_entropy_with_logits",
                "focal": "sigmoid_focal_loss"}


def _binary_config(ops, kind, name, shape, layout, dtype, operands, reduction, alpha_gamma):
    g = _generator(name + "/upstream")
    x, y, w, pw = _binary_inputs(name, kind, shape, layout, dtype, operands)
    code = {"none": 0, "mean": 1, "sum": 2}[reduction]
    op = BINARY_NAMES[kind]
    kw = {"reduction": code}
    args = (x, y, w) if kind == "bce" else (x, y, w, pw)
    if kind == "focal":
        kw["alpha"], kw["gamma"] = alpha_gamma
    loss = getattr(ops, f"{op}_fwd")(*args, **kw)
    go = _upstream(loss, g)
    grad = getattr(ops, f"{op}_bwd")(go, *args, **kw)
    if kind == "bce":
        api = lambda a, y_, w_, pw_: xent.binary_cross_entropy(a, y_, w_, reduction=reduction)
    elif kind == "logits":
        api = lambda a, y_, w_, pw_: xent.binary_cross_entropy_with_logits(a, y_, w_, reduction=reduction,
                                                                          pos_weight=pw_)
    else:
        api = lambda a, y_, w_, pw_: xent.sigmoid_focal_loss(a, y_, alpha_gamma[0], alpha_gamma[1], reduction, w_,
                                                            pw_)
    return [loss, grad] + _api_outputs(api, x, (y, w, pw), g)


def configurations(emulated):
    """(name, thunk(ops) -> list of tensors) for every configuration of the grid."""
    softmax_shapes = SOFTMAX_SHAPES + ([] if emulated else SOFTMAX_LARGE)
    binary_shapes = BINARY_SHAPES + ([] if emulated else BINARY_LARGE)
    dtypes = DTYPES if not emulated else {"f32": F32, "bf16": BF16, "f64": F64}
    for loss_name in ("cross_entropy", "softmax_focal_loss"):
        for shape, layout in softmax_shapes:
            large = (shape, layout) in SOFTMAX_LARGE
            for dname, dtype in dtypes.items():
                if large and dname in ("f64", "f16"):
                    continue
                for oname, options in SOFTMAX_OPTIONS.items():
                    if large and oname not in ("plain", "smooth", "prob"):
                        continue
                    if options.get("prob") and layout == "expanded":
                        continue
                    for reduction in (REDUCTIONS if not large else ["mean"]):
                        gammas = [2.0] if loss_name == "cross_entropy" else [2.0, 0.5]
                        for gamma in gammas[: 1 if loss_name == "cross_entropy" else 2]:
                            if gamma != 2.0 and (large or reduction != "mean"):
                                continue
                            name = f"{loss_name}|{shape}|{layout}|{dname}|{oname}|{reduction}|gamma={gamma}"
                            yield name, (lambda ops, a=(loss_name, name, shape, layout, dtype, options, reduction,
                                                        gamma): _softmax_config(ops, *a))
    for shape, layout in softmax_shapes:
        for dname, dtype in dtypes.items():
            for oname in ("plain", "weight", "ignore"):
                for reduction in REDUCTIONS:
                    name = f"nll_loss|{shape}|{layout}|{dname}|{oname}|{reduction}"
                    yield name, (lambda ops, a=(name, shape, layout, dtype, SOFTMAX_OPTIONS[oname], reduction):
                                 _nll_config(ops, *a))
    for kind in ("bce", "logits", "focal"):
        for shape, layout in binary_shapes:
            large = (shape, layout) in BINARY_LARGE
            for dname, dtype in dtypes.items():
                for oname, operands in BINARY_OPERANDS.items():
                    if kind == "bce" and operands[1] is not None:
                        continue
                    if shape == () and operands != (None, None):
                        continue
                    if large and oname not in ("plain", "weight_class"):
                        continue
                    for reduction in REDUCTIONS:
                        gammas = FOCAL_GAMMAS if kind == "focal" else {"": None}
                        for gname, alpha_gamma in gammas.items():
                            if gname not in ("", "g2") and (large or reduction == "none" or oname != "plain"):
                                continue
                            name = f"{kind}|{shape}|{layout}|{dname}|{oname}|{reduction}|{gname}"
                            yield name, (lambda ops, a=(kind, name, shape, layout, dtype, operands, reduction,
                                                        alpha_gamma): _binary_config(ops, *a))


def _digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _cpu_variants():
    """(label, context) for every CPU kernel table this machine can run."""
    original = torch.ops.xent._cpu_isa()
    variants = []
    for isa in ("avx512", "avx2", "generic"):
        try:
            torch.ops.xent._cpu_isa(isa)
        except ValueError:
            continue
        variants.append((isa, isa))
    torch.ops.xent._cpu_isa(original)
    has_bf16 = False
    try:
        with open("/proc/cpuinfo") as f:
            has_bf16 = any(line.startswith("flags") and "avx512_bf16" in line.split() for line in f)
    except OSError:
        pass

    def selected(isa, bf16_tables):
        @contextlib.contextmanager
        def ctx():
            torch.ops.xent._cpu_isa(isa)
            try:
                with _env("XENT_CPU_AVX512_BF16", "1" if bf16_tables else "0"):
                    yield
            finally:
                torch.ops.xent._cpu_isa(original)

        return ctx

    out = []
    for label, isa in variants:
        out.append((label, selected(isa, False)))
        if isa == "avx512" and has_bf16:
            out.append(("avx512_bf16", selected(isa, True)))
    return out


def run(backend, only=None, isa=None):
    results = {}
    if backend == "cpu":
        variants = [v for v in _cpu_variants() if isa is None or v[0] == isa]
        ops = torch.ops.xent
    else:
        variants = [("emulated", lambda: xent.testing.emulated_cuda("forward", 0))]
        ops = torch.ops.xent_emulated
    for label, ctx in variants:
        start = time.time()
        with ctx():
            for name, thunk in configurations(backend != "cpu"):
                if only and only not in name:
                    continue
                results[f"{label}|{name}"] = _digest(thunk(ops))
        print(f"[output_hashes] {label}: {sum(k.startswith(label + '|') for k in results)} configurations in "
              f"{time.time() - start:.0f} s", file=sys.stderr)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["cpu", "emulated"], default="cpu")
    parser.add_argument("--out", help="write the hashes (JSON) here")
    parser.add_argument("--compare", help="compare with hashes written earlier; exit 1 on any difference")
    parser.add_argument("--only", help="run only the configurations whose name contains this text")
    parser.add_argument("--isa", help="CPU: run only this kernel table (avx512, avx512_bf16, avx2, generic)")
    args = parser.parse_args()
    results = run(args.backend, args.only, args.isa)
    total = hashlib.sha256(json.dumps(results, sort_keys=True).encode()).hexdigest()[:16]
    print(f"{len(results)} configurations, total hash {total}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"total": total, "configurations": results}, f, indent=0, sort_keys=True)
    if args.compare:
        with open(args.compare) as f:
            before = json.load(f)["configurations"]
        differ = sorted(k for k in results if k in before and before[k] != results[k])
        missing = sorted(set(results) - set(before))
        if not (args.only or args.isa):
            missing = sorted(set(before) ^ set(results))
        for k in differ:
            print(f"DIFFERS {k}")
        for k in missing[:20]:
            print(f"ONLY IN ONE {k}")
        print(f"{len(differ)} differ, {len(missing)} in one run only")
        sys.exit(1 if differ or missing else 0)


if __name__ == "__main__":
    main()
