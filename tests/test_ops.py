"""Every op of xent's namespaces is checked by torch.library.opcheck somewhere: the losses' shared tests
(``LossTester`` subclasses, tests/harness/tester.py, each asserting that its samples reach its ``OPS``)
and the fused forward + gradient ops' (tests/test_fused_grad.py)."""

import torch

import test_binary_losses
import test_cross_entropy
import test_fused_grad
import test_nll_loss
import test_softmax_focal_loss
from harness.tester import LossTester, op_namespaces

SUITES = (test_binary_losses, test_cross_entropy, test_nll_loss, test_softmax_focal_loss)


def _testers(cls=LossTester):
    for sub in cls.__subclasses__():
        yield sub
        yield from _testers(sub)


def test_every_op_is_opchecked():
    covered = {f"{ns}::{op}" for cls in _testers() for ns in op_namespaces() for op in cls.OPS}
    # tests/test_fused_grad.py: the fused ops and scale_grad_ (CPU only: the fused path is the CPU's).
    covered |= {f"xent::{case[2]}" for case in test_fused_grad.FUSED_CASES.values()} | {"xent::scale_grad_"}
    ops = {
        name for name in torch._C._dispatch_get_all_op_names()
        if name.split("::")[0] in op_namespaces() and not name.split("::")[1].startswith("_")
        and torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    }
    assert {m.__name__ for m in SUITES} <= {c.__module__ for c in _testers()}
    assert ops <= covered, f"ops no suite opchecks: {sorted(ops - covered)}"
