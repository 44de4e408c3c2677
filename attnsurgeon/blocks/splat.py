"""Split attention (ResNeSt).

Paper: `ResNeSt: Split-Attention Networks` - https://arxiv.org/abs/2004.08955

timm's ``SplitAttn``, in place of a block's spatial convolution (position ``conv``), built as
timm's ResNeSt builds it: one conv with the replaced conv's kernel, stride, padding, dilation and
bias computes ``radix`` splits (radix 2; its groups are the conv's groups × radix, so each split
sees ``1/radix`` of the input channels), each with BN and ReLU; their sum is pooled through an MLP
(hidden width ``in·radix/reduction``, reduction 4, a multiple of 8, at least 32, grouped like the
conv) into a softmax over the splits per channel (a sigmoid for radix 1), which mixes them. The
norm/activation that followed the replaced conv stay (timm's ResNeSt bottleneck has none there).

``--init identity`` is refused: see :func:`attnsurgeon.blocks._convblock.refuse_identity`.
"""

from __future__ import annotations

from timm.layers import make_divisible
from timm.layers.split_attn import SplitAttn
from torch import nn

from ..core.errors import AttnSurgeonError
from ._convblock import check_conv, refuse_identity

CLASSES = (SplitAttn,)


def build(fmap, *, radix: int, reduction: float, rd_divisor: int) -> SplitAttn:
    conv = fmap.conv
    check_conv("splat", conv)
    radix, g = int(radix), conv.groups
    attn = make_divisible(conv.in_channels * radix / reduction, min_value=32, divisor=int(rd_divisor))
    for what, n, by in (
        ("input channels", conv.in_channels, g * radix),
        ("output channels", conv.out_channels, g),
        ("attention channels", attn, g),
    ):
        if n % by:
            raise AttnSurgeonError(
                f"splat: the {conv.describe()} cannot be split: its {n} {what} are not divisible by "
                f"{by} ({g} group{'s' if g > 1 else ''}{f' × radix {radix}' if by != g else ''})"
            )
    return SplitAttn(
        conv.in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=g,
        bias=conv.bias,
        radix=radix,
        rd_ratio=1.0 / reduction,
        rd_divisor=int(rd_divisor),
        norm_layer=nn.BatchNorm2d,
    )


def init_identity(module: SplitAttn) -> None:
    refuse_identity("splat", "each split ends in a ReLU and the splits are mixed by softmax weights (all > 0)")


def describe(module: SplitAttn) -> dict:
    return {"radix": module.radix, "hidden": module.fc1.out_channels}
