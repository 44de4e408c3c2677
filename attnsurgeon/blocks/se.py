"""Squeeze-and-Excitation.

Paper: `Squeeze-and-Excitation Networks` - https://arxiv.org/abs/1709.01507

timm's ``SEModule`` with its defaults (reduction 16, hidden width rounded to a multiple of 8,
biases, ReLU, sigmoid gate), so that SE inserted at the standard position of ``timm:resnet50``
has exactly the parameters and outputs of timm's hand-written ``seresnet50``.
"""

from __future__ import annotations

from timm.layers import SEModule

from ._common import ScaledSigmoid, reduced_channels, zero_gate_input_mlp

CLASSES = (SEModule,)
OPTIONS = {"reduction": 16, "bias": True, "rd_divisor": 8}


def build(channels: int, reduction: float = 16, bias: bool = True, rd_divisor: int = 8) -> SEModule:
    rd = reduced_channels("se", channels, reduction, rd_divisor)
    return SEModule(channels, rd_channels=rd, bias=bool(bias))


def init_identity(module: SEModule) -> None:
    zero_gate_input_mlp(module.fc1, module.fc2)
    module.gate = ScaledSigmoid(2.0)


def describe(module: SEModule) -> dict:
    return {"hidden": module.fc1.out_channels, "bias": module.fc1.bias is not None}
