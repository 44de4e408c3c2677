"""Convolutional Block Attention Module.

Paper: `CBAM: Convolutional Block Attention Module` - https://arxiv.org/abs/1807.06521

timm's ``CbamModule``: a channel gate (a shared MLP over the average- and max-pooled channels,
reduction 16, no biases) followed by a spatial gate (a k×k conv + BN over the channel-wise
average and max maps, k=7).
"""

from __future__ import annotations

import torch
from timm.layers.cbam import CbamModule

from ..errors import AttnSurgeonError
from ._common import ScaledSigmoid, reduced_channels, zero_gate_input_mlp

CLASSES = (CbamModule,)
OPTIONS = {"reduction": 16, "bias": False, "kernel_size": 7, "rd_divisor": 1}


def build(channels: int, reduction: float = 16, bias: bool = False, kernel_size: int = 7, rd_divisor: int = 1) -> CbamModule:
    rd = reduced_channels("cbam", channels, reduction, rd_divisor)
    k = int(kernel_size)
    if k < 1 or k % 2 == 0:
        raise AttnSurgeonError(f"cbam: spatial kernel size must be a positive odd number, got {kernel_size}")
    return CbamModule(channels, rd_channels=rd, spatial_kernel_size=k, mlp_bias=bool(bias))


@torch.no_grad()
def init_identity(module: CbamModule) -> None:
    # channel gate: the shared MLP outputs zero for the avg and the max branch alike
    zero_gate_input_mlp(module.channel.fc1, module.channel.fc2)
    module.channel.gate = ScaledSigmoid(2.0)
    # spatial gate: a zero conv gives BN a zero input; with zero running mean BN outputs its
    # bias, which is zeroed, in eval and train mode alike. The conv still learns through BN's weight.
    spatial = module.spatial
    spatial.conv.conv.weight.zero_()
    spatial.conv.bn.bias.zero_()
    spatial.conv.bn.running_mean.zero_()
    spatial.gate = ScaledSigmoid(2.0)


def describe(module: CbamModule) -> dict:
    ch = module.channel
    return {"hidden": ch.fc1.out_channels, "bias": ch.fc1.bias is not None,
            "kernel_size": module.spatial.conv.conv.kernel_size[0]}
