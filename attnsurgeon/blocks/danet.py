"""DANet's channel attention module.

Paper: `Dual Attention Network for Scene Segmentation`, Fu et al., CVPR 2019 -
https://arxiv.org/abs/1809.02983 (the CAM of its reference code, as seed 004 writes it with mmcv).

Every channel attends to every channel: the energy ``X·Xᵀ`` (C×C, X the map as C × positions),
``max(energy) − energy`` per row, a softmax over the row, the attention applied to X, scaled by a
learnable γ that starts at 0 and added to the input: ``y = γ·softmax(max − XXᵀ)·X + x``. One
parameter; 2·C²·N MACs for the two matmuls. Any rank (X is the map flattened over its positions).

Identity init: γ = 0, DANet's own init: the block adds exactly 0 and γ learns at once.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelAttentionModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        query = x.reshape(b, c, -1)
        energy = torch.bmm(query, query.transpose(1, 2))
        energy_new = torch.amax(energy, -1, keepdim=True).expand_as(energy) - energy
        attention = torch.softmax(energy_new, dim=-1)
        out = torch.bmm(attention, query).reshape(x.shape)
        return self.gamma * out + x


CLASSES = (ChannelAttentionModule,)


def build(fmap) -> ChannelAttentionModule:
    return ChannelAttentionModule()


@torch.no_grad()
def init_identity(module: ChannelAttentionModule) -> None:
    module.gamma.zero_()


def describe(module: ChannelAttentionModule) -> dict:
    return {}
