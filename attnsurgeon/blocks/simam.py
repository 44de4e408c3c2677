"""SimAM: a simple, parameter-free attention module.

Paper: `SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural Networks`,
Yang et al., ICML 2021 - http://proceedings.mlr.press/v139/yang21o.html (reference code:
ZjjConan/SimAM).

Each neuron's importance is the inverse of its minimal energy, in closed form from the channel's
mean and variance over the positions: ``e = (x − μ)² / (4·(Σ(x − μ)²/(n − 1) + λ)) + ½`` and
``y = x · σ(e)`` (λ = 1e-4; n = number of positions). No parameters. Any rank.

It has no parameters, so it has no identity of its own: ``--init identity`` wraps it as
``x + α·(SimAM(x) − x)`` with a learnable α = 0 (:class:`~attnsurgeon.blocks._alpha.AlphaGate`),
exact at the start.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import AttnSurgeonError
from ._alpha import AlphaGate
from ._common import pool_axes


class SimAM(nn.Module):
    def __init__(self, e_lambda: float = 1e-4, dims: int = 2):
        super().__init__()
        self.e_lambda = float(e_lambda)
        self.pool_axes = pool_axes(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = 1
        for axis in self.pool_axes:
            n *= x.shape[axis]
        d = (x - x.mean(self.pool_axes, keepdim=True)).pow(2)
        e = d / (4 * (d.sum(self.pool_axes, keepdim=True) / (n - 1) + self.e_lambda)) + 0.5
        return x * torch.sigmoid(e)

    def extra_repr(self) -> str:
        return f"lambda={self.e_lambda}"


CLASSES = (SimAM,)


def build(fmap, *, e_lambda: float) -> SimAM:
    known = [s for s in fmap.size if s]
    if known and len(known) == fmap.dims and torch.Size(known).numel() < 2:
        raise AttnSurgeonError("simam: a map with a single position has no spatial variance to weigh neurons by")
    return SimAM(e_lambda, fmap.dims)


def init_identity(module: SimAM) -> AlphaGate:
    return AlphaGate(module)


def describe(module: SimAM) -> dict:
    return {}
