"""A model with its rewritten parts in place: the traced parts of a model put back into it.

:func:`embed` splits the joined graph of the parts (:func:`attnsurgeon.graph.parts.trace_model`)
again and puts each rewritten part, a :class:`~attnsurgeon.graph.traced_part.TracedPart`, in place
of its submodule in a shallow copy of the model: the rest stays eager and shared, nothing is copied,
and the model itself is left as it was. :func:`base_like` builds the unmodified model the same way,
for timing base and modified through the same code path. The one place in ``graph/`` that makes a
model rather than reading one.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, cast


def embed(model: Any, gm: Any, targets: list[str] | None) -> Any:
    """The model with each target replaced by its rewritten part of ``gm`` (``gm`` itself when whole).

    The ancestors of each target are shallow copies (their other children are shared, not copied),
    so ``model`` itself is left as it was.
    """
    from .graph_module import _restore_unused_state
    from .traced_part import TracedPart

    if targets is None:
        return gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    outs = [out] if len(targets) == 1 else list(out)
    parts = {}
    for t, ph, value in zip(targets, placeholders, outs, strict=True):  # one input and one output per part
        holder = gm.get_submodule(t)
        original = model.get_submodule(t)
        graph = _split(gm.graph, ph, value, t)
        graph._codegen = ph.meta.get("as_codegen") or graph._codegen
        part = TracedPart(holder, graph, class_name=type(original).__name__)
        _tolerate_defaults(part, original, ph.meta.get("as_called_with") or {})
        _restore_unused_state(holder, part)
        _carry_attributes(original, part)
        part.train(original.training)
        parts[t] = part
    return _replaced(model, parts)


def _tolerate_defaults(part: Any, original: Any, called_with: dict[str, Any]) -> None:
    """Let the rewritten part be called as its parent calls the original: with the optional
    arguments it was traced at (the constants its parent passed, None, its defaults) given too,
    as Hugging Face passes ``return_dict=True``; anything else is refused, since the graph would
    ignore it."""
    import inspect

    try:
        params = inspect.signature(original.forward).parameters
    except (TypeError, ValueError):
        params = None
    if params is not None:
        defaults = {name: p.default for name, p in params.items() if p.default is not p.empty}
        defaults.update(called_with)
        part.tolerate(type(original).__name__, list(params), defaults)


def _carry_attributes(original: Any, part: Any) -> None:
    """Plain attributes the eager parent may read (``backbone.out_channels``)."""
    for key, value in vars(original).items():
        if not key.startswith("_") and key != "training" and key not in vars(part):
            part.__dict__[key] = value


def _replaced(model: Any, parts: dict[str, Any]) -> Any:
    """A shallow copy of ``model`` whose modules at the paths in ``parts`` are replaced; the copies'
    other children, parameters and buffers are the original objects (shared, not copied)."""
    copies: dict[int, Any] = {}

    def shallow(module: Any) -> Any:
        new = copy.copy(module)
        new._modules = OrderedDict(module._modules)
        new._parameters = OrderedDict(module._parameters)
        new._buffers = OrderedDict(module._buffers)
        copies[id(new)] = new
        return new

    root = shallow(model)
    for path, part in parts.items():
        parent_path, _, leaf = path.rpartition(".")
        parent = root
        for name in parent_path.split(".") if parent_path else []:
            child = parent._modules[name]
            if id(child) not in copies:
                child = shallow(child)
                parent._modules[name] = child
            parent = child
        parent._modules[leaf] = part
    return root


def _split(graph: Any, placeholder: Any, output: Any, prefix: str) -> Any:
    """One part of a joined graph, with module names relative to the part again."""
    import torch.fx

    seeds = list(_nodes_in(output))
    stack = [placeholder]
    seen: set = set()
    while stack:  # everything the part's input feeds (ops kept for their side effects, too)
        n = stack.pop()
        if n in seen or n.op == "output":
            continue
        seen.add(n)
        seeds.append(n)
        stack.extend(n.users)
    keep: set = set()
    while seeds:  # ... and everything those depend on (weights, constants)
        n = seeds.pop()
        if n not in keep:
            keep.add(n)
            seeds.extend(n.all_input_nodes)
    new = torch.fx.Graph()
    val_map: dict[Any, Any] = {}
    cut = len(prefix) + 1
    for n in graph.nodes:
        if n not in keep:
            continue
        if n is placeholder:
            val_map[n] = new.placeholder("x")
            val_map[n].meta = dict(n.meta)
            continue
        copy_ = new.node_copy(n, lambda a: val_map[a])
        if copy_.op in ("call_module", "get_attr"):
            copy_.target = cast(str, copy_.target)[cut:]  # a module's or attribute's dotted name
        stack_ = OrderedDict()
        for key, value in (n.meta.get("nn_module_stack") or {}).items():
            qual = value[0] if isinstance(value, tuple) else value
            if qual.startswith(prefix + "."):
                stack_[key[cut:] if key.startswith(prefix + ".") else key] = (
                    qual[cut:],
                    value[1] if isinstance(value, tuple) else None,
                )
        copy_.meta["nn_module_stack"] = stack_
        copy_.meta.pop("as_unit", None)
        val_map[n] = copy_
    new.output(_map_arg(output, val_map))
    new.lint()
    return new


def _map_arg(value: Any, val_map: dict) -> Any:
    import torch.fx

    return torch.fx.node.map_arg(value, lambda a: val_map[a])


def _nodes_in(value: Any) -> Iterable[Any]:
    import torch.fx

    found: list = []

    def collect(a: Any) -> Any:
        found.append(a)
        return a

    torch.fx.node.map_arg(value, collect)
    return found


def base_like(model: Any, targets: list[str] | None) -> Any:
    """The unmodified model traced the same way as a modified one (whole, or the same parts), for
    timing and weighing base and modified through the same code path."""
    from .tracing import trace

    if targets is None:
        return trace(model)
    parts = {}
    for t in targets:
        parts[t] = trace(model.get_submodule(t))
        _carry_attributes(model.get_submodule(t), parts[t])
    return _replaced(model, parts)
