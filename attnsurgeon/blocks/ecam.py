"""ECA with an MLP across channels (timm's ``EcaModule(use_mlp=True)``, a timm experiment on
`ECA-Net`, Wang et al., CVPR 2020 - https://arxiv.org/abs/1910.03151).

The channel descriptor (global average pool) goes through a 1-tap conv 1→rd (rd = C/8 rounded to
a multiple of 8), ReLU, and a k-tap conv rd→1 across channels (k from ECA's adaptive rule, or
``kernel_size``), then a sigmoid gate. Parameters: 2·rd + rd·k + 1. Any rank (the map is seen as
(N, C, L, 1) off 2-D: exact, it only pools).

Identity init: the second conv is zeroed and the gate becomes ``2·sigmoid``: the gate is exactly 1,
the second conv learns at once, the first from the second step.
"""

from __future__ import annotations

import torch
from timm.layers.eca import EcaModule

from ._common import ScaledSigmoid, flattened_if_not_2d, inner
from .eca import check_eca_kernel

CLASSES = (EcaModule,)
GATES = {"channel": ("gate", "channel")}  # read by explain: name -> (submodule, channel|spatial)


def build(fmap, *, kernel_size: int | None) -> torch.nn.Module:
    check_eca_kernel("ecam", kernel_size, fmap.channels)
    if kernel_size is None:
        module = EcaModule(fmap.channels, use_mlp=True)
    else:  # timm's adaptive rule overrides kernel_size when channels are given: set the conv afterwards
        module = EcaModule(fmap.channels, use_mlp=True)
        rd = module.conv2.in_channels
        module.conv2 = torch.nn.Conv1d(
            rd, 1, kernel_size=int(kernel_size), padding=(int(kernel_size) - 1) // 2, bias=True
        )
    return flattened_if_not_2d(module, fmap.dims)


@torch.no_grad()
def init_identity(module) -> None:
    m = inner(module)
    m.conv2.weight.zero_()
    m.conv2.bias.zero_()
    m.gate = ScaledSigmoid(2.0)


def describe(module) -> dict:
    m = inner(module)
    return {"kernel_size": m.conv2.kernel_size[0], "hidden": m.conv.out_channels}
