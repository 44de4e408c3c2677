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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, NamedTuple

from .errors import AttnSurgeonError, did_you_mean



@dataclass
class InsertionSpec:
    """One line of a plan: insert ``attn`` at ``position`` in the selected blocks.

    ``options`` are block options (``reduction``, ``bias``, ``kernel_size``, ``rd_divisor``); a
    list value gives one value per selected stage, in stage order (ECA-Net's ``[3, 5, 5, 7]``).
    """

    attn: str
    position: str = "standard"
    stages: list[int] | None = None
    blocks: list[str] | None = None
    init: str = "default"
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: v for k, v in d.items() if v not in (None, {}) or k in ("attn", "position", "init")}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "insertion") -> "InsertionSpec":
        """Validated as a recipe's insertion is (one schema, one checker: ``recipes.parse_insertion``)."""
        from .recipes import parse_insertion

        return parse_insertion(d, where)


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

    def to_dict(self) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- public API


def insert(
    model: Any,
    attn: str = "se",
    position: str = "standard",
    stages: Iterable[int] | None = None,
    blocks: Iterable[str] | str | None = None,
    init: str = "default",
    *,
    input_size: Any = None,
    pretrained: bool = False,
    weights: Any = None,
    target: Any = None,
    **block_options: Any,
) -> SurgeryResult:
    """Insert one kind of attention block into a model.

    Args:
        model: a model name (``"resnet50"``, ``"timm:resnet50"``, ``"my.py:build"``) or an ``nn.Module``.
        attn: ``se``, ``eca``, ``cbam`` (``attnsurgeon list attn``).
        position: ``standard``, ``pre``, ``post``, ``identity`` or ``3x3``.
        stages: 1-based stage numbers as ``attnsurgeon inspect`` shows them; all by default.
        blocks: globs over block names (``"layer3.*"``); all by default.
        init: ``default`` or ``identity`` (the modified model starts with the base model's outputs).
        input_size: ``224``, ``(224, 224)`` or ``(3, 224, 224)``; the model's own default if None.
        pretrained / weights: see :func:`attnsurgeon.models.load_model`.
        target: the submodule(s) to rewrite (``"backbone.body"``, a list, or ``"a,b"``); by default the
            whole model, or, where it does not trace (a detector), the parts found by
            :func:`attnsurgeon.parts.find_targets`. Block names are full paths from the top model.
        **block_options: ``reduction``, ``bias``, ``kernel_size``, ``rd_divisor``; a list gives
            one value per selected stage.

    Returns:
        ``(model, report)``: the rewritten ``torch.fx.GraphModule`` and a :class:`SurgeryReport`.
        The returned model shares the base model's parameters (nothing is copied).

    Example:
        >>> model, report = insert("timm:resnet50", attn="se")
        >>> report.params["delta"]
        2514944
    """
    spec = make_spec(attn, position, stages, blocks, init, **block_options)
    return apply_plan(model, [spec], input_size=input_size, pretrained=pretrained, weights=weights, target=target)


def make_spec(attn: str, position: str = "standard", stages: Iterable[int] | None = None,
              blocks: Iterable[str] | str | None = None, init: str = "default", **block_options: Any) -> InsertionSpec:
    """An :class:`InsertionSpec` from :func:`insert`-style arguments (``blocks`` may be 'a.*,b.1')."""
    if isinstance(blocks, str):
        blocks = [b.strip() for b in blocks.split(",") if b.strip()]
    return InsertionSpec(attn, position, list(stages) if stages else None, list(blocks) if blocks else None,
                         init, {k: v for k, v in block_options.items() if v is not None})


def apply_plan(
    model: Any,
    specs: Iterable[InsertionSpec | dict],
    *,
    input_size: Any = None,
    pretrained: bool = False,
    weights: Any = None,
    target: Any = None,
) -> SurgeryResult:
    """Apply several insertions (stacked in order) to a model; see :func:`insert`."""
    from .anatomy import analyse, propagate_shapes
    from .models import as_loaded
    from .parts import embed, trace_model

    specs = [s if isinstance(s, InsertionSpec) else InsertionSpec.from_dict(s) for s in specs]
    if not specs:
        raise AttnSurgeonError("the plan has no insertions")
    loaded = as_loaded(model, pretrained=pretrained, weights=weights)
    size = resolve_input_size(input_size, loaded.input_size)
    base_params = count_params(loaded.model)
    traced = trace_model(loaded.model, size, target)
    gm = traced.gm
    anatomy = analyse(gm, traced.analysis_size)
    planned = plan(anatomy, specs)
    _build_modules(planned, gm)
    insertions = _rewrite(gm, planned)
    gm.graph.lint()
    gm.recompile()
    try:
        propagate_shapes(gm, traced.analysis_size)
    except AttnSurgeonError as exc:  # the rewrite must keep the model runnable
        raise AttnSurgeonError(f"internal error: the rewritten model does not run: {exc}") from exc
    gm = embed(loaded.model, gm, traced.targets)
    modified = count_params(gm)
    params = {
        "base": base_params,
        "modified": modified,
        "delta": modified - base_params,
        "percent": round(100.0 * (modified - base_params) / base_params, 4) if base_params else None,
    }
    notes = list(traced.notes)
    if anatomy.existing_attention:
        names = [n for n, _ in anatomy.existing_attention]
        notes.append(f"the model already has {len(names)} attention module(s) ({', '.join(names[:3])}"
                     f"{', …' if len(names) > 3 else ''}); the new blocks are added to them, not in their place")
    report = SurgeryReport(loaded.spec, loaded.source, size, params, insertions, specs, loaded.weights,
                           dict(loaded.kwargs), notes, traced.targets)
    gm.train(loaded.model.training)
    gm.attnsurgeon_report = report  # export and profile read the recipe from here
    return SurgeryResult(gm, report)


def count_params(model: Any) -> int:
    """Parameters of ``model``, shared tensors counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def resolve_input_size(value: Any, default: tuple[int, ...]) -> tuple[int, int, int]:
    """``224`` / ``"224"`` / ``"160,128"`` / ``"3,224,224"`` / tuples -> ``(C, H, W)``."""
    if value is None or value == "":
        return tuple(int(v) for v in default)  # type: ignore[return-value]
    if isinstance(value, str):
        import re

        if not re.fullmatch(r"\s*\d+(\s*[,x×]\s*\d+){0,2}\s*", value):
            raise AttnSurgeonError(f"input size '{value}': expected S, H,W or C,H,W (e.g. 224, 160x128 or 3,224,224)")
        value = [int(p) for p in re.split(r"\s*[,x×]\s*", value.strip())]
    if isinstance(value, int):
        value = [value]
    value = [int(v) for v in value]
    if len(value) == 1:
        value = [default[0], value[0], value[0]]
    elif len(value) == 2:
        value = [default[0], *value]
    if len(value) != 3 or any(v <= 0 for v in value):
        raise AttnSurgeonError(f"input size {value}: expected S, H,W or C,H,W with positive numbers")
    return tuple(value)  # type: ignore[return-value]


# --------------------------------------------------------------------------- planning


def plan(anatomy: Any, specs: list[InsertionSpec]) -> list[_Planned]:
    """Check every spec against the anatomy and choose the sites and module names."""
    planned: list[_Planned] = []
    taken: set[str] = set()
    for i, spec in enumerate(specs):
        try:
            planned += _plan_one(anatomy, spec, taken)
        except AttnSurgeonError as exc:
            if len(specs) == 1:
                raise
            raise AttnSurgeonError(f"insertion {i + 1} of {len(specs)} ({spec.attn} at {spec.position}): {exc}") from exc
    return planned


def _plan_one(anatomy: Any, spec: InsertionSpec, taken: set[str]) -> list[_Planned]:
    from .anatomy import POSITIONS, select_blocks
    from .blocks import INITS, check_options, get_block

    planned: list[_Planned] = []
    info = get_block(spec.attn)
    if spec.position not in POSITIONS:
        raise AttnSurgeonError(
            f"unknown position '{spec.position}' (choose from {', '.join(POSITIONS)})." + did_you_mean(spec.position, POSITIONS)
        )
    if spec.init not in INITS:
        raise AttnSurgeonError(f"unknown init '{spec.init}' (choose from {', '.join(INITS)})")
    chosen = select_blocks(anatomy, spec.stages, spec.blocks)
    if not chosen:
        raise AttnSurgeonError("no block selected")
    lacking = [b.name for b in chosen if spec.position not in b.sites]
    if lacking:
        kinds = sorted({b.kind for b in chosen if b.name in lacking})
        why = {
            "identity": "it has no skip connection",
            "3x3": "it has no spatial (k>1) convolution",
        }.get(spec.position, "it offers no such place")
        if "opaque" in kinds:
            why = "the tracer keeps it whole (its library marks it not traceable), so only pre and post reach it"
        offering = len(chosen) - len(lacking)
        hint = (f"{offering} of the {len(chosen)} selected blocks offer it: narrow the selection with --stages/--blocks"
                if offering else "`attnsurgeon inspect MODEL` lists the positions of each block")
        raise AttnSurgeonError(
            f"position '{spec.position}' is not available in block{'s' if len(lacking) > 1 else ''} "
            f"{_few(lacking)} ({'/'.join(kinds)}: {why}); {hint}"
        )
    check_options(info.name, spec.options)
    per_stage = _per_stage_options(spec, sorted({b.stage for b in chosen}))
    for block in chosen:
        site = block.sites[spec.position]
        name = _module_name(anatomy.gm, block, info.name, spec.position, taken)
        taken.add(name)
        planned.append(_Planned(spec, block, site, per_stage[block.stage], name))
    return planned


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


def _module_name(gm: Any, block: Any, attn: str, position: str, taken: set[str]) -> str:
    leaf = attn if position == "standard" else f"{attn}_{position}"
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


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _build_modules(planned: list[_Planned], gm: Any) -> None:
    from .blocks import build_block

    param = next(iter(gm.parameters()), None)
    for p in planned:
        try:
            module = build_block(p.spec.attn, p.site.channels, p.spec.init, **p.options)
        except AttnSurgeonError as exc:
            raise AttnSurgeonError(f"block {p.block.name} ({p.site.channels} channels at '{p.spec.position}'): {exc}") from exc
        if param is not None:
            module = module.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
        p.module = module


# --------------------------------------------------------------------------- rewriting


def _rewrite(gm: Any, planned: list[_Planned]) -> list[Insertion]:
    graph = gm.graph
    done: list[Insertion] = []
    for p in planned:
        gm.add_submodule(p.module_name, p.module)
        consumers = set(p.site.consumers)
        anchor = _anchor(p.site.producer, consumers)
        head, tail = _call_in_layout(graph, anchor, p.module_name, p.site.layout)
        unit = {"head": head, "tail": tail, "cover": frozenset(consumers)}
        node = head
        while True:
            node.meta["as_unit"] = unit
            # the block's module scope, so that the rewritten model can be analysed again
            node.meta["nn_module_stack"] = dict(p.block.scope)
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
                layout=p.site.layout,
                options=_resolved_options(p),
            )
        )
    return done


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


def _call_in_layout(graph: Any, x: Any, target: str, layout: str) -> tuple[Any, Any]:
    """Nodes that call module ``target`` on ``x`` with channels at axis 1; returns (head, tail)."""
    steps: list[tuple[str, Any, tuple]] = {
        "NCHW": [],
        "NHWC": [("call_method", "permute", (0, 3, 1, 2))],
        "NLC": [("call_method", "transpose", (1, 2)), ("call_method", "unsqueeze", (-1,))],
        "NCL": [("call_method", "unsqueeze", (-1,))],
    }[layout]
    undo: list[tuple[str, Any, tuple]] = {
        "NCHW": [],
        "NHWC": [("call_method", "permute", (0, 2, 3, 1))],
        "NLC": [("call_method", "squeeze", (-1,)), ("call_method", "transpose", (1, 2))],
        "NCL": [("call_method", "squeeze", (-1,))],
    }[layout]
    head = None
    prev = x
    for op, target_, extra in [*steps, ("call_module", target, ()), *undo]:
        with graph.inserting_after(prev):
            node = graph.create_node(op, target_, (prev, *extra), {})
        head = head or node
        prev = node
    return head, prev


def _resolved_options(p: _Planned) -> dict[str, Any]:
    """The options the module was built with, defaults filled in (what a reader wants to see)."""
    from .blocks import describe_block

    out = describe_block(p.spec.attn, p.module, p.options)
    if p.spec.init != "default":
        out["init"] = p.spec.init
    return out
