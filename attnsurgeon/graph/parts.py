"""Surgery on the parts of a model that trace, when the whole model does not.

A detector loops over its list of images and an optical-flow model iterates until its flow
converges: neither traces whole. Their backbones do. :func:`trace_model` traces the whole model
when it can; otherwise (or when a ``target`` is named) it traces submodules:

* the **target** is one or more dotted module paths (``backbone.body``); by default the tool
  finds them: the whole model, else its children, then theirs, breadth first, and it takes every
  submodule at the first depth where some trace and contain blocks (``backbone`` for torchvision's
  detectors, ``feature_encoder`` and ``context_encoder`` for RAFT);
* each part's sample input is recorded by running the whole model once on its own input with a
  forward hook on every module, so shape propagation sees the real feature sizes;
* the parts are traced one by one and joined into one GraphModule with one input per part whose
  module names are full paths from the top model (``backbone.body.layer3.0``), so the anatomy,
  block names, ``--blocks`` globs and inserted module names need nothing special;
* after the rewrite, :func:`embed` splits the graph again and puts each rewritten part in place of
  its submodule in a shallow copy of the model (the rest stays eager and shared, nothing is
  copied), so the state dict keeps the model's own names.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import AttnSurgeonError, did_you_mean, one_line
from ..core.lists import split_list


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
            whole_error = f"{type(model).__name__} keeps its class (its forward takes labels, or serves its library's own predict and train)"
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


# --------------------------------------------------------------------------- sample inputs of submodules


class RecordedInputs(dict):
    """``{name: shape}`` (see :func:`record_inputs`), with ``kwargs``: ``{name: {key: value}}``, the
    constant keyword arguments (None, a bool, a number, a string) the module was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.kwargs: dict[str, dict[str, Any]] = {}


_CONSTANT = (type(None), bool, int, float, str)


def record_inputs(model: Any, size: tuple[int, ...]) -> RecordedInputs:
    """Run ``model`` once (eval, batch 1) and record each submodule's first input.

    Returns ``{name: shape}`` where the module was called with one tensor (and constant keyword
    arguments, kept in ``.kwargs``: a part is traced at them), ``{name: None}`` where it was called
    with something else (a list, several tensors), nothing where it was not called.
    """
    import torch

    from ..loading.samples import sample_args

    seen = RecordedInputs()
    handles = []

    def hook(name: str):
        def pre(module: Any, args: tuple, kwargs: dict) -> None:
            if name in seen:
                return
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            only = len(args) == 1 and len(tensors) == 1 and all(isinstance(v, _CONSTANT) for v in kwargs.values())
            seen[name] = tuple(tensors[0].shape) if only else None
            if only and kwargs:
                seen.kwargs[name] = dict(kwargs)

        return pre

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(hook(name), with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(
                *sample_args(
                    model,
                    size,
                    1,
                    generator=torch.Generator().manual_seed(0),
                    device=next((p.device for p in model.parameters()), None),
                )
            )
    except Exception as exc:
        raise AttnSurgeonError(
            f"the model does not run on its sample input ({_describe_input(model, size)}): "
            f"{one_line(exc, with_type=False)} "
            "(set --input-size to what the model expects)"
        ) from exc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen


def _describe_input(model: Any, size: tuple[int, ...]) -> str:
    from ..loading.samples import IMAGES, input_kind

    kind, count = input_kind(model)
    shape = "×".join(map(str, size))
    if kind == IMAGES:
        return f"a list of one {shape} image"
    return f"{count} tensor{'s' if count > 1 else ''} of shape (1, {', '.join(map(str, size))})"


@dataclass
class Found:
    targets: list[str]  # the submodules that trace and hold blocks (largest first found, see find_targets)
    inputs: dict[str, Any]


def find_targets(
    model: Any, size: tuple[int, ...], inputs: dict[str, Any] | None = None, exhaustive: bool = False
) -> Found:
    """Breadth first from the model's children: the submodules at the first depth where some trace
    (called with one tensor) and hold blocks. ``exhaustive`` goes on to every depth (for error
    messages); either way a hit's own children are not tried: the largest part wins."""
    inputs = record_inputs(model, size) if inputs is None else inputs
    level = [name for name, _ in model.named_children()]
    every: list[str] = []
    while level:
        hits: list[str] = []
        nxt: list[str] = []
        for name in level:
            if _traces_with_blocks(model, name, inputs):
                hits.append(name)  # the largest: its own children are not tried
                continue
            nxt += [f"{name}.{child}" for child, _ in model.get_submodule(name).named_children()]
        every += hits
        if hits and not exhaustive:
            break
        level = nxt
    return Found(every, inputs)


def _traces_with_blocks(model: Any, name: str, inputs: dict[str, Any]) -> bool:
    from .anatomy import analyse
    from .tracing import trace

    shape = inputs.get(name)
    if not shape or len(shape) < 2:
        return False
    try:
        analyse(trace(model.get_submodule(name), tuple(shape[1:]), _kwargs(inputs, name)), tuple(shape[1:]))
        return True
    except AttnSurgeonError:
        return False


def _check_target(model: Any, target: str, inputs: dict[str, Any], size: tuple[int, ...]) -> None:
    from .anatomy import analyse

    names = [n for n, _ in model.named_modules() if n]
    if target not in names:
        raise AttnSurgeonError(
            f"--target '{target}': {type(model).__name__} has no submodule of that name."
            + did_you_mean(target, names)
            + _traceable_hint(model, size, inputs)
        )
    shape = inputs.get(target)
    if target not in inputs:
        raise AttnSurgeonError(
            f"--target '{target}' is not called when the model runs on its sample input."
            + _traceable_hint(model, size, inputs)
        )
    if shape is None:
        raise AttnSurgeonError(
            f"--target '{target}' is called with something other than one tensor (a list, "
            "several arguments), which the tracer cannot be given." + _traceable_hint(model, size, inputs)
        )
    from .tracing import trace

    try:
        gm = trace(model.get_submodule(target), tuple(shape[1:]), _kwargs(inputs, target))
    except AttnSurgeonError as exc:
        raise AttnSurgeonError(
            f"--target '{target}' does not trace: {exc}" + _traceable_hint(model, size, inputs)
        ) from exc
    try:
        analyse(gm, tuple(shape[1:]))
    except AttnSurgeonError as exc:
        raise AttnSurgeonError(
            f"--target '{target}' traces but offers no place for a block: {exc}." + _traceable_hint(model, size, inputs)
        ) from exc


def _traceable_hint(model: Any, size: tuple[int, ...], inputs: dict[str, Any]) -> str:
    from .tracing import trace

    found = find_targets(model, size, inputs, exhaustive=True).targets
    try:
        trace(model, tuple(size))
        whole = " The whole model traces too (leave --target out)."
    except AttnSurgeonError:
        whole = ""
    if not found:
        return " No submodule of the model traces and holds blocks." + whole
    return f" Submodules that trace and hold blocks: {', '.join(found[:8])}{' …' if len(found) > 8 else ''}." + whole


# --------------------------------------------------------------------------- joining and splitting


def _trace_parts(model: Any, targets: list[str], inputs: dict[str, Any], whole_error: str | None) -> Traced:
    """Trace each target and join them into one GraphModule with full module names."""
    import torch.fx

    from .tracing import _restore_unused_state, trace

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
        stack = OrderedDict([(prefix, (prefix, cls))])
        for key, value in (n.meta.get("nn_module_stack") or {}).items():
            qual = value[0] if isinstance(value, tuple) else value
            stack[f"{prefix}.{key}"] = (f"{prefix}.{qual}", value[1] if isinstance(value, tuple) else None)
        new.meta["nn_module_stack"] = stack
        val_map[n] = new
    raise AttnSurgeonError(f"internal error: the traced graph of '{prefix}' has no output")


def _map_arg(value: Any, val_map: dict) -> Any:
    import torch.fx

    return torch.fx.node.map_arg(value, lambda a: val_map[a])


def _fetch(owner: Any, target: str) -> Any:
    obj = owner
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def embed(model: Any, gm: Any, targets: list[str] | None) -> Any:
    """The model with each target replaced by its rewritten part of ``gm`` (``gm`` itself when whole).

    The ancestors of each target are shallow copies (their other children are shared, not copied),
    so ``model`` itself is left as it was.
    """
    from .traced_part import TracedPart
    from .tracing import _restore_unused_state

    if targets is None:
        return gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    outs = [out] if len(targets) == 1 else list(out)
    parts = {}
    for t, ph, value in zip(targets, placeholders, outs):
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


def _kwargs(inputs: Any, name: str) -> dict[str, Any]:
    return getattr(inputs, "kwargs", {}).get(name, {})


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


def _unpickle_part(rebuild: Any, args: tuple, class_name: str, codegen: Any) -> Any:
    """What pickles of a part written before :class:`TracedPart` name; they unpickle as one."""
    from .traced_part import _unpickle

    return _unpickle(rebuild, args, class_name, codegen)


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
            copy_.target = copy_.target[cut:]
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


def _nodes_in(value: Any) -> Iterable[Any]:
    import torch.fx

    found: list = []
    torch.fx.node.map_arg(value, lambda a: found.append(a) or a)
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
