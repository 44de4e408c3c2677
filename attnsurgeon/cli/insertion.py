"""The insertion options, declared once: where a block goes (``--position``, ``--after``/``--before``,
``--stages``, ``--blocks``), how (``--init``, ``--replace``) and the block options, whose flags and
help are derived from :mod:`attnsurgeon.blocks.options` and the block registry. :func:`insertion_options`
gives every inserting command (insert, profile, sweep, explain) the same flags, handed to it as one
:class:`InsertionArgs`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Annotated, Any, TypedDict

import typer

from ..blocks import INITS
from ..blocks import REGISTRY as BLOCKS
from ..core.errors import AttnSurgeonError, one_line
from ..core.positions import POSITIONS
from .options import parse_globs

ATTN_HELP = (
    f"{', '.join(BLOCKS)} (see `attnsurgeon list attn`), or your own class by reference: path/to/file.py:Class, "
    "package.module:Class, timm:NAME"
)
AttnOpt = Annotated[
    str,
    typer.Option("--attn", "-a", help=f"Attention block: {ATTN_HELP}; none with --replace removes the model's own."),
]


def _attn_alone(what: str) -> Any:
    """``--attn`` for a command that also takes a model alone (profile, explain): ``what`` the command
    does to it (``profiled``, ``explained``) when no block is given."""
    return Annotated[
        str | None,
        typer.Option(
            "--attn",
            "-a",
            help=f"Attention block to insert: {ATTN_HELP} (none with --replace). Default: none; the model is "
            f"{what} alone.",
        ),
    ]


ProfileAttnOpt = _attn_alone("profiled")
ExplainAttnOpt = _attn_alone("explained")
OptionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--option",
        "-O",
        help="A block option as key=value, repeatable; the value is read as YAML (4, 0.5, true, [4, 8] one per "
        "selected stage). Any option of a zoo block, or any parameter of a class given by reference.",
        show_default="none",
    ),
]
ReplaceOpt = Annotated[
    bool,
    typer.Option(
        "--replace",
        help="Put the block in place of the attention gates the selected blocks "
        "already have (SE in EfficientNet, MobileNetV3, RegNetY...) instead of beside them; "
        "--attn none removes them.",
    ),
]
PositionOpt = Annotated[
    str | None,
    typer.Option(
        "--position",
        "-p",
        help=f"{', '.join(POSITIONS)} (see `attnsurgeon list positions`). "
        "Default: the block's natural position (`attnsurgeon list attn`).",
        show_default=False,
    ),
]
StagesOpt = Annotated[
    str | None,
    typer.Option(
        "--stages",
        "-s",
        help="Stages to modify, 1-based as `inspect` numbers them: 3,4 or 2-4. Default: all. "
        "Blocks there that cannot take the insertion are skipped with a note.",
    ),
]
BlocksOpt = Annotated[
    str | None,
    typer.Option(
        "--blocks",
        "-b",
        help="Comma-separated globs over block names: 'layer3.*,layer4.2'. Default: all. "
        "A named block that cannot take the insertion is an error.",
    ),
]
AfterOpt = Annotated[
    str | None,
    typer.Option(
        "--after",
        help="Instead of --position: put the block on the output of every module whose name "
        "matches, comma-separated globs (layer3.*.conv2, model.9, '**.conv2'; * stays within one "
        "dotted name). `inspect MODEL --anchors` lists the modules. With --stages/--blocks: only "
        "modules inside them.",
        show_default="none: --position applies",
    ),
]
BeforeOpt = Annotated[
    str | None,
    typer.Option(
        "--before",
        help="Instead of --position: put the block on the input of every module whose name "
        "matches (head, decoder.blocks.*.conv1); only that module reads the block's output.",
        show_default="none: --position applies",
    ),
]
InitOpt = Annotated[
    str,
    typer.Option(
        "--init", help=f"{' or '.join(INITS)}: identity makes every inserted block start as an exact identity."
    ),
]


def check_insertion_args(
    attn: str,
    position: str | None,
    options: dict[str, Any],
    init: str = "default",
    replace: bool = False,
    after: list[str] | None = None,
    before: list[str] | None = None,
) -> None:
    """Everything about an insertion that can be checked without a model: fail in a blink, not after a build."""
    from ..planning.schema import InsertionSpec, validate

    validate(InsertionSpec(attn, position, init=init, options=options, replace=replace, after=after, before=before))


def parse_numbers(text: str | None, what: str) -> Any:
    """'16' -> 16; '3,5,5,7' -> [3, 5, 5, 7]; floats allowed ('8.5')."""
    if text is None or not text.strip():
        return None
    values: list[Any] = []
    for part in text.split(","):
        part = part.strip()
        try:
            number = float(part)
        except ValueError:
            raise AttnSurgeonError(f"{what}: '{part}' is not a number") from None
        values.append(int(number) if number.is_integer() else number)
    return values[0] if len(values) == 1 else values


def _block_option_param(name: str) -> tuple[Any, Any]:
    """The typer annotation of block option ``name`` (from blocks/options.py) and its default.
    Its help names the blocks that take it, with their defaults, from the registry."""
    from ..blocks.options import OPTIONS

    opt = OPTIONS[name]
    takers = ", ".join(
        i.name if i.options[name] is None else f"{i.name} {i.options[name]}"
        for i in BLOCKS.values()
        if name in i.options
    )
    help = f"{opt.help} Default: the block's own ({takers})."
    decls = [f"{opt.flag}/--no-{opt.flag[2:]}" if opt.negatable else opt.flag] + ([opt.short] if opt.short else [])
    if opt.kind == "bool":
        kind: Any = bool | None
    elif opt.per_stage or opt.kind not in ("choice", "count"):
        kind = str | None  # numbers, or one per stage: parsed by parse_numbers
    else:
        kind = str | None if opt.kind == "choice" else int | None
    return Annotated[kind, typer.Option(*decls, help=help, show_default=False)], None


def _block_option_value(name: str, raw: Any) -> Any:
    from ..blocks.options import OPTIONS

    if raw is None or OPTIONS[name].kind in ("bool", "choice", "count"):
        return raw
    return parse_numbers(raw, OPTIONS[name].flag)


def _block_option_names() -> list[str]:
    from ..blocks.options import OPTIONS

    return list(OPTIONS)


class Anchors(TypedDict, total=False):
    """``--after``/``--before`` parsed, as :func:`check_insertion_args` and the API take them."""

    after: list[str]
    before: list[str]


@dataclass
class InsertionArgs:
    """The insertion options of every command that inserts (insert, profile, sweep, explain), declared once
    in :data:`INSERTION_PARAMS` (the block options: once in blocks/options.py) and handed to the
    command as one ``ins`` argument."""

    stages: str | None = None
    blocks: str | None = None
    init: str = "default"
    replace: bool = False
    after: str | None = None
    before: str | None = None
    option: list[str] | None = None  # --option key=value, as typed
    raw_options: dict[str, Any] = field(default_factory=dict)  # block option -> as typed

    @property
    def anchors(self) -> Anchors:
        """``--after``/``--before`` as given, parsed: ``{"after": ["layer3.*.conv2"]}`` (empty: a position)."""
        anchors = Anchors()
        if self.after is not None:
            anchors["after"] = parse_globs(self.after, "--after")
        if self.before is not None:
            anchors["before"] = parse_globs(self.before, "--before")
        return anchors

    @property
    def options(self) -> dict[str, Any]:
        """The block options that were given, parsed (``-k 3,5,5,7`` -> ``[3, 5, 5, 7]``)."""
        opts = {k: _block_option_value(k, v) for k, v in self.raw_options.items()}
        opts = {k: v for k, v in opts.items() if v is not None}
        for key, value in parse_key_values(self.option).items():
            if key in opts:
                raise AttnSurgeonError(f"--option {key}=… and {_flag(key)} both given: give one")
            opts[key] = value
        return opts


def _flag(name: str) -> str:
    from ..blocks.options import OPTIONS

    return OPTIONS[name].flag if name in OPTIONS else f"--{name}"


def parse_key_values(items: list[str] | None, what: str = "--option") -> dict[str, Any]:
    """``['reduction=4', 'stages=[4, 8]']`` -> ``{'reduction': 4, 'stages': [4, 8]}``: YAML values."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or ():
        key, eq, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key.isidentifier():
            raise AttnSurgeonError(f"{what} '{item}': expected key=value (reduction=4, act=relu, kernel_sizes=[3, 5])")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise AttnSurgeonError(f"{what} '{item}': the value is not YAML ({one_line(exc)})") from None
        if key in out:
            raise AttnSurgeonError(f"{what} {key} given twice")
        out[key] = value
    return out


INSERTION_PARAMS = [
    ("after", AfterOpt, None),
    ("before", BeforeOpt, None),
    ("stages", StagesOpt, None),
    ("blocks", BlocksOpt, None),
    ("init", InitOpt, "default"),
    *((name, *_block_option_param(name)) for name in _block_option_names()),
    ("option", OptionOpt, None),
    ("replace", ReplaceOpt, False),
]


def insertion_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command the insertion options in place of its ``ins`` parameter (keyword-only, without a
    default: this supplies it); they reach it as one :class:`InsertionArgs`. Typer reads the signature
    this sets."""
    import inspect

    signature = inspect.signature(fn, eval_str=True)  # the module has `from __future__ import annotations`
    params: list[inspect.Parameter] = []
    for p in signature.parameters.values():
        if p.name == "ins":
            params += [
                inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
                for name, kind, default in INSERTION_PARAMS
            ]
        else:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {name: kwargs.pop(name) for name, _, _ in INSERTION_PARAMS if name in kwargs}
        ins = InsertionArgs(
            **{
                k: given.pop(k)
                for k in ("stages", "blocks", "init", "replace", "after", "before", "option")
                if k in given
            },
            raw_options=given,
        )
        return fn(*args, ins=ins, **kwargs)

    # inspect.signature (so Typer) reads __signature__; functools.wraps' type does not declare it
    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    return wrapper


def _takes(attn: str) -> Collection[str]:
    """The block options ``attn`` takes (none for ``none``)."""
    from ..blocks import get_block
    from ..planning.schema import NONE

    return () if attn == NONE else get_block(attn).options
