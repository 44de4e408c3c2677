"""Every block option, declared once: its flag, its help, what its values must be.

A block takes a subset of these (:attr:`BlockInfo.options` maps each to the block's default).
The command line builds ``--reduction``, ``--kernel-size``, ... from :data:`OPTIONS` for every
command that inserts (``insert``, ``profile``, ``sweep``), recipes check their ``options:`` against
the same rules, and ``list attn`` shows them. Adding an option is one entry here. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    # kind -> (rule, what the rule asks for, as said in an error)
    "positive": (lambda v: _number(v) and v > 0, "a number > 0"),
    "fraction": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "nonnegative": (lambda v: _number(v) and v >= 0, "a number ≥ 0"),
    "count": (lambda v: _integer(v) and v >= 1, "an integer ≥ 1"),
    "odd": (lambda v: _integer(v) and v >= 1 and v % 2 == 1, "a positive odd integer"),
    "extent": (lambda v: _integer(v) and v >= 0 and (v & (v - 1)) == 0 and v != 1, "0 (global) or a power of two ≥ 2"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "choice": (lambda v: isinstance(v, str), "one of the choices"),
}


@dataclass(frozen=True)
class BlockOption:
    """One block option. ``per_stage``: a list gives one value per selected stage (``-k 3,5,5,7``).
    ``negatable``: the flag has a ``--no-`` form (``--bias/--no-bias``); a plain bool flag only sets
    true. ``choices``: the values a ``choice`` option takes."""

    name: str
    kind: str
    help: str
    short: str | None = None
    per_stage: bool = False
    negatable: bool = False
    choices: tuple[str, ...] = ()

    cli: str | None = None  # the flag's name where it differs from the option's (a Python keyword)

    @property
    def flag(self) -> str:
        return "--" + (self.cli or self.name).replace("_", "-")

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (a list of them, per stage), or None."""
        values = value if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, (list, tuple)) and not self.per_stage:
            return f"{self.name} takes one value, got {list(value)!r}"
        if not values:
            return f"{self.name} must be {self.what}, got {value!r}"
        ok, _ = KINDS[self.kind]
        for v in values:
            if not ok(v) or (self.choices and v not in self.choices):
                return f"{self.name} must be {self.what}, got {v!r}"
        return None

    @property
    def what(self) -> str:
        return f"one of {', '.join(self.choices)}" if self.choices else KINDS[self.kind][1]


OPTIONS: dict[str, BlockOption] = {
    o.name: o
    for o in (
        BlockOption(
            "reduction",
            "positive",
            "Reduction ratio r of the block's bottleneck (hidden = C/r); one value or one per selected stage.",
            short="-r",
            per_stage=True,
        ),
        BlockOption("bias", "bool", "Biases in the block's MLP/FC layers.", negatable=True),
        BlockOption(
            "kernel_size",
            "odd",
            "Kernel of the block's conv (ECA's 1-D channel conv, CBAM's spatial conv, ...); "
            "one value or one per selected stage, e.g. 3,5,5,7.",
            short="-k",
            per_stage=True,
        ),
        BlockOption("rd_divisor", "count", "Round the hidden width to a multiple of this."),
        BlockOption(
            "extent",
            "extent",
            "Gather-Excite's gather extent: 0 gathers over the whole map, e (a power of two) over "
            "e×e windows with stride e, then the gate is upsampled back.",
        ),
        BlockOption(
            "extra_params",
            "bool",
            "Gather-Excite: gather with learned depthwise convs (GE-θ) instead of average pooling (GE-θ⁻).",
            negatable=True,
        ),
        BlockOption(
            "split_input",
            "bool",
            "Selective Kernel: each path sees an equal share of the input channels.",
            negatable=True,
        ),
        BlockOption("radix", "count", "Split attention: the number of splits (radix) the conv computes."),
        BlockOption(
            "fusion", "choice", "How scSE fuses its channel and spatial recalibrations.", choices=("max", "sum")
        ),
        BlockOption("e_lambda", "positive", "SimAM's regulariser λ of the energy function.", cli="lambda"),
        BlockOption(
            "keep_depth",
            "bool",
            "On 3-D (video) maps: pool over H,W only and gate every (channel, frame) pair "
            "instead of pooling over T,H,W.",
        ),
    )
}


def get_option(name: str) -> BlockOption:
    return OPTIONS[name]
