"""Convolutional Block Attention Module.

Paper: `CBAM: Convolutional Block Attention Module` - https://arxiv.org/abs/1807.06521

timm's ``CbamModule``: a channel gate (a shared MLP over the average- and max-pooled channels,
reduction 16, no biases) followed by a spatial gate (a k×k conv + BN over the channel-wise
average and max maps, k=7).

On 1-D and 3-D maps the same module is built with 1-D/3-D convolutions and norm: the spatial gate
becomes a k (1-D) or k×k×k (3-D) conv, so its parameters are 2·k^d + 2 for d spatial dimensions.
"""

from __future__ import annotations

import torch
from timm.layers.cbam import CbamModule, ChannelAttn

from ._common import (
    ScaledSigmoid,
    batchnorm_nd,
    check_kernel_fits,
    conv_nd,
    pool_axes,
    reduced_channels,
    zero_gate_input_mlp,
)


class ChannelAttnNd(ChannelAttn):
    """timm's CBAM channel gate for feature maps of 1 to 3 spatial dimensions."""

    def __init__(self, channels: int, rd_channels: int, mlp_bias: bool, dims: int):
        super().__init__(channels, rd_channels=rd_channels, mlp_bias=mlp_bias)
        conv = conv_nd(dims)
        # timm types fc1 and fc2 as Conv2d; these are of the map's rank (Conv1d, Conv2d or Conv3d)
        self.fc1 = conv(channels, rd_channels, 1, bias=mlp_bias)  # type: ignore[assignment]
        self.fc2 = conv(rd_channels, channels, 1, bias=mlp_bias)  # type: ignore[assignment]
        self.pool_axes = pool_axes(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_avg = self.fc2(self.act(self.fc1(x.mean(self.pool_axes, keepdim=True))))
        x_max = self.fc2(self.act(self.fc1(x.amax(self.pool_axes, keepdim=True))))
        return x * self.gate(x_avg + x_max)


CLASSES = (CbamModule,)
GATES = {"channel": ("channel.gate", "channel"), "spatial": ("spatial.gate", "spatial")}  # read by explain


def build(fmap, *, reduction: float, bias: bool, kernel_size: int, rd_divisor: int) -> CbamModule:
    rd = reduced_channels("cbam", fmap.channels, reduction, rd_divisor)
    k = int(kernel_size)  # a positive odd integer: the registry's rule (blocks.options)
    check_kernel_fits("cbam", k, fmap.size)
    module = CbamModule(fmap.channels, rd_channels=rd, spatial_kernel_size=k, mlp_bias=bool(bias))
    if fmap.dims != 2:  # the same module, its convolutions and norm built for the map's rank
        module.channel = ChannelAttnNd(fmap.channels, rd, bool(bias), fmap.dims)
        spatial = module.spatial.conv
        spatial.conv = conv_nd(fmap.dims)(2, 1, k, padding=k // 2, bias=False)
        spatial.bn = batchnorm_nd(fmap.dims)(1)
    return module


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
    return {
        "hidden": ch.fc1.out_channels,
        "bias": ch.fc1.bias is not None,
        "kernel_size": module.spatial.conv.conv.kernel_size[0],
    }
