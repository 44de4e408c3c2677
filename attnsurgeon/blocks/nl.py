"""Non-local block.

Paper: `Non-local Neural Networks`, Wang et al., CVPR 2018 - https://arxiv.org/abs/1711.07971

timm's ``NonLocalAttn`` (the embedded-Gaussian form): 1×1 convs θ, φ, g map C→rd (rd = C/8,
rounded to a multiple of 8 by timm's rule), the affinity of every position with every other
(θᵀφ / √C, a softmax over positions) mixes g, a 1×1 conv maps rd→C, and a BN whose weight timm
initialises to zero is added to the input. Parameters: 4·C·rd + 3·rd + C + 2·C. Its cost grows with
the square of the positions: 2·rd·(HW)² MACs for the two affinity matmuls. Any rank: off 2-D the
map is seen as (N, C, L, 1) (exact: every op is per position or over all positions).

Identity init: the output BN's weight and bias are zero (timm's own init) and its running mean
too, so the block adds exactly 0 in eval and train mode; the BN weight learns at once, the rest
from the second step.
"""

from __future__ import annotations

import torch
from timm.layers.non_local_attn import NonLocalAttn

from ._common import flattened_if_not_2d, inner


class NonLocalBlock(NonLocalAttn):
    """timm's ``NonLocalAttn`` returning its output in its input's memory layout: timm's comes out
    channels-last strided (from its permutes), which sends the next convolutions down another
    kernel, with other rounding, although every value is the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        layout = torch.contiguous_format if x.is_contiguous() else torch.channels_last
        return out.contiguous(memory_format=layout)


CLASSES = (NonLocalAttn,)


def build(fmap, *, reduction: float, rd_divisor: int) -> torch.nn.Module:
    return flattened_if_not_2d(NonLocalBlock(fmap.channels, rd_ratio=1.0 / reduction, rd_divisor=rd_divisor), fmap.dims)


@torch.no_grad()
def init_identity(module) -> None:
    norm = inner(module).norm
    norm.weight.zero_()
    norm.bias.zero_()
    norm.running_mean.zero_()


def describe(module) -> dict:
    return {"hidden": inner(module).t.out_channels}
