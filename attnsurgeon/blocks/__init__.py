"""The attention zoo and its registry.

One small file per block (``se.py``, ``eca.py``, ``cbam.py``); each defines

* ``OPTIONS``: the block options it accepts, with their defaults (``None`` = the block's own rule);
* ``build(fmap, **options) -> nn.Module``, for the :class:`FeatureMap` at the site (its channels
  and spatial size: a block is built for 1-D, 2-D or 3-D maps alike);
* ``init_identity(module)``: make the module an exact identity that still learns;
* ``describe(module) -> dict``: the options it was built with, defaults filled in;
* ``GATES`` (optional): where its gates are, ``{name: (submodule path, "channel" | "spatial")}``,
  the submodule whose output is the gate (``{"channel": ("gate", "channel")}`` for SE);
  ``attnsurgeon explain`` reads them with forward hooks and draws them.

Adding a block is one file plus one line in :data:`REGISTRY`. Nothing here imports torch, so
``attnsurgeon list attn`` and ``--help`` stay fast; a block's file is imported when it is built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from ..errors import AttnSurgeonError, did_you_mean


@dataclass(frozen=True)
class BlockInfo:
    name: str
    module: str  # the file that builds it
    summary: str
    paper: str
    options: tuple[str, ...]  # the block options it accepts

    def impl(self):
        return importlib.import_module(self.module)


REGISTRY: dict[str, BlockInfo] = {
    info.name: info
    for info in (
        BlockInfo("se", "attnsurgeon.blocks.se", "Squeeze-and-Excitation: global average pool, bottleneck MLP, sigmoid channel gate",
                  "Hu et al., Squeeze-and-Excitation Networks, CVPR 2018, https://arxiv.org/abs/1709.01507",
                  ("reduction", "bias", "rd_divisor", "keep_depth")),
        BlockInfo("eca", "attnsurgeon.blocks.eca", "Efficient Channel Attention: global average pool, 1-D conv across channels, sigmoid gate",
                  "Wang et al., ECA-Net, CVPR 2020, https://arxiv.org/abs/1910.03151",
                  ("kernel_size", "keep_depth")),
        BlockInfo("cbam", "attnsurgeon.blocks.cbam", "CBAM: avg+max channel MLP gate, then a k×k spatial gate over channel avg/max maps",
                  "Woo et al., CBAM, ECCV 2018, https://arxiv.org/abs/1807.06521",
                  ("reduction", "bias", "kernel_size", "rd_divisor")),
    )
}

INITS = ("default", "identity")


@dataclass(frozen=True)
class FeatureMap:
    """What a block is built for: the channels at its site and the map's spatial size there
    (``(L,)``, ``(H, W)`` or ``(T, H, W)``; its length is the number of spatial dimensions)."""

    channels: int
    size: tuple[int, ...] = (0, 0)  # unknown extents, two spatial dimensions

    @property
    def dims(self) -> int:
        return len(self.size)


def get_block(name: str) -> BlockInfo:
    info = REGISTRY.get(str(name).lower())
    if info is None:
        raise AttnSurgeonError(
            f"unknown attention block '{name}' (known: {', '.join(REGISTRY)})." + did_you_mean(str(name), REGISTRY)
        )
    return info


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


# what each option's values must be, checked before any model is built (a list: one value per stage)
_OPTION_RULES = {
    "reduction": (_positive_number, "a number > 0"),
    "rd_divisor": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer ≥ 1"),
    "kernel_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v % 2 == 1, "a positive odd integer"),
    "bias": (lambda v: isinstance(v, bool), "true or false"),
    "keep_depth": (lambda v: isinstance(v, bool), "true or false"),
}


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Drop unset (None) options; refuse options the block does not take, and values out of range."""
    info = get_block(name)
    given = {k: v for k, v in options.items() if v is not None}
    bad = [k for k in given if k not in info.options]
    if bad:
        takes = ", ".join(info.options) or "no options"
        raise AttnSurgeonError(f"'{info.name}' takes no option {', '.join(map(repr, bad))} (it takes: {takes})")
    for key, value in given.items():
        ok, what = _OPTION_RULES.get(key, (lambda v: True, ""))
        values = value if isinstance(value, (list, tuple)) else [value]
        wrong = [v for v in values if not ok(v)]
        if not values or wrong:
            raise AttnSurgeonError(f"{info.name}: {key} must be {what}, got {wrong[0] if wrong else value!r}")
    return given


def build_block(name: str, channels: int, init: str = "default", *, size: tuple[int, ...] = (0, 0), **options: Any):
    """Build block ``name`` for a map of ``channels`` channels and spatial ``size`` (its length sets
    1-D, 2-D or 3-D); ``init='identity'`` makes it start as an exact identity."""
    info = get_block(name)
    if init not in INITS:
        raise AttnSurgeonError(f"unknown init '{init}' (choose from {', '.join(INITS)})")
    impl = info.impl()
    module = impl.build(FeatureMap(int(channels), tuple(size)), **check_options(name, options))
    if init == "identity":
        impl.init_identity(module)
    return module


def describe_block(name: str, module: Any, requested: dict[str, Any]) -> dict[str, Any]:
    """What ``module`` was built with: the options as requested (defaults filled in), then what
    they came to (``{"reduction": 16, "hidden": 8, "bias": True}``: 8 after rounding 64/16 up)."""
    impl = get_block(name).impl()
    defaults = {k: v for k, v in impl.OPTIONS.items() if v is not None}
    return {**defaults, **requested, **impl.describe(module)}


def block_classes() -> tuple[type, ...]:
    """The module classes the zoo builds (kept whole, as leaves, when a model is traced)."""
    classes: list[type] = []
    for info in REGISTRY.values():
        classes.extend(info.impl().CLASSES)
    return tuple(classes)
