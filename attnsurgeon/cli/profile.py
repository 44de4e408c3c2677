"""``attnsurgeon profile``: the cost of an insertion, base and modified measured side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..core.errors import AttnSurgeonError
from ..core.files import existing_folder
from .app import app, command
from .insertion import InsertionArgs, PositionOpt, ProfileAttnOpt, check_insertion_args, insertion_options
from .options import (
    PROFILE_DEFAULTS,
    BatchSizesOpt,
    ChannelsLastOpt,
    CompileOpt,
    DeviceOpt,
    DtypeOpt,
    InputSizeOpt,
    JsonOpt,
    MaxTimeOpt,
    MemoryEfficientOpt,
    MinTimeOpt,
    ModelArg,
    ModelArgsOpt,
    ModeOpt,
    PretrainedOpt,
    QuantizeOpt,
    RuntimeOpt,
    TargetCiOpt,
    TargetOpt,
    ThreadsOpt,
    WeightsKeyOpt,
    WeightsOpt,
    _check_plot,
    parse_globs,
    parse_ints,
    parse_model_args,
    parse_runtimes,
)
from .render import _escape, _stdout, _Steps, emit_json
from .render_profile import print_profile

# --------------------------------------------------------------------------- profile

CsvOpt = Annotated[
    Path | None, typer.Option("--csv", help="Also write the figures as CSV to this file.", show_default="none")
]
MarkdownOpt = Annotated[
    Path | None, typer.Option("--markdown", help="Also write them as a markdown table.", show_default="none")
]
CostPlotOpt = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help="Also draw per-insertion bars of Δ params, Δ MACs and, in --mode "
        "train, the activation memory each keeps for backward: .png, .svg or .pdf.",
        show_default="none",
    ),
]


@app.command()
@command
@insertion_options
def profile(
    *,
    model: ModelArg,
    attn: ProfileAttnOpt = None,
    position: PositionOpt = None,
    ins: InsertionArgs,  # --stages, --blocks, --init, the block options and --replace (declared once)
    device: DeviceOpt = PROFILE_DEFAULTS["device"],
    dtype: DtypeOpt = PROFILE_DEFAULTS["dtype"],
    batch_size: BatchSizesOpt = PROFILE_DEFAULTS["batch_size"],
    mode: ModeOpt = PROFILE_DEFAULTS["mode"],
    threads: ThreadsOpt = None,
    channels_last: ChannelsLastOpt = False,
    compile_: CompileOpt = False,
    min_time: MinTimeOpt = PROFILE_DEFAULTS["min_time"],
    max_time: MaxTimeOpt = PROFILE_DEFAULTS["max_time"],
    target_ci: TargetCiOpt = None,
    input_size: InputSizeOpt = None,
    target: TargetOpt = None,
    pretrained: PretrainedOpt = False,
    weights: WeightsOpt = None,
    weights_key: WeightsKeyOpt = None,
    model_arg: ModelArgsOpt = None,
    json_out: JsonOpt = False,
    csv_path: CsvOpt = None,
    markdown_path: MarkdownOpt = None,
    plot: CostPlotOpt = None,
    memory_efficient: MemoryEfficientOpt = False,
    runtime: RuntimeOpt = None,
    quantize: QuantizeOpt = None,
) -> None:
    """Measure MODEL and, with --attn, its modified twin side by side: params, MACs/FLOPs, latency, peak memory.

    Example: attnsurgeon profile resnet50 --attn se --stages 3,4 --batch-size 1,32

    In the deployment runtimes: attnsurgeon profile resnet50 --attn se --runtime eager,onnxruntime,openvino
    """
    options = _check_insertion(attn, position, ins)
    sizes = parse_ints(batch_size, "--batch-size") or []
    model_args = parse_model_args(model_arg)
    runtimes = parse_runtimes(runtime)
    _check_outputs(model, attn, plot, csv_path, markdown_path)
    from ..profiling import profile as do_profile

    with _Steps() as steps:
        result = do_profile(
            model,
            attn,
            position,
            parse_ints(ins.stages, "--stages"),
            parse_globs(ins.blocks),
            ins.init,
            device=device,
            dtype=dtype,
            batch_sizes=sizes,
            input_size=input_size,
            mode=mode,
            threads=threads,
            channels_last=channels_last,
            compile=compile_,
            min_run_time=min_time,
            max_run_time=max_time,
            target_ci=target_ci,
            pretrained=pretrained,
            weights=weights,
            weights_key=weights_key,
            model_args=model_args,
            target=target,
            progress=steps,
            replace=ins.replace,
            memory_efficient=memory_efficient,
            runtimes=runtimes,
            quantize=quantize,
            **ins.anchors,
            **options,
        )
    _write_outputs(result, csv_path, markdown_path, plot)
    _show(result, memory_efficient, plot, json_out)


def _check_insertion(attn: str | None, position: str | None, ins: InsertionArgs) -> dict[str, Any]:
    """The block options, parsed, once the insertion is checked; without --attn, the model is profiled alone
    and no insertion option may be given."""
    options, init, replace = ins.options, ins.init, ins.replace
    if attn is not None:
        check_insertion_args(attn, position, options, init, replace, **ins.anchors)
    elif options or ins.anchors:
        raise AttnSurgeonError("--after/--before and block options (--reduction, --kernel-size, ...) need --attn")
    elif replace:
        raise AttnSurgeonError(
            "--replace needs --attn: the block to put in place of the model's attention, or none to remove it"
        )
    return options


def _check_outputs(
    model: str, attn: str | None, plot: Path | None, csv_path: Path | None, markdown_path: Path | None
) -> None:
    """--plot, --csv and --markdown fail before anything is measured."""
    _check_plot(plot)
    if plot is not None and attn is None and not model.lower().endswith(".safetensors"):
        raise AttnSurgeonError("--plot draws the cost of each insertion: give --attn (the model alone has none)")
    for path in (csv_path, markdown_path):
        if path is not None:
            existing_folder(path.expanduser())


def _write_outputs(result: Any, csv_path: Path | None, markdown_path: Path | None, plot: Path | None) -> None:
    from ..core.files import write_text_atomic
    from ..profiling.report import to_csv, to_markdown

    if csv_path is not None:
        write_text_atomic(csv_path, to_csv(result))
    if markdown_path is not None:
        write_text_atomic(markdown_path, to_markdown(result))
    if plot is not None:
        from ..pictures.plot import draw_costs, save_figure

        save_figure(draw_costs(result), plot)


def _show(result: Any, memory_efficient: bool, plot: Path | None, json_out: bool) -> None:
    if json_out:
        emit_json(
            {
                **result.to_dict(),
                "memory_efficient": memory_efficient,
                **({"plot": str(plot)} if plot is not None else {}),
            }
        )
        return
    print_profile(result, memory_efficient)
    if plot is not None:
        _stdout().print(f"Cost plot: {_escape(str(plot))}")
