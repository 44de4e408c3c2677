"""MACs with fvcore, element-wise ops included.

fvcore counts one multiply-add as one "flop" and, by default, skips element-wise ops — the very
ops an attention block is made of (pooling, the sigmoid gate, the broadcast multiply). This module
adds handles for them, in fvcore's own unit, and keeps its convention explicit:

* **MACs**: a multiply-add in a conv/linear/matmul counts 1 (fvcore's default handles); an
  element-wise or reduction op counts 1 per element it produces (pointwise) or reads (reductions);
  a pooling window counts its size per output element.
* **FLOPs** = 2 × MACs.

Ops still without a handle are listed with their call counts instead of fvcore's warnings. A new op
is one entry in :data:`EXTRA_HANDLES` (a pure function of the op's input/output shapes).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod
from typing import Any

Handle = Callable[[list, list], float]


def _shape(value: Any) -> list[int] | None:
    from fvcore.nn.jit_handles import get_shape

    return get_shape(value)


def _per_output(inputs: list, outputs: list) -> float:
    shape = _shape(outputs[0])
    return float(prod(shape)) if shape is not None else 0.0


def _per_input(inputs: list, outputs: list) -> float:
    shape = _shape(inputs[0])
    return float(prod(shape)) if shape is not None else 0.0


def _pool_window(inputs: list, outputs: list) -> float:
    kernel = inputs[1].toIValue() if len(inputs) > 1 else None
    window = prod(kernel) if isinstance(kernel, (list, tuple)) and kernel else 1
    shape = _shape(outputs[0])
    return float(prod(shape) * window) if shape is not None else 0.0


def _sdpa(inputs: list, outputs: list) -> float:
    q, k, v = (_shape(t) for t in inputs[:3])
    if not (q and k and v):
        return 0.0
    *batch, length, dim = q
    keys, dim_v = k[-2], v[-1]
    # q @ k^T, softmax over the scores, scores @ v
    return float(prod(batch) * length * keys * (dim + 1 + dim_v))


_POINTWISE = [
    "sigmoid",
    "sigmoid_",
    "hardsigmoid",
    "hardsigmoid_",
    "relu",
    "relu_",
    "relu6",
    "hardtanh",
    "hardtanh_",
    "silu",
    "silu_",
    "gelu",
    "gelu_",
    "hardswish",
    "hardswish_",
    "tanh",
    "tanh_",
    "elu",
    "elu_",
    "leaky_relu",
    "leaky_relu_",
    "mish",
    "softplus",
    "maximum",
    "minimum",
    "mul",
    "mul_",
    "add",
    "add_",
    "sub",
    "sub_",
    "rsub",
    "div",
    "div_",
    "neg",
    "exp",
    "sqrt",
    "rsqrt",
    "pow",
    "abs",
    "log",
    "erf",
    "reciprocal",
    "square",
    "addcmul",
    "lerp",
]
_REDUCTIONS = [
    "mean",
    "sum",
    "amax",
    "amin",
    "max",
    "min",
    "std",
    "var",
    "norm",
    "logsumexp",
    "softmax",
    "log_softmax",
    "adaptive_max_pool2d",
    "adaptive_avg_pool1d",
    "adaptive_max_pool1d",
    "adaptive_avg_pool3d",
    "adaptive_max_pool3d",
    "cumsum",
]
_POOLS = [
    "avg_pool1d",
    "max_pool1d",
    "avg_pool2d",
    "max_pool2d",
    "max_pool2d_with_indices",
    "avg_pool3d",
    "max_pool3d",
    "max_pool3d_with_indices",
]
# Data movement that costs no arithmetic: counted as zero so that it is not reported as uncounted.
_FREE = [
    "expand_as",
    "view_as",
    "reshape_as",
    "clone",
    "alias",
    "chunk",
    "pad",
    "pixel_shuffle",
    "pixel_unshuffle",
    "channel_shuffle",
    "repeat",
    "tile",
    "roll",
    "flip",
    "masked_fill_",
    "fill_",
    "zero_",
    "new_ones",
    "lift_fresh",
    "dropout_",
    "feature_dropout",
    "alpha_dropout",
    "numel",
    "dim",
    "movedim",
    "stack",
    "unflatten",
    "split",
    "native_dropout",
    "contiguous",
    "detach_",
    "empty_like",
    "ones_like",
    "linspace",
    "meshgrid",
    "_unsafe_view",
]

EXTRA_HANDLES: dict[str, Handle | None] = {
    **{f"aten::{op}": _per_output for op in _POINTWISE},
    **{f"aten::{op}": _per_input for op in _REDUCTIONS},
    **{f"aten::{op}": _pool_window for op in _POOLS},
    "aten::scaled_dot_product_attention": _sdpa,
    **{f"aten::{op}": (lambda inputs, outputs: 0.0) for op in _FREE},
}
EXTRA_KEYS = {name.split("::", 1)[1] for name in EXTRA_HANDLES}


@dataclass
class FlopCount:
    """MACs of one forward pass on a batch of one."""

    macs: int
    by_operator: dict[str, int]
    by_module: dict[str, int] = field(repr=False)
    uncounted: dict[str, int]  # op -> calls, ops no handle counts
    fvcore_default_macs: int  # what stock FlopCountAnalysis reports (no element-wise ops)

    @property
    def flops(self) -> int:
        return 2 * self.macs


def count_macs(model: Any, example: Any) -> FlopCount:
    """Count MACs of ``model(example)`` (``model(*example)`` for a tuple of arguments) with fvcore plus
    :data:`EXTRA_HANDLES` (see module docstring)."""
    # fvcore scripts a helper at import; torch now calls torch.jit.script deprecated
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis

    from ..core.native import quiet_native_output

    was_training = model.training
    model.eval()
    try:
        analysis = (
            FlopCountAnalysis(model, example if isinstance(example, tuple) else (example,))
            .set_op_handle(**EXTRA_HANDLES)
            .unsupported_ops_warnings(False)
            .uncalled_modules_warnings(False)
            .tracer_warnings("none")
        )
        # not under no_grad: there nn.MultiheadAttention takes a fused fast path whose one op
        # (_native_multi_head_attention) hides its matmuls from the count, as stock fvcore avoids too
        with quiet_native_output():
            total = analysis.total()
        by_operator = {k: int(v) for k, v in analysis.by_operator().items() if v}
        by_module = {k: int(v) for k, v in analysis.by_module().items()}
        uncounted = dict(analysis.unsupported_ops())
    finally:
        model.train(was_training)
    default = sum(v for k, v in by_operator.items() if k not in EXTRA_KEYS)
    return FlopCount(int(total), by_operator, by_module, uncounted, int(default))
