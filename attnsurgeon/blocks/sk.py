"""Selective Kernel convolution (SKNet).

Paper: `Selective Kernel Networks` - https://arxiv.org/abs/1903.06586

timm's ``SelectiveKernel`` with its defaults, in place of a block's spatial convolution (position
``conv``): two paths, a 3×3 conv and a 3×3 conv with dilation 2 (a 5×5 receptive field), each with
its BN and ReLU; a softmax attention over the paths, per channel, computed from their pooled sum
(an MLP of reduction 16, hidden width a multiple of 8). With ``split_input`` (timm's default, and
its skresnets') each path sees half the input channels. The replaced conv's in/out channels,
stride, dilation and groups are kept; its kernel size is not (the paths are SK's own), and the
norm/activation that followed it stay.

So SK at ``conv`` in ``timm:resnet18/34/50`` builds the layout of timm's ``skresnet18/34/50``
(whose SK replaces ``conv1`` of a basic block and ``conv2`` of a bottleneck, under the same names),
except that the replaced conv's BN and ReLU stay after it. timm's skresnet18/34 use
``reduction 8, rd_divisor 16`` (``sk_kwargs``); skresnet50 uses the defaults.

``--init identity`` is refused: see :func:`attnsurgeon.blocks._convblock.refuse_identity`.
"""

from __future__ import annotations

from timm.layers.selective_kernel import SelectiveKernel

from ..core.errors import AttnSurgeonError
from ._convblock import check_conv, refuse_identity, square

CLASSES = (SelectiveKernel,)


def build(fmap, *, reduction: float, rd_divisor: int, split_input: bool) -> SelectiveKernel:
    conv = fmap.conv
    check_conv("sk", conv)
    stride, dilation = square("sk", conv, "stride"), square("sk", conv, "dilation")
    paths = 2
    path_in = conv.in_channels // paths if split_input else conv.in_channels
    if split_input and conv.in_channels % paths:
        raise AttnSurgeonError(
            f"sk: split_input gives each of its {paths} paths an equal share of the "
            f"{conv.in_channels} input channels of the {conv.describe()}; set split_input false"
        )
    if path_in % conv.groups or conv.out_channels % conv.groups:
        hint = "; set split_input false" if split_input and conv.in_channels % conv.groups == 0 else ""
        raise AttnSurgeonError(
            f"sk: the {conv.describe()} has {conv.groups} groups, which do not divide the "
            f"{path_in} input channels of each path{hint}"
        )
    return SelectiveKernel(
        conv.in_channels,
        conv.out_channels,
        stride=stride,
        dilation=dilation,
        groups=conv.groups,
        rd_ratio=1.0 / reduction,
        rd_divisor=int(rd_divisor),
        split_input=bool(split_input),
    )


def init_identity(module: SelectiveKernel) -> None:
    refuse_identity("sk", "each of its paths ends in a ReLU and the paths are mixed by softmax weights (all > 0)")


def describe(module: SelectiveKernel) -> dict:
    return {"paths": module.num_paths, "hidden": module.attn.fc_reduce.out_channels, "split_input": module.split_input}
