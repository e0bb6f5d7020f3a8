"""Workload for tests/test_emulated_sanitizers.py: the binary losses through the emulated CUDA kernels,
forward and backward: vector kernels with a misaligned head and a tail, scalar kernels, strided / broadcast /
scalar / materialized operands, an expanded grad_loss, all dtypes, forward and random schedules."""
import torch, torch.nn.functional as F, xent
assert xent.testing.emulated_cuda_available()
torch.manual_seed(0)
shapes = [(37, 81), (3, 1100), (2, 3, 2, 3, 2, 5), (7,)]
n = 0
for sched in ["forward", "random"]:
  for shape in shapes:
    for dt in [torch.float32, torch.bfloat16, torch.float64, torch.float16]:
      for misaligned in (False, True):
        numel = int(torch.tensor(shape).prod())
        base = torch.randn(numel + 1, dtype=dt)
        x = (base[1:] if misaligned else base[:numel]).view(shape)
        ybase = torch.rand(numel + 1, dtype=dt)
        y = (ybase[1:] if misaligned else ybase[:numel]).view(shape)
        p = torch.sigmoid(x.float()).clamp(0.01, 0.99).to(dt)
        C = shape[-1]
        w_class, w_row = torch.rand(C, dtype=dt) + 0.5, torch.rand(shape[:-1] + (1,), dtype=dt) + 0.5
        w_alt = torch.rand(tuple(s if i % 2 else 1 for i, s in enumerate(shape)), dtype=dt) + 0.5
        for w, pw in ((None, None), (w_class, torch.tensor(2.0, dtype=dt)), (w_row, w_class), (w_alt, w_alt)):
          for reduction in ("none", "mean", "sum"):
            xs = x.detach().clone().requires_grad_() if not misaligned else x.detach().requires_grad_()
            ps = p.detach().requires_grad_()
            with xent.testing.emulated_cuda(sched, 3):
              losses = [xent.binary_cross_entropy(ps, y, w, reduction=reduction),
                        xent.binary_cross_entropy_with_logits(xs, y, w, reduction=reduction, pos_weight=pw),
                        xent.sigmoid_focal_loss(xs, y, 0.25, 1.5 if reduction == "sum" else 2.0, reduction,
                                                weight=w, pos_weight=pw)]
              for l in losses:
                torch.autograd.grad(l.sum(), [ps if l is losses[0] else xs])
            ref = F.binary_cross_entropy_with_logits(x.double(), y.double(), None if w is None else w.double(),
                                                     reduction=reduction, pos_weight=None if pw is None else pw.double())
            # This run hunts memory errors under ASan/UBSan, not accuracy (tests/test_binary_losses.py checks
            # parity with dtype-derived tolerances): a bound loose enough for bf16 inputs and results (2**-8
            # relative each) that still rejects garbage from a wrong read.
            assert torch.allclose(losses[1].double(), ref, rtol=2e-2, atol=2e-2), (shape, dt, reduction)
            n += 1
print("asan run ok", n)
