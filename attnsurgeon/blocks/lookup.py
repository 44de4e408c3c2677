"""The one lookup of a block (a zoo name or a reference), its options checked, built for a site,
described, and the module classes the zoo builds. Nothing here imports torch at import time."""

from __future__ import annotations

from typing import Any

from ..core.errors import AttnSurgeonError, did_you_mean
from .info import BlockInfo, ConvSpec, FeatureMap
from .options import OPTIONS
from .registry import INITS, REGISTRY


def get_block(name: Any) -> BlockInfo:
    """The one lookup of a block: a zoo name (``se``), or a reference to a class anywhere
    (``gate.py:Gate``, ``pkg.mod:Class``, ``timm:eca``, or the class itself), resolved once by
    :func:`.external.resolve_block` into a :class:`BlockInfo` like the zoo's."""
    from .external import resolve_block
    from .references import FORMS, is_reference

    info = REGISTRY.get(name.lower()) if isinstance(name, str) else None
    if info is not None:
        return info
    if is_reference(name):
        return resolve_block(name)
    raise AttnSurgeonError(
        f"unknown attention block '{name}' (known: {', '.join(REGISTRY)}; or a class by reference: "
        f"{', '.join(FORMS)})." + did_you_mean(str(name), REGISTRY)
    )


def check_options(name: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Drop unset (None) options; refuse options the block does not take, and values out of range."""
    info = get_block(name)
    given = {k: v for k, v in options.items() if v is not None}
    if info.external is not None:  # its constructor's parameters; its values are its own business
        info.external.check_options(given, info.options)
        return given
    bad = [k for k in given if k not in info.options]
    if bad:
        takes = ", ".join(info.options) or "no options"
        raise AttnSurgeonError(f"'{info.name}' takes no option {', '.join(map(repr, bad))} (it takes: {takes})")
    for key, value in given.items():
        problem = OPTIONS[key].problem(value)
        if problem:
            raise AttnSurgeonError(f"{info.name}: {problem}")
    return given


def build_block(
    name: str,
    channels: int,
    init: str = "default",
    *,
    size: tuple[int, ...] = (0, 0),
    conv: ConvSpec | None = None,
    **options: Any,
):
    """Build block ``name`` for a map of ``channels`` channels and spatial ``size`` (its length sets
    1-D, 2-D or 3-D); ``init='identity'`` makes it start as an exact identity. A block of kind
    ``conv`` is built to replace the convolution ``conv`` describes (and needs one)."""
    info = get_block(name)
    if init not in INITS:
        raise AttnSurgeonError(f"unknown init '{init}' (choose from {', '.join(INITS)})")
    if (info.kind == "conv") != (conv is not None):
        raise AttnSurgeonError(
            f"{info.name} replaces a convolution and is built only at position 'conv'"
            if conv is None
            else f"{info.name} is a {info.kind} and cannot take the place of a convolution"
        )
    impl = info.impl()
    defaults = {} if info.external is not None else info.options  # a class fills in its own defaults
    module = impl.build(FeatureMap(int(channels), tuple(size), conv), **{**defaults, **check_options(name, options)})
    if init == "identity":
        module = impl.init_identity(module) or module  # in place, or a new module (the α-gate)
    return module


def describe_block(name: str, module: Any, requested: dict[str, Any]) -> dict[str, Any]:
    """What ``module`` was built with: the options as requested (defaults filled in), then what
    they came to (``{"reduction": 16, "hidden": 8, "bias": True}``: 8 after rounding 64/16 up)."""
    from ._alpha import AlphaGate

    info = get_block(name)
    defaults = {k: v for k, v in info.options.items() if v is not None}
    if isinstance(module, AlphaGate):
        return {**defaults, **requested, **info.impl().describe(module.block), "identity": "α-gate"}
    return {**defaults, **requested, **info.impl().describe(module)}


def block_classes(kind: str | None = None) -> tuple[type, ...]:
    """The module classes the zoo builds (kept whole, as leaves, when a model is traced); with
    ``kind``, those of the blocks of that kind only (``"conv"``: SelectiveKernel, SplitAttn)."""
    from ._alpha import AlphaGate
    from .external import resolved_classes

    classes: list[type] = []
    for info in REGISTRY.values():
        if kind is None or info.kind == kind:
            classes.extend(info.impl().CLASSES)
    if kind in (None, "gate"):  # blocks given by reference are gates; the α-gate wraps any of them
        classes.extend((*resolved_classes(), AlphaGate))
    return tuple(classes)
