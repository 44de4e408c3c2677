"""The GraphModule a trace makes, and the model's inputs and state around it.

:func:`attnsurgeon.graph.tracing.trace` traces ``forward``'s optional inputs at their defaults
(:func:`_fixed_inputs`) and drops them from the graph (:func:`_drop_fixed_inputs`), so the
GraphModule takes the one input; the GraphModule holds the trace's tensor constants
(:func:`_graph_module`) and every parameter and buffer of the model, those its forward does not use
too (:func:`_restore_unused_state`). A model already rewritten is copied, not traced again
(:func:`_copy_graph_module`).
"""

from __future__ import annotations

import inspect as _inspect
import operator
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx import Node


def _graph_module(model: nn.Module, graph: torch.fx.Graph, constants: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    """The GraphModule of ``graph`` over ``model``, holding the trace's tensor constants as buffers
    (fx's own convention), so that the graph runs, copies, pickles and saves with them while the
    user's model is left without them."""
    model.__dict__.update(constants)
    try:
        return torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    finally:
        for name in constants:
            model.__dict__.pop(name, None)


def _fixed_inputs(model: nn.Module) -> dict[str, Any]:
    """``forward``'s parameters after the first that have a plain default (None, a bool, a number,
    a string): traced as constants, so ``if mask is not None`` takes the path a one-input call takes;
    ``*args`` and ``**kwargs`` are traced empty, as a one-input call leaves them."""
    try:
        params = list(_inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    fixed: dict[str, Any] = {
        p.name: p.default
        for p in params[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is not p.empty
        and (p.default is None or isinstance(p.default, (bool, int, float, str)))
    }
    for p in params[1:]:  # fx names their placeholders *args and **kwargs
        if p.kind == p.VAR_POSITIONAL:
            fixed["*" + p.name] = ()
        elif p.kind == p.VAR_KEYWORD:
            fixed["**" + p.name] = {}
    return fixed


_INPUT_CHECKS = {torch._assert, operator.eq}


def _drop_fixed_inputs(graph: torch.fx.Graph) -> None:
    """Remove the placeholders fx makes for inputs traced as constants, with the checks it hangs
    on them (``_assert_is_none``, ``torch._assert(x == v)``): the graph keeps its one input."""
    from torch.fx._symbolic_trace import _assert_is_none

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for ph in placeholders[1:]:
        if not ph.args:  # no default: a real input the caller must give
            continue
        checks: list[Node] = []
        frontier = list(ph.users)
        while frontier:
            n = frontier.pop()
            if n in checks:
                continue
            if n.op != "call_function" or n.target not in (_INPUT_CHECKS | {_assert_is_none}):
                break
            checks.append(n)
            frontier.extend(n.users)
        else:
            for n in sorted(checks, key=lambda n: -list(graph.nodes).index(n)):
                graph.erase_node(n)
            graph.erase_node(ph)


# model attributes a GraphModule carries over (the default input size is read from them)
_CARRIED_ATTRS = ("pretrained_cfg", "default_cfg", "num_classes", "default_input_size")


def _copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A rewritten model is not traced again (its flat forward has lost the module scopes that
    name blocks): its graph is copied with each node's metadata, sharing the modules."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    graph._codegen = gm.graph._codegen  # a model's own output structure (a Hugging Face ModelOutput)
    for n in graph.nodes:
        n.meta.pop("as_unit", None)  # links to the old graph's nodes
    copy = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    _restore_unused_state(gm, copy)
    for attr in (*_CARRIED_ATTRS, "attnsurgeon_report"):
        if hasattr(gm, attr):
            setattr(copy, attr, getattr(gm, attr))
    copy.train(gm.training)
    return copy


def _restore_unused_state(model: nn.Module, gm: nn.Module) -> None:
    """GraphModule only copies what forward uses; keep every original name (unused heads, too)."""
    have = set(gm.state_dict(keep_vars=True))
    for name in model.state_dict(keep_vars=True):
        if name in have:
            continue
        owner_path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        target = gm
        for part in owner_path.split(".") if owner_path else []:
            if not hasattr(target, part):
                target.add_module(part, nn.Module())
            target = getattr(target, part)
        if isinstance(getattr(owner, leaf), nn.Parameter):
            target.register_parameter(leaf, getattr(owner, leaf))
        else:
            persistent = leaf not in getattr(owner, "_non_persistent_buffers_set", set())
            target.register_buffer(leaf, getattr(owner, leaf), persistent=persistent)
