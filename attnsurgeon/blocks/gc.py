"""Global Context block, scale fusion (``gc``; ``gca`` is the add fusion).

Paper: `GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond`, Cao et al.,
ICCVW 2019 - https://arxiv.org/abs/1904.11492

timm's ``GlobalContext`` as timm's ``create_attn('gc')`` builds it: a 1×1 conv C→1 scores every
position, a softmax over the positions weights them into one context vector (attention pooling),
a bottleneck MLP (1×1 conv C→C/8, LayerNorm, ReLU, 1×1 conv back) transforms it, and it is fused
into every position by a sigmoid scale (``gc``) or an add (``gca``). Parameters: C + 1 for the
scoring conv, 2·C·rd + 3·rd + C for the MLP (rd = C/``reduction``). Any rank: off 2-D the map is
seen as (N, C, L, 1), exact since the softmax and the pooling run over every position.

Identity init: the MLP's last conv is zeroed; the scale gate becomes ``2·sigmoid`` (exactly 1 at
0), the add fusion adds exactly 0. The last conv learns at once, the rest from the second step.
"""

from __future__ import annotations

import torch
from timm.layers.global_context import GlobalContext

from ._common import ScaledSigmoid, flattened_if_not_2d, inner, reduced_channels

CLASSES = (GlobalContext,)
GATES = {"channel": ("gate", "channel")}  # read by explain: name -> (submodule, channel|spatial)
FUSE = {"fuse_add": False, "fuse_scale": True}  # timm's 'gc'


def build_fused(name: str, fmap, reduction: float, fuse: dict) -> torch.nn.Module:
    rd = reduced_channels(name, fmap.channels, reduction, 1)
    return flattened_if_not_2d(GlobalContext(fmap.channels, rd_channels=rd, **fuse), fmap.dims)


def build(fmap, *, reduction: float) -> torch.nn.Module:
    return build_fused("gc", fmap, reduction, FUSE)


@torch.no_grad()
def init_identity(module) -> None:
    m = inner(module)
    for mlp in (m.mlp_scale, m.mlp_add):
        if mlp is not None:
            mlp.fc2.weight.zero_()
            mlp.fc2.bias.zero_()
    if m.mlp_scale is not None:
        m.gate = ScaledSigmoid(2.0)


def describe(module) -> dict:
    m = inner(module)
    mlp = m.mlp_scale if m.mlp_scale is not None else m.mlp_add
    return {"hidden": mlp.fc1.out_channels}
