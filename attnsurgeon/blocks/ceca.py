"""Circular ECA (timm's ``CecaModule``, a timm variant of `ECA-Net`, Wang et al., CVPR 2020 -
https://arxiv.org/abs/1910.03151).

ECA whose k-tap conv across channels pads circularly: the first and last channels see each other
(channels have no edges). k from ECA's adaptive rule or ``kernel_size``; k parameters, no bias.
Any rank (the map is seen as (N, C, L, 1) off 2-D: exact, it only pools).

Identity init: the conv is zeroed and the gate becomes ``2·sigmoid`` (exactly 1 at 0, slope 1/2).
"""

from __future__ import annotations

import torch
from timm.layers.eca import CecaModule

from ._common import ScaledSigmoid, flattened_if_not_2d, inner
from .eca import check_eca_kernel

CLASSES = (CecaModule,)
GATES = {"channel": ("gate", "channel")}  # read by explain: name -> (submodule, channel|spatial)


def build(fmap, *, kernel_size: int | None) -> torch.nn.Module:
    check_eca_kernel("ceca", kernel_size, fmap.channels)
    module = CecaModule(fmap.channels) if kernel_size is None else CecaModule(None, kernel_size=int(kernel_size))
    return flattened_if_not_2d(module, fmap.dims)


@torch.no_grad()
def init_identity(module) -> None:
    m = inner(module)
    m.conv.weight.zero_()
    m.gate = ScaledSigmoid(2.0)


def describe(module) -> dict:
    return {"kernel_size": inner(module).conv.kernel_size[0]}
