"""``attnsurgeon inspect``: a model's stages, blocks, positions, anchors and existing attention."""

from __future__ import annotations

from typing import Annotated

import typer

from .app import app, command
from .options import InputSizeOpt, JsonOpt, ModelArg, ModelArgsOpt, PlotOpt, TargetOpt, _check_plot, parse_model_args
from .render import _escape, _stdout, emit_json, print_anatomy, print_anchors, progress

# --------------------------------------------------------------------------- inspect

GlobArg = Annotated[
    str | None,
    typer.Argument(
        help="With --anchors (which it implies): keep the modules this glob matches and those inside them "
        "('decoder.*', '**.conv2'; * within one dotted name), and say how many rows were left out.",
        show_default=False,
        metavar="[GLOB]",
    ),
]
AnchorsOpt = Annotated[
    bool,
    typer.Option(
        "--anchors",
        help="Also list every module that can be an anchor of --after/--before, "
        "with the maps it receives and gives (GLOB keeps some).",
    ),
]


@app.command()
@command
def inspect(
    model: ModelArg,
    input_size: InputSizeOpt = None,
    target: TargetOpt = None,
    model_arg: ModelArgsOpt = None,
    plot: PlotOpt = None,
    glob: GlobArg = None,
    anchors: AnchorsOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Show MODEL's stages, blocks, the positions each block offers, and attention it already has."""
    _check_plot(plot)
    anchors = anchors or glob is not None
    model_args = parse_model_args(model_arg)
    with progress(f"Loading {model} …"):
        from ..saving.saved import load_model

        loaded = load_model(model, **model_args)  # a saved file: the modified model it holds
        if loaded.saved:
            target = target or loaded.model.attnsurgeon_report.target
    with progress("Tracing …"):
        from ..graph.inspect import inspect_model

        _, anatomy = inspect_model(loaded, input_size=input_size, target=target)
        from ..graph.attention import attention_regions

        gates = [r.name for r in attention_regions(anatomy.gm) if r.gate] if anatomy.existing_attention else []
        if anchors:
            from ..graph.anchors import anchor_table, anchors_matching

            every = anchor_table(anatomy)
            table = anchors_matching(every, glob or "**")
            left_out = len(every) - len(table)
    if plot is not None:
        with progress(f"Drawing {plot} …"):
            from ..pictures.plot import draw_insertion_map, save_figure

            title = f"{loaded.spec.split(':', 1)[-1]}: {len(anatomy.blocks)} blocks in {len(anatomy.stages)} stages"
            save_figure(draw_insertion_map(anatomy, [], show_positions=True, title=title), plot)
    if json_out:
        emit_json(
            {
                "model": loaded.spec,
                "source": loaded.origin,
                **anatomy.to_dict(),
                "replaceable_attention": gates,
                **({"anchors": [a.to_dict() for a in table], "anchors_left_out": left_out} if anchors else {}),
                **({"plot": str(plot)} if plot is not None else {}),
            }
        )
        return
    print_anatomy(loaded, anatomy, gates)
    if anchors:
        print_anchors(table, glob or "**", left_out)
    if plot is not None:
        _stdout().print(f"Block map: {_escape(str(plot))}")
