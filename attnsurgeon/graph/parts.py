"""Surgery on the parts of a model that trace, when the whole model does not.

A detector loops over its list of images and an optical-flow model iterates until its flow
converges: neither traces whole. Their backbones do. :func:`trace_model` traces the whole model
when it can; otherwise (or when a ``target`` is named) it traces submodules:

* the **target** is one or more dotted module paths (``backbone.body``); by default the tool
  finds them: the whole model, else its children, then theirs, breadth first, and it takes every
  submodule at the first depth where some trace and contain blocks (``backbone`` for torchvision's
  detectors, ``feature_encoder`` and ``context_encoder`` for RAFT);
* each part's sample input is recorded by running the whole model once on its own input with a
  forward hook on every module, so shape propagation sees the real feature sizes (finding and
  checking the targets, and recording their inputs: :mod:`attnsurgeon.graph.part_targets`);
* the parts are traced one by one and joined into one GraphModule with one input per part whose
  module names are full paths from the top model (``backbone.body.layer3.0``), so the anatomy,
  block names, ``--blocks`` globs and inserted module names need nothing special;
* after the rewrite, :func:`embed` splits the graph again and puts each rewritten part in place of
  its submodule in a shallow copy of the model (the rest stays eager and shared, nothing is
  copied), so the state dict keeps the model's own names (:mod:`attnsurgeon.graph.part_embed`).

The names of both modules are importable from here, where the rest of the package reads them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import AttnSurgeonError
from ..core.lists import split_list
from .part_embed import _map_arg, base_like, embed
from .part_targets import Found, RecordedInputs, _check_target, _kwargs, find_targets, record_inputs

__all__ = [
    "Found",
    "RecordedInputs",
    "Traced",
    "base_like",
    "embed",
    "find_targets",
    "parse_target",
    "record_inputs",
    "trace_model",
]


@dataclass
class Traced:
    """A traced model, or the traced parts of one."""

    gm: Any  # torch.fx.GraphModule; module names are full paths from the top model
    targets: list[str] | None  # None: the whole model was traced
    sizes: list[tuple[int, ...]]  # each part's input size without the batch (the model's own when whole)
    whole_error: str | None = None  # why the whole model did not trace (when it was tried)
    notes: list[str] = field(default_factory=list)

    @property
    def analysis_size(self) -> Any:
        """What :func:`attnsurgeon.graph.anatomy.analyse` takes: one size, or one per part."""
        return self.sizes[0] if len(self.sizes) == 1 else list(self.sizes)


def parse_target(target: Any) -> list[str] | None:
    """``None``/``""`` -> None; ``"a.b"``, ``"a,b"`` or a list -> a list of dotted paths."""
    names = [str(t) for t in split_list(target) or []]
    return names or None


def trace_model(model: Any, size: tuple[int, ...], target: Any = None) -> Traced:
    """Trace ``model`` whole, or the parts named by ``target`` (found automatically when the whole fails)."""
    from ..loading.sources import keeps_class
    from .tracing import trace

    targets = parse_target(target)
    if targets is None:
        if keeps_class(model):  # a Hugging Face or ultralytics model stays itself: its parts are traced
            whole_error = (
                f"{type(model).__name__} keeps its class "
                "(its forward takes labels, or serves its library's own predict and train)"
            )
        else:
            try:
                return Traced(trace(model, tuple(size)), None, [tuple(size)])
            except AttnSurgeonError as exc:
                whole_error = str(exc)
        found = find_targets(model, size)
        if not found.targets:
            raise AttnSurgeonError(
                f"{whole_error} No submodule that traces and holds blocks was found either; "
                "name one with --target MODULE (a dotted path from `named_modules()`)"
            )
        return _trace_parts(model, found.targets, found.inputs, whole_error)
    inputs = record_inputs(model, size)
    for t in targets:
        _check_target(model, t, inputs, size)
    return _trace_parts(model, targets, inputs, None)


# --------------------------------------------------------------------------- joining


def _trace_parts(model: Any, targets: list[str], inputs: dict[str, Any], whole_error: str | None) -> Traced:
    """Trace each target and join them into one GraphModule with full module names."""
    import torch.fx

    from .graph_module import _restore_unused_state
    from .tracing import trace

    if len(set(targets)) != len(targets) or any(a != b and b.startswith(a + ".") for a in targets for b in targets):
        raise AttnSurgeonError(f"--target {', '.join(targets)}: the parts overlap; name each module once")
    graph = torch.fx.Graph()
    attrs: dict[str, Any] = {}
    outputs = []
    sizes = []
    holders = []
    for t in targets:
        sub = model.get_submodule(t)
        part = trace(sub, tuple(inputs[t][1:]), _kwargs(inputs, t))
        sizes.append(tuple(inputs[t][1:]))
        outputs.append(_copy_part(part.graph, graph, t, type(sub), attrs, part))
        holders.append((t, sub))
    graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    gm = torch.fx.GraphModule(attrs, graph, class_name=type(model).__name__)
    for t, sub in holders:
        _restore_unused_state(sub, gm.get_submodule(t))
    gm.train(model.training)
    notes = (
        [
            f"{type(model).__name__} does not trace whole: surgery works on "
            f"{', '.join(targets)}; the rest of the model runs as it is"
        ]
        if whole_error
        else []
    )
    return Traced(gm, list(targets), sizes, whole_error, notes)


def _copy_part(src: Any, dst: Any, prefix: str, cls: type, attrs: dict[str, Any], owner: Any) -> Any:
    """Copy a part's graph into ``dst`` under ``prefix``; returns the value its output returns."""
    val_map: dict[Any, Any] = {}
    first = True
    for n in src.nodes:
        if n.op == "placeholder":
            if first:
                ph = dst.placeholder(prefix.replace(".", "_"))
                ph.meta = dict(n.meta)
                ph.meta["as_codegen"] = src._codegen  # the part's output structure, for embed
                ph.meta["as_called_with"] = getattr(owner, "_attnsurgeon_called_with", {})
                val_map[n] = ph
                first = False
            else:  # an optional argument: its default
                val_map[n] = n.args[0] if n.args else None
            continue
        if n.op == "output":
            return _map_arg(n.args[0], val_map)
        new = dst.node_copy(n, lambda a: val_map[a])
        if new.op in ("call_module", "get_attr"):
            attrs[f"{prefix}.{new.target}"] = _fetch(owner, new.target)
            new.target = f"{prefix}.{new.target}"
        stack: OrderedDict[str, tuple[str, type | None]] = OrderedDict([(prefix, (prefix, cls))])
        for key, value in (n.meta.get("nn_module_stack") or {}).items():
            qual = value[0] if isinstance(value, tuple) else value
            stack[f"{prefix}.{key}"] = (f"{prefix}.{qual}", value[1] if isinstance(value, tuple) else None)
        new.meta["nn_module_stack"] = stack
        val_map[n] = new
    raise AttnSurgeonError(f"internal error: the traced graph of '{prefix}' has no output")


def _fetch(owner: Any, target: str) -> Any:
    obj = owner
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _unpickle_part(rebuild: Any, args: tuple, class_name: str, codegen: Any) -> Any:
    """What pickles of a part written before :class:`TracedPart` name; they unpickle as one."""
    from .traced_part import _unpickle

    return _unpickle(rebuild, args, class_name, codegen)
