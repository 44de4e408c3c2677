"""A model's anatomy from its name: load it, trace it (whole or in parts), find its stages, blocks,
positions and existing attention. ``attnsurgeon inspect``, the insertion map and ``explain`` start here."""

from __future__ import annotations

from typing import Any

from ..loading.models import LoadedModel, as_loaded
from .anatomy import analyse
from .layout import resolve_input_size
from .parts import trace_model
from .sites import Anatomy


def inspect_model(
    model: Any, *, input_size: Any = None, pretrained: bool = False, weights: Any = None, target: Any = None
) -> tuple[LoadedModel, Anatomy]:
    """Trace a model (or the parts named by ``target``, or found where the whole does not trace: see
    :mod:`attnsurgeon.graph.parts`) and find its stages, blocks, positions and existing attention.

    Example:
        >>> loaded, anatomy = inspect_model("resnet18")
        >>> [s.name for s in anatomy.stages]
        ['layer1', 'layer2', 'layer3', 'layer4']
    """
    loaded = as_loaded(model, pretrained=pretrained, weights=weights)
    size = resolve_input_size(input_size, loaded.input_size)
    traced = trace_model(loaded.model, size, target)
    anatomy = analyse(traced.gm, traced.analysis_size)
    anatomy.target = traced.targets
    anatomy.model_input_size = tuple(size) if traced.targets else None
    anatomy.notes[:0] = traced.notes
    return loaded, anatomy
