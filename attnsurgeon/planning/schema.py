"""The insertion schema: what one insertion says, and every check of it (torch-free).

An :class:`InsertionSpec` names an attention block, a position (or an anchor: ``after``/``before``
modules named by globs), the blocks it goes into (stages, globs), an init, block options and whether
it replaces the model's own attention. This module
owns it and its one checker, :func:`validate`, against the block, position and init registries;
:func:`parse_insertion` reads one from plain data (a recipe's YAML, a saved model's metadata, the
API's dicts) with type checks that name the place of a problem. The CLI validates before any
model is built, recipes validate with the YAML line, and planning validates every spec once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.errors import AttnSurgeonError, did_you_mean
from ..core.lists import split_list
from ..core.positions import ANCHORS

NONE = "none"  # attn="none" with replace: remove the model's own attention gates
INSERTION_KEYS = ("attn", "position", "after", "before", "stages", "blocks", "init", "options", "replace")


@dataclass
class InsertionSpec:
    """One line of a plan: insert ``attn`` at ``position`` in the selected blocks.

    ``options`` are block options (``reduction``, ``bias``, ``kernel_size``, ``rd_divisor``,
    ``keep_depth``); a list value gives one value per selected stage, in stage order (ECA-Net's
    ``[3, 5, 5, 7]``).

    ``after`` / ``before`` are anchors (globs over module names, see :mod:`attnsurgeon.graph.anchors`):
    the block goes on the output of / the input of every matching module instead of at a position,
    and ``position`` becomes ``"after"`` / ``"before"``. ``stages`` and ``blocks`` then narrow the
    anchors to modules inside the selected blocks.
    """

    attn: str
    position: str | None = None  # None: the block's natural position (see natural_position), or the anchor's kind
    stages: list[int] | None = None
    blocks: list[str] | None = None
    init: str = "default"
    options: dict[str, Any] = field(default_factory=dict)
    replace: bool = False  # take the place of the attention gates the selected blocks have
    after: list[str] | None = None  # globs: on the output of each matching module
    before: list[str] | None = None  # globs: on the input of each matching module

    def __post_init__(self) -> None:
        if self.position is None:
            anchored = [a for a in ANCHORS if getattr(self, a)]
            self.position = anchored[0] if len(anchored) == 1 else natural_position(self.attn, self.replace)

    @property
    def anchor(self) -> list[str] | None:
        """The globs of an anchored spec (``after`` or ``before``), None for a position."""
        return getattr(self, self.position) if self.position in ANCHORS else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.anchor:  # the anchor says where: position follows from it
            d.pop("position")
        return {k: v for k, v in d.items() if v not in (None, {}, False) or k in ("attn", "position", "init")}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "insertion") -> InsertionSpec:
        """Read and validate plain data, as a recipe's insertion is."""
        return parse_insertion(d, (), Where(where))


def natural_position(attn: str, replace: bool = False) -> str:
    """Where ``attn`` goes when no position is given: the registry's natural position of the block
    (``standard`` for the gates, ``conv`` for sk/splat); ``standard`` with ``replace``, where the
    position does not apply, and for a name the registry does not know (validation says so)."""
    from ..blocks import REGISTRY

    info = REGISTRY.get(str(attn).lower())
    return info.position if info is not None and not replace else "standard"


class SpecError(AttnSurgeonError):
    """A spec that breaks a rule; ``field`` is the key path of the value at fault (for recipes)."""

    def __init__(self, message: str, field: tuple = ()):
        super().__init__(message)
        self.field = field


def validate(spec: InsertionSpec) -> InsertionSpec:
    """Check ``spec`` against the registries: the block, the position, the init, ``replace`` and
    the block's options. Raises :class:`SpecError`; returns the spec."""
    from ..blocks import INITS, check_options, get_block
    from ..core.positions import POSITIONS

    if spec.attn != NONE:
        try:  # a zoo name, or a class by reference (imported and inspected here, once)
            spec.attn = get_block(spec.attn).name
        except AttnSurgeonError as exc:
            raise SpecError(str(exc), ("attn",)) from None
    attn = spec.attn
    check_anchor(spec)
    if spec.position not in POSITIONS and spec.position not in ANCHORS:
        raise SpecError(
            f"unknown position '{spec.position}' (choose from {', '.join(POSITIONS)}, or give --after/--before "
            "MODULE)." + did_you_mean(str(spec.position), POSITIONS),
            ("position",),
        )
    if spec.init not in INITS:
        raise SpecError(f"unknown init '{spec.init}' (choose from {', '.join(INITS)})", ("init",))
    if attn != NONE:
        check_position(attn, spec.position, spec.replace)
    check_replace(attn, spec.position, spec.replace, spec.options)
    if attn != NONE:
        for key, value in spec.options.items():
            try:
                check_options(attn, {key: value})  # the registry's rules: known options, reduction > 0, odd kernels
            except AttnSurgeonError as exc:
                raise SpecError(str(exc), ("options", key)) from None
    return spec


def check_anchor(spec: InsertionSpec) -> None:
    """An anchor takes the place of a position: one of ``after``/``before``, each a non-empty list of
    globs, and no other position beside it."""
    given = [a for a in ANCHORS if getattr(spec, a) is not None]
    for a in given:
        globs = getattr(spec, a)
        if not (isinstance(globs, list) and globs and all(isinstance(g, str) and g.strip() for g in globs)):
            raise SpecError(f"--{a}: expected one or more module-name globs (layer3.*.conv2), got {globs!r}", (a,))
    if len(given) > 1:
        raise SpecError(
            "--after and --before in one insertion: give each in an insertion of its own (two insertions "
            "of a recipe, or two commands)",
            (given[1],),
        )
    if given and spec.position != given[0]:
        raise SpecError(
            f"--{given[0]} puts the block on a module's {'output' if given[0] == 'after' else 'input'} and "
            f"takes the place of a position: leave --position ('{spec.position}') out",
            ("position",),
        )
    if not given and spec.position in ANCHORS:
        raise SpecError(
            f"position '{spec.position}' needs the modules: --{spec.position} GLOB "
            f"({spec.position}: [GLOB, ...] in a recipe)",
            ("position",),
        )


def check_position(attn: str, position: str, replace: bool = False) -> None:
    """The registry's rule: a block's kind names the positions it allows (gates go anywhere but
    ``conv``, and after or before any module; conv blocks only at ``conv``)."""
    from ..blocks import REGISTRY, get_block
    from ..core.positions import KIND_POSITIONS

    info = get_block(attn)
    if info.kind == "conv" and replace:
        raise SpecError(
            f"{attn} takes the place of a convolution, not of an attention gate: --replace is for gates "
            f"({', '.join(n for n, i in REGISTRY.items() if i.kind == 'gate')})",
            ("replace",),
        )
    if position in info.positions or (position in ANCHORS and info.kind == "gate"):
        return
    if position in ANCHORS:
        raise SpecError(
            f"{attn} takes the place of a convolution and cannot go --{position} a module: it goes only at "
            "position 'conv' (leave --after/--before out)",
            (position,),
        )
    if info.kind == "conv":
        raise SpecError(
            f"{attn} replaces the block's spatial convolution and goes only at position 'conv', not "
            f"'{position}'; leave --position out (it defaults to conv)",
            ("position",),
        )
    convs = [n for n, i in REGISTRY.items() if i.kind == "conv"]
    raise SpecError(
        f"{attn} is a gate added on a tensor's path and cannot take the place of a convolution: position "
        f"'{position}' is for conv blocks ({', '.join(convs)}); choose one of "
        f"{', '.join(KIND_POSITIONS[info.kind])} (its natural position is {info.position})",
        ("position",),
    )


def check_replace(attn: str, position: str, replace: bool, options: dict[str, Any]) -> None:
    """What ``replace`` and ``attn='none'`` allow."""
    if attn == NONE and not replace:
        raise SpecError(
            "attention block 'none' removes the attention modules the model already has and needs "
            "--replace (replace: true in a recipe); to insert a block, name one: se, eca, cbam",
            ("attn",),
        )
    if replace and position in ANCHORS:
        raise SpecError(
            f"--replace puts the new block where the existing attention module is, so --{position} does not "
            f"apply; leave it out (or insert with --{position} in a separate insertion)",
            (position,),
        )
    if replace and position != "standard":
        raise SpecError(
            f"--replace puts the new block where the existing attention module is, so position "
            f"'{position}' does not apply; leave --position out (or insert at '{position}' in a "
            "separate insertion)",
            ("position",),
        )
    given = [k for k, v in options.items() if v is not None]
    if attn == NONE and given:
        raise SpecError(
            f"attention block 'none' builds nothing and takes no block options (got {', '.join(given)})", ("options",)
        )


# --------------------------------------------------------------------------- plain data


class Where:
    """Where a value sits: a key path, plus its line when read from a YAML file."""

    def __init__(self, source: str, lines: dict[tuple, int] | None = None, folder: str | None = None):
        self.source = source
        self.lines = lines or {}
        self.folder = folder  # a recipe file's folder: block files (attn: gate.py:Gate) are relative to it

    def __call__(self, path: tuple) -> str:
        dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "(top level)"
        line = self.lines.get(path)
        return f"{self.source}{f', line {line}' if line else ''}: {dotted}"


def parse_insertion(item: Any, path: tuple = (), where: Where | None = None) -> InsertionSpec:
    """One insertion from plain data: types checked here, rules by :func:`validate`; an error
    names the key path (and the YAML line) of the value at fault."""
    where = where or Where("insertion")
    if not isinstance(item, dict):
        raise AttnSurgeonError(f"{where(path)}: an insertion is a mapping with at least 'attn'")
    from ..blocks import REGISTRY

    for key in item:  # a block option written beside attn instead of under options
        if key not in INSERTION_KEYS and any(key in info.options for info in REGISTRY.values()):
            raise AttnSurgeonError(
                f"{where(path + (key,))}: '{key}' is a block option: write it under options "
                f"(options: {{{key}: {json.dumps(item[key])}}})"
            )
    no_unknown(item, INSERTION_KEYS, path, where)
    from ..blocks.references import anchor_reference

    attn = anchor_reference(typed(item, "attn", str, path, where, required=True), where.folder)
    replace = bool(typed(item, "replace", bool, path, where))
    position = typed(item, "position", str, path, where)  # None: the block's natural position
    init = typed(item, "init", str, path, where) or "default"
    stages = positive_ints(item.get("stages"), where(path + ("stages",)), "a list of stage numbers (1-based)")
    blocks, after, before = (
        globs(item.get(key), where(path + (key,)), what)
        for key, what in (("blocks", "block-name"), ("after", "module-name"), ("before", "module-name"))
    )
    options = item.get("options") or {}
    if not isinstance(options, dict):
        raise AttnSurgeonError(f"{where(path + ('options',))}: expected a mapping of block options")
    spec = InsertionSpec(attn, position, stages, blocks, init, dict(options), replace, after, before)
    try:
        return validate(spec)
    except SpecError as exc:
        raise AttnSurgeonError(f"{where(path + exc.field)}: {exc}") from None


def no_unknown(d: dict, allowed: tuple, path: tuple, where: Where) -> None:
    for key in d:
        if key not in allowed:
            raise AttnSurgeonError(
                f"{where(path + (key,))}: unknown key '{key}' (allowed: {', '.join(allowed)})."
                + did_you_mean(str(key), allowed)
            )


def typed(d: dict, key: str, kind: type, path: tuple, where: Where, required: bool = False) -> Any:
    if key not in d or d[key] is None:
        if required:
            raise AttnSurgeonError(f"{where(path + (key,))}: missing (required)")
        return None
    if not isinstance(d[key], kind):
        raise AttnSurgeonError(
            f"{where(path + (key,))}: expected {kind.__name__}, got {type(d[key]).__name__} {d[key]!r}"
        )
    return d[key]


def globs(value: Any, place: str, what: str) -> list[str] | None:
    """``'a.*, b'`` or ``['a.*', ' b']`` -> ``['a.*', 'b']`` (:func:`~attnsurgeon.core.lists.split_list`); None
    stays None; an empty list (``''``, ``' , '``, ``[]``) or anything else is an error at ``place``."""
    items = split_list(value) if isinstance(value, (str, list, tuple)) else value
    if items is None:
        return None
    if not (isinstance(items, list) and items and all(isinstance(v, str) for v in items)):
        raise AttnSurgeonError(f"{place}: expected a list of {what} globs, got {value!r}")
    return items


def positive_ints(value: Any, place: str, what: str) -> list[int] | None:
    """``3`` or ``[3, 4]`` -> ``[3]`` / ``[3, 4]``; None stays None; anything else is an error at ``place``."""
    if value is None:
        return None
    values = [value] if is_int(value) else value
    if not (isinstance(values, list) and values and all(is_int(v) and v >= 1 for v in values)):
        raise AttnSurgeonError(f"{place}: expected {what}, got {value!r}")
    return values


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
