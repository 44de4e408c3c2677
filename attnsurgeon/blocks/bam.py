"""Bottleneck Attention Module.

Paper: `BAM: Bottleneck Attention Module`, Park, Woo, Lee & Kweon, BMVC 2018 -
https://arxiv.org/abs/1807.06514 (reference code: Jongchan/attention-module, ``bam.py``).

Placed between stages (its natural position is ``stage``). A channel branch (global average
pool, FC C→C/r + BatchNorm + ReLU, FC back to C) and a spatial branch (1×1 conv C→C/r + BN +
ReLU, two 3×3 convs with dilation 4 + BN + ReLU, a 1×1 conv to one map) are broadcast together and
gate the map as ``x · (1 + σ(c · s))``, as the reference code computes it (r = 16, dilation 4).
Parameters: 2·C·rd + rd + C + 2·rd (channel, with BN) + C·rd + rd + 2·rd + 2·(9·rd² + rd + 2·rd)
+ rd + 1 (spatial). 2-D maps only (dilated 3×3 convs). Like the reference, its BatchNorm over the
pooled vector needs a batch of 2 or more in training.

Identity init: the channel branch's last layer is zeroed, so c · s = 0, and the gate ``1 + σ`` becomes
``2·σ`` (exactly 1 at 0, slope ½): the block starts as an identity, the channel branch learns at
once and the spatial branch from the second step.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from ._common import ScaledSigmoid, reduced_channels, require_2d


class OnePlusSigmoid(nn.Module):
    """BAM's gate, ``1 + σ(x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x) + 1


class BAM(nn.Module):
    def __init__(self, channels: int, rd_channels: int, dilation: int = 4):
        super().__init__()
        self.channel = nn.Sequential(
            nn.Linear(channels, rd_channels),
            nn.BatchNorm1d(rd_channels),
            nn.ReLU(inplace=True),
            nn.Linear(rd_channels, channels),
        )
        layers: list[nn.Module] = [
            nn.Conv2d(channels, rd_channels, 1),
            nn.BatchNorm2d(rd_channels),
            nn.ReLU(inplace=True),
        ]
        for _ in range(2):
            layers += [
                nn.Conv2d(rd_channels, rd_channels, 3, padding=dilation, dilation=dilation),
                nn.BatchNorm2d(rd_channels),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(rd_channels, 1, 1))
        self.spatial = nn.Sequential(*layers)
        self.gate: nn.Module = OnePlusSigmoid()  # 2·sigmoid after init_identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.channel(x.mean((2, 3)))[:, :, None, None]
        s = self.spatial(x)
        return x * self.gate(c * s)


CLASSES = (BAM,)


def build(fmap, *, reduction: float) -> BAM:
    require_2d("bam", fmap, "its spatial branch is dilated 3×3 convs over H, W")
    return BAM(fmap.channels, reduced_channels("bam", fmap.channels, reduction, 1))


@torch.no_grad()
def init_identity(module: BAM) -> None:
    last = cast(nn.Linear, module.channel[-1])  # the channel MLP's last layer
    last.weight.zero_()
    last.bias.zero_()
    module.gate = ScaledSigmoid(2.0)


def describe(module: BAM) -> dict:
    return {"hidden": module.channel[0].out_features}
