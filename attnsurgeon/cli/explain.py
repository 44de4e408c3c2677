"""``attnsurgeon explain``: Grad-CAM and gate values of base and modified models on images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..core.errors import AttnSurgeonError
from .app import app, command
from .insertion import ExplainAttnOpt, InsertionArgs, PositionOpt, check_insertion_args, insertion_options
from .options import (
    InputSizeOpt,
    JsonOpt,
    ModelArg,
    ModelArgsOpt,
    PretrainedOpt,
    WeightsKeyOpt,
    WeightsOpt,
    parse_globs,
    parse_ints,
    parse_model_args,
)
from .render import _Steps, emit_json, print_explanation

# --------------------------------------------------------------------------- explain

ImageOpt = Annotated[
    list[Path],
    typer.Option("--image", "-i", help="An image file, or a folder of images; repeat for several.", show_default=False),
]
ExplainOutOpt = Annotated[
    Path,
    typer.Option(
        "--out",
        "-o",
        help="Folder for the sheets, summary.png and explain.json (must not exist, unless --force).",
        show_default=False,
    ),
]
ClassOpt = Annotated[
    int | None, typer.Option("--class", help="Class index for Grad-CAM.", show_default="the base model's top class")
]
LayerOpt = Annotated[
    str | None,
    typer.Option(
        "--layer",
        help="Module whose output Grad-CAM reads (layer4, layer3.1).",
        show_default="the last spatial feature map",
    ),
]
ReplaceFolderOpt = Annotated[
    bool, typer.Option("--force", help="Replace an existing --out folder (once the new one is complete).")
]


@app.command()
@command
@insertion_options
def explain(
    *,
    model: ModelArg,
    image: ImageOpt,
    out: ExplainOutOpt,
    attn: ExplainAttnOpt = None,
    position: PositionOpt = None,
    ins: InsertionArgs,  # --stages, --blocks, --init, the block options and --replace (declared once)
    class_index: ClassOpt = None,
    layer: LayerOpt = None,
    input_size: InputSizeOpt = None,
    pretrained: PretrainedOpt = False,
    weights: WeightsOpt = None,
    weights_key: WeightsKeyOpt = None,
    model_arg: ModelArgsOpt = None,
    force: ReplaceFolderOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Grad-CAM of MODEL and of its modified twin side by side, and the values of every attention gate, on images.

    Example: attnsurgeon explain resnet50 --pretrained --attn cbam --init identity --image cat.jpg --out explain-cat
    """
    options, init, replace = ins.options, ins.init, ins.replace
    if attn is not None:
        check_insertion_args(attn, position, options, init, replace, **ins.anchors)
    elif options or replace or ins.stages or ins.blocks or ins.anchors:
        raise AttnSurgeonError("--stages/--blocks/--after/--before/--replace and block options need --attn")
    model_args = parse_model_args(model_arg)
    from ..core.files import check_new_dir

    check_new_dir(out, force)
    from ..pictures.explain import collect_images

    files = collect_images(image)  # a missing or unreadable image fails before any model is built
    from ..pictures.explain import explain as do_explain
    from ..pictures.sheet import write_explanation

    with _Steps() as steps:
        result = do_explain(
            model,
            files,
            attn,
            position,
            parse_ints(ins.stages, "--stages"),
            parse_globs(ins.blocks),
            init,
            class_index=class_index,
            layer=layer,
            input_size=input_size,
            pretrained=pretrained,
            weights=weights,
            weights_key=weights_key,
            model_args=model_args,
            replace=replace,
            progress=steps,
            **ins.anchors,
            **options,
        )
        written = write_explanation(result, out, force=force, progress=steps)
    if json_out:
        emit_json({**result.to_dict(), "folder": str(out), "files": [str(w) for w in written]})
        return
    print_explanation(result, written)
