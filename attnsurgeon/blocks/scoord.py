"""Simple coordinate attention (timm's ``SimpleCoordAttn``, a simplified `Coordinate Attention`,
Hou et al., CVPR 2021 - https://arxiv.org/abs/2103.02907).

Row and column means go through one shared linear layer C→rd + SiLU, then linear layers rd→C
for rows and columns (with biases); the two are added before one sigmoid: ``x · σ(a_h + a_w)``.
rd = make_divisible(C / reduction · 2/3, rd_divisor) with timm's reduction 4. Parameters:
3·C·rd + rd + 2·C. 2-D maps only.

Identity init: the row and column layers are zeroed and the gate becomes ``2·sigmoid``.
"""

from __future__ import annotations

from timm.layers.coord_attn import SimpleCoordAttn

from ._coord import check_site, zero_and_double

CLASSES = (SimpleCoordAttn,)


def build(fmap, *, reduction: float, rd_divisor: int) -> SimpleCoordAttn:
    check_site("scoord", fmap)
    return SimpleCoordAttn(fmap.channels, rd_ratio=1.0 / reduction, rd_divisor=rd_divisor)


def init_identity(module: SimpleCoordAttn) -> None:
    zero_and_double(module, "fc_h", "fc_w")


def describe(module: SimpleCoordAttn) -> dict:
    return {"hidden": module.fc1.out_features}
