"""Apply an insertion plan to a traced model.

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

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, NamedTuple

from ..core.errors import AttnSurgeonError, few as _few
from ..graph.layout import resolve_input_size  # noqa: F401  (the input size of every command: one rule)
from ..planning.schema import NONE, InsertionSpec, check_replace, validate  # noqa: F401  (the schema, re-exported)



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
    anchor: str | None = None  # the module it goes after/before (position 'after'/'before'); block: the block it lies in
    took_along: list[str] = field(default_factory=list)  # modules whose calls a conv block replaced with the conv (its BN)

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

    def to_dict(self) -> dict[str, Any]:
        extra = {} if self.memory_efficient is None else {"memory_efficient": [s.to_dict() for s in self.memory_efficient]}
        return {
            "model": self.model,
            "target": self.target,
            "source": self.source,
            "weights": self.weights,
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
class _Planned:
    spec: InsertionSpec
    block: Any  # anatomy.Block
    site: Any  # anatomy.Site
    options: dict[str, Any]
    module_name: str
    module: Any = None
    region: Any = None  # anatomy.AttentionRegion this one replaces


# --------------------------------------------------------------------------- public API


def insert(
    model: Any,
    attn: str = "se",
    position: str | None = None,
    stages: Iterable[int] | None = None,
    blocks: Iterable[str] | str | None = None,
    init: str = "default",
    *,
    input_size: Any = None,
    pretrained: bool = False,
    weights: Any = None,
    replace: bool = False,
    target: Any = None,
    memory_efficient: bool = False,
    after: Iterable[str] | str | None = None,
    before: Iterable[str] | str | None = None,
    **block_options: Any,
) -> SurgeryResult:
    """Insert one kind of attention block into a model.

    Args:
        model: a model name (``"resnet50"``, ``"timm:resnet50"``, ``"my.py:build"``) or an ``nn.Module``.
        attn: a block of the zoo (``se``, ``eca``, ``cbam``, ...: ``attnsurgeon list attn``).
        position: one of :data:`attnsurgeon.core.positions.POSITIONS`; by default the block's natural
            position (``standard`` for the gates).
        stages: 1-based stage numbers as ``attnsurgeon inspect`` shows them; all by default.
        blocks: globs over block names (``"layer3.*"``); all by default.
        init: ``default`` or ``identity`` (the modified model starts with the base model's outputs).
        input_size: ``224``, ``(224, 224)`` or ``(3, 224, 224)``; the model's own default if None.
        pretrained / weights: see :func:`attnsurgeon.loading.models.load_model`.
        replace: put the block in place of the attention gates the selected blocks already have
            (SE, ECA, CBAM...) instead of beside them; with ``attn="none"`` they are removed.
        target: the submodule(s) to rewrite (``"backbone.body"``, a list, or ``"a,b"``); by default the
            whole model, or, where it does not trace (a detector), the parts found by
            :func:`attnsurgeon.graph.parts.find_targets`. Block names are full paths from the top model.
        memory_efficient: in training, recompute each inserted block (and the norm before it) in the
            backward pass instead of keeping its input: see :mod:`attnsurgeon.rewriting.memory`.
        after / before: instead of a position, globs over module names (``"layer3.*.conv2"``, a list,
            or ``"a,b"``): the block goes on the output of / the input of every matching module
            (:mod:`attnsurgeon.graph.anchors`); ``stages``/``blocks`` then keep the modules inside them.
        **block_options: the block's options (``reduction``, ``kernel_size``, ...: see
            :mod:`attnsurgeon.blocks.options`); a list gives one value per selected stage.

    Returns:
        ``(model, report)``: the rewritten ``torch.fx.GraphModule`` and a :class:`SurgeryReport`.
        The returned model shares the base model's parameters (nothing is copied).

    Example:
        >>> model, report = insert("timm:resnet50", attn="se")
        >>> report.params["delta"]
        2514944
    """
    spec = make_spec(attn, position, stages, blocks, init, replace=replace, after=after, before=before, **block_options)
    return apply_plan(model, [spec], input_size=input_size, pretrained=pretrained, weights=weights, target=target,
                      memory_efficient=memory_efficient)


def make_spec(attn: str, position: str | None = None, stages: Iterable[int] | None = None,
              blocks: Iterable[str] | str | None = None, init: str = "default", *, replace: bool = False,
              after: Iterable[str] | str | None = None, before: Iterable[str] | str | None = None,
              **block_options: Any) -> InsertionSpec:
    """An :class:`InsertionSpec` from :func:`insert`-style arguments (``blocks``, ``after`` and
    ``before`` may be 'a.*,b.1')."""
    def listed(globs: Any) -> list[str] | None:
        if isinstance(globs, str):
            globs = [g.strip() for g in globs.split(",") if g.strip()]
        return list(globs) if globs is not None else None

    return validate(InsertionSpec(attn, position, list(stages) if stages else None, listed(blocks) or None, init,
                                  {k: v for k, v in block_options.items() if v is not None}, bool(replace),
                                  listed(after), listed(before)))


def apply_plan(
    model: Any,
    specs: Iterable[InsertionSpec | dict],
    *,
    input_size: Any = None,
    pretrained: bool = False,
    weights: Any = None,
    target: Any = None,
    memory_efficient: bool = False,
) -> SurgeryResult:
    """Apply several insertions (stacked in order) to a model; see :func:`insert`. With
    ``memory_efficient`` and no insertions, the model's own attention gates are made memory-efficient
    (:func:`attnsurgeon.rewriting.memory.optimize`)."""
    from ..graph.anatomy import analyse
    from ..loading.models import as_loaded, refuse_saved
    from ..graph.shapes import propagate_shapes
    from ..graph.parts import embed, trace_model

    specs = [s if isinstance(s, InsertionSpec) else InsertionSpec.from_dict(s) for s in specs]
    if not specs and not memory_efficient:
        raise AttnSurgeonError("the plan has no insertions")
    refuse_saved(model)
    loaded = as_loaded(model, pretrained=pretrained, weights=weights)
    size = resolve_input_size(input_size, loaded.input_size)
    base_params = count_params(loaded.model)
    traced = trace_model(loaded.model, size, target)
    gm = traced.gm
    anatomy = analyse(gm, traced.analysis_size, require_blocks=not specs or not all(s.anchor for s in specs))
    anatomy.target = traced.targets
    anatomy.model_modules = [n for n, _ in loaded.model.named_modules() if n]
    notes: list[str] = list(traced.notes)
    planned = plan(anatomy, specs, notes)
    _place_modules(planned, gm)
    insertions = _rewrite(gm, planned)
    gm.graph.lint()
    gm.recompile()
    try:
        propagate_shapes(gm, traced.analysis_size)
    except AttnSurgeonError as exc:  # the rewrite must keep the model runnable
        raise AttnSurgeonError(f"internal error: the rewritten model does not run: {exc}") from exc
    segments = None
    if memory_efficient:
        from .memory import recompute_gates

        segments = recompute_gates(gm, [i.module for i in insertions if i.attn != NONE] if specs else None, notes)
    gm = embed(loaded.model, gm, traced.targets)
    modified = count_params(gm)
    params = {
        "base": base_params,
        "modified": modified,
        "delta": modified - base_params,
        "percent": round(100.0 * (modified - base_params) / base_params, 4) if base_params else None,
    }
    notes += _attention_notes(anatomy, planned) if specs else []
    report = SurgeryReport(loaded.spec, loaded.source, size, params, insertions, specs, loaded.weights,
                           dict(loaded.kwargs), notes, traced.targets, segments,
                           loaded.model if loaded.source == "object" else None)
    gm.train(loaded.model.training)
    gm.attnsurgeon_report = report  # export and profile read the recipe from here
    return SurgeryResult(gm, report)


def _attention_notes(anatomy: Any, planned: list[_Planned]) -> list[str]:
    names = [n for n, _ in anatomy.existing_attention]
    replaced = {p.region.name for p in planned if p.region is not None and p.spec.replace}
    if not names:
        return []
    if not replaced:
        return [f"the model already has {len(names)} attention module(s) ({_few(names, 3)}); the new blocks are added "
                "to them, not in their place (--replace puts them in their place)"]
    kept = [n for n in names if n not in replaced and not any(r.startswith(n + ".") for r in replaced)]
    return [f"{len(kept)} attention module(s) of the model are kept as they were, outside the selected blocks or "
            f"not channel/spatial gates: {_few(kept, 3)}"] if kept else []


def count_params(model: Any) -> int:
    """Parameters of ``model``, shared tensors counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------- planning


def plan(anatomy: Any, specs: list[InsertionSpec], notes: list[str] | None = None) -> list[_Planned]:
    """Check every spec against the anatomy, build its modules and choose the sites and module
    names; nothing in the model changes. Blocks a spec skips are described in ``notes``."""
    planned: list[_Planned] = []
    taken: set[str] = set()
    for i, spec in enumerate(specs):
        try:
            planned += _plan_one(anatomy, validate(spec), taken, notes if notes is not None else [])
        except AttnSurgeonError as exc:
            if len(specs) == 1:
                raise
            where = f"{spec.position} {','.join(spec.anchor)}" if spec.anchor else f"at {spec.position}"
            raise AttnSurgeonError(f"insertion {i + 1} of {len(specs)} ({spec.attn} {where}): {exc}") from exc
    return planned


def _plan_one(anatomy: Any, spec: InsertionSpec, taken: set[str], notes: list[str]) -> list[_Planned]:
    """One validated spec (:func:`attnsurgeon.planning.schema.validate`) against the anatomy."""
    from ..graph.anatomy import select_blocks
    from ..blocks import get_block

    if spec.replace or spec.attn == NONE:
        return _plan_replacement(anatomy, spec, taken)
    from ..graph.anatomy import AttentionRegion
    from ..core.positions import STAGE_POSITIONS

    planned: list[_Planned] = []
    info = get_block(spec.attn)
    if spec.anchor:
        from ..graph.anchors import anchor_blocks

        chosen = anchor_blocks(anatomy, spec.position, spec.anchor, spec.stages, spec.blocks, anatomy.model_modules)
    else:
        chosen = select_blocks(anatomy, spec.stages, spec.blocks)
    if not chosen:
        raise AttnSurgeonError("no block selected")
    if spec.position in STAGE_POSITIONS:
        chosen = _stage_ends(anatomy, chosen, spec)
    per_stage = _per_stage_options(spec, sorted({b.stage for b in chosen}))
    for block, module in _fitting_blocks(spec, chosen, per_stage, notes):
        site = block.sites[spec.position]
        region = None
        if site.replaces is not None:  # 'conv': the module takes the conv's place and name
            name = site.replaces.target
            if name in taken:
                raise AttnSurgeonError(f"convolution {name} is replaced by two insertions of the plan; select disjoint blocks")
            taken_along = [type(anatomy.gm.get_submodule(n.target)).__name__ if n.op == "call_module" else str(n.target)
                           for n in (site.replaces, *site.absorbs)]
            region = AttentionRegion(name, "+".join(taken_along), frozenset({site.replaces, *site.absorbs}), site=site)
        else:
            name = _module_name(anatomy.gm, block, info.name, spec.position, taken, parent=site.module)
        taken.add(name)
        planned.append(_Planned(spec, block, site, per_stage[block.stage], name, module, region))
    return planned


def _stage_ends(anatomy: Any, chosen: list[Any], spec: InsertionSpec) -> list[Any]:
    """At a stage position the unit is the stage: the selected blocks that end a stage (the others
    have no such site and are no news). Blocks named by --blocks that end no stage are an error."""
    ends = {s.blocks[-1].name: s for s in anatomy.stages}
    kept = [b for b in chosen if b.name in ends]
    if not kept:
        last = [anatomy.stages[b.stage - 1].blocks[-1].name for b in chosen]
        raise AttnSurgeonError(f"position '{spec.position}' goes after the last block of a stage, and the selected "
                               f"blocks ({_few([b.name for b in chosen], 3)}) end no stage; select stages with --stages, "
                               f"or name the last block of one ({_few(list(dict.fromkeys(last)), 3)})")
    if not spec.stages and not spec.blocks:  # by default every stage that has a following stage: the last has none
        kept = [b for b in kept if spec.position in b.sites] or kept
    return kept


def _plan_replacement(anatomy: Any, spec: InsertionSpec, taken: set[str]) -> list[_Planned]:
    """``replace``: one item per attention gate in the selected blocks, with its module built for
    the channels at the gate's input (none for ``attn='none'``), named as the module it replaces."""
    from ..graph.anatomy import attention_regions, select_blocks
    from ..blocks import build_block

    chosen = select_blocks(anatomy, spec.stages, spec.blocks)
    if not chosen:
        raise AttnSurgeonError("no block selected")
    regions = attention_regions(anatomy.gm)
    found: list[tuple[Any, Any]] = []  # (block, region), each region once, in the first block holding it
    for region in regions:
        block = next((b for b in chosen if region.nodes & b.nodes), None)
        if block is not None:
            found.append((block, region))
    if not found:
        stages = sorted({b.stage for r in regions for b in anatomy.blocks if r.nodes & b.nodes})
        where = (f"the model's {len(regions)} attention modules ({_few([r.name for r in regions], 2)}) are in "
                 f"stage{'s' if len(stages) != 1 else ''} {', '.join(map(str, stages))}" if stages
                 else "the model's attention modules are in no block" if regions
                 else "the model has no attention modules of its own")
        raise AttnSurgeonError(f"--replace: the selected blocks hold no attention module to replace ({where}); "
                               "`attnsurgeon inspect MODEL` lists the attention a model has")
    gates = [(b, r) for b, r in found if r.gate]
    if not gates:
        kinds: dict[tuple[str, str], list[str]] = {}
        for _, r in found:
            kinds.setdefault((r.type, r.why), []).append(r.name)
        why = "; ".join(f"{len(names)} {cls} ({_few(names, 1)}): {reason}" for (cls, reason), names in kinds.items())
        raise AttnSurgeonError(f"--replace: no attention module in the selected blocks is a channel/spatial gate that "
                               f"can be replaced ({why}); SE, ECA, CBAM, GE and GC-like modules can be")
    per_stage = _per_stage_options(spec, sorted({b.stage for b, _ in gates}))
    planned: list[_Planned] = []
    for block, region in gates:
        if region.name in taken:
            raise AttnSurgeonError(f"attention module {region.name} is replaced by two insertions of the plan; "
                                   "select disjoint blocks")
        taken.add(region.name)
        module = None
        if spec.attn != NONE:
            site = region.site
            try:
                module = build_block(spec.attn, site.channels, spec.init, size=site.size, **per_stage[block.stage])
            except AttnSurgeonError as exc:
                raise AttnSurgeonError(f"attention module {region.name} ({site.channels} channels): {exc}") from exc
        planned.append(_Planned(spec, block, region.site, per_stage[block.stage], region.name, module, region))
    return planned


def _fitting_blocks(spec: InsertionSpec, chosen: list[Any], per_stage: dict[int, dict[str, Any]],
                    notes: list[str]) -> list[tuple[Any, Any]]:
    """The selected blocks the insertion fits, each with the module built for it.

    A block does not fit where it does not offer the position (an opaque block at ``standard``)
    or where the attention block cannot be built for its channels. A block the user named
    (``blocks`` globs) that does not fit is an error; under the default or a ``stages``
    selection it is skipped with a note, and it is an error only when no selected block fits.
    """
    from ..blocks import build_block

    lacking = [b for b in chosen if spec.position not in b.sites]
    fitting: list[tuple[Any, Any]] = []
    unbuildable: list[tuple[Any, str]] = []
    for block in chosen:
        if block in lacking:
            continue
        site = block.sites[spec.position]
        try:
            module = build_block(spec.attn, site.channels, spec.init, size=site.size, conv=site.conv, **per_stage[block.stage])
            if site.replaces is not None:
                _check_replacement(spec.attn, module, site)
            fitting.append((block, module))
        except AttnSurgeonError as exc:
            where = (f"--{spec.position} {site.anchor} ({site.layout} map of {site.channels} channels)" if site.anchor
                     else f"block {block.name} ({site.channels} channels at '{spec.position}')")
            unbuildable.append((block, f"{where}: {exc}"))
    errors = ([_not_offered(spec, chosen, lacking)] if lacking else []) + [why for _, why in unbuildable]
    if errors and (spec.blocks or spec.anchor or not fitting):  # a module the user named must take the block
        raise AttnSurgeonError(errors[0] if spec.blocks or not unbuildable else unbuildable[0][1])
    if lacking:
        notes.append(f"{spec.attn} skipped {len(lacking)} block{'s' if len(lacking) > 1 else ''} ({_few([b.name for b in lacking])}): "
                     f"position '{spec.position}' is not available there ({_why_not_offered(spec.position, lacking)})")
    for _, why in unbuildable:
        notes.append(f"{spec.attn} skipped {why}")
    return fitting


def _check_replacement(attn: str, module: Any, site: Any) -> None:
    """What replaces a conv must give the conv's output shape (on the meta device: no compute)."""
    import copy

    import torch

    from ..graph.shapes import _shape

    want = _shape(site.replaces)
    with torch.no_grad():
        got = tuple(copy.deepcopy(module).to("meta").eval()(torch.empty(site.shape, device="meta")).shape)
    if want is not None and got != tuple(want):
        raise AttnSurgeonError(f"{attn} built for the {site.conv.describe()} gives a {tuple(got)} output where the conv "
                               f"gives {tuple(want)} (its padding {site.conv.padding!r} is not the symmetric "
                               "padding the block uses)")


def _why_not_offered(position: str, lacking: list[Any]) -> str:
    """Why each kind of block in ``lacking`` has no ``position``: 'opaque: …; plain: …'."""
    reasons = []
    for kind in sorted({b.kind for b in lacking}):
        if kind == "opaque":
            why = "the tracer keeps it whole (its library marks it not traceable), so only pre and post reach it"
        else:
            why = {"identity": "it has no skip connection", "3x3": "it has no spatial (k>1) convolution",
                   "conv": "it has no spatial (k>1) nn.Conv module to replace",
                   "stage": "it ends the last stage: no stage follows it"}.get(position, "it offers no such place")
        reasons.append(f"{kind}: {why}")
    return "; ".join(reasons)


def _not_offered(spec: InsertionSpec, chosen: list[Any], lacking: list[Any]) -> str:
    offering = len(chosen) - len(lacking)  # > 0 only where --blocks named the others
    hint = (f"{offering} of the {len(chosen)} selected blocks offer it: leave the others out of --blocks" if offering
            else "`attnsurgeon inspect MODEL` lists the positions of each block")
    return (f"position '{spec.position}' is not available in block{'s' if len(lacking) > 1 else ''} "
            f"{_few([b.name for b in lacking])} ({_why_not_offered(spec.position, lacking)}); {hint}")


def _per_stage_options(spec: InsertionSpec, stages: list[int]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {s: {} for s in stages}
    for key, value in spec.options.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            values = list(value)
            if len(values) == 1:
                values = values * len(stages)
            if len(values) != len(stages):
                raise AttnSurgeonError(
                    f"{key}: {len(values)} values given ({', '.join(map(str, values))}) for "
                    f"{len(stages)} selected stage{'s' if len(stages) != 1 else ''} ({', '.join(map(str, stages))}); "
                    "give one value, or one per selected stage"
                )
            for s, v in zip(stages, values):
                out[s][key] = v
        else:
            for s in stages:
                out[s][key] = value
    return out


def _module_name(gm: Any, block: Any, attn: str, position: str, taken: set[str], parent: str | None = None) -> str:
    """Where the module for ``block`` hangs: under the block's module, or under ``parent`` where the
    site names one (a stage container: ``layer1.bam_stage``)."""
    leaf = attn if position == "standard" else f"{attn}_{position}"
    anchor = block.sites[position].anchor if position in block.sites else None
    if anchor is not None:  # beside the module: layer3.0.conv2_se (after), decoder.blocks.0.scse_conv1 (before)
        own = anchor.rpartition(".")[2] if parent != anchor else ""
        leaf = (f"{own}_{attn}" if position == "after" else f"{attn}_{own}") if own else f"{attn}_{position}"
    if parent is not None:
        base = f"{parent}.{leaf}" if parent else leaf
    else:
        if "#" in block.name:  # the k-th merge in one module's forward
            leaf += "_" + block.name.rsplit("#", 1)[1]
        if block.kind == "unit":  # beside its conv: features.0 -> features.0_se
            leaf = f"{block.name.rsplit('.', 1)[-1]}_{leaf}"
        elif not block.module:  # a merge in the root's forward
            leaf = f"{block.name}_{leaf}"
        base = f"{block.module}.{leaf}" if block.module else leaf
    name, k = base, 1
    while name in taken or _exists(gm, name):
        k += 1
        name = f"{base}{k}"
    return name


def _exists(gm: Any, path: str) -> bool:
    obj = gm
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


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
    from ..graph.anatomy import region_io

    graph, nodes = gm.graph, p.region.nodes
    inputs, outputs = region_io(nodes)  # now: an earlier insertion may feed the region
    if len(inputs) != 1 or len(outputs) != 1:
        raise AttnSurgeonError(f"attention module {p.module_name} no longer reads one tensor after the plan's earlier "
                               "insertions; put the replacement first in the plan")
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
    took_along = sorted(n.target for n in nodes if n.op == "call_module" and n.target != p.module_name
                        and not n.target.startswith(p.module_name + "."))  # a conv block's norm and activation
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
    steps = [("call_method", "permute", layout.to_channels_first()),
             ("call_module", target, ()),
             ("call_method", "permute", layout.from_channels_first())]
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
