"""What the registry knows of a block (torch-free): :class:`BlockInfo`, one per zoo block in
:data:`attnsurgeon.blocks.REGISTRY`, and one per block given by reference
(:func:`attnsurgeon.blocks.external.resolve_block`)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .options import OPTIONS


@dataclass(frozen=True)
class BlockInfo:
    name: str
    module: str  # the file that builds it
    summary: str
    paper: str
    options: dict[str, Any]  # the block options it takes -> its default (None: the block's own rule)
    position: str = "standard"  # where it goes when --position is not given
    kind: str = "gate"  # "gate": added on a tensor's path; "conv": takes the place of a spatial conv
    leaf: str = ""  # the inserted modules' name (layer3.0.<leaf>) where it differs from name
    label: str = ""  # the name in reports where it differs from name (a referenced block's class)
    external: Any = None  # a block given by reference: its external.External (build, init_identity, ...)

    def __post_init__(self) -> None:
        unknown = [k for k in self.options if k not in OPTIONS and self.external is None]
        assert not unknown, f"{self.name}: options {unknown} are not declared in blocks/options.py"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summary": self.summary,
            "kind": self.kind,
            "position": self.position,
            "positions": list(self.positions),
            "paper": self.paper,
            "options": [
                {
                    "name": k,
                    "default": v,
                    "flag": OPTIONS[k].flag,
                    "kind": OPTIONS[k].kind,
                    "per_stage": OPTIONS[k].per_stage,
                    **({"choices": list(OPTIONS[k].choices)} if OPTIONS[k].choices else {}),
                    "help": OPTIONS[k].help,
                }
                for k, v in self.options.items()
            ],
        }

    def impl(self):
        return self.external or importlib.import_module(self.module)

    @property
    def short(self) -> str:
        """The leaf of the inserted modules' names: ``se`` (layer3.0.se), ``gate`` for ``gate.py:Gate``."""
        return self.leaf or self.name

    @property
    def positions(self) -> tuple[str, ...]:
        """The positions its kind allows."""
        from ..core.positions import KIND_POSITIONS

        return KIND_POSITIONS[self.kind]


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
