"""A channel gate's product whose backward needs no rebuilt feature map.

In a selective plan (:mod:`attnsurgeon.rewriting.recompute`) a gate ``y = x * s`` keeps ``x`` for one
thing only: ``∂L/∂s = Σ g·x`` over the positions ``s`` is broadcast along (``∂L/∂x = g·s`` needs only
``s``). Rebuilding ``x`` for that sum costs a full element-wise pass and a map-sized allocation in
every step's backward, and the plain product's own backward writes ``g·x`` in full before summing it.
:class:`GateProduct` takes the sum without either:

* ``x = BN(z)``, a batch norm's output: with ``x = (z - mean)·a + bias``, ``a = weight·invstd`` (the
  batch statistics the forward used), ``Σ g·x = a·Σ g·(z - mean) + bias·Σ g``, and ``Σ g·(z - mean)``
  and ``Σ g`` are what batch norm's own backward reduces: ``aten.native_batch_norm_backward`` over the
  map viewed as one sample of ``N·C`` channels gives both, per (sample, channel), in one read of ``g``
  and ``z`` — centred as the norm's, so nothing cancels — and writes nothing the size of the map
  (:func:`norm_gradient`). That is cheaper than the plain model's backward.
* any other ``x`` the plan can rebuild row by row (an activation of the norm's output, a product of it
  with a per-sample scale): ``Σ g·x`` is summed over a few samples at a time (:func:`summed_by_rows`),
  each block of ``x`` rebuilt from the same rows of what it is made of, or read from the rebuilt ``x``
  where another op's backward has it already: small blocks, no map-sized write.

Either equals the plain product's gradient up to the order of a float sum. A product takes this path
where :func:`applies`: ``s`` varies only along the batch and channel axes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable

ROWS_BYTES = 2 << 20  # how much of x a block of rows holds (cache-sized)


def applies(x: torch.Tensor, s: torch.Tensor) -> bool:
    """Whether ``x * s`` is a gate's product: ``s`` needs a gradient and varies only along ``x``'s batch and
    channel axes."""
    if not (torch.is_grad_enabled() and s.requires_grad and x.dim() >= 2 and s.dim() <= x.dim()):
        return False
    shape = (1,) * (x.dim() - s.dim()) + tuple(s.shape)
    return shape[0] in (1, x.shape[0]) and shape[1] in (1, x.shape[1]) and all(d == 1 for d in shape[2:])


class GateProduct(torch.autograd.Function):
    """``x * s`` (or ``s * x``), differentiated in ``x`` as the product is and in ``s`` by ``gradient(g)``:
    ``Σ g·x`` per (sample, channel), shaped (N, C, 1, …), taken without ``x``."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, s: torch.Tensor, x_first: bool, gradient: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        ctx.save_for_backward(s)
        ctx.gradient = gradient
        return x * s if x_first else s * x

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (s,) = ctx.saved_tensors
        # dropped here, as autograd drops saved tensors: the node outlives its backward, and what the function
        # reads (the plan's records: the norm's input) would stay alive to the end of the backward pass
        gradient, ctx.gradient = ctx.gradient, None
        grad_x = g * s if ctx.needs_input_grad[0] else None
        grad_s = gradient(g).sum_to_size(s.shape) if ctx.needs_input_grad[1] else None
        return grad_x, grad_s, None, None


def norm_gradient(
    g: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor | None:
    """``Σ g·BN(z)`` over the axes after the channel one, per (sample, channel), from ``z`` and the batch
    statistics; None where ``z`` cannot be read as N·C rows (channels-last) or is not in the statistics'
    dtype (under autocast)."""
    if not (z.is_contiguous() and z.shape == g.shape and z.dtype == mean.dtype == g.dtype):
        return None
    n, c = z.shape[:2]
    flat = (1, n * c, -1)
    _, centred, total = torch.ops.aten.native_batch_norm_backward(
        g.reshape(flat), z.view(flat), None, None, None, mean.repeat(n), torch.ones_like(mean).repeat(n), True, 0.0,
        [False, True, True],
    )  # fmt: skip
    scale = invstd if weight is None else invstd * weight
    out = centred.view(n, c) * scale
    if bias is not None:
        out = out + total.view(n, c) * bias
    return out.view((n, c) + (1,) * (z.dim() - 2))


def summed_by_rows(g: torch.Tensor, rows: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """``Σ g·x`` over the axes after the channel one, per (sample, channel), with ``rows(i, j)`` giving
    ``x[i:j]``: a few samples at a time."""
    n = g.shape[0]
    step = max(1, ROWS_BYTES // max(1, g[0].numel() * g.element_size()))
    axes = tuple(range(2, g.dim()))
    return torch.cat([(g[i : i + step] * rows(i, min(i + step, n))).sum(axes, keepdim=True) for i in range(0, n, step)])
