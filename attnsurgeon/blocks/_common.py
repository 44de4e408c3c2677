"""Helpers shared by the blocks: option checks and the identity-init machinery."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.errors import AttnSurgeonError

if TYPE_CHECKING:
    from typing import TypeAlias

    ConvNd: TypeAlias = nn.Conv1d | nn.Conv2d | nn.Conv3d  # a convolution of any rank


def conv_nd(dims: int) -> type[ConvNd]:
    """The convolution class for feature maps of ``dims`` spatial dimensions."""
    classes: dict[int, type[ConvNd]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    return classes[dims]


def batchnorm_nd(dims: int) -> type[nn.Module]:
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]


def pool_axes(dims: int, keep_depth: bool = False) -> tuple[int, ...]:
    """The axes a channel descriptor averages over: every spatial axis of an (N, C, *size) map, or
    with ``keep_depth`` all but the first (a 3-D map's depth/time axis stays: one gate per (C, T))."""
    return tuple(range(3 if keep_depth else 2, 2 + dims))


def check_keep_depth(block: str, keep_depth: bool | None, dims: int) -> None:
    if keep_depth and dims != 3:
        raise AttnSurgeonError(
            f"{block}: keep_depth gates each (channel, depth) pair of a 3-D (video/volume) feature map; "
            f"this one has {dims} spatial dimension{'s' if dims != 1 else ''}"
        )


class ScaledSigmoid(nn.Module):
    """``scale * sigmoid(x)``.

    With ``scale=2`` (the gate NFNets use in their SE blocks) an input of exactly zero gates at
    exactly 1, and the gate's slope there is 0.5, so a block whose gate input starts at zero is an
    exact identity that still passes gradient. A plain sigmoid reaches 1 only where its gradient
    has vanished.
    """

    def __init__(self, scale: float = 2.0):
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def reduced_channels(block: str, channels: int, reduction: float, divisor: int) -> int:
    """timm's ``make_divisible(channels / reduction, divisor, round_limit=0)``, with clear errors.

    The rule never gives fewer than ``divisor`` hidden units, so a reduction larger than the
    channels is no error: an 8-channel block with reduction 16 gets 8 hidden units (SE's
    divisor 8) or 1 (CBAM's divisor 1), exactly what timm's ``SEModule`` / ``CbamModule`` build.
    """
    from timm.layers import make_divisible

    if not reduction or reduction <= 0:
        raise AttnSurgeonError(f"{block}: reduction must be > 0, got {reduction}")
    if divisor is None or divisor < 1:
        raise AttnSurgeonError(f"{block}: rd_divisor must be ≥ 1, got {divisor}")
    return int(make_divisible(channels / reduction, divisor, round_limit=0.0))


@torch.no_grad()
def zero_gate_input_mlp(fc1: ConvNd, fc2: ConvNd) -> None:
    """Make ``fc2(relu(fc1(p)))`` exactly zero for every ``p`` while every weight still learns.

    With biases: ``fc1`` outputs the constant 1 (zero weight, unit bias), and ``fc2``'s bias
    cancels its row sums exactly (dyadic weights make the sum exact in any order), so gradients
    reach ``fc1`` through ``fc2``'s non-zero weights. Without biases ``fc2`` is zeroed: ``fc1``
    then learns from the second step on.
    """
    if fc1.bias is not None and fc2.bias is not None:
        fc1.weight.zero_()
        fc1.bias.fill_(1.0)
        w = torch.randn_like(fc2.weight) * 0.01
        fc2.weight.copy_(torch.round(w * 2**16) / 2**16)  # exact sums: few significant bits
        fc2.bias.copy_(-fc2.weight.flatten(1).sum(dim=1))
    else:
        fc2.weight.zero_()
        if fc2.bias is not None:
            fc2.bias.zero_()


def check_kernel_fits(block: str, kernel: int, extents: tuple[int, ...], what: str = "feature map") -> None:
    """Refuse a kernel none of whose outer taps can ever touch the map (``-k 9999``): with 'same'
    padding a kernel reaches at most ``2·s − 1`` positions along an axis of extent ``s``, so a
    larger one only adds weights that never learn. The block's own default kernel is always
    allowed (CBAM's 7×7 on a 2×2 map at a small input size is what timm builds too); unknown
    extents (0) are not checked."""
    from . import get_block

    default = get_block(block).options.get("kernel_size") or 1
    known = [s for s in extents if s]
    if kernel > default and known and all(kernel > 2 * s - 1 for s in known):
        size = "×".join(map(str, extents))
        raise AttnSurgeonError(
            f"{block}: kernel_size {kernel} is larger than a {size} {what} can use "
            f"(at most {2 * max(known) - 1} there); choose a smaller kernel_size"
        )


class Scaled(nn.Module):
    """``scale * gate(x)``: a gate that maps 0 to exactly 1 with a non-zero slope when
    ``gate(0) * scale == 1`` — ``2 * sigmoid`` (see :class:`ScaledSigmoid`), ``2 * hard_sigmoid``."""

    def __init__(self, gate: nn.Module, scale: float = 2.0):
        super().__init__()
        self.gate = gate
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class Flattened(nn.Module):
    """Run a 2-D channel block on a map of any rank, seen as ``(N, C, L, 1)``.

    Exact for blocks whose result depends on the spatial positions only through sums over all of
    them (global pooling, a softmax over every position, 1×1 convolutions): pooling ``(N, C, *size)``
    over its positions is pooling the flattened map. The 2-D module is timm's own, kept as
    ``self.block`` (on 2-D maps the block is built without this wrapper).
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x.reshape(x.shape[0], x.shape[1], -1, 1)).reshape(x.shape)


def flattened_if_not_2d(block: nn.Module, dims: int) -> nn.Module:
    return block if dims == 2 else Flattened(block)


def inner(module: nn.Module) -> Any:
    """The timm module inside a :class:`Flattened` wrapper (or the module itself): of the class the
    calling block's file builds, hence ``Any`` here."""
    return module.block if isinstance(module, Flattened) else module


def require_2d(block: str, fmap, why: str = "it pools rows and columns separately") -> None:
    if fmap.dims != 2:
        raise AttnSurgeonError(
            f"{block} needs a 2-D (H, W) feature map ({why}); this site is {fmap.dims}-D "
            f"({'tokens or a 1-D signal' if fmap.dims == 1 else 'a video or volume'})"
        )
