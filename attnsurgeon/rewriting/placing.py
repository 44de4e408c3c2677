"""Plan an insertion against a model's anatomy: which block's which site gets which module, under
which name; nothing in the model changes here.

Each :class:`~attnsurgeon.planning.schema.InsertionSpec` is validated, its blocks chosen (stages,
block globs, anchors), the sites that do not fit it described in the notes, its modules built with
their per-stage options, and a free module name chosen beside the block (``layer3.0.se``,
``layer3.0.eca_pre``, ``layer1.bam_stage``, ``layer3.0.conv2_se``). With ``replace`` the plan also
names the attention region each new module takes the place of. :mod:`attnsurgeon.rewriting.surgery`
then edits the graph by this plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.errors import AttnSurgeonError, few
from ..planning.schema import NONE, InsertionSpec, validate


@dataclass
class _Planned:
    spec: InsertionSpec
    block: Any  # anatomy.Block
    site: Any  # anatomy.Site
    options: dict[str, Any]
    module_name: str
    module: Any = None
    region: Any = None  # anatomy.AttentionRegion this one replaces


def _attention_notes(anatomy: Any, planned: list[_Planned]) -> list[str]:
    names = [n for n, _ in anatomy.existing_attention]
    replaced = {p.region.name for p in planned if p.region is not None and p.spec.replace}
    if not names:
        return []
    if not replaced:
        return [
            f"the model already has {len(names)} attention module(s) ({few(names, 3)}); the new blocks are added "
            "to them, not in their place (--replace puts them in their place)"
        ]
    kept = [n for n in names if n not in replaced and not any(r.startswith(n + ".") for r in replaced)]
    return (
        [
            f"{len(kept)} attention module(s) of the model are kept as they were, outside the selected blocks or "
            f"not channel/spatial gates: {few(kept, 3)}"
        ]
        if kept
        else []
    )


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
    from ..blocks import get_block
    from ..graph.sites import select_blocks

    assert spec.position is not None  # InsertionSpec.__post_init__ sets it

    if spec.replace or spec.attn == NONE:
        return _plan_replacement(anatomy, spec, taken)
    from ..core.positions import STAGE_POSITIONS
    from ..graph.attention import AttentionRegion

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
                raise AttnSurgeonError(
                    f"convolution {name} is replaced by two insertions of the plan; select disjoint blocks"
                )
            taken_along = [
                type(anatomy.gm.get_submodule(n.target)).__name__ if n.op == "call_module" else str(n.target)
                for n in (site.replaces, *site.absorbs)
            ]
            region = AttentionRegion(name, "+".join(taken_along), frozenset({site.replaces, *site.absorbs}), site=site)
        else:
            name = _module_name(anatomy.gm, block, info.short, spec.position, taken, parent=site.module)
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
        raise AttnSurgeonError(
            f"position '{spec.position}' goes after the last block of a stage, and the selected "
            f"blocks ({few([b.name for b in chosen], 3)}) end no stage; select stages with --stages, "
            f"or name the last block of one ({few(list(dict.fromkeys(last)), 3)})"
        )
    if not spec.stages and not spec.blocks:  # by default every stage that has a following stage: the last has none
        kept = [b for b in kept if spec.position in b.sites] or kept
    return kept


def _plan_replacement(anatomy: Any, spec: InsertionSpec, taken: set[str]) -> list[_Planned]:
    """``replace``: one item per attention gate in the selected blocks, with its module built for
    the channels at the gate's input (none for ``attn='none'``), named as the module it replaces."""
    from ..blocks import build_block
    from ..graph.attention import attention_regions
    from ..graph.sites import select_blocks

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
        where = (
            f"the model's {len(regions)} attention modules ({few([r.name for r in regions], 2)}) are in "
            f"stage{'s' if len(stages) != 1 else ''} {', '.join(map(str, stages))}"
            if stages
            else "the model's attention modules are in no block"
            if regions
            else "the model has no attention modules of its own"
        )
        raise AttnSurgeonError(
            f"--replace: the selected blocks hold no attention module to replace ({where}); "
            "`attnsurgeon inspect MODEL` lists the attention a model has"
        )
    gates = [(b, r) for b, r in found if r.gate]
    if not gates:
        kinds: dict[tuple[str, str], list[str]] = {}
        for _, r in found:
            kinds.setdefault((r.type, r.why), []).append(r.name)
        why = "; ".join(f"{len(names)} {cls} ({few(names, 1)}): {reason}" for (cls, reason), names in kinds.items())
        raise AttnSurgeonError(
            f"--replace: no attention module in the selected blocks is a channel/spatial gate that "
            f"can be replaced ({why}); SE, ECA, CBAM, GE and GC-like modules can be"
        )
    per_stage = _per_stage_options(spec, sorted({b.stage for b, _ in gates}))
    planned: list[_Planned] = []
    for block, region in gates:
        if region.name in taken:
            raise AttnSurgeonError(
                f"attention module {region.name} is replaced by two insertions of the plan; select disjoint blocks"
            )
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


def _fitting_blocks(
    spec: InsertionSpec, chosen: list[Any], per_stage: dict[int, dict[str, Any]], notes: list[str]
) -> list[tuple[Any, Any]]:
    """The selected blocks the insertion fits, each with the module built for it.

    A block does not fit where it does not offer the position (an opaque block at ``standard``)
    or where the attention block cannot be built for its channels. A block the user named
    (``blocks`` globs) that does not fit is an error; under the default or a ``stages``
    selection it is skipped with a note, and it is an error only when no selected block fits.
    """
    from ..blocks import build_block

    assert spec.position is not None  # InsertionSpec.__post_init__ sets it
    lacking = [b for b in chosen if spec.position not in b.sites]
    fitting: list[tuple[Any, Any]] = []
    unbuildable: list[tuple[Any, str]] = []
    for block in chosen:
        if block in lacking:
            continue
        site = block.sites[spec.position]
        try:
            module = build_block(
                spec.attn, site.channels, spec.init, size=site.size, conv=site.conv, **per_stage[block.stage]
            )
            if site.replaces is not None:
                _check_replacement(spec.attn, module, site)
            fitting.append((block, module))
        except AttnSurgeonError as exc:
            where = (
                f"--{spec.position} {site.anchor} ({site.layout} map of {site.channels} channels)"
                if site.anchor
                else f"block {block.name} ({site.channels} channels at '{spec.position}')"
            )
            unbuildable.append((block, f"{where}: {exc}"))
    errors = ([_not_offered(spec, chosen, lacking)] if lacking else []) + [why for _, why in unbuildable]
    if errors and (spec.blocks or spec.anchor or not fitting):  # a module the user named must take the block
        raise AttnSurgeonError(errors[0] if spec.blocks or not unbuildable else unbuildable[0][1])
    if lacking:
        notes.append(
            f"{spec.attn} skipped {len(lacking)} block{'s' if len(lacking) > 1 else ''} "
            f"({few([b.name for b in lacking])}): position '{spec.position}' is not available there "
            f"({_why_not_offered(spec.position, lacking)})"
        )
    for _, why in unbuildable:
        notes.append(f"{spec.attn} skipped {why}")
    return fitting


def _check_replacement(attn: str, module: Any, site: Any) -> None:
    """What replaces a conv must give the conv's output shape (on the meta device: no compute)."""
    import copy

    import torch

    from ..graph.shapes import shape_of

    want = shape_of(site.replaces)
    with torch.no_grad():
        got = tuple(copy.deepcopy(module).to("meta").eval()(torch.empty(site.shape, device="meta")).shape)
    if want is not None and got != tuple(want):
        raise AttnSurgeonError(
            f"{attn} built for the {site.conv.describe()} gives a {tuple(got)} output where the conv "
            f"gives {tuple(want)} (its padding {site.conv.padding!r} is not the symmetric "
            "padding the block uses)"
        )


def _why_not_offered(position: str, lacking: list[Any]) -> str:
    """Why each kind of block in ``lacking`` has no ``position``: 'opaque: …; plain: …'."""
    reasons = []
    for kind in sorted({b.kind for b in lacking}):
        if kind == "opaque":
            why = "the tracer keeps it whole (its library marks it not traceable), so only pre and post reach it"
        else:
            why = {
                "identity": "it has no skip connection",
                "3x3": "it has no spatial (k>1) convolution",
                "conv": "it has no spatial (k>1) nn.Conv module to replace",
                "stage": "it ends the last stage: no stage follows it",
            }.get(position, "it offers no such place")
        reasons.append(f"{kind}: {why}")
    return "; ".join(reasons)


def _not_offered(spec: InsertionSpec, chosen: list[Any], lacking: list[Any]) -> str:
    assert spec.position is not None  # InsertionSpec.__post_init__ sets it
    offering = len(chosen) - len(lacking)  # > 0 only where --blocks named the others
    hint = (
        f"{offering} of the {len(chosen)} selected blocks offer it: leave the others out of --blocks"
        if offering
        else "`attnsurgeon inspect MODEL` lists the positions of each block"
    )
    return (
        f"position '{spec.position}' is not available in block{'s' if len(lacking) > 1 else ''} "
        f"{few([b.name for b in lacking])} ({_why_not_offered(spec.position, lacking)}); {hint}"
    )


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
            for s, v in zip(stages, values, strict=True):  # the lengths are checked above
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
