"""Rewrite a traced model by an insertion plan (:mod:`attnsurgeon.rewriting.placing` makes the plan).

An :class:`InsertionSpec` says what to insert where (attention block, position, stages or block
globs, init, block options). :func:`apply_plan` traces the model once, validates every spec
against its anatomy (so a bad spec fails before anything is changed), builds the modules, and
rewrites the graph: each module is called on a site's producer, and the site's consumers read its
output. Tensors whose channels are not at axis 1 (NHWC, tokens) are permuted around the block.

Stacked insertions compose: a new insertion whose consumers include an earlier one's goes
outside it (nearer the producer); one with the same consumers goes after it. So ``post`` on one
block and ``pre`` on the next give ``out -> post -> pre -> branch`` with the skip seeing ``post``.

Inserted modules hang under the block's module as ``{attn}`` (standard) or
``{attn}_{position}`` (``layer3.0.se``, ``layer3.0.eca_pre``); base parameters keep their names.
At ``stage`` they hang under the stage's container (``layer1.bam_stage``: after ``layer1``, before
``layer2``). At ``conv`` a block of kind conv (sk, splat) takes the place of the block's spatial
convolution under the convolution's own name (``layer1.0.conv1`` becomes a ``SelectiveKernel``, as
in timm's skresnet): the conv node is replaced as a one-node region, like ``replace`` below.

With ``replace``, the new block takes the place of each attention gate the selected blocks already
have (SE in EfficientNet, ...): the gate's region of the graph (its nodes, one input, one output)
is removed with its module, and the new module, under the old one's name, is called on the
region's input; ``attn='none'`` only removes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from ..core.errors import AttnSurgeonError
from ..planning.schema import InsertionSpec
from .placing import _attention_notes, _Planned, plan


@dataclass
class Insertion:
    """One inserted module, as reported."""

    block: str
    stage: int
    position: str
    attn: str
    channels: int
    params: int
    module: str
    layout: str
    options: dict[str, Any]
    replaced: str | None = None  # class of the attention module this one took the place of
    replaced_params: int = 0  # ... and its parameters, which left the model
    anchor: str | None = (
        None  # the module it goes after/before (position 'after'/'before'); block: the block it lies in
    )
    took_along: list[str] = field(
        default_factory=list
    )  # modules whose calls a conv block replaced with the conv (its BN)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SurgeryReport:
    model: str
    source: str
    input_size: tuple[int, ...]
    params: dict[str, Any]
    insertions: list[Insertion]
    plan: list[InsertionSpec]
    weights: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    target: list[str] | None = None  # the submodules that were traced and rewritten (None: the whole model)
    memory_efficient: list[Any] | None = None  # memory.Segment per recomputed gate; None: not asked for
    # the nn.Module a model object was built from (source "object"): no name rebuilds it, so export
    # checks a saved file by rebuilding the recipe on a copy of it. Not part of the report's dict.
    base_object: Any = field(default=None, repr=False, compare=False)
    weights_key: str | None = None  # the checkpoint's entry the weights came from

    def to_dict(self) -> dict[str, Any]:
        extra = (
            {} if self.memory_efficient is None else {"memory_efficient": [s.to_dict() for s in self.memory_efficient]}
        )
        return {
            "model": self.model,
            "target": self.target,
            "source": self.source,
            "weights": self.weights,
            "weights_key": self.weights_key,
            "model_kwargs": self.model_kwargs,
            "input_size": list(self.input_size),
            "params": dict(self.params),
            "insertions": [i.to_dict() for i in self.insertions],
            "plan": [s.to_dict() for s in self.plan],
            "notes": list(self.notes),
            **extra,
        }


class SurgeryResult(NamedTuple):
    model: Any  # torch.fx.GraphModule
    report: SurgeryReport


@dataclass
class Rewrite:
    """A model whose traced graph has been rewritten by a plan, before it is embedded back into the
    model: the step between :func:`rewrite` and :func:`finish`, where a later pass (the
    memory-efficient segments of :mod:`attnsurgeon.rewriting.memory`) may still edit the graph."""

    loaded: Any  # loading.models.LoadedModel
    size: tuple[int, ...]
    traced: Any  # graph.parts.Traced
    anatomy: Any
    specs: list[InsertionSpec]
    planned: list[_Planned]
    insertions: list[Insertion]
    notes: list[str]
    base_params: int

    @property
    def gm(self) -> Any:
        return self.traced.gm


def rewrite(
    model: Any,
    specs: list[InsertionSpec],
    *,
    input_size: Any = None,
    pretrained: bool = False,
    weights: Any = None,
    target: Any = None,
    weights_key: str | None = None,
    model_args: dict[str, Any] | None = None,
) -> Rewrite:
    """Load and trace ``model``, plan ``specs`` against its anatomy and rewrite the traced graph;
    the model itself is not changed until :func:`finish`. No specs: the graph as traced."""
    from ..graph.anatomy import analyse
    from ..graph.layout import resolve_input_size
    from ..graph.parts import trace_model
    from ..graph.shapes import propagate_shapes
    from ..loading.models import as_loaded, refuse_saved

    refuse_saved(model)
    loaded = as_loaded(model, pretrained=pretrained, weights=weights, weights_key=weights_key, **(model_args or {}))
    size = resolve_input_size(input_size, loaded.input_size)
    base_params = count_params(loaded.model)
    traced = trace_model(loaded.model, size, target)
    gm = traced.gm
    anatomy = analyse(gm, traced.analysis_size, require_blocks=not specs or not all(s.anchor for s in specs))
    anatomy.target = traced.targets
    anatomy.model_modules = [n for n, _ in loaded.model.named_modules() if n]
    notes: list[str] = list(loaded.notes) + list(traced.notes)
    planned = plan(anatomy, specs, notes)
    _place_modules(planned, gm)
    insertions = _rewrite(gm, planned)
    gm.graph.lint()
    gm.recompile()
    try:
        propagate_shapes(gm, traced.analysis_size)
    except AttnSurgeonError as exc:  # the rewrite must keep the model runnable
        raise AttnSurgeonError(f"internal error: the rewritten model does not run: {exc}") from exc
    return Rewrite(loaded, size, traced, anatomy, specs, planned, insertions, notes, base_params)


def finish(done: Rewrite, segments: list[Any] | None = None) -> SurgeryResult:
    """Embed the rewritten graph back into the model (in place of the traced parts) and report it;
    ``segments``: the memory-efficient pass's record, if one ran."""
    from ..graph.parts import embed

    loaded, specs = done.loaded, done.specs
    gm = embed(loaded.model, done.gm, done.traced.targets)
    modified = count_params(gm)
    params = {
        "base": done.base_params,
        "modified": modified,
        "delta": modified - done.base_params,
        "percent": round(100.0 * (modified - done.base_params) / done.base_params, 4) if done.base_params else None,
    }
    notes = done.notes + (_attention_notes(done.anatomy, done.planned) if specs else [])
    report = SurgeryReport(
        loaded.spec,
        loaded.source,
        done.size,
        params,
        done.insertions,
        specs,
        loaded.weights,
        dict(loaded.kwargs),
        notes,
        done.traced.targets,
        segments,
        loaded.model if loaded.source == "object" else None,
        weights_key=loaded.weights_key,
    )
    gm.train(loaded.model.training)
    gm.attnsurgeon_report = report  # export and profile read the recipe from here
    return SurgeryResult(gm, report)


def count_params(model: Any) -> int:
    """Parameters of ``model``, shared tensors counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------- planning


def _place_modules(planned: list[_Planned], gm: Any) -> None:
    """Move the modules planning built onto the model's device and floating dtype."""
    param = next(iter(gm.parameters()), None)
    if param is None:
        return
    for p in planned:
        if p.module is not None:  # None: a removal (--attn none --replace)
            p.module = p.module.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)


# --------------------------------------------------------------------------- rewriting


def _rewrite(gm: Any, planned: list[_Planned]) -> list[Insertion]:
    graph = gm.graph
    done: list[Insertion] = []
    moved = _Moved()
    for p in planned:
        if p.region is not None:
            done.append(_replace(gm, p, moved))
            continue
        gm.add_submodule(p.module_name, p.module)
        consumers = moved.consumers(p.site.consumers)
        anchor = _anchor(moved.producer(p.site.producer), consumers)
        head, tail = _call_in_layout(graph, anchor, p.module_name, p.site.layout)
        unit = {"head": head, "tail": tail, "cover": frozenset(consumers)}
        node = head
        while True:
            node.meta["as_unit"] = unit
            # the block's module scope (the site's, a stage's), so that the rewritten model can be analysed again
            node.meta["nn_module_stack"] = dict(p.site.scope if p.site.scope is not None else p.block.scope)
            if node.op == "call_module":
                node.meta["nn_module_stack"][p.module_name] = (p.module_name, type(p.module))
            if node is tail:
                break
            node = next(iter(node.users))
        for user in list(anchor.users):
            if user is head:
                continue
            other = user.meta.get("as_unit")
            if user in consumers or (other is not None and other["head"] is user and other["cover"] <= consumers):
                user.replace_input_with(anchor, tail)
        assert p.spec.position is not None  # InsertionSpec.__post_init__ sets it
        done.append(
            Insertion(
                block=p.block.name,
                stage=p.block.stage,
                position=p.spec.position,
                attn=p.spec.attn,
                channels=p.site.channels,
                params=count_params(p.module),
                module=p.module_name,
                layout=str(p.site.layout),
                options=_resolved_options(p),
                anchor=p.site.anchor,
            )
        )
    return done


class _Moved:
    """Nodes a replacement removed, and what stands in their place: a site planned before the
    rewrite (SE-3×3 feeds the SE's pool; SE-ResNet's standard site is the SE's output) follows them."""

    def __init__(self) -> None:
        self.as_producer: dict[Any, Any] = {}
        self.as_consumer: dict[Any, tuple] = {}

    def producer(self, node: Any) -> Any:
        while node in self.as_producer:
            node = self.as_producer[node]
        return node

    def consumers(self, nodes: Iterable[Any]) -> set:
        out: set = set()
        for n in nodes:
            out |= self.consumers(self.as_consumer[n]) if n in self.as_consumer else {n}
        return out


def _replace(gm: Any, p: _Planned, moved: _Moved) -> Insertion:
    """Call ``p.module`` (None: nothing) on the region's input, in place of the region."""
    from ..graph.attention import region_io

    assert p.spec.position is not None  # InsertionSpec.__post_init__ sets it

    graph, nodes = gm.graph, p.region.nodes
    inputs, outputs = region_io(nodes)  # now: an earlier insertion may feed the region
    if len(inputs) != 1 or len(outputs) != 1:
        raise AttnSurgeonError(
            f"attention module {p.module_name} no longer reads one tensor after the plan's earlier "
            "insertions; put the replacement first in the plan"
        )
    (x,), (y,) = inputs, outputs
    readers = [u for u in y.users if u not in nodes]
    old = gm.get_submodule(p.module_name)
    removed = count_params(old)
    gm.delete_submodule(p.module_name)
    if p.module is not None:
        gm.add_submodule(p.module_name, p.module)
        head, out = _call_in_layout(graph, x, p.module_name, p.site.layout)
        scope = {}
        for key, value in ((p.site.replaces or y).meta.get("nn_module_stack") or {}).items():
            if (value[0] if isinstance(value, tuple) else value) == p.module_name:
                break
            scope[key] = value
        node = head
        while True:
            node.meta["nn_module_stack"] = dict(scope)
            if node.op == "call_module":
                node.meta["nn_module_stack"][p.module_name] = (p.module_name, type(p.module))
            if node is out:
                break
            node = next(iter(node.users))
        stands_in: tuple = (head,)
    else:
        out, stands_in = x, tuple(readers)
    for user in readers:
        user.replace_input_with(y, out)
    for n in reversed(list(graph.nodes)):
        if n in nodes:
            graph.erase_node(n)
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    took_along = sorted(
        n.target
        for n in nodes
        if n.op == "call_module" and n.target != p.module_name and not n.target.startswith(p.module_name + ".")
    )  # a conv block's norm and activation
    for target in took_along:
        if target not in called:  # called nowhere else now (a shared ReLU stays)
            removed += count_params(gm.get_submodule(target))
            gm.delete_submodule(target)
    moved.as_producer[y] = out
    for n in nodes:
        moved.as_consumer[n] = stands_in
    for n in graph.nodes:  # earlier insertions that fed the region cover what stands in its place now
        unit = n.meta.get("as_unit")
        if unit is not None and unit["head"] is n and unit["cover"] & nodes:
            unit["cover"] = frozenset(moved.consumers(unit["cover"]))
    return Insertion(
        block=p.block.name,
        stage=p.block.stage,
        position="replace" if p.spec.replace else p.spec.position,
        attn=p.spec.attn,
        channels=p.site.channels,
        params=count_params(p.module) if p.module is not None else 0,
        module=p.module_name,
        layout=str(p.site.layout),
        options=_resolved_options(p) if p.module is not None else {},
        replaced=p.region.type,
        replaced_params=removed,
        took_along=took_along,
    )


def _anchor(producer: Any, consumers: set) -> Any:
    """Walk past earlier insertions on this edge whose consumers include all of ours."""
    current = producer
    while True:
        nxt = None
        for user in current.users:
            unit = user.meta.get("as_unit")
            if unit is not None and unit["head"] is user and unit["cover"] >= consumers:
                nxt = unit["tail"]
                break
        if nxt is None:
            return current
        current = nxt


def _call_in_layout(graph: Any, x: Any, target: str, layout: Any) -> tuple[Any, Any]:
    """Nodes that call module ``target`` on ``x`` with its channels at axis 1 (a channels-last map is
    permuted there and back, as its :class:`~attnsurgeon.graph.layout.Layout` says); returns (head, tail)."""
    steps = [
        ("call_method", "permute", layout.to_channels_first()),
        ("call_module", target, ()),
        ("call_method", "permute", layout.from_channels_first()),
    ]
    head = None
    prev = x
    for op, target_, extra in steps:
        if extra is None:
            continue  # channels first already: nothing to move
        with graph.inserting_after(prev):
            node = graph.create_node(op, target_, (prev, *extra), {})
        head = head or node
        prev = node
    return head, prev


def _resolved_options(p: _Planned) -> dict[str, Any]:
    """The options the module was built with, defaults filled in (what a reader wants to see)."""
    from ..blocks import describe_block

    out = describe_block(p.spec.attn, p.module, p.options)
    if p.spec.init != "default":
        out["init"] = p.spec.init
    return out
