"""Coordinate attention.

Paper: `Coordinate Attention for Efficient Mobile Network Design`, Hou et al., CVPR 2021 -
https://arxiv.org/abs/2103.02907

timm's ``CoordAttn``: the map is pooled along W (one vector per row) and along H (one per column);
the two are concatenated, go through a shared 1×1 conv C→rd + BN + hard-swish, are split again,
and 1×1 convs rd→C with sigmoids give a row gate and a column gate: ``x · a_h · a_w``.
rd = make_divisible(C / reduction · 2/3, rd_divisor) (timm's rule). Parameters: 3·C·rd + 2·rd.
2-D maps only.

Identity init: the two output convs are zeroed and the gate becomes ``2·sigmoid``.
"""

from __future__ import annotations

from timm.layers.coord_attn import CoordAttn

from ._coord import check_site, zero_and_double

CLASSES = (CoordAttn,)


def build(fmap, *, reduction: float, rd_divisor: int) -> CoordAttn:
    check_site("coord", fmap)
    return CoordAttn(fmap.channels, rd_ratio=1.0 / reduction, rd_divisor=rd_divisor)


def init_identity(module: CoordAttn) -> None:
    zero_and_double(module, "conv_h", "conv_w")


def describe(module: CoordAttn) -> dict:
    return {"hidden": module.conv1.out_channels}
