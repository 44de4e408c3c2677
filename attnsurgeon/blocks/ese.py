"""Effective Squeeze-and-Excitation.

Paper: `CenterMask: Real-Time Anchor-Free Instance Segmentation` (VoVNetV2), Lee & Park, CVPR 2020 -
https://arxiv.org/abs/1911.06667

timm's ``EffectiveSEModule``: global average pool, ONE 1×1 conv C→C (with bias; no bottleneck, so
no channel information is lost), hard-sigmoid gate. Parameters: C² + C. On 1-D/3-D maps the same
module runs on the map seen as (N, C, L, 1) (exact: it only pools over every position).

Identity init: the conv is zeroed and the gate becomes ``2·hard_sigmoid`` (``relu6(x + 3) / 3``),
exactly 1 at 0 with slope 1/3, so the gate starts at 1 and the conv still learns.
"""

from __future__ import annotations

import torch
from timm.layers.squeeze_excite import EffectiveSEModule

from ._common import Scaled, flattened_if_not_2d, inner

CLASSES = (EffectiveSEModule,)
GATES = {"channel": ("gate", "channel")}  # read by explain: name -> (submodule, channel|spatial)


def build(fmap) -> torch.nn.Module:
    return flattened_if_not_2d(EffectiveSEModule(fmap.channels), fmap.dims)


@torch.no_grad()
def init_identity(module) -> None:
    m = inner(module)
    m.fc.weight.zero_()
    m.fc.bias.zero_()
    m.gate = Scaled(m.gate, 2.0)


def describe(module) -> dict:
    return {}
