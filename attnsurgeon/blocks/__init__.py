"""The attention zoo and its registry.

One small file per block (``se.py``, ``eca.py``, ``cbam.py``); each defines

* ``OPTIONS``: the block options it accepts, with their defaults (``None`` = the block's own rule);
* ``build(channels, **options) -> nn.Module``;
* ``init_identity(module)``: make the module an exact identity that still learns;
* ``describe(module) -> dict``: the options it was built with, defaults filled in.

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
                  ("reduction", "bias", "rd_divisor")),
        BlockInfo("eca", "attnsurgeon.blocks.eca", "Efficient Channel Attention: global average pool, 1-D conv across channels, sigmoid gate",
                  "Wang et al., ECA-Net, CVPR 2020, https://arxiv.org/abs/1910.03151",
                  ("kernel_size",)),
        BlockInfo("cbam", "attnsurgeon.blocks.cbam", "CBAM: avg+max channel MLP gate, then a k×k spatial gate over channel avg/max maps",
                  "Woo et al., CBAM, ECCV 2018, https://arxiv.org/abs/1807.06521",
                  ("reduction", "bias", "kernel_size", "rd_divisor")),
    )
}

INITS = ("default", "identity")


def get_block(name: str) -> BlockInfo:
    info = REGISTRY.get(str(name).lower())
    if info is None:
        raise AttnSurgeonError(
            f"unknown attention block '{name}' (known: {', '.join(REGISTRY)})." + did_you_mean(str(name), REGISTRY)
        )
    return info


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Drop unset (None) options; refuse options the block does not take."""
    info = get_block(name)
    given = {k: v for k, v in options.items() if v is not None}
    bad = [k for k in given if k not in info.options]
    if bad:
        takes = ", ".join(info.options) or "no options"
        raise AttnSurgeonError(f"attention block '{info.name}' takes no option {', '.join(map(repr, bad))} (it takes: {takes})")
    return given


def build_block(name: str, channels: int, init: str = "default", **options: Any):
    """Build block ``name`` for ``channels`` channels; ``init='identity'`` makes it start as identity."""
    info = get_block(name)
    if init not in INITS:
        raise AttnSurgeonError(f"unknown init '{init}' (choose from {', '.join(INITS)})")
    impl = info.impl()
    module = impl.build(int(channels), **check_options(name, options))
    if init == "identity":
        impl.init_identity(module)
    return module


def describe_block(name: str, module: Any) -> dict[str, Any]:
    """The options ``module`` was built with (``{"reduction": 16, "hidden": 64, "bias": True}``)."""
    return dict(get_block(name).impl().describe(module))


def block_classes() -> tuple[type, ...]:
    """The module classes the zoo builds (kept whole, as leaves, when a model is traced)."""
    classes: list[type] = []
    for info in REGISTRY.values():
        classes.extend(info.impl().CLASSES)
    return tuple(classes)
