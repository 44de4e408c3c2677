"""The anatomy's data model: a :class:`Site` (a producer node and the consumers that should see a
block's output instead), a :class:`Block` with its sites per position, a :class:`Stage`, the
:class:`Anatomy` of a traced model, and :func:`select_blocks` (the blocks ``--stages``/``--blocks``
pick). The finders that fill it are in :mod:`attnsurgeon.graph.finders`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.fx import Node

from ..core.errors import AttnSurgeonError
from ..core.positions import POSITIONS  # torch-free, for the CLI
from .layout import Layout
from .shapes import layout_of, shape_of


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


def _site(position: str, producer: Node, consumers: Iterable[Node]) -> Site | None:
    shape = shape_of(producer)
    layout = layout_of(producer)
    consumers = tuple(dict.fromkeys(consumers))
    if shape is None or layout is None or not consumers:
        return None
    return Site(position, producer, consumers, layout.channels(shape), layout, shape)


def select_blocks(
    anatomy: Anatomy, stages: Iterable[int] | None = None, blocks: Iterable[str] | None = None
) -> list[Block]:
    """Blocks in ``stages`` (1-based) whose names match any of the ``blocks`` globs; all by default."""
    chosen = list(anatomy.blocks)
    n = len(anatomy.stages)
    if stages:
        stages = list(stages)
        bad = [s for s in stages if not isinstance(s, int) or s < 1 or s > n]
        if bad:
            raise AttnSurgeonError(
                f"stage {', '.join(map(str, bad))} out of range: "
                f"the model has {n} stage{'s' if n != 1 else ''} (1-{n}); `attnsurgeon inspect MODEL` lists them"
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
