"""The ops a selective plan knows how to make and rebuild (:mod:`attnsurgeon.rewriting.recompute`).

A batch norm in training, run so that it also returns its batch statistics, and its output rebuilt
from its input and those statistics (:func:`affine`); activations, run out of place; element-wise
functions and methods whose output is rebuilt from their rebuilt inputs.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- ops a plan rebuilds

ACTIVATIONS: dict[type, Callable[[Any, torch.Tensor], torch.Tensor]] = {  # each takes its key's module
    nn.Identity: lambda m, x: x,
    nn.ReLU: lambda m, x: F.relu(x),
    nn.ReLU6: lambda m, x: F.relu6(x),
    nn.SiLU: lambda m, x: F.silu(x),
    nn.GELU: lambda m, x: F.gelu(x, approximate=m.approximate),
    nn.Hardswish: lambda m, x: F.hardswish(x),
    nn.Hardsigmoid: lambda m, x: F.hardsigmoid(x),
    nn.Sigmoid: lambda m, x: torch.sigmoid(x),
    nn.Tanh: lambda m, x: torch.tanh(x),
    nn.Mish: lambda m, x: F.mish(x),
    nn.LeakyReLU: lambda m, x: F.leaky_relu(x, m.negative_slope),
}
"""Activation modules, run out of place (an in-place one would overwrite what a plan rebuilds from)."""

ELEMENTWISE_FUNCTIONS = {
    operator.mul,
    operator.add,
    operator.sub,
    operator.truediv,
    torch.mul,
    torch.add,
    torch.sub,
    torch.div,
    torch.sigmoid,
    torch.tanh,
    F.relu,
    F.relu6,
    F.silu,
    F.gelu,
    F.hardswish,
    F.hardsigmoid,
    F.mish,
    F.leaky_relu,
}
ELEMENTWISE_METHODS = {
    "mul",
    "add",
    "sub",
    "div",
    "sigmoid",
    "tanh",
    "relu",
    "view",
    "reshape",
    "flatten",
    "permute",
    "transpose",
    "unsqueeze",
    "squeeze",
    "contiguous",
}
"""Ops (out of place) whose large output a plan rebuilds from their rebuilt inputs."""


# --------------------------------------------------------------------------- norms


def batch_norm(m: nn.modules.batchnorm._BatchNorm, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``m(z)`` in training, as ``_BatchNorm.forward`` does it, also returning the batch mean and
    inverse standard deviation the output was normalised with."""
    momentum = 0.0 if m.momentum is None else m.momentum
    if m.track_running_stats and m.num_batches_tracked is not None:
        m.num_batches_tracked.add_(1)
        momentum = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
    if m.track_running_stats and m.running_mean is not None:
        out = torch.ops.aten._batch_norm_with_update(
            z, m.weight, m.bias, m.running_mean, m.running_var, momentum, m.eps
        )
    else:
        out = torch.ops.aten._batch_norm_no_update(z, m.weight, m.bias, None, None, momentum, m.eps)
    return out[0], out[1], out[2]


def is_timm_norm_act(m: nn.Module) -> bool:
    """timm's BatchNormAct2d (a batch norm, its dropout, its activation) with no dropout and a
    known activation: the plan runs the activation after the norm (out of place)."""
    return (
        type(m).__name__ == "BatchNormAct2d"
        and isinstance(getattr(m, "drop", None), nn.Identity)
        and type(getattr(m, "act", None)) in ACTIVATIONS
    )


NORMS: dict[type, Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {
    nn.BatchNorm1d: batch_norm,
    nn.BatchNorm2d: batch_norm,
    nn.BatchNorm3d: batch_norm,
}
"""Norm modules whose output a plan rebuilds: type -> (module, input) -> (output, batch mean, invstd).
Each function takes a module of its key's type (hence ``Any``: a type cannot say that)."""


def norm_of(m: nn.Module):  # unannotated: mypy infers NORMS' function type, or None
    """The function that runs ``m`` and returns its batch statistics (:data:`NORMS`), or None."""
    if type(m) in NORMS:
        return NORMS[type(m)]
    return batch_norm if is_timm_norm_act(m) else None


def norm_scale(invstd: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``a`` of a batch norm's output ``(z - mean)·a + bias``: ``weight·invstd``, per channel."""
    return invstd if weight is None else invstd * weight


def affine(
    z: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """The batch norm's output from its input and batch statistics: one fused pass, in the
    statistics' precision, rounded to the input's dtype as the kernel does."""
    scale = norm_scale(invstd, weight)
    shift = -mean * scale if bias is None else bias - mean * scale
    shape = (-1,) + (1,) * (z.dim() - 2)
    return torch.addcmul(shift.view(shape), z, scale.view(shape)).to(z.dtype)
