"""The op table: every loss's entry (xent/_registrar.py), and their registration. Importing this module
loads the kernels (xent/_library.py) and registers the fake kernels and autograd of every op in every op
namespace.

Each op family keeps its formulas and entries in its own module: xent/_cross_entropy_ops.py,
xent/_nll_ops.py, xent/_softmax_focal_ops.py, xent/_binary_ops.py.
"""

from . import _binary_ops, _cross_entropy_ops, _nll_ops, _registrar, _softmax_focal_ops

TABLE = (
    _cross_entropy_ops.INDEX,
    _cross_entropy_ops.PROB,
    _nll_ops.NLL,
    _softmax_focal_ops.INDEX,
    _softmax_focal_ops.PROB,
    _binary_ops.BINARY_CROSS_ENTROPY,
    _binary_ops.BINARY_CROSS_ENTROPY_WITH_LOGITS,
    _binary_ops.SIGMOID_FOCAL_LOSS,
)

_registrar.register(TABLE)
