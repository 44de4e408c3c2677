"""The attention a model already has: its modules, found from the class names in the traced
module scopes (:func:`existing_attention`), and each one's region of the graph — its nodes, its
one input and output, and whether it is a gate (its output is its input scaled) that ``--replace``
can take out (:func:`attention_regions`). The memory-efficient pass recomputes these regions too.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn
from torch.fx import Node

from ..core.ops import ATTENTION_CLASS, called_module
from .nodes import _is_add, _scope
from .shapes import propagate_shapes, shape_of
from .sites import Site, _site

__all__ = [
    "existing_attention",
    "attention_modules",
    "AttentionRegion",
    "region_io",
    "attention_regions",
    "in_module",
    "attention_region",
]


def existing_attention(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    """Attention modules already in the model (outermost only), from the traced module scopes.

    A GraphModule keeps only leaf modules, so the classes of traced-through containers (torchvision's
    SqueezeExcitation) are read from the scopes the tracer recorded on each node.
    """
    found: list[tuple[str, str]] = []
    for name, cls in attention_modules(gm):
        if not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, cls))
    return found


def attention_modules(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    """Every module whose class name says attention, nested ones too, in forward order; a placeholder
    that does nothing (smp's ``Attention`` wrapping an ``nn.Identity`` when no attention is configured)
    is none."""
    seen: dict[str, str] = {}
    works: dict[str, bool] = {}  # does its forward do anything but pass its input on?
    for n in gm.graph.nodes:
        m = called_module(gm, n)
        passes = isinstance(m, nn.Identity)
        for qual, cls in _scope(n):
            seen.setdefault(qual, cls)
            works[qual] = works.get(qual, False) or not passes
        if m is not None:
            seen.setdefault(n.target, type(m).__name__)
            works[n.target] = works.get(n.target, False) or not passes
    return [(name, cls) for name, cls in seen.items() if name and works.get(name) and ATTENTION_CLASS.search(cls)]


@dataclass
class AttentionRegion:
    """An attention module already in the model, as a region of the traced graph.

    ``nodes`` are the nodes of its forward: many where the tracer went through it (torchvision's
    SqueezeExcitation), one ``call_module`` node where it kept it whole (timm's SEModule).
    ``gate`` says whether it can be replaced: one tensor in, one tensor of the same shape out,
    and that output is its input scaled by gates it computes (SE, ECA, CBAM, GE) or shifted by a
    broadcast context (GC) — never self-attention, whose output is a projection of mixed tokens.
    ``why`` says why not; ``site`` is where it reads its input (channels, layout).
    """

    name: str
    type: str
    nodes: frozenset
    gate: bool = False
    why: str = ""
    site: Site | None = None


def region_io(nodes: Iterable[Node]) -> tuple[list[Node], list[Node]]:
    """(tensors a region reads from outside, its nodes read from outside), in graph order."""
    nodes = set(nodes)
    inputs = {a: None for n in nodes for a in n.all_input_nodes if a not in nodes and a.op != "get_attr"}
    outputs = [n for n in nodes if any(u not in nodes for u in n.users)]
    index = {n: i for i, n in enumerate(next(iter(nodes)).graph.nodes)} if nodes else {}
    return sorted(inputs, key=index.__getitem__), sorted(outputs, key=index.__getitem__)


def attention_regions(gm: torch.fx.GraphModule) -> list[AttentionRegion]:
    """The attention modules already in the model as regions, each checked for whether it is a
    replaceable gate: the outermost gates, and the outermost others that hold no gate (an SE inside
    a block whose class name says attention is found). Needs the shapes of :func:`analyse`."""
    regions = [attention_region(gm, name, cls) for name, cls in attention_modules(gm)]
    gates = [r for r in regions if r.gate]
    out: list[AttentionRegion] = []
    for r in regions:
        inside = lambda a, b: a.name.startswith(b.name + ".")  # noqa: E731
        if any(inside(r, o) for o in out):
            continue
        if r.gate or not any(inside(g, r) for g in gates):
            out.append(r)
    return out


def in_module(n: Node, name: str) -> bool:
    if n.op in ("call_module", "get_attr") and (n.target == name or str(n.target).startswith(name + ".")):
        return True
    return any((v[0] if isinstance(v, tuple) else v) == name for v in (n.meta.get("nn_module_stack") or {}).values())


def attention_region(gm: torch.fx.GraphModule, name: str, cls: str) -> AttentionRegion:
    nodes = frozenset(n for n in gm.graph.nodes if in_module(n, name) and n.op not in ("placeholder", "output"))
    region = AttentionRegion(name, cls, nodes)
    inputs, outputs = region_io(nodes)
    if not nodes:
        region.why = "the traced forward never calls it"
    elif len(inputs) != 1 or len(outputs) != 1:
        region.why = f"it reads {len(inputs)} tensors and returns {len(outputs)} (a gate reads one and returns one)"
    elif shape_of(outputs[0]) != shape_of(inputs[0]):
        region.why = "it does not return one tensor shaped like its input (a gate keeps the shape)"
    else:
        x, y = inputs[0], outputs[0]
        region.site = _site("replace", x, [u for u in x.users if u in nodes])
        if region.site is None:
            region.why = "its input is not a feature map"
        elif len(nodes) == 1 and y.op == "call_module" and y.target == name:
            region.gate, region.why = _leaf_gates(gm.get_submodule(name), region.site.shape)  # x's shape
        else:
            region.gate = _gates_input(nodes, x, y)
            region.why = "" if region.gate else _NOT_A_GATE
    return region


_NOT_A_GATE = (
    "its output is not its input scaled by gates it computes (self-attention and kernel selection are not replaced)"
)
_MUL = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_", "__mul__", "__rmul__"}
_EXPANDS = {"expand", "expand_as", "broadcast_to"}


def _gates_input(nodes: frozenset, x: Node, y: Node) -> bool:
    """``y = x ⊙ g1 ⊙ g2 …`` or ``x + c``: each gate ``g`` is computed inside the region (SE's
    (N, C, 1, 1), CBAM's (N, 1, H, W), GE's full-size map; ECA's ``expand_as`` is seen through),
    each context ``c`` too, with fewer elements than the tensor it shifts (GC's (N, C, 1, 1)) —
    a non-local block's full-size ``x + attention(x)`` is no gate."""

    def reaches(n: Node, depth: int) -> bool:
        if n is x:
            return True
        is_mul = (n.op == "call_function" and n.target in _MUL) or (n.op == "call_method" and n.target in _MUL_METHODS)
        if n not in nodes or depth > 16 or not (is_mul or _is_add(n)):
            return False
        args = [a for a in (*n.args[:2], *n.kwargs.values()) if isinstance(a, Node)]
        if len(args) != 2:
            return False
        for main, modulator in (args, args[::-1]):
            source = _unexpanded(modulator)
            if source not in nodes or shape_of(main) != shape_of(n):
                continue
            smaller = (_numel(source) or 0) < (_numel(main) or 0)
            if (is_mul or smaller) and reaches(main, depth + 1):
                return True
        return False

    return reaches(y, 0)


def _unexpanded(n: Node) -> Node:
    while (
        n.op in ("call_method", "call_function")
        and getattr(n.target, "__name__", n.target) in _EXPANDS
        and n.args
        and isinstance(n.args[0], Node)
    ):
        n = n.args[0]
    return n


def _numel(n: Node) -> int | None:
    shape = shape_of(n)
    if shape is None:
        return None
    out = 1
    for s in shape:
        out *= s
    return out


def _leaf_gates(module: nn.Module, shape: tuple[int, ...]) -> tuple[bool, str]:
    """:func:`_gates_input` on the forward of a module the tracer kept whole, traced on its own."""
    try:
        gm = torch.fx.symbolic_trace(module)
        propagate_shapes(gm, shape[1:], batch=shape[0])
    except Exception:
        return False, "it cannot be traced on its own to check that it gates its input"
    xs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    inner = frozenset(n for n in gm.graph.nodes if n.op not in ("placeholder", "output"))
    if len(xs) != 1 or not isinstance(out, Node) or shape_of(out) != tuple(shape):
        return False, "it does not map one tensor to one of the same shape"
    if not _gates_input(inner, xs[0], out):
        return False, _NOT_A_GATE
    return True, ""
