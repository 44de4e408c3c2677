"""The command-line application: the Typer app, its ``list`` group, ``--debug``/``--version``, and
:func:`command`, which turns a user error into one line and exit 2.

Heavy imports (torch, torchvision, timm) happen inside the commands, so ``--help`` and
``attnsurgeon list attn`` answer at once. The commands parse options and call the API; what they
show is drawn by :mod:`attnsurgeon.cli.render` (Rich tables on stdout, progress and notes on stderr,
``--json`` as exactly one JSON object on stdout). A wrong argument exits with status 2 and one
line of explanation (``--debug`` shows the traceback).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any

import typer

from ..core.errors import AttnSurgeonError, one_line
from .render import _escape, _stderr, json_stdout


def _flags_show_no_type() -> None:
    """Typer prints a flag's type as ``<bool>``, as if it took a value: print none for flags."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich

    def display_type_rich(self: Any, ctx: Any) -> Any:
        return None if self.is_flag else shown(self, ctx)

    # a patch of Typer's class, on purpose: Typer has no setting for this
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_show_no_type()

app = typer.Typer(
    name="attnsurgeon",
    help="Insert attention blocks (SE, ECA, CBAM) into any torchvision or timm model by torch.fx surgery, "
    "and measure what they cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
list_app = typer.Typer(help="List attention blocks, positions or models.", no_args_is_help=True)
app.add_typer(list_app, name="list")

_state = {"debug": False}


def command(fn: Callable) -> Callable:
    """Turn AttnSurgeonError into one red line and exit 2; anything else is a bug (exit 1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            if kwargs.get("json_out"):  # stdout is the JSON object's alone: a library's chatter goes to stderr
                with json_stdout():
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except AttnSurgeonError as exc:
            if _state["debug"]:
                raise
            _stderr().print(f"[bold red]error:[/] {_escape(str(exc))}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            _stderr().print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except Exception as exc:  # a bug: say so, briefly
            if _state["debug"]:
                raise
            _stderr().print(
                f"[bold red]internal error:[/] {_escape(one_line(exc))}\n"
                "Run again with --debug for the traceback, and please report it."
            )
            raise typer.Exit(1) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        from ..core.version import __version__

        typer.echo(f"attnsurgeon {__version__}")
        raise typer.Exit()


DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")]
VersionOpt = Annotated[
    bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
]


@app.callback()
def _main(debug: DebugOpt = False, version: VersionOpt = None) -> None:
    """Rewrite a model, inspect it, profile it, export it."""
    if debug:
        _state["debug"] = True
