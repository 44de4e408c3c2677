"""Find where attention blocks can go in a traced model: its blocks, stages and sites.

:func:`analyse` takes a model traced by :func:`attnsurgeon.graph.tracing.trace`, propagates shapes and
channel axes through it (:mod:`attnsurgeon.graph.shapes`: on the meta device, no real compute; a real
batch-1 pass only where an op has no meta kernel), and :func:`find_blocks` reads the graph:

* a **residual block** is a residual merge: an add whose two inputs fork from one node, one of
  them through a branch with more weighted ops (convs, linears) than the other. The other is the
  skip: the fork itself (identity) or a short projection. The block is named after the module
  whose ``forward`` does the add (``layer3.0``), as in ``named_modules()``. An add whose branch
  is per-channel linear (``x + dwconv(x)``, a convolutional position encoding) or whose tensor
  has one channel is no block;
* modules of the same class as a residual block's that have no merge of their own (the first
  inverted residual of a MobileNet stage) are **plain blocks**;
* in a model with no residual merge at all (VGG, DenseNet), a **unit** is a convolution followed
  by an optional norm and an activation, named after its conv.

Blocks are grouped into stages by the model's own containers (``layer1``..``layer4``,
``stages.N``), or, where it has none, by runs of equal output resolution; stages are numbered from 1
in forward order. Each block offers :data:`POSITIONS` as :class:`Site` objects: a producer node and
the consumer nodes that should see the attention block's output instead. Two sites are special:
``stage`` is offered only by the last block of each stage that has a following stage (its output,
seen by the nodes on the path into the next stage), and ``conv`` names the node it replaces (the
block's first spatial ``nn.ConvNd``, described by a :class:`~attnsurgeon.blocks.ConvSpec`).

The attention modules the model already has are found here too (:func:`existing_attention`), as
regions of the graph checked for whether they are replaceable gates (:func:`attention_regions`).
This module holds the data model (:class:`Site`, :class:`Block`, :class:`Stage`, :class:`Anatomy`),
the block finders, stage grouping and :func:`select_blocks`; the op tables are in
:mod:`attnsurgeon.core.ops`.
"""

from __future__ import annotations

import fnmatch
import heapq
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from ..core.errors import AttnSurgeonError
from .layout import Layout
from ..core.ops import (
    _ACT_FUNCTIONS, _ACT_METHODS, _ADD_FUNCTIONS, _ADD_METHODS, _ATTENTION_CLASS, _CONV_MODULES, _NORM_FUNCTIONS,
    _NORM_MODULES, _PASS_FUNCTIONS, _PASS_MODULES, _WEIGHTED_FUNCTIONS, _WEIGHTED_MODULES, _is_activation_module,
    _module,
)
from ..core.positions import POSITIONS  # torch-free, for the CLI
from .shapes import _shape, layout_of, propagate_channel_axis, propagate_shapes
from .tracing import _restore_unused_state, trace  # noqa: F401  (re-exported: callers import them from here)


# --------------------------------------------------------------------------- data model


@dataclass
class Site:
    """A place to insert: after ``producer``, seen only by ``consumers``."""

    position: str
    producer: Node
    consumers: tuple[Node, ...]
    channels: int
    layout: Layout
    shape: tuple[int, ...]
    module: str | None = None  # where an insertion here hangs, where not under its block's module (a stage container)
    scope: dict | None = None  # the module scope its nodes get, where not its block's
    conv: Any = None  # blocks.ConvSpec of the convolution a 'conv' insertion replaces
    replaces: Node | None = None  # ... and that convolution's node (the producer is its input)
    absorbs: tuple[Node, ...] = ()  # ... and the norm/activation after it, which the conv block replaces too
    anchor: str | None = None  # the module an 'after'/'before' site is anchored to (attnsurgeon.graph.anchors)

    @property
    def size(self) -> tuple[int, ...]:
        """The feature map's spatial size here (``(T, H, W)``, ``(H, W)`` or ``(L,)``)."""
        return self.layout.size(self.shape)


@dataclass
class Block:
    name: str  # qualified module name (``layer3.0``), ``#k`` for the k-th merge in one module
    module: str  # the module path the inserted modules hang under ("" for the root)
    type: str  # class name of that module (or the op)
    kind: str  # "residual" | "plain" | "unit" | "opaque"; "anchor" for an anchored site (attnsurgeon.graph.anchors)
    skip: str | None  # "identity" | "projection" | None
    channels: int
    resolution: tuple[int, ...]
    layout: str  # the main site's Layout name (NCHW, NLC, NCDHW, ...)
    order: int  # forward order (topological index of its output)
    stage: int = 0
    sites: dict[str, Site] = field(default_factory=dict)
    nodes: frozenset = field(default_factory=frozenset, repr=False)
    scope: dict = field(default_factory=dict, repr=False)  # nn_module_stack down to the block's module

    @property
    def positions(self) -> list[str]:
        return [p for p in POSITIONS if p in self.sites]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stage": self.stage,
            "type": self.type,
            "kind": self.kind,
            "skip": self.skip,
            "channels": self.channels,
            "resolution": list(self.resolution),
            "layout": self.layout,
            "positions": self.positions,
            "site_channels": {p: s.channels for p, s in self.sites.items()},
        }


@dataclass
class Stage:
    index: int  # 1-based
    name: str  # the container (``layer3``) or ``28x28`` where grouped by resolution
    blocks: list[Block]

    def to_dict(self) -> dict[str, Any]:
        first = self.blocks[0]
        return {
            "index": self.index,
            "name": self.name,
            "blocks": [b.name for b in self.blocks],
            "channels": sorted({b.channels for b in self.blocks}),
            "resolution": list(first.resolution),
        }


@dataclass
class Anatomy:
    gm: torch.fx.GraphModule
    blocks: list[Block]
    stages: list[Stage]
    input_size: tuple[int, ...]
    grouping: str  # "containers" | "resolution"
    shape_mode: str  # "meta" | "real"
    existing_attention: list[tuple[str, str]]
    notes: list[str] = field(default_factory=list)
    target: list[str] | None = None  # the traced submodules (None: the whole model), see attnsurgeon.graph.parts
    model_input_size: tuple[int, ...] | None = None  # the whole model's input where only parts were traced
    model_modules: list[str] | None = None  # every module name of the whole model (anchors outside the traced parts)

    def block(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size),
            "stage_grouping": self.grouping,
            "shape_propagation": self.shape_mode,
            "stages": [s.to_dict() for s in self.stages],
            "blocks": [b.to_dict() for b in self.blocks],
            "existing_attention": [{"module": n, "type": t} for n, t in self.existing_attention],
            "notes": self.notes,
            "target": self.target,
            "model_input_size": list(self.model_input_size) if self.model_input_size else None,
        }


# --------------------------------------------------------------------------- analysis


def analyse(gm: torch.fx.GraphModule, input_size: tuple[int, ...], require_blocks: bool = True) -> Anatomy:
    """Propagate shapes and channel axes through ``gm`` and find its blocks, stages and sites. A model
    without blocks is an error unless ``require_blocks`` is off (anchors need no block)."""
    shape_mode = propagate_shapes(gm, input_size)
    propagate_channel_axis(gm)
    blocks = find_blocks(gm)
    if not blocks and require_blocks:
        raise AttnSurgeonError(
            "found no blocks: the model has no residual merges and no conv+activation units "
            "on feature maps of 1 to 3 spatial dimensions"
        )
    stages, grouping = _group_stages(blocks)
    _add_stage_sites(_Graph(gm), stages, grouping)
    notes = []
    if shape_mode == "real":
        notes.append("shapes were propagated with one real batch-1 pass (an op had no meta kernel)")
    return Anatomy(gm, blocks, stages, tuple(input_size), grouping, shape_mode, existing_attention(gm), notes)


def existing_attention(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    """Attention modules already in the model (outermost only), from the traced module scopes.

    A GraphModule keeps only leaf modules, so the classes of traced-through containers (torchvision's
    SqueezeExcitation) are read from the scopes the tracer recorded on each node.
    """
    found: list[tuple[str, str]] = []
    for name, cls in _attention_modules(gm):
        if not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, cls))
    return found


def _attention_modules(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    """Every module whose class name says attention, nested ones too, in forward order; a placeholder
    that does nothing (smp's ``Attention`` wrapping an ``nn.Identity`` when no attention is configured)
    is none."""
    seen: dict[str, str] = {}
    works: dict[str, bool] = {}  # does its forward do anything but pass its input on?
    for n in gm.graph.nodes:
        m = _module(gm, n)
        passes = isinstance(m, nn.Identity)
        for qual, cls in _scope(n):
            seen.setdefault(qual, cls)
            works[qual] = works.get(qual, False) or not passes
        if m is not None:
            seen.setdefault(n.target, type(m).__name__)
            works[n.target] = works.get(n.target, False) or not passes
    return [(name, cls) for name, cls in seen.items() if name and works.get(name) and _ATTENTION_CLASS.search(cls)]


# --------------------------------------------------------------------------- attention the model has


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
    regions = [_attention_region(gm, name, cls) for name, cls in _attention_modules(gm)]
    gates = [r for r in regions if r.gate]
    out: list[AttentionRegion] = []
    for r in regions:
        inside = lambda a, b: a.name.startswith(b.name + ".")  # noqa: E731
        if any(inside(r, o) for o in out):
            continue
        if r.gate or not any(inside(g, r) for g in gates):
            out.append(r)
    return out


def _in_module(n: Node, name: str) -> bool:
    if n.op in ("call_module", "get_attr") and (n.target == name or str(n.target).startswith(name + ".")):
        return True
    return any((v[0] if isinstance(v, tuple) else v) == name for v in (n.meta.get("nn_module_stack") or {}).values())


def _attention_region(gm: torch.fx.GraphModule, name: str, cls: str) -> AttentionRegion:
    nodes = frozenset(n for n in gm.graph.nodes if _in_module(n, name) and n.op not in ("placeholder", "output"))
    region = AttentionRegion(name, cls, nodes)
    inputs, outputs = region_io(nodes)
    if not nodes:
        region.why = "the traced forward never calls it"
    elif len(inputs) != 1 or len(outputs) != 1:
        region.why = f"it reads {len(inputs)} tensors and returns {len(outputs)} (a gate reads one and returns one)"
    elif _shape(outputs[0]) != _shape(inputs[0]):
        region.why = "it does not return one tensor shaped like its input (a gate keeps the shape)"
    else:
        x, y = inputs[0], outputs[0]
        region.site = _site("replace", x, [u for u in x.users if u in nodes])
        if region.site is None:
            region.why = "its input is not a feature map"
        elif len(nodes) == 1 and y.op == "call_module" and y.target == name:
            region.gate, region.why = _leaf_gates(gm.get_submodule(name), _shape(x))
        else:
            region.gate = _gates_input(nodes, x, y)
            region.why = "" if region.gate else _NOT_A_GATE
    return region


_NOT_A_GATE = "its output is not its input scaled by gates it computes (self-attention and kernel selection are not replaced)"
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
            if source not in nodes or _shape(main) != _shape(n):
                continue
            smaller = (_numel(source) or 0) < (_numel(main) or 0)
            if (is_mul or smaller) and reaches(main, depth + 1):
                return True
        return False

    return reaches(y, 0)


def _unexpanded(n: Node) -> Node:
    while n.op in ("call_method", "call_function") and getattr(n.target, "__name__", n.target) in _EXPANDS \
            and n.args and isinstance(n.args[0], Node):
        n = n.args[0]
    return n


def _numel(n: Node) -> int | None:
    shape = _shape(n)
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
    if len(xs) != 1 or not isinstance(out, Node) or _shape(out) != tuple(shape):
        return False, "it does not map one tensor to one of the same shape"
    if not _gates_input(inner, xs[0], out):
        return False, _NOT_A_GATE
    return True, ""


class _Graph:
    """Index helpers over a graph: topological order, ancestors, branches."""

    def __init__(self, gm: torch.fx.GraphModule):
        from ..blocks import block_classes

        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.conv_blocks = block_classes("conv")  # SK, split attention: convolutions, whatever their names say

    def latest_common_ancestor(self, a: Node, b: Node) -> Node | None:
        """The common ancestor (or a/b itself) latest in topological order."""
        marks: dict[Node, int] = {a: 1}
        marks[b] = marks.get(b, 0) | 2
        heap = [(-self.index[n], id(n), n) for n in marks]
        heapq.heapify(heap)
        seen: set[Node] = set()
        while heap:
            _, _, n = heapq.heappop(heap)
            if n in seen:
                continue
            seen.add(n)
            if marks[n] == 3:
                return n
            for p in n.all_input_nodes:
                before = marks.get(p, 0)
                marks[p] = before | marks[n]
                if p not in seen:
                    heapq.heappush(heap, (-self.index[p], id(p), p))
        return None

    def branch(self, fork: Node, end: Node) -> set[Node]:
        """Nodes on paths from ``fork`` (exclusive) to ``end`` (inclusive)."""
        if end is fork:
            return set()
        lo = self.index[fork]
        back: set[Node] = set()
        stack = [end]
        while stack:
            n = stack.pop()
            if n in back or self.index[n] <= lo:
                continue
            back.add(n)
            stack.extend(n.all_input_nodes)
        on_path = {fork}
        for n in sorted(back, key=self.index.__getitem__):
            if any(p in on_path for p in n.all_input_nodes):
                on_path.add(n)
        on_path.discard(fork)
        return on_path

    def is_weighted(self, n: Node) -> bool:
        m = _module(self.gm, n)
        if m is not None:
            if isinstance(m, self.conv_blocks):
                return True  # a conv block in a conv's place (ours, timm's skresnet/resnest) does the conv's work
            if _ATTENTION_CLASS.search(type(m).__name__) and not isinstance(m, nn.MultiheadAttention):
                return False  # attention gates (ours or the model's) are not the branch's own work
            return isinstance(m, _WEIGHTED_MODULES) or (any(True for _ in m.parameters()) and not _is_chain_op(self.gm, n))
        if n.op == "call_function" and n.target in _WEIGHTED_FUNCTIONS:
            return True
        # a function fed a weight matrix does the branch's work (torchvision's shifted_window_attention)
        return n.op in ("call_function", "call_method") and any(
            a.op == "get_attr" and len(_shape(a) or ()) >= 2 for a in n.all_input_nodes)

    def weight(self, nodes: Iterable[Node]) -> int:
        return sum(1 for n in nodes if self.is_weighted(n))


def _is_add(n: Node) -> bool:
    return (n.op == "call_function" and n.target in _ADD_FUNCTIONS) or (n.op == "call_method" and n.target in _ADD_METHODS)


def _is_chain_op(gm: torch.fx.GraphModule, n: Node) -> bool:
    """Norms, activations and pass-through ops that close a conv unit."""
    m = _module(gm, n)
    if m is not None:
        return isinstance(m, _NORM_MODULES + _PASS_MODULES) or _is_activation_module(m) or _is_stochastic_leaf(m)
    if n.op == "call_function":
        return n.target in _ACT_FUNCTIONS | _NORM_FUNCTIONS | _PASS_FUNCTIONS
    if n.op == "call_method":
        return n.target in _ACT_METHODS - {"sigmoid"}
    return False


def _is_activation(gm: torch.fx.GraphModule, n: Node) -> bool:
    m = _module(gm, n)
    if m is not None:
        return _is_activation_module(m) or (isinstance(m, _NORM_MODULES) and type(m).__name__.endswith("Act2d")
                                            and not isinstance(getattr(m, "act", None), nn.Identity))
    if n.op == "call_function":
        return n.target in _ACT_FUNCTIONS
    return n.op == "call_method" and n.target in (_ACT_METHODS - {"sigmoid"})


def _is_stochastic_leaf(m: nn.Module) -> bool:
    return not any(True for _ in m.parameters()) and type(m).__name__ in (
        "DropPath", "StochasticDepth", "DropBlock2d", "DropBlockFast2d")


def _spatial_kernel(gm: torch.fx.GraphModule, n: Node) -> bool:
    m = _module(gm, n)
    if m is not None and isinstance(m, _CONV_MODULES):
        return any(k > 1 for k in m.kernel_size)
    if n.op == "call_function" and n.target in (F.conv1d, F.conv2d, F.conv3d):
        w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        ws = _shape(w)
        return bool(ws and any(k > 1 for k in ws[2:]))
    return False


def _scope(n: Node) -> list[tuple[str, str]]:
    """(qualified name, class name) of the modules whose forward holds ``n``, outermost first."""
    stack = n.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        qual, cls = value if isinstance(value, tuple) else (value, None)
        out.append((qual, cls.__name__ if isinstance(cls, type) else str(cls)))
    return out


def _scope_upto(n: Node, module: str) -> dict:
    """``n``'s nn_module_stack cut after ``module`` (all of it where ``module`` is not in it)."""
    out: dict = {}
    for key, value in (n.meta.get("nn_module_stack") or {}).items():
        qual = value[0] if isinstance(value, tuple) else value
        if module and not (module == qual or module.startswith(qual + ".")):
            break
        out[key] = value
        if qual == module:
            break
    return out if module else {}


def _innermost_container(n: Node) -> tuple[str, str]:
    """The innermost non-leaf module whose forward holds ``n`` (``("", root)`` at the top)."""
    scope = _scope(n)
    if n.op == "call_module" and scope and scope[-1][0] == n.target:
        scope = scope[:-1]  # a leaf module's own entry
    return scope[-1] if scope else ("", "")


def _site(position: str, producer: Node, consumers: Iterable[Node]) -> Site | None:
    shape = _shape(producer)
    layout = layout_of(producer)
    consumers = tuple(dict.fromkeys(consumers))
    if shape is None or layout is None or not consumers:
        return None
    return Site(position, producer, consumers, layout.channels(shape), layout, shape)


def _complete(block: Block, sites: list[Site | None], nodes: Iterable[Node], scope: dict, main: str = "standard") -> Block | None:
    """Fill in a block from its sites (channels, layout and resolution from the ``main`` site);
    None where that site is not insertable."""
    block.sites = {s.position: s for s in sites if s is not None}
    if main not in block.sites:
        return None
    site = block.sites[main]
    block.channels, block.layout = site.channels, site.layout.name
    block.resolution = site.size
    block.nodes = frozenset(nodes)
    block.scope = scope
    return block


def _spatial_site(g: _Graph, region: set[Node], inside: set[Node]) -> Site | None:
    """After the first spatial conv in ``region`` and the norm/act ops that follow it."""
    convs = sorted((n for n in region if _spatial_kernel(g.gm, n)), key=g.index.__getitem__)
    if not convs:
        return None
    end = convs[0]
    while True:
        users = list(end.users)
        if len(users) == 1 and users[0] in inside and _is_chain_op(g.gm, users[0]):
            end = users[0]
        else:
            break
    return _site("3x3", end, [u for u in end.users if u in inside])


def _conv_site(g: _Graph, region: Iterable[Node]) -> Site | None:
    """The first spatial conv in ``region``, to be replaced: called on its input, read by the conv
    node alone (what stands in its place takes its users). Only an ``nn.ConvNd`` module has a
    description to build a replacement from; a functional conv offers no such site."""
    from ..blocks import ConvSpec

    convs = sorted((n for n in region if _spatial_kernel(g.gm, n)), key=g.index.__getitem__)
    if not convs or convs[0].op != "call_module":
        return None
    n, m = convs[0], _module(g.gm, convs[0])
    x = n.args[0] if n.args and isinstance(n.args[0], Node) else None
    if x is None or not isinstance(m, _CONV_MODULES) or isinstance(m, nn.modules.conv._ConvTransposeNd):
        return None
    if sum(1 for u in g.nodes if u.op == "call_module" and u.target == n.target) > 1:
        return None  # one conv called twice (shared weights): replacing the module would change both calls
    padding = "dynamic" if type(m).__name__.endswith("Same") else m.padding  # timm's Conv2dSame pads per input
    spec = ConvSpec(m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride), padding, tuple(m.dilation),
                    m.groups, m.bias is not None, m.padding_mode)
    site = _site("conv", x, [n])
    if site is None:
        return None
    site.conv, site.replaces, site.absorbs = spec, n, _norm_act_after(g, n)
    return site


def _norm_act_after(g: _Graph, conv: Node) -> tuple[Node, ...]:
    """The norm and activation (and pass-through ops between them) that follow ``conv`` alone, up to
    the first activation: a conv block (SK, split attention) carries its own norm and activation on
    its paths, so it takes their place too, as timm's skresnet and resnest do."""
    chain: list[Node] = []
    end = conv
    while len(end.users) == 1:
        user = next(iter(end.users))
        if not _is_chain_op(g.gm, user):
            break
        chain.append(user)
        end = user
        if _is_activation(g.gm, user):
            break
    return tuple(chain)


def _add_stage_sites(g: _Graph, stages: list[Stage], grouping: str) -> None:
    """The ``stage`` site of each stage that has a following stage, on its last block: that block's
    output, read by the nodes on the path into the next stage (a feature tap elsewhere, a detector's
    FPN, keeps reading the stage's own output). Its insertions hang under the stage's container
    (``layer1.bam_stage``) where stages are containers, else under the last block."""
    for stage, following in zip(stages, stages[1:]):
        last = stage.blocks[-1]
        post = last.sites.get("post")
        if post is None:
            continue
        out = post.producer
        ahead = _ancestors_after(g, following.blocks[0].nodes, g.index[out])
        site = _site("stage", out, [u for u in out.users if u in ahead])
        if site is None:
            continue
        if grouping == "containers":
            site.module, site.scope = stage.name, _scope_upto(out, stage.name)
        last.sites["stage"] = site


def _ancestors_after(g: _Graph, nodes: Iterable[Node], after: int) -> set[Node]:
    """``nodes`` and their ancestors later than index ``after`` in topological order."""
    seen: set[Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in seen or g.index.get(n, -1) <= after:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _closing_activation(g: _Graph, merge: Node, module: str) -> Node:
    out = merge
    while len(out.users) == 1:
        user = next(iter(out.users))
        in_block = any(q == module for q, _ in _scope(user)) or module == ""
        if in_block and (_is_activation(g.gm, user) or _is_stochastic_leaf(_module(g.gm, user) or nn.Module())):
            out = user
        else:
            break
    return out


def find_blocks(gm: torch.fx.GraphModule) -> list[Block]:
    """Residual blocks, plain blocks of the same classes, or conv units (see the module docstring)."""
    g = _Graph(gm)
    blocks = _residual_blocks(g)
    if blocks:
        blocks += _plain_blocks(g, blocks)
    else:
        blocks = _conv_units(g)
    blocks += _opaque_blocks(g, blocks)
    blocks.sort(key=lambda b: b.order)
    return blocks


def _residual_blocks(g: _Graph) -> list[Block]:
    found: list[tuple[Node, str, str, Block]] = []
    for n in g.nodes:
        if not _is_add(n):
            continue
        args = [a for a in n.args[:2] if isinstance(a, Node)]
        out = _shape(n)
        if len(args) != 2 or out is None or len(out) < 3 or any(_shape(a) != out for a in args):
            continue
        if n.meta.get("as_caxis") is None:
            continue  # no conv/linear fixes the channels here (e.g. per-head tensors inside attention)
        if out[n.meta["as_caxis"]] == 1:
            continue  # a one-channel map (CSATv2's spatial-attention transformer): no channels to weigh
        fork = g.latest_common_ancestor(args[0], args[1])
        if fork is None or _shape(fork) is None:
            continue
        branches = [g.branch(fork, a) for a in args]
        weights = [g.weight(b) for b in branches]
        if weights[0] == weights[1]:
            continue  # two alike branches (a split-attention sum), not a residual merge
        r = 0 if weights[0] > weights[1] else 1
        s = 1 - r
        if _per_channel_linear(g, branches[r], fork):
            continue  # x + dwconv(x): one depthwise conv, re-parameterised (a positional encoding), no block
        res_in, skip_in = args[r], args[s]
        module, cls = _innermost_container(n)
        block = Block(
            name=module or n.name,
            module=module,
            type=cls or "add",
            kind="residual",
            skip="identity" if skip_in is fork or weights[s] == 0 else "projection",
            channels=0,
            resolution=(),
            layout="",
            order=0,
        )
        region = branches[r]
        output = _closing_activation(g, n, module)
        block.order = g.index[output]
        sites = [
            _site("standard", res_in, [n]),
            _site("pre", fork, [u for u in fork.users if u in region]),
            _site("post", output, list(output.users)),
            _site("identity", skip_in, [n]),
            _spatial_site(g, region, region | {n}),
            _conv_site(g, region),
        ]
        if _complete(block, sites, region | branches[s] | {n, output}, _scope_upto(n, module)):
            found.append((n, module, cls, block))
    # several merges in one module's forward (a ViT block): number them
    per_module: dict[str, int] = {}
    for _, module, _, _ in found:
        per_module[module] = per_module.get(module, 0) + 1
    counter: dict[str, int] = {}
    blocks = []
    for n, module, _, block in found:
        if module and per_module[module] > 1:
            counter[module] = counter.get(module, 0) + 1
            block.name = f"{module}#{counter[module]}"
        blocks.append(block)
    return blocks


_SHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "contiguous", "squeeze",
                  "unsqueeze", "size", "view_as", "reshape_as"}
_SUMS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, "add", "add_", "sub", "sub_"}
_PRODUCTS = {operator.mul, operator.imul, operator.truediv, torch.mul, "mul", "mul_", "div", "div_"}


def _per_channel_linear(g: _Graph, region: set[Node], fork: Node) -> bool:
    """The branch maps each channel on its own and linearly: depthwise convs, batch norms without
    an activation, scales, sums and reshapes. Then ``x + branch(x)`` is itself one depthwise
    conv (a convolutional position encoding ``x + dwconv(x)``, RepGhost's re-parameterisable
    ``dwconv(x) + bn(x)``): a layer, not a block that transforms its input."""
    carried = region | {fork}
    for n in region:
        m = _module(g.gm, n)
        if m is not None:
            if isinstance(m, _CONV_MODULES):
                if not m.groups == m.in_channels == m.out_channels:
                    return False
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                if _is_activation(g.gm, n):
                    return False
            elif not (isinstance(m, _PASS_MODULES) or _is_stochastic_leaf(m)):
                return False
            continue
        if n.op not in ("call_function", "call_method"):
            return False
        target = n.target
        if target in (operator.getitem, getattr, F.batch_norm) or target in _SHAPE_METHODS or target in _SUMS:
            continue
        if target in _PRODUCTS and sum(1 for a in n.all_input_nodes if a in carried) <= 1:
            continue  # a scale (a parameter, a constant), not a product of two branches
        if target in (F.conv1d, F.conv2d, F.conv3d):
            w = _shape(n.args[1] if len(n.args) > 1 else n.kwargs.get("weight"))
            groups = n.args[6] if len(n.args) > 6 else n.kwargs.get("groups", 1)
            if w and w[1] == 1 and groups == w[0]:
                continue
        return False
    return True


def _plain_blocks(g: _Graph, residual: list[Block]) -> list[Block]:
    """Blocks with no merge of their own, found beside the residual ones.

    Two rules: a module of a residual block's class (the first inverted residual of a MobileNet
    stage), or a child of a stage container that sits beside the residual blocks' containers
    (timm EfficientNet's first, depthwise-separable stage). A stage container is one whose
    children are all containers themselves, so a stem ``Sequential(conv, bn, act)`` is not one.
    """
    classes = {b.type for b in residual if b.module}
    taken = {b.module for b in residual}
    scope_class: dict[str, str] = {}
    members: dict[str, list[Node]] = {}
    for n in g.nodes:
        for qual, cls in _scope(n):
            scope_class.setdefault(qual, cls)
            if not (n.op == "call_module" and n.target == qual):
                members.setdefault(qual, []).append(n)
    children: dict[str, set[str]] = {}
    for qual in scope_class:
        if qual:
            parent = qual.rsplit(".", 1)[0] if "." in qual else ""
            children.setdefault(parent, set()).add(qual)
    leaf_targets = {n.target for n in g.nodes if n.op == "call_module"}
    stage_parents = {b.module.rsplit(".", 1)[0] for b in residual if b.module.count(".") >= 2}
    grandparents = {p.rsplit(".", 1)[0] for p in stage_parents}
    candidates = {q for q, cls in scope_class.items() if cls in classes and q not in taken}
    for gp in grandparents:
        for container in children.get(gp, ()):
            kids = children.get(container, set()) | {t for t in leaf_targets if t.rsplit(".", 1)[0] == container}
            if kids and all(k in members and k not in leaf_targets for k in kids):
                candidates |= {k for k in kids if k not in taken}
    blocks = []
    for qual in sorted(candidates):
        nodes = members.get(qual, [])
        inside = set(nodes)
        if not any(_spatial_kernel(g.gm, n) or g.is_weighted(n) for n in nodes):
            continue
        inputs = {a for n in nodes for a in n.all_input_nodes if a not in inside and a.op != "get_attr"}
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        if len(inputs) != 1 or len(outputs) != 1:
            continue
        (inp,), out = tuple(inputs), outputs[0]
        block = Block(qual, qual, scope_class[qual], "plain", None, 0, (), "", g.index[out])
        sites = [
            _site("standard", out, list(out.users)),
            _site("pre", inp, [u for u in inp.users if u in inside]),
            _site("post", out, list(out.users)),
            _spatial_site(g, inside, inside),
            _conv_site(g, inside),
        ]
        if _complete(block, sites, inside, _scope_upto(nodes[0], qual)):
            blocks.append(block)
    return blocks


def _opaque_blocks(g: _Graph, found: list[Block]) -> list[Block]:
    """Whole blocks the tracer keeps as leaves (timm registers NormFreeBlock, MobileVitBlock... as
    not traceable): only their input and output can be reached, so they offer pre and post."""
    inside = set().union(*(b.nodes for b in found)) if found else set()
    blocks = []
    for n in g.nodes:
        m = _module(g.gm, n)
        if m is None or n in inside or type(m).__module__.startswith("torch.nn") or "." not in n.target:
            continue  # a root-level module (a head, a stem) is no block
        if _ATTENTION_CLASS.search(type(m).__name__) or not any(isinstance(c, _WEIGHTED_MODULES) for c in m.modules()):
            continue
        block = Block(n.target, n.target, type(m).__name__, "opaque", None, 0, (), "", g.index[n])
        inp = next((a for a in n.all_input_nodes if a.op != "get_attr"), None)
        sites = [_site("pre", inp, [n]) if inp is not None else None, _site("post", n, list(n.users))]
        if _complete(block, sites, {n}, _scope_upto(n, n.target), main="post"):
            blocks.append(block)
    return blocks


def _conv_units(g: _Graph) -> list[Block]:
    """conv [+ norm] + activation, in models without residual merges."""
    blocks = []
    for n in g.nodes:
        m = _module(g.gm, n)
        is_conv = (m is not None and isinstance(m, _CONV_MODULES)) or (
            n.op == "call_function" and n.target in (F.conv1d, F.conv2d, F.conv3d))
        if not is_conv:
            continue
        chain, end, has_act = [n], n, False
        while len(end.users) == 1 and _is_chain_op(g.gm, next(iter(end.users))):
            end = next(iter(end.users))
            chain.append(end)
            has_act = has_act or _is_activation(g.gm, end)
        if not has_act:
            continue
        name = n.target if n.op == "call_module" else n.name
        inp = n.args[0] if isinstance(n.args[0], Node) else None
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        block = Block(name, parent, type(m).__name__ if m is not None else "conv", "unit", None, 0, (), "", g.index[end])
        sites = [
            _site("standard", end, list(end.users)),
            _site("pre", inp, [n]) if inp is not None else None,
            _site("post", end, list(end.users)),
            _site("3x3", end, list(end.users)) if _spatial_kernel(g.gm, n) else None,
            _conv_site(g, [n]),
        ]
        if _complete(block, sites, chain, _scope_upto(n, parent)):
            blocks.append(block)
    return blocks


def _stage_key(block: Block) -> str | None:
    if not block.module or "." not in block.module:
        return None
    parent = block.module.rsplit(".", 1)[0]
    if parent.endswith(".blocks"):  # timm's stages.N.blocks.M
        parent = parent[: -len(".blocks")]
    return parent


def _group_stages(blocks: list[Block]) -> tuple[list[Stage], str]:
    keys = [_stage_key(b) if b.kind != "unit" else None for b in blocks]
    distinct = list(dict.fromkeys(keys))
    contiguous = all(keys[i] == keys[i - 1] or keys[i] not in keys[:i] for i in range(1, len(keys)))
    if None not in distinct and 1 < len(distinct) < len(blocks) and contiguous:
        stages = [Stage(i + 1, key, [b for b, k in zip(blocks, keys) if k == key]) for i, key in enumerate(distinct)]
        grouping = "containers"
    else:
        stages = []
        for b in blocks:
            if stages and stages[-1].blocks[-1].resolution == b.resolution:
                stages[-1].blocks.append(b)
            else:
                stages.append(Stage(len(stages) + 1, "x".join(map(str, b.resolution)) or "-", [b]))
        grouping = "resolution"
    for s in stages:
        for b in s.blocks:
            b.stage = s.index
    return stages, grouping


# --------------------------------------------------------------------------- selection


def select_blocks(anatomy: Anatomy, stages: Iterable[int] | None = None, blocks: Iterable[str] | None = None) -> list[Block]:
    """Blocks in ``stages`` (1-based) whose names match any of the ``blocks`` globs; all by default."""
    chosen = list(anatomy.blocks)
    n = len(anatomy.stages)
    if stages:
        stages = list(stages)
        bad = [s for s in stages if not isinstance(s, int) or s < 1 or s > n]
        if bad:
            raise AttnSurgeonError(
                f"stage {', '.join(map(str, bad))} out of range: the model has {n} stage{'s' if n != 1 else ''} (1-{n}); "
                "`attnsurgeon inspect MODEL` lists them"
            )
        wanted = set(stages)
        chosen = [b for b in chosen if b.stage in wanted]
    if blocks:
        globs = [g.strip() for g in blocks if g.strip()]
        matched: list[Block] = []
        for pattern in globs:
            hits = [b for b in chosen if _block_matches(b, pattern)]
            if not hits:
                from ..core.errors import did_you_mean

                where = " in the selected stages" if stages else ""
                raise AttnSurgeonError(
                    f"block pattern '{pattern}' matches no block{where}."
                    + did_you_mean(pattern, [b.name for b in chosen])
                    + " `attnsurgeon inspect MODEL` lists the block names"
                )
            matched.extend(h for h in hits if h not in matched)
        chosen = [b for b in chosen if b in matched]
    return chosen


def _block_matches(block: Block, pattern: str) -> bool:
    names = {block.name, block.module} if block.module else {block.name}
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)
