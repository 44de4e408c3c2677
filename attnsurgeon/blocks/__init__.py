"""The attention zoo and its registry.

One small file per block (``se.py``, ``eca.py``, ``cbam.py``, ...); each defines

* ``build(fmap, **options) -> nn.Module``, for the :class:`FeatureMap` at the site (its channels
  and spatial size: a block is built for 1-D, 2-D or 3-D maps alike; at the ``conv`` position also
  the :class:`ConvSpec` of the convolution it replaces), with every option the block
  takes given (the registry fills in the defaults); a site the block cannot fit (too few channels,
  a kernel larger than the map) raises :class:`AttnSurgeonError` saying why;
* ``init_identity(module)``: make the module an exact identity that still learns;
* ``describe(module) -> dict``: the options it was built with, defaults filled in;
* ``GATES`` (optional): where its gates are, ``{name: (submodule path, "channel" | "spatial")}``,
  the submodule whose output is the gate (``{"channel": ("gate", "channel")}`` for SE);
  ``attnsurgeon explain`` reads them with forward hooks and draws them.

Its :class:`BlockInfo` in :data:`REGISTRY` says the rest, once: the options it takes and their
defaults (``None`` = the block's own rule; each option's flag, help and rule live in
:mod:`.options`), what it is (``kind``: a ``gate`` added on a tensor's path, or a ``conv`` that
replaces a spatial convolution, hence the positions it allows:
:data:`attnsurgeon.core.positions.KIND_POSITIONS`), its natural position, its paper. Adding a block
is one file plus one entry here. Nothing here imports torch, so ``attnsurgeon list attn`` and
``--help`` stay fast; a block's file is imported when it is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.errors import AttnSurgeonError, did_you_mean
from .info import BlockInfo
from .options import OPTIONS

REGISTRY: dict[str, BlockInfo] = {
    info.name: info
    for info in (
        BlockInfo(
            "se",
            "attnsurgeon.blocks.se",
            "Squeeze-and-Excitation: global average pool, bottleneck MLP, sigmoid channel gate",
            "Hu et al., Squeeze-and-Excitation Networks, CVPR 2018, https://arxiv.org/abs/1709.01507",
            {"reduction": 16, "bias": True, "rd_divisor": 8, "keep_depth": None},
        ),
        BlockInfo(
            "eca",
            "attnsurgeon.blocks.eca",
            "Efficient Channel Attention: global average pool, 1-D conv across channels, sigmoid gate",
            "Wang et al., ECA-Net, CVPR 2020, https://arxiv.org/abs/1910.03151",
            {"kernel_size": None, "keep_depth": None},
        ),  # None: ECA's adaptive k; pool over every axis
        BlockInfo(
            "cbam",
            "attnsurgeon.blocks.cbam",
            "CBAM: avg+max channel MLP gate, then a k×k spatial gate over channel avg/max maps",
            "Woo et al., CBAM, ECCV 2018, https://arxiv.org/abs/1807.06521",
            {"reduction": 16, "bias": False, "kernel_size": 7, "rd_divisor": 1},
        ),
        BlockInfo(
            "ese",
            "attnsurgeon.blocks.ese",
            "Effective SE: global average pool, one 1×1 conv C→C (no bottleneck), hard-sigmoid gate",
            "Lee & Park, CenterMask (VoVNetV2), CVPR 2020, https://arxiv.org/abs/1911.06667",
            {},
        ),
        BlockInfo(
            "ecam",
            "attnsurgeon.blocks.ecam",
            "ECA with an MLP: pooled channels through a 1-tap conv to C/8 maps, ReLU, a k-tap conv back",
            "timm's EcaModule(use_mlp=True), after Wang et al., ECA-Net, CVPR 2020, https://arxiv.org/abs/1910.03151",
            {"kernel_size": None},
        ),
        BlockInfo(
            "ceca",
            "attnsurgeon.blocks.ceca",
            "Circular ECA: ECA whose conv across channels pads circularly",
            "timm's CecaModule, after Wang et al., ECA-Net, CVPR 2020, https://arxiv.org/abs/1910.03151",
            {"kernel_size": None},
        ),
        BlockInfo(
            "ge",
            "attnsurgeon.blocks.ge",
            "Gather-Excite: gather context (global or e×e windows, pooled or learned), "
            "excite through an MLP, upsample the gate",
            "Hu et al., Gather-Excite, NeurIPS 2018, https://arxiv.org/abs/1810.12348",
            {"extent": 0, "extra_params": False, "reduction": 16},
        ),
        BlockInfo(
            "gc",
            "attnsurgeon.blocks.gc",
            "Global Context: softmax attention pooling, bottleneck MLP with LayerNorm, sigmoid scale",
            "Cao et al., GCNet, ICCVW 2019, https://arxiv.org/abs/1904.11492",
            {"reduction": 8},
        ),
        BlockInfo(
            "gca",
            "attnsurgeon.blocks.gca",
            "Global Context, add fusion: the transformed context is added to every position",
            "Cao et al., GCNet, ICCVW 2019, https://arxiv.org/abs/1904.11492",
            {"reduction": 8},
        ),
        BlockInfo(
            "lcbam",
            "attnsurgeon.blocks.lcbam",
            "Light CBAM: ½avg+½max pooled once through the channel MLP, then a k×k spatial gate",
            "timm's LightCbamModule, after Woo et al., CBAM, ECCV 2018, https://arxiv.org/abs/1807.06521",
            {"reduction": 16, "bias": False, "kernel_size": 7, "rd_divisor": 1},
        ),
        BlockInfo(
            "coord",
            "attnsurgeon.blocks.coord",
            "Coordinate attention: row and column pooling, a shared 1×1 conv+BN, a row gate × a column gate",
            "Hou et al., Coordinate Attention, CVPR 2021, https://arxiv.org/abs/2103.02907",
            {"reduction": 16, "rd_divisor": 8},
        ),
        BlockInfo(
            "scoord",
            "attnsurgeon.blocks.scoord",
            "Simple coordinate attention: linear layers, no norm, one sigmoid over row + column terms",
            "timm's SimpleCoordAttn, after Hou et al., CVPR 2021, https://arxiv.org/abs/2103.02907",
            {"reduction": 4, "rd_divisor": 8},
        ),
        BlockInfo(
            "ela",
            "attnsurgeon.blocks.ela",
            "Efficient Local Attention: k-tap depthwise convs along rows and columns, GroupNorm, no reduction",
            "Xu & Wan, ELA, 2024, https://arxiv.org/abs/2403.01123",
            {"kernel_size": 7},
        ),
        BlockInfo(
            "strip",
            "attnsurgeon.blocks.strip",
            "Strip attention: row and column means refined by k-tap depthwise convs, one sigmoid",
            "timm's StripAttn, after Hou et al., Strip Pooling, CVPR 2020, https://arxiv.org/abs/2003.13328",
            {"kernel_size": 3},
        ),
        BlockInfo(
            "nl",
            "attnsurgeon.blocks.nl",
            "Non-local block: every position attends to every other (θᵀφ softmax), added back through a zero-init BN",
            "Wang et al., Non-local Neural Networks, CVPR 2018, https://arxiv.org/abs/1711.07971",
            {"reduction": 8, "rd_divisor": 8},
        ),
        BlockInfo(
            "cam",
            "attnsurgeon.blocks.cam",
            "ENCAM channel attention: avg- and max-pooled descriptors through one shared MLP, summed, sigmoid",
            "seed 004 (ENCAM); CBAM's channel gate, Woo et al., ECCV 2018, https://arxiv.org/abs/1807.06521",
            {"reduction": 8, "bias": False},
        ),
        BlockInfo(
            "danet",
            "attnsurgeon.blocks.danet",
            "DANet channel attention: channel-to-channel affinity XXᵀ, max − energy, softmax, γ·(A·X) + x, γ from 0",
            "Fu et al., Dual Attention Network, CVPR 2019, https://arxiv.org/abs/1809.02983",
            {},
        ),
        BlockInfo(
            "scse",
            "attnsurgeon.blocks.scse",
            "Concurrent spatial and channel SE: an SE channel gate and a 1×1-conv spatial gate, fused by max or sum",
            "Roy et al., scSE, MICCAI 2018, https://arxiv.org/abs/1803.02579",
            {"reduction": 2, "fusion": "max"},
        ),
        BlockInfo(
            "simam",
            "attnsurgeon.blocks.simam",
            "SimAM: parameter-free, each neuron weighted by σ of its closed-form energy",
            "Yang et al., SimAM, ICML 2021, http://proceedings.mlr.press/v139/yang21o.html",
            {"e_lambda": 1e-4},
        ),
        BlockInfo(
            "bam",
            "attnsurgeon.blocks.bam",
            "Bottleneck Attention Module: channel MLP × dilated spatial branch, x·(1 + σ(c·s)), between stages",
            "Park et al., BAM, BMVC 2018, https://arxiv.org/abs/1807.06514",
            {"reduction": 16},
            position="stage",
        ),
        BlockInfo(
            "sk",
            "attnsurgeon.blocks.sk",
            "Selective Kernel: the conv becomes a 3×3 and a dilated 3×3 path, mixed per channel by a softmax attention",
            "Li et al., Selective Kernel Networks, CVPR 2019, https://arxiv.org/abs/1903.06586",
            {"reduction": 16, "rd_divisor": 8, "split_input": True},
            kind="conv",
            position="conv",
        ),
        BlockInfo(
            "splat",
            "attnsurgeon.blocks.splat",
            "Split attention (ResNeSt): the conv computes radix splits, mixed per channel by a softmax attention",
            "Zhang et al., ResNeSt: Split-Attention Networks, 2020, https://arxiv.org/abs/2004.08955",
            {"radix": 2, "reduction": 4, "rd_divisor": 8},
            kind="conv",
            position="conv",
        ),
    )
}

INITS = ("default", "identity")


@dataclass(frozen=True)
class ConvSpec:
    """The convolution a ``conv`` block replaces (what ``nn.ConvNd`` was built with)."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str  # a string: 'same' / 'valid', or 'dynamic' (TF-style padding computed per input)
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    padding_mode: str = "zeros"

    @property
    def dims(self) -> int:
        return len(self.kernel_size)

    def describe(self) -> str:
        k = "×".join(map(str, self.kernel_size))
        extras = [
            f"stride {self.stride[0]}" if set(self.stride) != {1} else "",
            f"dilation {self.dilation[0]}" if set(self.dilation) != {1} else "",
            f"groups {self.groups}" if self.groups != 1 else "",
        ]
        return f"{k} conv {self.in_channels}→{self.out_channels}" + "".join(f", {e}" for e in extras if e)


@dataclass(frozen=True)
class FeatureMap:
    """What a block is built for: the channels at its site and the map's spatial size there
    (``(L,)``, ``(H, W)`` or ``(T, H, W)``; its length is the number of spatial dimensions).
    At the ``conv`` position, ``conv`` describes the convolution the block replaces (``channels``
    and ``size`` are then its input's)."""

    channels: int
    size: tuple[int, ...] = (0, 0)  # unknown extents, two spatial dimensions
    conv: ConvSpec | None = None

    @property
    def dims(self) -> int:
        return len(self.size)


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
