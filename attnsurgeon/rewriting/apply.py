"""The rewriting API: :func:`insert` one kind of block, :func:`apply_plan` a list of insertions,
:func:`optimize` a model's own gates. Each composes the steps below it: plan and rewrite the graph
(:mod:`~attnsurgeon.rewriting.placing`, :mod:`~attnsurgeon.rewriting.surgery`), then, when asked,
make the attention gates memory-efficient (:mod:`~attnsurgeon.rewriting.memory`), then put the graph
back into the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..core.errors import AttnSurgeonError
from ..planning.schema import NONE, InsertionSpec, globs, validate
from .surgery import SurgeryResult, finish, rewrite


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
    weights_key: str | None = None,
    model_args: dict[str, Any] | None = None,
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
        pretrained / weights / weights_key: see :func:`attnsurgeon.loading.models.build_model`.
        model_args: the builder's arguments where ``model`` is a name (``{"num_classes": 7}``).
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
    return apply_plan(
        model,
        [spec],
        input_size=input_size,
        pretrained=pretrained,
        weights=weights,
        target=target,
        memory_efficient=memory_efficient,
        weights_key=weights_key,
        model_args=model_args,
    )


def make_spec(
    attn: str,
    position: str | None = None,
    stages: Iterable[int] | None = None,
    blocks: Iterable[str] | str | None = None,
    init: str = "default",
    *,
    replace: bool = False,
    after: Iterable[str] | str | None = None,
    before: Iterable[str] | str | None = None,
    **block_options: Any,
) -> InsertionSpec:
    """An :class:`InsertionSpec` from :func:`insert`-style arguments (``blocks``, ``after`` and
    ``before`` may be 'a.*,b.1'; an empty list is an error, as on the command line and in a recipe)."""
    blocks, after, before = (
        globs(value if value is None or isinstance(value, str) else list(value), key, what)
        for value, key, what in (
            (blocks, "blocks", "block-name"),
            (after, "after", "module-name"),
            (before, "before", "module-name"),
        )
    )
    return validate(
        InsertionSpec(
            attn,
            position,
            list(stages) if stages else None,
            blocks,
            init,
            {k: v for k, v in block_options.items() if v is not None},
            bool(replace),
            after,
            before,
        )
    )


def apply_plan(
    model: Any,
    specs: Iterable[InsertionSpec | dict],
    *,
    input_size: Any = None,
    pretrained: bool = False,
    weights: Any = None,
    target: Any = None,
    memory_efficient: bool = False,
    weights_key: str | None = None,
    model_args: dict[str, Any] | None = None,
) -> SurgeryResult:
    """Apply several insertions (stacked in order) to a model; see :func:`insert`. With
    ``memory_efficient`` and no insertions, the model's own attention gates are made memory-efficient
    (:func:`optimize`).

    Two steps: :func:`~attnsurgeon.rewriting.surgery.rewrite` edits the traced graph by the plan,
    then, with ``memory_efficient``, :func:`~attnsurgeon.rewriting.memory.recompute_gates` wraps
    the attention gates in recomputed segments, and :func:`~attnsurgeon.rewriting.surgery.finish`
    puts the graph back into the model."""
    plan: list[InsertionSpec] = [s if isinstance(s, InsertionSpec) else InsertionSpec.from_dict(s) for s in specs]
    if not plan and not memory_efficient:
        raise AttnSurgeonError("the plan has no insertions")
    done = rewrite(
        model,
        plan,
        input_size=input_size,
        pretrained=pretrained,
        weights=weights,
        target=target,
        weights_key=weights_key,
        model_args=model_args,
    )
    segments = None
    if memory_efficient:
        from .memory import recompute_gates

        names = [i.module for i in done.insertions if i.attn != NONE] if plan else None
        segments = recompute_gates(done.gm, names, done.notes)
    return finish(done, segments)


def optimize(
    model: Any,
    *,
    input_size: Any = None,
    pretrained: bool = False,
    weights: Any = None,
    target: Any = None,
    weights_key: str | None = None,
    model_args: dict[str, Any] | None = None,
) -> Any:
    """The model with its own attention gates (SE in SE-ResNet, EfficientNet, MobileNetV3, RegNetY…)
    recomputed in the backward pass: same outputs, parameters and names, less training memory.

    Returns ``(model, report)`` like :func:`attnsurgeon.insert`; ``report.memory_efficient`` lists the
    recomputed segments.

    Example:
        >>> model, report = optimize("timm:seresnet50")
        >>> len(report.memory_efficient)
        16
    """
    return apply_plan(
        model,
        [],
        input_size=input_size,
        pretrained=pretrained,
        weights=weights,
        target=target,
        memory_efficient=True,
        weights_key=weights_key,
        model_args=model_args,
    )
