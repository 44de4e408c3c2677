"""Efficient Channel Attention.

Paper: `ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks`
- https://arxiv.org/abs/1910.03151

timm's ``EcaModule``: a bias-free 1-D convolution across the pooled channels. Its kernel size is
the paper's adaptive rule ``k = |log2(C)/γ + b/γ|`` rounded up to odd (γ=2, b=1, at least 3)
unless ``kernel_size`` is given.

On 1-D and 3-D maps :class:`EcaModuleNd` pools over every spatial axis, with the same single
convolution. ``keep_depth`` (3-D maps) pools over H, W only and runs the same convolution across
the channels of every frame, gating each (channel, T) pair (the seeds' ``eca_layer3d``).
"""

from __future__ import annotations

import torch
from timm.layers import EcaModule

from ..core.errors import AttnSurgeonError
from ._common import ScaledSigmoid, check_keep_depth, pool_axes


class EcaModuleNd(EcaModule):
    """timm's EcaModule for feature maps of 1 to 3 spatial dimensions (see the module docstring)."""

    def __init__(self, channels: int | None, kernel_size: int = 3, dims: int = 2, keep_depth: bool = False):
        super().__init__(channels, kernel_size=kernel_size)
        self.pool_axes = pool_axes(dims, keep_depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        y = x.mean(self.pool_axes)  # (N, C), or (N, C, T) where the depth axis is kept
        if y.dim() == 3:  # one sequence of C channels per frame, through the same convolution
            t = y.shape[2]
            y = self.gate(self.conv(y.transpose(1, 2).reshape(-1, 1, c)))  # no size arithmetic: nothing to count
            return x * y.reshape(n, t, c).transpose(1, 2).reshape(n, c, t, 1, 1)
        y = self.gate(self.conv(y.view(n, 1, c)))
        return x * y.view((n, c) + (1,) * (x.dim() - 2))

    def extra_repr(self) -> str:
        return f"pool_axes={self.pool_axes}"


CLASSES = (EcaModule,)  # EcaModuleNd is one
GATES = {"channel": ("gate", "channel")}  # explain reads the gate here: name -> (submodule, channel|spatial)


def check_eca_kernel(block: str, kernel_size: int | None, channels: int) -> None:
    """A kernel across channels longer than the channels (and than ECA's smallest, 3) is refused."""
    if kernel_size is not None and kernel_size > channels and kernel_size > 3:  # odd and ≥ 1: the registry's rule
        raise AttnSurgeonError(f"{block}: kernel size {kernel_size} is larger than the {channels} channels here")


def build(fmap, *, kernel_size: int | None, keep_depth: bool | None) -> EcaModule:
    check_keep_depth("eca", keep_depth, fmap.dims)
    check_eca_kernel("eca", kernel_size, fmap.channels)
    # channels=None with a kernel size: timm's way of fixing k instead of the adaptive rule
    channels, k = (fmap.channels, 3) if kernel_size is None else (None, int(kernel_size))
    if fmap.dims == 2:
        return EcaModule(channels, kernel_size=k)  # timm's own, exactly
    return EcaModuleNd(channels, k, fmap.dims, bool(keep_depth))


@torch.no_grad()
def init_identity(module: EcaModule) -> None:
    module.conv.weight.zero_()
    module.gate = ScaledSigmoid(2.0)


def describe(module: EcaModule) -> dict:
    out = {"kernel_size": module.conv.kernel_size[0]}
    if isinstance(module, EcaModuleNd) and module.pool_axes[0] == 3:
        out["keep_depth"] = True
    return out
