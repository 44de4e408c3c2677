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
