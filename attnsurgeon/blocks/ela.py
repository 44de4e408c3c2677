"""Efficient Local Attention.

Paper: `ELA: Efficient Local Attention for Deep Convolutional Neural Networks`, Xu & Wan, 2024 -
https://arxiv.org/abs/2403.01123

timm's ``EfficientLocalAttn``: row and column means, each through a k-tap depthwise conv along
its axis (k = 7, no bias), GroupNorm(1 group) and SiLU, then a sigmoid: ``x · a_h · a_w``. No
channel reduction. Parameters: 2·C·k + 4·C. 2-D maps only.

Identity init: the norms' weights and biases are zeroed (SiLU(0) = 0) and the gate becomes
``2·sigmoid``; the norms learn at once, the convs from the second step.
"""

from __future__ import annotations

from timm.layers.coord_attn import EfficientLocalAttn

from ._coord import check_site, zero_and_double

CLASSES = (EfficientLocalAttn,)


def build(fmap, *, kernel_size: int) -> EfficientLocalAttn:
    check_site("ela", fmap, kernel_size)
    return EfficientLocalAttn(fmap.channels, kernel_size=int(kernel_size))


def init_identity(module: EfficientLocalAttn) -> None:
    zero_and_double(module, "norm_h", "norm_w")


def describe(module: EfficientLocalAttn) -> dict:
    return {"kernel_size": module.conv_h.kernel_size[0]}
