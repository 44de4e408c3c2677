"""Concurrent spatial and channel squeeze & excitation (scSE).

Paper: `Concurrent Spatial and Channel 'Squeeze & Excitation' in Fully Convolutional Networks`,
Roy, Navab & Wachinger, MICCAI 2018 - https://arxiv.org/abs/1803.02579 (seed 003's list).

Two gates side by side: cSE, an SE (global average pool, C→C/r→C with biases, ReLU, sigmoid,
r = 2 as in the authors' code, ai-med/squeeze_and_excitation) recalibrating channels, and sSE, a
1×1 conv C→1 with a sigmoid recalibrating positions. They are fused by ``max`` (the authors'
``ChannelSpatialSELayer``, default) or ``sum`` (the MICCAI paper's formula, also
segmentation_models_pytorch's ``SCSEModule``). Parameters: 2·C·rd + rd + C + C + 1. Any rank.

Identity init: both gate inputs are zeroed (cSE's last conv, sSE's conv). With ``max`` both gates
become ``2·sigmoid`` (exactly 1: max(x, x) = x); with ``sum`` they stay sigmoids (exactly ½ each:
½x + ½x = x). Every weight still learns.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import ScaledSigmoid, conv_nd, pool_axes, reduced_channels, zero_gate_input_mlp


class SCSEModule(nn.Module):
    def __init__(self, channels: int, rd_channels: int, fusion: str, dims: int = 2):
        super().__init__()
        conv = conv_nd(dims)
        self.pool_axes = pool_axes(dims)
        self.fusion = fusion
        self.fc1 = conv(channels, rd_channels, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = conv(rd_channels, channels, 1)
        self.channel_gate: nn.Module = nn.Sigmoid()  # 2·sigmoid after init_identity
        self.spatial = conv(channels, 1, 1)
        self.spatial_gate: nn.Module = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x * self.channel_gate(self.fc2(self.act(self.fc1(x.mean(self.pool_axes, keepdim=True)))))
        s = x * self.spatial_gate(self.spatial(x))
        return torch.maximum(c, s) if self.fusion == "max" else c + s

    def extra_repr(self) -> str:
        return f"fusion={self.fusion}"


CLASSES = (SCSEModule,)
GATES = {
    "channel": ("channel_gate", "channel"),
    "spatial": ("spatial_gate", "spatial"),
}  # read by explain: name -> (submodule, channel|spatial)


def build(fmap, *, reduction: float, fusion: str) -> SCSEModule:
    return SCSEModule(fmap.channels, reduced_channels("scse", fmap.channels, reduction, 1), fusion, fmap.dims)


@torch.no_grad()
def init_identity(module: SCSEModule) -> None:
    zero_gate_input_mlp(module.fc1, module.fc2)
    module.spatial.weight.zero_()
    assert module.spatial.bias is not None  # built with a bias
    module.spatial.bias.zero_()
    if module.fusion == "max":
        module.channel_gate = ScaledSigmoid(2.0)
        module.spatial_gate = ScaledSigmoid(2.0)


def describe(module: SCSEModule) -> dict:
    return {"hidden": module.fc1.out_channels}
