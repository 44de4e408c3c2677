"""Anchors: a block after or before any module of a traced model, named by globs.

The named positions (:mod:`attnsurgeon.core.positions`) are places in a residual block. An anchor is a
place in the model itself: ``after M`` gates the output of module ``M`` (every reader of it sees
the block's output), ``before M`` gates the tensor ``M`` receives (only ``M`` sees the block's
output). ``M`` is a qualified name as ``named_modules()`` prints it, full paths from the top model
where only parts are traced (``backbone.body.layer3``), matched by globs whose ``*`` stays within
one dotted name (``layer3.*.conv2``) and whose ``**`` spans several (``**.conv2``).

A module is found in the traced graph by the module scopes the tracer records on every node
(``nn_module_stack``): its **region** is the set of nodes its ``forward`` made, one node for a
module the tracer keeps whole (a conv, a BN, a block timm marks not traceable), many for a
container it traces through (``layer3.0``, a part of a detector, YOLO's ``model.9``). The region's
output is the one node read outside it; its input is the one tensor from outside that its nodes
read. An anchor is refused, before the model changes, where a glob matches nothing, where the
output (``after``) or input (``before``) is not one feature map, where the module runs more than
once per forward (shared weights: one block would gate every call, so the tool refuses rather
than guess; anchor on the module that calls it), and where it lies inside a module the tracer
keeps whole or outside the traced parts.

Each anchor becomes an :class:`~attnsurgeon.graph.anatomy.Site` like any position's, on a
:class:`~attnsurgeon.graph.anatomy.Block` of kind ``anchor`` named after the module, so planning,
rewriting, identity init, layouts (NCHW, NHWC, tokens, 1-D, 3-D), reports, profiles, exports and
the memory-efficient pass treat it as they treat a named position. The inserted module hangs
beside the anchor: ``layer3.0.conv2_se`` after ``layer3.0.conv2``, ``decoder.blocks.0.scse_conv1``
before ``decoder.blocks.0.conv1``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch.fx import Node

from ..core.errors import AttnSurgeonError, did_you_mean, few


@dataclass
class Region:
    """The nodes one module's ``forward`` made, in forward order, and how often it was called."""

    name: str
    type: str
    nodes: list[Node] = field(default_factory=list)
    calls: set[str] = field(default_factory=set)  # the tracer's scope keys: ``m``, ``m@1``, ... one per call

    @property
    def leaf(self) -> bool:
        """Kept whole by the tracer: one ``call_module`` node."""
        return len(self.nodes) == 1 and self.nodes[0].op == "call_module" and self.nodes[0].target == self.name

    def inputs(self) -> list[Node]:
        """The tensors from outside the region that its nodes read (weights and constants left out)."""
        inside = set(self.nodes)
        found: dict[Node, None] = {}
        for n in self.nodes:
            for a in n.all_input_nodes:
                if a not in inside and a.op != "get_attr" and _is_tensor(a):
                    found[a] = None
        return list(found)

    def outputs(self) -> list[Node]:
        """The region's nodes read outside it (the graph's output counts as outside)."""
        inside = set(self.nodes)
        return [n for n in self.nodes if n.op != "get_attr" and any(u not in inside for u in n.users)]


def module_regions(gm: Any) -> dict[str, Region]:
    """Every module the traced graph ran, by qualified name, in forward order."""
    regions: dict[str, Region] = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        for key, value in (n.meta.get("nn_module_stack") or {}).items():
            qual, cls = value if isinstance(value, tuple) else (value, None)
            region = regions.get(qual)
            if region is None:
                region = regions[qual] = Region(qual, cls.__name__ if isinstance(cls, type) else str(cls or ""))
            region.nodes.append(n)
            region.calls.add(key)
    return regions


def glob_regex(pattern: str) -> re.Pattern:
    """A module-name glob: ``*`` and ``?`` within one dotted name, ``**`` across names, ``[...]`` a class."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def match_modules(pattern: str, names: Iterable[str]) -> list[str]:
    rx = glob_regex(pattern)
    return [n for n in names if rx.match(n)]


@dataclass
class AnchorInfo:
    """What ``inspect --anchors`` lists: a module that can be an anchor, and what it reads and gives."""

    name: str
    type: str
    stage: int
    calls: int
    input: tuple[int, ...] | None  # the one tensor it receives (None: several, or none)
    output: tuple[int, ...] | None  # ... and gives
    layout_in: str | None  # None: no block fits there (not a feature map)
    layout_out: str | None
    why_not: str | None = None  # why neither side can take a block

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.name,
            "type": self.type,
            "stage": self.stage,
            "calls": self.calls,
            "input": list(self.input) if self.input else None,
            "output": list(self.output) if self.output else None,
            "before": self.layout_in,
            "after": self.layout_out,
            **({"why_not": self.why_not} if self.why_not else {}),
        }


def anchor_table(anatomy: Any) -> list[AnchorInfo]:
    """Every module of the traced graph with the maps it receives and gives (for ``inspect --anchors``)."""
    from .shapes import layout_of, shape_of

    rows = []
    for region in module_regions(anatomy.gm).values():
        ins, outs = region.inputs(), region.outputs()
        x = ins[0] if len(ins) == 1 else None
        y = outs[0] if len(outs) == 1 else None
        lin, lout = (layout_of(x) if x is not None else None), (layout_of(y) if y is not None else None)
        why = None
        if len(region.calls) > 1:
            why, lin, lout = f"runs {len(region.calls)} times per forward", None, None
        elif lin is None and lout is None:
            why = "neither its input nor its output is one feature map"
        rows.append(
            AnchorInfo(
                region.name,
                region.type,
                _stage_of(anatomy, region.name),
                len(region.calls),
                shape_of(x) if x is not None else None,
                shape_of(y) if y is not None else None,
                lin.name if lin else None,
                lout.name if lout else None,
                why,
            )
        )
    return rows


def anchors_matching(rows: list[AnchorInfo], pattern: str) -> list[AnchorInfo]:
    """The rows of ``inspect --anchors GLOB``: the modules the glob matches and those inside them
    (``decoder.*`` keeps ``decoder.blocks.0.conv1``); a glob that matches no module is an error."""
    rx = glob_regex(pattern)
    kept = [
        r for r in rows if any(rx.match(".".join(r.name.split(".")[: i + 1])) for i in range(r.name.count(".") + 1))
    ]
    if not kept:
        raise AttnSurgeonError(
            f"--anchors {pattern}: no module matches (globs: * within one dotted name, ** across "
            "names)." + did_you_mean(pattern, [r.name for r in rows]) + " `--anchors` alone lists every module"
        )
    return kept


# --------------------------------------------------------------------------- resolving an anchored spec


def anchor_blocks(
    anatomy: Any,
    which: str,
    globs: list[str],
    stages: list[int] | None = None,
    blocks: list[str] | None = None,
    model_names: Iterable[str] | None = None,
) -> list[Any]:
    """One :class:`~attnsurgeon.graph.anatomy.Block` of kind ``anchor`` per module the globs match, with its
    ``which`` (``after``/``before``) site; ``stages``/``blocks`` keep the modules inside the selected
    blocks. Every refusal is one :class:`AttnSurgeonError`, raised before anything changes."""
    from .sites import select_blocks

    regions = module_regions(anatomy.gm)
    matched: list[str] = []
    for pattern in globs:
        hits = [n for n in match_modules(pattern, regions) if n not in matched]
        if not hits and not any(match_modules(pattern, matched)):
            raise AttnSurgeonError(_no_match(anatomy, which, pattern, regions, model_names))
        matched += hits
    if stages or blocks:
        chosen = select_blocks(anatomy, stages, blocks)
        inside = [
            n
            for n in matched
            if any(_within(n, b) for b in chosen)
            or any(
                n == s.name or n.startswith(s.name + ".")
                for s in anatomy.stages
                if anatomy.grouping == "containers" and (not stages or s.index in stages) and not blocks
            )
        ]
        if not inside:
            what = ", ".join(
                filter(
                    None,
                    [
                        f"stages {','.join(map(str, stages))}" if stages else "",
                        f"blocks {','.join(blocks)}" if blocks else "",
                    ],
                )
            )
            raise AttnSurgeonError(
                f"--{which} {','.join(globs)}: none of the {len(matched)} matching modules "
                f"({few(matched, 3)}) lies inside the selected {what}; --stages/--blocks narrow the "
                "anchors to modules inside them"
            )
        matched = inside
    order = {n: i for i, n in enumerate(anatomy.gm.graph.nodes)}
    out = [_anchor_block(anatomy, regions, regions[name], which) for name in matched]
    out.sort(key=lambda b: order[b.sites[which].producer] if which == "after" else order[b.sites[which].consumers[0]])
    return out


def _anchor_block(anatomy: Any, regions: dict[str, Region], region: Region, which: str) -> Any:
    from .nodes import _scope_upto
    from .shapes import layout_of, shape_of
    from .sites import Block, Site

    name = region.name
    if len(region.calls) > 1:
        raise AttnSurgeonError(
            f"--{which} {name}: {region.type} '{name}' runs {len(region.calls)} times in one forward "
            "(one module called again, its weights shared): a block there would gate every call. "
            "Anchor on a module that runs once (the one that calls it, or one next to each call)"
        )
    if which == "after":
        ends = region.outputs()
        if len(ends) != 1:
            raise AttnSurgeonError(
                f"--after {name}: the output of {region.type} '{name}' is not one tensor "
                f"({_values(ends)}); anchor on a module inside it whose output is"
            )
        producer = ends[0]
        inside = set(region.nodes)
        consumers = [u for u in producer.users if u not in inside]
    else:
        starts = region.inputs()
        if len(starts) != 1:
            raise AttnSurgeonError(
                f"--before {name}: {region.type} '{name}' does not receive one tensor "
                f"({_values(starts)}); anchor on a module whose input is one feature map"
            )
        producer = starts[0]
        consumers = [n for n in region.nodes if producer in n.all_input_nodes]
    shape, layout = shape_of(producer), layout_of(producer)
    if shape is None or layout is None:
        side = "output" if which == "after" else "input"
        got = f"a {tuple(shape)} tensor" if shape is not None else "not a tensor"
        raise AttnSurgeonError(
            f"--{which} {name}: the {side} of {region.type} '{name}' is {got}, not a feature map "
            "with a channel axis beside 1 to 3 spatial or token axes: no block fits there"
        )
    parent = name.rpartition(".")[0]
    if parent and parent not in regions:  # the root of a traced part: hang the block inside it
        parent = name
    scope = _scope_upto(producer if which == "after" else consumers[0], parent)
    site = Site(
        which,
        producer,
        tuple(dict.fromkeys(consumers)),
        layout.channels(shape),
        layout,
        tuple(shape),
        module=parent,
        scope=scope,
        anchor=name,
    )
    enclosing = _enclosing(anatomy, name)
    return Block(
        enclosing.name if enclosing is not None else "-",
        parent,
        region.type,
        "anchor",
        None,
        site.channels,
        site.size,
        layout.name,
        0,
        _stage_of(anatomy, name),
        {which: site},
        frozenset(region.nodes),
        dict(scope),
    )


def _within(name: str, block: Any) -> bool:
    """Is module ``name`` part of ``block`` (its module, or the conv of a unit)?"""
    scope = block.name if block.kind == "unit" or not block.module else block.module
    return name == scope or name.startswith(scope + ".")


def _enclosing(anatomy: Any, name: str) -> Any:
    """The block a module lies in (None: outside every block: a stem, a head, a decoder)."""
    inside = [b for b in anatomy.blocks if _within(name, b)]
    return max(inside, key=lambda b: len(b.module or b.name)) if inside else None


def _stage_of(anatomy: Any, name: str) -> int:
    block = _enclosing(anatomy, name)
    if block is not None:
        return block.stage
    for s in anatomy.stages:
        if anatomy.grouping == "containers" and (name == s.name or name.startswith(s.name + ".")):
            return s.index
    return 0


def _no_match(
    anatomy: Any, which: str, pattern: str, regions: dict[str, Region], model_names: Iterable[str] | None
) -> str:
    """Why a glob matched nothing: a typo (close names), a module kept whole, or one outside the traced parts."""
    names = list(regions)
    leaves = {n: r for n, r in regions.items() if r.leaf}
    for leaf, region in leaves.items():  # modules inside a module the tracer keeps whole
        sub = [f"{leaf}.{s}" for s, _ in anatomy.gm.get_submodule(leaf).named_modules() if s]
        hidden = match_modules(pattern, sub)
        if hidden:
            return (
                f"--{which} {pattern}: {few(hidden, 2)} lies inside {region.type} '{leaf}', which the tracer keeps "
                f"whole (a module it cannot trace through): anchor on '{leaf}' itself"
            )
    if model_names is not None:
        outside = match_modules(pattern, [n for n in model_names if n not in regions])
        if outside and anatomy.target:
            return (
                f"--{which} {pattern}: {few(outside, 2)} lies outside the traced part"
                f"{'s' if len(anatomy.target) > 1 else ''} ({', '.join(anatomy.target)}), "
                "which alone can be rewritten; --target chooses the parts"
            )
        if outside:
            return (
                f"--{which} {pattern}: {few(outside, 2)} is not called when the model runs on its sample input: "
                "nothing to gate there"
            )
    hint = did_you_mean(pattern, names)
    if not hint and "*" not in pattern:
        near = [n for n in names if n.startswith(pattern + ".")][:3]
        hint = f" Modules under it: {', '.join(near)}." if near else ""
    return (
        f"--{which} {pattern}: no module matches (globs: * within one dotted name, ** across names)."
        + hint
        + " `attnsurgeon inspect MODEL --anchors` lists the modules and their shapes"
    )


def _values(nodes: list[Node]) -> str:
    from .shapes import shape_of

    if not nodes:
        return "none of its own"
    return f"{len(nodes)} values: " + ", ".join(
        str(tuple(shape)) if (shape := shape_of(n)) is not None else n.name for n in nodes[:3]
    )


def _is_tensor(n: Node) -> bool:
    from .shapes import shape_of

    return shape_of(n) is not None
