"""``attnsurgeon optimize``: a model's own attention gates made memory-efficient."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app, command
from .options import (
    _EXTENSIONS,
    ForceOpt,
    FormatOpt,
    InputSizeOpt,
    JsonOpt,
    ModelArg,
    ModelArgsOpt,
    PretrainedOpt,
    TargetOpt,
    ToleranceOpt,
    WeightsKeyOpt,
    WeightsOpt,
    check_tolerance,
    parse_model_args,
)
from .render import _escape, _stderr, emit_json, print_export, progress

OptimizeOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help=f"Write the optimized model: {_EXTENSIONS} (.safetensors "
        "holds the recipe; the other formats hold the plain graph).",
        show_default="nothing written",
    ),
]


@app.command()
@command
def optimize(
    model: ModelArg,
    input_size: InputSizeOpt = None,
    target: TargetOpt = None,
    pretrained: PretrainedOpt = False,
    weights: WeightsOpt = None,
    weights_key: WeightsKeyOpt = None,
    model_arg: ModelArgsOpt = None,
    out: OptimizeOutOpt = None,
    format_: FormatOpt = None,
    force: ForceOpt = False,
    tolerance: ToleranceOpt = 1e-4,
    json_out: JsonOpt = False,
) -> None:
    """Make the attention MODEL already has memory-efficient: each gate (SE, ECA, ...) and the norm before it
    are recomputed in the backward pass; outputs, gradients, parameters and their names stay the same.

    Example: attnsurgeon optimize timm:seresnet50 --out seresnet50-me.safetensors
    """
    model_args = parse_model_args(model_arg)
    if out is not None:
        from ..saving.export import check_target

        check_tolerance(tolerance)
        check_target(out, format_, force)
    from ..loading.models import refuse_saved

    refuse_saved(model)
    with progress(f"Loading {model} …"):
        from ..saving.saved import load_model

        loaded = load_model(model, pretrained=pretrained, weights=weights, weights_key=weights_key, **model_args)
    with progress("Tracing and finding the attention …"):
        from ..rewriting.apply import optimize as do_optimize

        model_out, report = do_optimize(loaded, input_size=input_size, target=target)
    written = None
    if out is not None:
        with progress(f"Writing {out} and checking it …"):
            from ..saving.export import export as do_export

            written = do_export(model_out, out, format=format_, force=force, tolerance=tolerance)
    if json_out:
        emit_json({**report.to_dict(), **({"export": written.to_dict()} if written else {})})
        return
    from .render import print_memory_efficient

    print_memory_efficient(report, table=True)
    for note in report.notes:
        _stderr().print(f"[dim]note: {_escape(note)}[/]")
    if written:
        print_export(written)
