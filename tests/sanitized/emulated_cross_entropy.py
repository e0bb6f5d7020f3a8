"""Workload for tests/test_emulated_sanitizers.py: cross-entropy through the emulated CUDA kernels,
forward and backward, misaligned rows, split rows, lanes layout, all dtypes, forward and random schedules."""
import torch, torch.nn.functional as F, xent
assert xent.testing.emulated_cuda_available()
torch.manual_seed(0)
cases = [((8, 5000), (8,)), ((3, 21, 5, 7), (3, 5, 7)), ((4, 9000), (4,)), ((7, 33), (7,))]
n = 0
for sched in ["forward", "random"]:
  for shape, tshape in cases:
    for dt in [torch.float32, torch.bfloat16, torch.float64]:
      for kw in [{}, dict(label_smoothing=0.1, weight=torch.rand(shape[1], dtype=dt)), dict(reduction="none", ignore_index=0)]:
        base = torch.randn(int(torch.tensor(shape).prod()) + 1, dtype=dt)
        x = base[1:].view(shape).requires_grad_()   # misaligned
        t = torch.randint(0, shape[1], tshape)
        with xent.testing.emulated_cuda(sched, 3):
            l = xent.cross_entropy(x, t, **kw)
            g, = torch.autograd.grad(l.sum(), x)
        r = F.cross_entropy(x.double(), t, **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()})
        assert torch.allclose(l.double(), r, rtol=1e-2, atol=1e-2), (shape, dt, kw)  # bf16-level; parity is tested elsewhere
        n += 1
      p = torch.softmax(torch.randn(shape, dtype=dt), 1)
      with xent.testing.emulated_cuda(sched, 1):
        l = xent.cross_entropy(torch.randn(shape, dtype=dt, requires_grad=True), p, label_smoothing=0.2)
        l.backward()
      n += 1
print("asan run ok", n)
