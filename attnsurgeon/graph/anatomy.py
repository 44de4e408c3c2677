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
The work is split by what it reads: the data model and :func:`select_blocks` in
:mod:`~attnsurgeon.graph.sites`, node predicates and scopes in :mod:`~attnsurgeon.graph.nodes`, the
finders in :mod:`~attnsurgeon.graph.finders`, the model's own attention in
:mod:`~attnsurgeon.graph.attention`; the op tables are in :mod:`attnsurgeon.core.ops`. This module
puts them together in :func:`analyse`.
"""

from __future__ import annotations

import torch
import torch.fx

from ..core.errors import AttnSurgeonError
from .attention import existing_attention
from .finders import _add_stage_sites, _group_stages, find_blocks
from .nodes import _Graph
from .shapes import propagate_channel_axis, propagate_shapes
from .sites import Anatomy


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
