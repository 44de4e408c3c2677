"""The `attnsurgeon` command line: a thin layer over the Python API, one module per command.

Heavy imports (torch, torchvision, timm) happen inside the commands, so ``--help`` and
``attnsurgeon list attn`` answer at once. The commands parse options (declared once in
:mod:`~attnsurgeon.cli.options` and :mod:`~attnsurgeon.cli.insertion`) and call the API; what they
show is drawn by :mod:`attnsurgeon.cli.render` (Rich tables on stdout, progress and notes on
stderr, ``--json`` as exactly one JSON object on stdout). A wrong argument exits with status 2 and one line of
explanation (``--debug`` shows the traceback): :func:`attnsurgeon.cli.app.command`.
"""

from __future__ import annotations

import sys
from typing import Any

# each module registers its command; imported in the order `--help` lists them
# isort: off
from . import insert, export, optimize, profile, apply, sweep, inspect, explain, listing  # noqa: F401

# isort: on
from .app import _state, app
from .sweep import _optional_ray_address

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point; ``--debug`` is honoured anywhere on the command line."""
    import signal

    def _terminated(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds: atomic writes remove their temporary files

    signal.signal(signal.SIGTERM, _terminated)
    argv = sys.argv[1:]
    if "--debug" in argv:
        _state["debug"] = True
        argv = [a for a in argv if a != "--debug"]
    app(args=_optional_ray_address(argv), prog_name="attnsurgeon")
