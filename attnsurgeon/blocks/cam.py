"""The seeds' "ENCAM" channel attention (seed 004; the channel gate of CBAM, Woo et al., ECCV 2018 -
https://arxiv.org/abs/1807.06521, as the ENCAM code writes it).

The average- and the max-pooled channel descriptors go through ONE shared MLP of 1×1 convs
(C→C/8→C, no biases, ReLU); the two results are summed and a sigmoid gates the channels. It is
CBAM's channel gate alone, with reduction 8: timm's ``ChannelAttn`` (its N-d twin off 2-D).
Parameters: 2·C·rd with rd = C/``reduction`` (at least 1). Any rank.

Identity init as CBAM's channel gate: the MLP's last conv is zeroed, the gate becomes ``2·sigmoid``.
"""

from __future__ import annotations

import torch
from timm.layers.cbam import ChannelAttn

from ._common import ScaledSigmoid, reduced_channels, zero_gate_input_mlp
from .cbam import ChannelAttnNd

CLASSES = (ChannelAttn,)
GATES = {"channel": ("gate", "channel")}  # read by explain: name -> (submodule, channel|spatial)


def build(fmap, *, reduction: float, bias: bool) -> ChannelAttn:
    rd = reduced_channels("cam", fmap.channels, reduction, 1)
    if fmap.dims == 2:
        return ChannelAttn(fmap.channels, rd_channels=rd, mlp_bias=bool(bias))
    return ChannelAttnNd(fmap.channels, rd, bool(bias), fmap.dims)


@torch.no_grad()
def init_identity(module: ChannelAttn) -> None:
    zero_gate_input_mlp(module.fc1, module.fc2)
    module.gate = ScaledSigmoid(2.0)


def describe(module: ChannelAttn) -> dict:
    return {"hidden": module.fc1.out_channels, "bias": module.fc1.bias is not None}
