"""``attnsurgeon insert``: rewrite a model, and show (or write) what changed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .app import app, command
from .insertion import AttnOpt, InsertionArgs, PositionOpt, check_insertion_args, insertion_options
from .options import (
    _EXTENSIONS,
    DynamicOpt,
    ExportBatchOpt,
    ForceOpt,
    FormatOpt,
    InputSizeOpt,
    JsonOpt,
    MemoryEfficientOpt,
    ModelArg,
    ModelArgsOpt,
    PlotMetricOpt,
    PlotOpt,
    PretrainedOpt,
    TargetOpt,
    ToleranceOpt,
    WeightsKeyOpt,
    WeightsOpt,
    _check_plot,
    check_tolerance,
    parse_globs,
    parse_ints,
    parse_model_args,
)
from .render import _escape, _stdout, emit_json, print_export, print_report, progress

# --------------------------------------------------------------------------- insert

InsertOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help=f"Write the modified model: {_EXTENSIONS} (.safetensors "
        "holds the recipe: reloadable). It is loaded back and checked.",
        show_default="nothing written",
    ),
]


@app.command()
@command
@insertion_options
def insert(
    *,
    model: ModelArg,
    attn: AttnOpt = "se",
    position: PositionOpt = None,
    ins: InsertionArgs,  # --stages, --blocks, --init, the block options and --replace (declared once)
    input_size: InputSizeOpt = None,
    target: TargetOpt = None,
    pretrained: PretrainedOpt = False,
    weights: WeightsOpt = None,
    weights_key: WeightsKeyOpt = None,
    model_arg: ModelArgsOpt = None,
    out: InsertOutOpt = None,
    format_: FormatOpt = None,
    force: ForceOpt = False,
    static_batch: DynamicOpt = False,
    export_batch: ExportBatchOpt = 1,
    tolerance: ToleranceOpt = 1e-4,
    plot: PlotOpt = None,
    plot_metric: PlotMetricOpt = "params",
    json_out: JsonOpt = False,
    memory_efficient: MemoryEfficientOpt = False,
) -> None:
    """Insert attention blocks into MODEL and report what was added (and write it with --out).

    Example: attnsurgeon insert resnet50 --attn eca --stages 3,4 --out eca50.safetensors --plot map.png
    """
    options, init, replace = ins.options, ins.init, ins.replace
    check_insertion_args(attn, position, options, init, replace, **ins.anchors)  # typos fail before loading anything
    model_args = parse_model_args(model_arg)
    _check_plot(plot, plot_metric)
    fmt = _check_out(out, format_, force, tolerance)
    stage_list = parse_ints(ins.stages, "--stages")
    block_list = parse_globs(ins.blocks)
    loaded = _load(model, pretrained, weights, weights_key, model_args)
    if fmt is not None:
        from ..saving.export import check_exportable

        check_exportable(loaded.model, fmt)  # a detector cannot become .onnx: say so before the surgery
    with progress("Tracing and inserting …"):
        from ..rewriting.apply import insert as do_insert

        model_out, report = do_insert(
            loaded,
            attn,
            position,
            stage_list,
            block_list,
            init,
            input_size=input_size,
            replace=replace,
            target=target,
            memory_efficient=memory_efficient,
            **ins.anchors,
            **options,
        )
    written = None
    if out is not None:
        with progress(f"Writing {out} and checking it …"):
            from ..saving.export import export as do_export

            written = do_export(
                model_out,
                out,
                format=format_,
                batch_size=export_batch,
                dynamic_batch=not static_batch,
                force=force,
                tolerance=tolerance,
            )
    drawn = None
    if plot is not None:
        with progress(f"Drawing {plot} …"):
            from ..pictures.plot import write_insertion_map

            drawn = write_insertion_map(loaded, model_out, report, plot, plot_metric)
    _show(report, written, drawn, json_out)


def _check_out(out: Path | None, format_: str | None, force: bool, tolerance: float) -> str | None:
    """The format --out is written in, or None: an unknown extension, a missing folder or no --force fails
    here, before any work."""
    if out is None:
        return None
    from ..saving.export import check_target

    check_tolerance(tolerance)
    return check_target(out, format_, force)


def _load(model: str, pretrained: bool, weights: Path | None, weights_key: str | None, model_args: dict) -> Any:
    """The base model, built once every option has been checked (a saved file is refused: it is modified)."""
    from ..loading.models import refuse_saved

    refuse_saved(model)  # before loading it
    with progress(f"Loading {model} …"):
        from ..saving.saved import load_model

        return load_model(model, pretrained=pretrained, weights=weights, weights_key=weights_key, **model_args)


def _show(report: Any, written: Any, drawn: Path | None, json_out: bool) -> None:
    """What was inserted, and what was written and drawn: tables, or one JSON object."""
    if json_out:
        emit_json(
            {
                **report.to_dict(),
                **({"export": written.to_dict()} if written else {}),
                **({"plot": str(drawn)} if drawn else {}),
            }
        )
    else:
        print_report(report)
        if written:
            print_export(written)
        if drawn:
            _stdout().print(f"Insertion map: {_escape(str(drawn))}")
