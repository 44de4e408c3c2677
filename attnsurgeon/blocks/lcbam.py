"""Light CBAM (timm's ``LightCbamModule``, a timm variant of `CBAM`, Woo et al., ECCV 2018 -
https://arxiv.org/abs/1807.06521).

CBAM with the average- and max-pooled descriptors mixed (½·avg + ½·max) before ONE pass through
the channel MLP (C→C/16→C, no biases), and a spatial gate over ½·mean + ½·max across channels
through a 1→1 k×k conv + BN (k = 7). Parameters: 2·C·rd + k² + 2. 2-D maps only (timm pools
over H, W and its spatial gate is a k×k conv).

Identity init as :mod:`.cbam`'s: the MLP outputs zero (``zero_gate_input_mlp``), the spatial conv
is zeroed and the BN outputs its (zero) bias; both gates become ``2·sigmoid``. timm's light channel
gate calls ``F.sigmoid`` directly, so it is built as :class:`LightChannelGate`, the same module
(same parameters, same outputs) calling its ``gate``.
"""

from __future__ import annotations

import torch
from timm.layers.cbam import LightCbamModule, LightChannelAttn

from . import cbam
from ._common import check_kernel_fits, reduced_channels, require_2d


class LightChannelGate(LightChannelAttn):
    """timm's ``LightChannelAttn`` with its gate as a module (timm hard-codes ``F.sigmoid``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_pool = 0.5 * x.mean((2, 3), keepdim=True) + 0.5 * x.amax((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(x_pool))))


CLASSES = (LightCbamModule,)
GATES = {
    "channel": ("channel.gate", "channel"),
    "spatial": ("spatial.gate", "spatial"),
}  # read by explain: name -> (submodule, channel|spatial)


def build(fmap, *, reduction: float, bias: bool, kernel_size: int, rd_divisor: int) -> LightCbamModule:
    require_2d("lcbam", fmap, "its spatial gate is a k×k conv over H, W")
    rd = reduced_channels("lcbam", fmap.channels, reduction, rd_divisor)
    check_kernel_fits("lcbam", int(kernel_size), fmap.size)
    module = LightCbamModule(fmap.channels, rd_channels=rd, spatial_kernel_size=int(kernel_size), mlp_bias=bool(bias))
    module.channel.__class__ = LightChannelGate  # the same parameters; its gate is now a module
    return module


# the same submodules as CBAM's (channel.fc1/fc2/gate, spatial.conv.conv/bn, spatial.gate): the same identity
init_identity = cbam.init_identity
describe = cbam.describe
