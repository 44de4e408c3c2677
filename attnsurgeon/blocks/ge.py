"""Gather-Excite.

Paper: `Gather-Excite: Exploiting Feature Context in Convolutional Neural Networks`, Hu et al.,
NeurIPS 2018 - https://arxiv.org/abs/1810.12348

timm's ``GatherExcite`` as ``create_attn('ge')`` builds it: gather context over the whole map
(``extent`` 0) or over e×e windows with stride e, excite it through an SE-style MLP (1×1 convs
C→C/16→C with biases, ReLU), upsample the gate back to the map (nearest) and multiply. Without
``extra_params`` (GE-θ⁻) the gather is an average pool: the global one is SE with timm's rounding
(divisor 1). With ``extra_params`` (GE-θ) it is learned: log2(e) stride-2 3×3 depthwise convs with
BN, or, for the global extent, one depthwise conv as large as the map (the block then needs the
map's size, which it gets from the site). Parameters: 2·C·rd + rd + C for the MLP, plus per
depthwise conv 9·C (or H·W·C) and 2·C for its BN.

Any rank for the parameter-free global gather (the map is seen as (N, C, L, 1): exact); the
windowed and learned gathers are 2-D only. A window larger than the map is refused.

Identity init: the MLP's last conv is zeroed and the gate becomes ``2·sigmoid``.

timm 1.0.31's ``GatherExcite.__init__`` cannot be called (it passes ``*dd`` where it means
``**dd``: "got multiple values for argument 'act_layer'"), so :class:`GatherExciteModule` is
timm's class with that constructor repaired: the same submodules under the same names, timm's
own ``forward``.
"""

from __future__ import annotations

import math

import torch
from timm.layers.create_conv2d import create_conv2d
from timm.layers.gather_excite import GatherExcite
from timm.layers.mlp import ConvMlp
from torch import nn

from ..core.errors import AttnSurgeonError
from ._common import ScaledSigmoid, flattened_if_not_2d, inner, reduced_channels, require_2d


class GatherExciteModule(GatherExcite):
    """timm's ``GatherExcite`` (timm's defaults: ReLU, BN, sigmoid gate) with a constructor that runs."""

    def __init__(
        self,
        channels: int,
        feat_size: tuple[int, ...] | None = None,
        extra_params: bool = False,
        extent: int = 0,
        rd_channels: int = 1,
    ):
        nn.Module.__init__(self)
        self.add_maxpool = False
        self.extent = extent
        if extra_params:
            self.gather = nn.Sequential()
            if extent == 0:
                self.gather.add_module(
                    "conv1", create_conv2d(channels, channels, kernel_size=feat_size, stride=1, depthwise=True)
                )
                self.gather.add_module("norm1", nn.BatchNorm2d(channels))
            else:
                num_conv = int(math.log2(extent))
                for i in range(num_conv):
                    self.gather.add_module(
                        f"conv{i + 1}", create_conv2d(channels, channels, kernel_size=3, stride=2, depthwise=True)
                    )
                    self.gather.add_module(f"norm{i + 1}", nn.BatchNorm2d(channels))
                    if i != num_conv - 1:
                        self.gather.add_module(f"act{i + 1}", nn.ReLU(inplace=True))
        else:
            # as timm's own __init__ does, which leaves it typed Sequential
            self.gather = None  # type: ignore[assignment]
            self.gk, self.gs = (0, 0) if extent == 0 else (extent * 2 - 1, extent)
        self.mlp = ConvMlp(channels, rd_channels, act_layer=nn.ReLU)
        self.gate = nn.Sigmoid()


CLASSES = (GatherExcite,)
GATES = {"channel": ("gate", "channel")}  # read by explain: name -> (submodule, channel|spatial)


def build(fmap, *, extent: int, extra_params: bool, reduction: float) -> torch.nn.Module:
    rd = reduced_channels("ge", fmap.channels, reduction, 1)
    if extent == 0 and not extra_params:
        return flattened_if_not_2d(GatherExciteModule(fmap.channels, rd_channels=rd), fmap.dims)
    require_2d("ge", fmap, "its windowed or learned gather works on H, W")
    known = [s for s in fmap.size if s]
    if extent and known and min(known) < extent:
        raise AttnSurgeonError(
            f"ge: extent {extent} is larger than the {'×'.join(map(str, fmap.size))} feature map here; "
            "choose a smaller extent or 0 (global)"
        )
    feat_size = None
    if extra_params and extent == 0:
        if not all(fmap.size):
            raise AttnSurgeonError(
                "ge: extra_params with the global extent needs the feature map's size, which is unknown here"
            )
        feat_size = tuple(fmap.size)
    return GatherExciteModule(
        fmap.channels, feat_size=feat_size, extra_params=bool(extra_params), extent=int(extent), rd_channels=rd
    )


@torch.no_grad()
def init_identity(module) -> None:
    m = inner(module)
    m.mlp.fc2.weight.zero_()
    m.mlp.fc2.bias.zero_()
    m.gate = ScaledSigmoid(2.0)


def describe(module) -> dict:
    return {"hidden": inner(module).mlp.fc1.out_channels}
