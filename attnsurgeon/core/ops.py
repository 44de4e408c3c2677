"""What kind of op a traced node is: the tables of functions, methods and module classes that
tracing (:mod:`attnsurgeon.graph.tracing`), channel-axis propagation (:mod:`attnsurgeon.graph.shapes`) and the
block finders (:mod:`attnsurgeon.graph.anatomy`) read, and the module a ``call_module`` node calls."""

from __future__ import annotations

import operator
import re
from typing import cast

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import Node
from torchvision.ops.misc import FrozenBatchNorm2d  # pretrained detectors' backbones use it

__all__ = [
    "ADD_FUNCTIONS",
    "ADD_METHODS",
    "ACT_FUNCTIONS",
    "NORM_FUNCTIONS",
    "PASS_FUNCTIONS",
    "ACT_METHODS",
    "NORM_MODULES",
    "PASS_MODULES",
    "CONV_MODULES",
    "WEIGHTED_MODULES",
    "WEIGHTED_FUNCTIONS",
    "CHANNEL_FIRST_MODULES",
    "CHANNEL_LAST_MODULES",
    "ATTENTION_CLASS",
    "is_activation_module",
    "called_module",
]


ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
ACT_FUNCTIONS = {
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.relu6,
    F.silu,
    F.gelu,
    F.hardswish,
    F.leaky_relu,
    F.elu,
    F.mish,
    F.selu,
    F.celu,
    F.hardtanh,
    torch.tanh,
    F.softplus,
}
NORM_FUNCTIONS = {F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm}
PASS_FUNCTIONS = {F.dropout, F.dropout2d, F.alpha_dropout}
ACT_METHODS = {"relu", "relu_", "sigmoid", "tanh", "gelu"}

NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, FrozenBatchNorm2d)
PASS_MODULES = (nn.Identity, nn.modules.dropout._DropoutNd)
CONV_MODULES = (nn.modules.conv._ConvNd,)
WEIGHTED_MODULES = (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)
WEIGHTED_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.matmul, torch.bmm, F.scaled_dot_product_attention}
CHANNEL_FIRST_MODULES = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    FrozenBatchNorm2d,
    nn.modules.instancenorm._InstanceNorm,
)
CHANNEL_LAST_MODULES = (nn.Linear, nn.LayerNorm)

# Attention a model already has, found by class name (SE in MobileNetV3/EfficientNet/RegNetY, ...).
ATTENTION_CLASS = re.compile(
    r"SqueezeExcit|SEModule|SELayer|^SE$|Eca|Cbam|GatherExcite|GlobalContext|SelectiveKernel|SplitAttn"
    r"|CoordAttn|NonLocal|Attention$|^Attention|MultiheadAttention|WindowAttention|Attn$"
)


def is_activation_module(m: nn.Module) -> bool:
    mod = type(m).__module__
    if isinstance(m, (nn.MultiheadAttention, nn.Softmax, nn.Softmin, nn.LogSoftmax)):
        return False
    return mod.startswith("torch.nn.modules.activation") or mod.startswith("timm.layers.activations")


def called_module(gm: torch.fx.GraphModule, n: Node) -> nn.Module | None:
    if n.op != "call_module":
        return None
    try:
        return gm.get_submodule(cast(str, n.target))  # a call_module node's target is its module's name
    except AttributeError:
        return None
