"""The α-gate: an exact identity start for any block."""

from __future__ import annotations

import torch
from torch import nn


class AlphaGate(nn.Module):
    """``x + α·(f(x) − x)`` with a learnable scalar α that starts at 0: any block ``f`` of a tensor
    to a tensor of its shape, made an exact identity at the start (α = 0 gives ``x`` exactly while
    ``f(x)`` is finite). α learns from the first step (its gradient is ``Σ g·(f(x) − x)``), and
    ``f``'s weights as soon as α leaves 0. ``--init identity`` for blocks with no identity of their
    own: those given by reference, and SimAM, which has no parameters."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * (self.block(x) - x)
