"""Strip attention (timm's ``StripAttn``: strip pooling, after `Strip Pooling: Rethinking Spatial
Pooling for Scene Parsing`, Hou et al., CVPR 2020 - https://arxiv.org/abs/2003.13328).

Row and column means, each refined by a k-tap depthwise conv along its axis (k = 3, no bias),
added (broadcast to H×W) and gated by one sigmoid: ``x · σ(conv_h(x_h) + conv_w(x_w))``.
Parameters: 2·C·k. 2-D maps only.

Identity init: both convs are zeroed and the gate becomes ``2·sigmoid``.
"""

from __future__ import annotations

from timm.layers.coord_attn import StripAttn

from ._coord import check_site, zero_and_double

CLASSES = (StripAttn,)


def build(fmap, *, kernel_size: int) -> StripAttn:
    check_site("strip", fmap, kernel_size)
    return StripAttn(fmap.channels, kernel_size=int(kernel_size))


def init_identity(module: StripAttn) -> None:
    zero_and_double(module, "conv_h", "conv_w")


def describe(module: StripAttn) -> dict:
    return {"kernel_size": module.conv_h.kernel_size[0]}
