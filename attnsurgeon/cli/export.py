"""``attnsurgeon export``: write a model (a name with insertions, or a saved file) in any format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app, command
from .options import (
    _EXTENSIONS,
    DynamicOpt,
    ExportBatchOpt,
    ForceOpt,
    FormatOpt,
    InputSizeOpt,
    JsonOpt,
    ToleranceOpt,
    check_tolerance,
)
from .render import emit_json, print_export, progress

SavedArg = Annotated[
    str,
    typer.Argument(
        help="A .safetensors written by `insert --out` (or a model name: the unmodified model).",
        show_default=False,
        metavar="SAVED",
    ),
]
ExportOutOpt = Annotated[Path, typer.Option("--out", "-o", help=f"Target file: {_EXTENSIONS}.", show_default=False)]


@app.command()
@command
def export(
    saved: SavedArg,
    out: ExportOutOpt,
    format_: FormatOpt = None,
    force: ForceOpt = False,
    input_size: InputSizeOpt = None,
    batch_size: ExportBatchOpt = 1,
    static_batch: DynamicOpt = False,
    tolerance: ToleranceOpt = 1e-4,
    json_out: JsonOpt = False,
) -> None:
    """Convert a saved modified model to another format; the written file is loaded back and checked.

    Example: attnsurgeon export se50.safetensors --out se50.onnx --static-batch --batch-size 8
    """
    from ..saving.export import check_target

    check_tolerance(tolerance)
    check_target(out, format_, force)
    with progress(f"Loading {saved} …"):
        from ..saving.saved import load_model

        model = load_model(saved).model  # a saved file: the modified model it holds
    with progress(f"Writing {out} and checking it …"):
        from ..saving.export import export as do_export

        written = do_export(
            model,
            out,
            format=format_,
            input_size=input_size,
            batch_size=batch_size,
            dynamic_batch=not static_batch,
            force=force,
            tolerance=tolerance,
        )
    if json_out:
        emit_json(written.to_dict())
    else:
        print_export(written)
