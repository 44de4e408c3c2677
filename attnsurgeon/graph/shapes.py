"""Shapes and layouts of a traced graph's tensors.

:func:`propagate_shapes` records each node's output shape in ``node.meta['as_shape']``, on the meta
device (no real compute) or, where an op has no meta kernel, with one real batch-1 pass;
:func:`propagate_channel_axis` records which axis holds channels in ``node.meta['as_caxis']``;
:func:`layout_of` reads both into the :class:`~attnsurgeon.graph.layout.Layout` of an insertable tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from ..core.errors import AttnSurgeonError, one_line
from ..core.ops import CHANNEL_FIRST_MODULES, CHANNEL_LAST_MODULES, called_module
from .layout import Layout

__all__ = ["propagate_shapes", "shape_of", "propagate_channel_axis", "layout_of"]


class _ShapeProp(torch.fx.Interpreter):
    """Run the graph, recording each node's output shape.

    Functions get plain lists and dicts: the generated code passes a fresh ``[0, 0, 0]`` on every
    call, while the Interpreter would pass the node's own immutable copy, and some wrapped
    functions fill in the list they are given (torchvision's Swin3D window sizes).
    """

    def call_function(self, target, args, kwargs):
        return super().call_function(target, _mutable(args), _mutable(kwargs))

    def run_node(self, n: Node):
        result = super().run_node(n)
        _record_shape(n, result)
        return result


def _mutable(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_mutable(v) for v in value)
    if isinstance(value, list):
        return [_mutable(v) for v in value]
    if isinstance(value, dict):
        return {k: _mutable(v) for k, v in value.items()}
    return value


def _norm_channels(m: Any, x: torch.Tensor, dims: tuple[int, ...]) -> bool:
    return x.dim() in dims and x.shape[1] == m.num_features


def _layer_norm(m: Any, x: torch.Tensor) -> bool:
    shape = tuple(m.normalized_shape)
    return x.dim() >= len(shape) and tuple(x.shape[x.dim() - len(shape) :]) == shape


SAME_SHAPE: dict[type, Callable[[Any, torch.Tensor], bool]] = {
    nn.BatchNorm1d: lambda m, x: _norm_channels(m, x, (2, 3)),
    nn.BatchNorm2d: lambda m, x: _norm_channels(m, x, (4,)),
    nn.BatchNorm3d: lambda m, x: _norm_channels(m, x, (5,)),
    nn.GroupNorm: lambda m, x: x.dim() >= 2 and x.shape[1] == m.num_channels,
    nn.LayerNorm: _layer_norm,
    **dict.fromkeys((nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Sigmoid, nn.Tanh), lambda m, x: True),
}
"""Modules (exact types: a subclass may change ``forward``) whose output, in eval mode, is a tensor
like their one input when the check on it holds (channels, normalised shape). On the meta device the
norms run as Python decompositions (about 1.2-1.8 ms each, most of an ``insert``'s shape pass on a
CNN); :class:`_MetaProp` gives their output without running them."""


def _like_input(mod: nn.Module, args: tuple, kwargs: dict) -> bool:
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return False
    keeps = SAME_SHAPE.get(type(mod))
    x = args[0]
    return (
        keeps is not None
        and keeps(mod, x)
        and all(t.dtype == x.dtype for t in (*mod.parameters(), *mod.buffers()) if t.is_floating_point())
    )


class _MetaProp(_ShapeProp):
    """Run the graph on meta tensors: module parameters are swapped for meta stand-ins, and a module of
    :data:`SAME_SHAPE` whose check holds gives a tensor like its input without running."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self._meta: dict[int, torch.Tensor] = {}

    def _m(self, t: torch.Tensor) -> torch.Tensor:
        key = id(t)
        if key not in self._meta:
            self._meta[key] = torch.empty_like(t, device="meta")
        return self._meta[key]

    def call_module(self, target, args, kwargs):
        from torch.func import functional_call

        mod = self.fetch_attr(target)
        if _like_input(mod, args, kwargs):
            return torch.empty_like(args[0])
        state = {n: self._m(p) for n, p in mod.named_parameters()}
        state.update({n: self._m(b) for n, b in mod.named_buffers()})
        return functional_call(mod, state, args, kwargs)

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return self._m(value) if isinstance(value, torch.Tensor) else value


def _record_shape(n: Node, result: Any) -> None:
    n.meta["as_shape"] = tuple(result.shape) if isinstance(result, torch.Tensor) else None


def propagate_shapes(gm: torch.fx.GraphModule, input_size: tuple[int, ...], batch: int = 1) -> str:
    """Record each node's output shape in ``node.meta['as_shape']``; returns 'meta' or 'real'.

    ``input_size`` is one size without the batch, or a list of them, one per input (the traced
    parts of a model, see :mod:`attnsurgeon.graph.parts`)."""
    sizes = list(input_size) if input_size and isinstance(input_size[0], (tuple, list)) else [input_size]
    shapes = [(batch, *s) for s in sizes]
    shape = shapes[0] if len(shapes) == 1 else shapes
    was_training = gm.training
    gm.eval()
    try:
        try:
            with torch.no_grad():
                _MetaProp(gm).run(*(torch.empty(s, device="meta") for s in shapes))
            return "meta"
        except Exception:
            pass  # an op without a meta kernel: pay for one real pass
        dtype = next((p.dtype for p in gm.parameters() if p.is_floating_point()), torch.float32)
        device = next((p.device for p in gm.parameters()), torch.device("cpu"))
        try:
            with torch.no_grad():
                _ShapeProp(gm).run(*(torch.randn(s, dtype=dtype, device=device) for s in shapes))
        except Exception as exc:
            raise AttnSurgeonError(
                f"the model does not run on an input of shape {tuple(shape)}: {one_line(exc, with_type=False)}"
                " (set --input-size to what the model expects)"
            ) from exc
        return "real"
    finally:
        gm.train(was_training)


def shape_of(n: Any) -> tuple[int, ...] | None:
    return n.meta.get("as_shape") if isinstance(n, Node) else None


# --------------------------------------------------------------------------- channel axis


def propagate_channel_axis(gm: torch.fx.GraphModule) -> None:
    """Record in ``node.meta['as_caxis']`` which axis holds channels (None where unknown).

    Convolutions and batch norms put channels at axis 1, linears and layer norms at the last
    axis; permutes and transposes move the axis; other ops inherit it from their first tensor
    input whose size along the axis they keep.
    """
    for n in gm.graph.nodes:
        out = shape_of(n)
        axis: int | None = None
        if out is not None and len(out) >= 2:
            m = called_module(gm, n)
            if n.op == "placeholder":
                axis = 1 if len(out) >= 3 else None
            elif m is not None and isinstance(m, CHANNEL_FIRST_MODULES):
                axis = 1
            elif m is not None and isinstance(m, CHANNEL_LAST_MODULES) and not type(m).__name__.endswith("2d"):
                axis = len(out) - 1
            elif n.op == "call_function" and n.target in (F.conv1d, F.conv2d, F.conv3d, F.batch_norm):
                axis = 1
            elif n.op == "call_function" and n.target in (F.linear, F.layer_norm):
                axis = len(out) - 1
            else:
                axis = _moved_axis(n, out)
        n.meta["as_caxis"] = axis


def _moved_axis(n: Node, out: tuple[int, ...]) -> int | None:
    src = next((a for a in n.all_input_nodes if a.meta.get("as_caxis") is not None), None)
    if src is None:
        return None
    ax = src.meta["as_caxis"]
    ins = cast(tuple[int, ...], shape_of(src))  # a node is given a channel axis only where it has a shape
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    args: tuple[Any, ...] = n.args  # permute's and transpose's dimensions: ints
    if name == "permute":
        dims = [d for d in args[1:]] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else list(args[1])
        dims = [d % len(ins) for d in dims]
        return dims.index(ax) if ax in dims else None
    if name in ("transpose", "swapaxes"):
        a, b = (d % len(ins) for d in args[1:3])
        return b if ax == a else a if ax == b else ax
    if len(out) == len(ins) and (out[ax] == ins[ax] or name not in _RESHAPES):
        return ax  # slicing, cat, pooling keep the channel axis where it is
    if ax == len(ins) - 1 and out[-1] == ins[-1]:  # channels-last through a reshape/flatten
        return len(out) - 1
    if ax < len(out) and out[: ax + 1] == ins[: ax + 1]:  # leading dims kept (flatten(2))
        return ax
    return None


_RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "unsqueeze", "squeeze"}


def layout_of(n: Node) -> Layout | None:
    """The :class:`~attnsurgeon.graph.layout.Layout` of an insertable tensor (rank 3 to 5), else None."""
    shape = shape_of(n)
    if shape is None:
        return None
    axis = n.meta.get("as_caxis")
    if axis is None and len(shape) == 4:  # unknown: the common convention for images
        axis = 1
    if axis is None and len(shape) == 3:  # ... and for token sequences
        axis = 2
    return Layout.of(len(shape), axis)
