"""``attnsurgeon list attn|positions|models``: what the registries hold."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ..core.errors import AttnSurgeonError
from .app import command, list_app
from .options import JsonOpt
from .render import emit_json, print_table

# --------------------------------------------------------------------------- list

PatternArg = Annotated[
    str | None,
    typer.Argument(help="A glob (resnet*) or a substring (convnext); timm:PATTERN or tv:PATTERN keeps one library."),
]


@list_app.command("attn")
@command
def list_attn(json_out: JsonOpt = False) -> None:
    """The attention blocks that can be inserted, with their options and papers."""
    from ..blocks import REGISTRY
    from ..blocks.external import FORM_HELP

    if json_out:
        emit_json({"blocks": [i.to_dict() for i in REGISTRY.values()]})
        return

    from ..blocks.options import OPTIONS

    def typed(name: str, default: Any) -> str:  # as it is typed: --lambda, not the API's e_lambda; --no-bias
        flag = OPTIONS[name].flag
        if isinstance(default, bool):
            return flag if default else f"--no-{flag[2:]}"
        return flag if default is None else f"{flag} {default}"

    def options(info: Any) -> str:
        return ", ".join(typed(k, v) for k, v in info.options.items()) or "-"

    print_table(
        ("name", "what it does", "position", "options (default)", "paper"),
        [(i.name, i.summary, i.position, options(i), i.paper) for i in REGISTRY.values()],
    )
    print_table(
        ("or by reference", "what it names (options: --option key=value, the constructor's parameters)"),
        list(FORM_HELP.items()),
    )


@list_app.command("positions")
@command
def list_positions(json_out: JsonOpt = False) -> None:
    """The insertion positions (the SENet paper's integration study)."""
    from ..core.positions import ANCHOR_HELP, POSITION_HELP

    if json_out:
        emit_json(
            {
                "positions": [{"name": k, "kind": "position", "description": v} for k, v in POSITION_HELP.items()]
                + [{"name": k, "kind": "anchor", "description": v} for k, v in ANCHOR_HELP.items()]
            }
        )
        return
    print_table(
        ("position", "where the block goes"),
        [*POSITION_HELP.items(), *ANCHOR_HELP.items()],
        caption="after/before are anchors: --after GLOB / --before GLOB instead of --position",
    )


@list_app.command("models")
@command
def list_models_cmd(pattern: PatternArg = None, json_out: JsonOpt = False) -> None:
    """Model names from torchvision and timm, with their source, named as MODEL and --models take them
    (tv:NAME / timm:NAME; a bare name in both libraries resolves to torchvision)."""
    from ..loading.models import list_models, model_spec

    rows = list_models(pattern)
    if json_out:
        emit_json({"models": [{"name": n, "source": s} for n, s in rows]})
        return
    if not rows:
        raise AttnSurgeonError(f"no model matches '{pattern}'")
    print_table(("model", "source"), [(model_spec(n, s), s) for n, s in rows], caption=f"{len(rows)} models")
