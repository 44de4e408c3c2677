"""A channel gate's product whose backward needs no rebuilt feature map.

In a selective plan (:mod:`attnsurgeon.rewriting.recompute`) a gate ``y = x * s`` keeps ``x`` for one
thing only: ``∂L/∂s = Σ g·x`` over the positions ``s`` is broadcast along (``∂L/∂x = g·s`` needs only
``s``). Rebuilding ``x`` for that sum costs a full element-wise pass and a map-sized allocation in
every step's backward, and the plain product's own backward writes ``g·x`` in full before summing it.
:class:`GateProduct` takes the sum without either. With ``x = BN(z)``, a batch norm's output,
``x = (z - mean)·a + bias``, ``a = weight·invstd`` (the batch
statistics the forward used), so ``Σ g·x = a·Σ g·(z - mean) + bias·Σ g``; ``Σ g·(z - mean)`` and ``Σ g`` are
what batch norm's own backward reduces: ``aten.native_batch_norm_backward`` over the map viewed as one
sample of ``N·C`` channels gives both, per (sample, channel), in one read of ``g`` and ``z`` — centred as
the norm's, so nothing cancels — and writes nothing the size of the map (:func:`norm_gradient`). That
is cheaper than the plain model's backward.

A gate on a map made *from* the norm's output (SiLU of it, in EfficientNet) keeps the plan's rebuild:
summing ``g·SiLU(BN(z))`` a few samples at a time, from ``BN(z)`` rebuilt for SiLU's own backward, was
tried and measured no faster (EfficientNet-B0 112², batch 4: the rebuild path 1.4 % [0.0, 2.0] faster;
CBAM, whose max pooling needs the map anyway, 0.8 % [−0.2, 1.9]; docs/memory-efficient.md).

The result equals the plain product's gradient up to the order of a float sum. A product takes this
path where :func:`applies`: ``s`` varies only along the batch and channel axes of a norm's output whose
input can be read as N·C rows (contiguous) in the statistics' dtype (float32; under autocast, and for
channels-last maps, the plan rebuilds ``x`` as before).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .rebuilds import norm_scale


def applies(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, mean: torch.Tensor) -> bool:
    """Whether ``x * s``, ``x`` a batch norm's output of ``z`` with batch mean ``mean``, is a gate's product whose
    gradient :func:`norm_gradient` takes: ``s`` needs a gradient and varies only along ``x``'s batch and channel
    axes, and ``z`` reads as N·C rows in the statistics' dtype."""
    if not (torch.is_grad_enabled() and s.requires_grad and x.dim() >= 2 and s.dim() <= x.dim()):
        return False
    shape = (1,) * (x.dim() - s.dim()) + tuple(s.shape)
    return (
        shape[0] in (1, x.shape[0])
        and shape[1] in (1, x.shape[1])
        and all(d == 1 for d in shape[2:])
        and z.shape == x.shape
        and z.is_contiguous()
        and x.dtype == s.dtype == z.dtype == mean.dtype
    )


class GateProduct(torch.autograd.Function):
    """``x * s`` (``s * x`` is the same: a float product commutes exactly), differentiated in ``x`` as the product
    is and in ``s`` by ``gradient(g)``: ``Σ g·x`` per (sample, channel), shaped (N, C, 1, …), taken without ``x``."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, s: torch.Tensor, gradient: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        ctx.save_for_backward(s)
        ctx.gradient = gradient
        return x * s

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (s,) = ctx.saved_tensors
        # dropped here, as autograd drops saved tensors: the node outlives its backward, and what the function
        # reads (the plan's records: the norm's input) would stay alive to the end of the backward pass
        gradient, ctx.gradient = ctx.gradient, None
        grad_x = g * s if ctx.needs_input_grad[0] else None
        grad_s = gradient(g).sum_to_size(s.shape) if ctx.needs_input_grad[1] else None
        return grad_x, grad_s, None


def norm_gradient(
    g: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``Σ g·BN(z)`` over the axes after the channel one, per (sample, channel), from ``z`` and the batch
    statistics (``z`` contiguous: :func:`applies`)."""
    n, c = z.shape[:2]
    flat = (1, n * c, -1)
    _, centred, total = torch.ops.aten.native_batch_norm_backward(
        g.reshape(flat), z.view(flat), None, None, None, mean.repeat(n), torch.ones_like(mean).repeat(n), True, 0.0,
        [False, True, True],
    )  # fmt: skip
    out = centred.view(n, c) * norm_scale(invstd, weight)
    if bias is not None:
        out = out + total.view(n, c) * bias
    return out.view((n, c) + (1,) * (z.dim() - 2))
