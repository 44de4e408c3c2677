"""Efficient Channel Attention.

Paper: `ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks`
- https://arxiv.org/abs/1910.03151

timm's ``EcaModule``: a bias-free 1-D convolution across the pooled channels. Its kernel size is
the paper's adaptive rule ``k = |log2(C)/γ + b/γ|`` rounded up to odd (γ=2, b=1, at least 3)
unless ``kernel_size`` is given.
"""

from __future__ import annotations

import torch
from timm.layers import EcaModule

from ..errors import AttnSurgeonError
from ._common import ScaledSigmoid

CLASSES = (EcaModule,)
OPTIONS = {"kernel_size": None}


def build(channels: int, kernel_size: int | None = None) -> EcaModule:
    if kernel_size is None:
        return EcaModule(channels)  # adaptive rule
    k = int(kernel_size)
    if k < 1 or k % 2 == 0:
        raise AttnSurgeonError(f"eca: kernel size must be a positive odd number, got {kernel_size}")
    if k > channels and k > 3:
        raise AttnSurgeonError(f"eca: kernel size {k} is larger than the {channels} channels here")
    return EcaModule(None, kernel_size=k)


@torch.no_grad()
def init_identity(module: EcaModule) -> None:
    module.conv.weight.zero_()
    module.gate = ScaledSigmoid(2.0)


def describe(module: EcaModule) -> dict:
    return {"kernel_size": module.conv.kernel_size[0]}
