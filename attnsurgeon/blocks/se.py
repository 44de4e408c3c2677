"""Squeeze-and-Excitation.

Paper: `Squeeze-and-Excitation Networks` - https://arxiv.org/abs/1709.01507

timm's ``SEModule`` with its defaults (reduction 16, hidden width rounded to a multiple of 8,
biases, ReLU, sigmoid gate), so that SE inserted at the standard position of ``timm:resnet50``
has exactly the parameters and outputs of timm's hand-written ``seresnet50``.

On 1-D ``(N, C, L)`` and 3-D ``(N, C, T, H, W)`` maps the same module is built with 1-D/3-D 1×1
convolutions (:class:`SEModuleNd`: the same parameters, the same formula). ``keep_depth`` is the
band-preserving 3-D variant (``SELayer3DNew`` in the seeds): the squeeze pools over H, W only and
the excitation gates every (channel, T) pair.
"""

from __future__ import annotations

import torch
from timm.layers import SEModule

from ._common import ScaledSigmoid, check_keep_depth, conv_nd, pool_axes, reduced_channels, zero_gate_input_mlp


class SEModuleNd(SEModule):
    """timm's SEModule for feature maps of 1 to 3 spatial dimensions (see the module docstring)."""

    def __init__(self, channels: int, rd_channels: int, bias: bool = True, dims: int = 2, keep_depth: bool = False):
        super().__init__(channels, rd_channels=rd_channels, bias=bias)
        conv = conv_nd(dims)
        # timm types fc1 and fc2 as Conv2d; these are of the map's rank (Conv1d, Conv2d or Conv3d)
        self.fc1 = conv(channels, rd_channels, 1, bias=bias)  # type: ignore[assignment]
        self.fc2 = conv(rd_channels, channels, 1, bias=bias)  # type: ignore[assignment]
        self.pool_axes = pool_axes(dims, keep_depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = self.fc1(x.mean(self.pool_axes, keepdim=True))
        x_se = self.fc2(self.act(self.bn(x_se)))
        return x * self.gate(x_se)

    def extra_repr(self) -> str:
        return f"pool_axes={self.pool_axes}"


CLASSES = (SEModule,)  # SEModuleNd is one
GATES = {"channel": ("gate", "channel")}  # explain reads the gate here: name -> (submodule, channel|spatial)


def build(fmap, *, reduction: float, bias: bool, rd_divisor: int, keep_depth: bool | None) -> SEModule:
    check_keep_depth("se", keep_depth, fmap.dims)
    rd = reduced_channels("se", fmap.channels, reduction, rd_divisor)
    if fmap.dims == 2:
        return SEModule(fmap.channels, rd_channels=rd, bias=bool(bias))  # timm's own, exactly
    return SEModuleNd(fmap.channels, rd, bool(bias), fmap.dims, bool(keep_depth))


def init_identity(module: SEModule) -> None:
    zero_gate_input_mlp(module.fc1, module.fc2)
    module.gate = ScaledSigmoid(2.0)


def describe(module: SEModule) -> dict:
    out = {"hidden": module.fc1.out_channels, "bias": module.fc1.bias is not None}
    if isinstance(module, SEModuleNd) and module.pool_axes[0] == 3:
        out["keep_depth"] = True
    return out
