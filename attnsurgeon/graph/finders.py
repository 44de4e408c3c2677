"""The block finders, reading a traced graph (see :mod:`attnsurgeon.graph.anatomy` for the rules):
residual merges (:func:`_residual_blocks`), plain blocks of the same class without a merge, blocks
the tracer keeps whole, and conv units where a model has no merge at all; each block's sites per
position (:func:`_complete`), the ``conv`` site and what it absorbs, the stages and their
``stage`` sites (:func:`_group_stages`, :func:`_add_stage_sites`).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import cast

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from ..core.ops import ATTENTION_CLASS, CONV_MODULES, PASS_MODULES, WEIGHTED_MODULES, called_module
from .nodes import (
    _Graph,
    _innermost_container,
    _is_activation,
    _is_add,
    _is_chain_op,
    _is_stochastic_leaf,
    _scope,
    _scope_upto,
    _spatial_kernel,
)
from .shapes import shape_of
from .sites import Block, Site, Stage, _site


def _complete(
    block: Block, sites: list[Site | None], nodes: Iterable[Node], scope: dict, main: str = "standard"
) -> Block | None:
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
    n, m = convs[0], called_module(g.gm, convs[0])
    x = n.args[0] if n.args and isinstance(n.args[0], Node) else None
    if x is None or not isinstance(m, CONV_MODULES) or isinstance(m, nn.modules.conv._ConvTransposeNd):
        return None
    if sum(1 for u in g.nodes if u.op == "call_module" and u.target == n.target) > 1:
        return None  # one conv called twice (shared weights): replacing the module would change both calls
    padding = "dynamic" if type(m).__name__.endswith("Same") else m.padding  # timm's Conv2dSame pads per input
    spec = ConvSpec(
        m.in_channels,
        m.out_channels,
        tuple(m.kernel_size),
        tuple(m.stride),
        padding,
        tuple(m.dilation),
        m.groups,
        m.bias is not None,
        m.padding_mode,
    )
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
    for stage, following in zip(stages, stages[1:], strict=False):  # each stage and the next
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
        if in_block and (_is_activation(g.gm, user) or _is_stochastic_leaf(called_module(g.gm, user) or nn.Module())):
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
        out = shape_of(n)
        if len(args) != 2 or out is None or len(out) < 3 or any(shape_of(a) != out for a in args):
            continue
        if n.meta.get("as_caxis") is None:
            continue  # no conv/linear fixes the channels here (e.g. per-head tensors inside attention)
        if out[n.meta["as_caxis"]] == 1:
            continue  # a one-channel map (CSATv2's spatial-attention transformer): no channels to weigh
        fork = g.latest_common_ancestor(args[0], args[1])
        if fork is None or shape_of(fork) is None:
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
    for _, module, _, block in found:
        if module and per_module[module] > 1:
            counter[module] = counter.get(module, 0) + 1
            block.name = f"{module}#{counter[module]}"
        blocks.append(block)
    return blocks


_SHAPE_METHODS = {
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "permute",
    "transpose",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "size",
    "view_as",
    "reshape_as",
}
_SUMS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, "add", "add_", "sub", "sub_"}
_PRODUCTS = {operator.mul, operator.imul, operator.truediv, torch.mul, "mul", "mul_", "div", "div_"}


def _per_channel_linear(g: _Graph, region: set[Node], fork: Node) -> bool:
    """The branch maps each channel on its own and linearly: depthwise convs, batch norms without
    an activation, scales, sums and reshapes. Then ``x + branch(x)`` is itself one depthwise
    conv (a convolutional position encoding ``x + dwconv(x)``, RepGhost's re-parameterisable
    ``dwconv(x) + bn(x)``): a layer, not a block that transforms its input."""
    carried = region | {fork}
    for n in region:
        m = called_module(g.gm, n)
        if m is not None:
            if isinstance(m, CONV_MODULES):
                if not m.groups == m.in_channels == m.out_channels:
                    return False
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                if _is_activation(g.gm, n):
                    return False
            elif not (isinstance(m, PASS_MODULES) or _is_stochastic_leaf(m)):
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
            w = shape_of(n.args[1] if len(n.args) > 1 else n.kwargs.get("weight"))
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
        m = called_module(g.gm, n)
        if m is None or n in inside or type(m).__module__.startswith("torch.nn") or "." not in n.target:
            continue  # a root-level module (a head, a stem) is no block
        if ATTENTION_CLASS.search(type(m).__name__) or not any(isinstance(c, WEIGHTED_MODULES) for c in m.modules()):
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
        m = called_module(g.gm, n)
        is_conv = (m is not None and isinstance(m, CONV_MODULES)) or (
            n.op == "call_function" and n.target in (F.conv1d, F.conv2d, F.conv3d)
        )
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
        block = Block(
            name, parent, type(m).__name__ if m is not None else "conv", "unit", None, 0, (), "", g.index[end]
        )
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
        names = cast(list[str], distinct)  # no unit among the blocks: every key is a container's name
        stages = [
            Stage(i + 1, key, [b for b, k in zip(blocks, keys, strict=True) if k == key]) for i, key in enumerate(names)
        ]
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
