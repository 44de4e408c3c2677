"""The `attnsurgeon` command line: a thin layer over the Python API.

Heavy imports (torch, torchvision, timm) happen inside the commands, so ``--help`` and
``attnsurgeon list attn`` answer at once. The commands parse options and call the API; what they
show is drawn by :mod:`attnsurgeon.render` (Rich tables on stdout, progress and notes on stderr,
``--json`` as exactly one JSON object on stdout). A wrong argument exits with status 2 and one
line of explanation (``--debug`` shows the traceback).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from typing_extensions import Annotated

from .errors import AttnSurgeonError
from .export import FORMATS  # the format registry (torch-free)
from .render import (
    _escape, _stderr, _stdout, _Steps, _SweepProgress, emit_json, print_anatomy, print_anchors, print_explanation, print_export,
    print_profile, print_report, print_sweep, print_table, progress,
)


def _flags_show_no_type() -> None:
    """Typer prints a flag's type as ``<bool>``, as if it took a value: print none for flags."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich

    def display_type_rich(self: Any, ctx: Any) -> Any:
        return None if self.is_flag else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich


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
                f"[bold red]internal error:[/] {type(exc).__name__}: {_escape(str(exc).splitlines()[0] if str(exc) else '')}\n"
                "Run again with --debug for the traceback, and please report it."
            )
            raise typer.Exit(1) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"attnsurgeon {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Rewrite a model, inspect it, profile it, export it."""
    if debug:
        _state["debug"] = True


# --------------------------------------------------------------------------- shared options
# Each option is declared once here; help texts name what the registries hold (torch-free imports).

from .blocks import INITS, REGISTRY as BLOCKS  # noqa: E402
from .positions import POSITIONS  # noqa: E402

ModelArg = Annotated[
    str,
    typer.Argument(
        help="A torchvision or timm name (resnet50; tv:NAME / timm:NAME force the library), "
        "yolo:NAME, hf:NAME, smp:ARCH[:ENCODER], path/to/file.py:factory or package.module:factory.",
        show_default=False,
        metavar="MODEL",
    ),
]
AttnOpt = Annotated[str, typer.Option("--attn", "-a", help=f"Attention block: {', '.join(BLOCKS)} (see `attnsurgeon list attn`); "
                                      "none with --replace removes the model's own.")]
ReplaceOpt = Annotated[bool, typer.Option("--replace", help="Put the block in place of the attention gates the selected blocks "
                                          "already have (SE in EfficientNet, MobileNetV3, RegNetY...) instead of beside them; "
                                          "--attn none removes them.")]
PositionOpt = Annotated[
    Optional[str], typer.Option("--position", "-p", help=f"{', '.join(POSITIONS)} (see `attnsurgeon list positions`). "
                                "Default: the block's natural position (`attnsurgeon list attn`).", show_default=False)
]
StagesOpt = Annotated[
    Optional[str], typer.Option("--stages", "-s", help="Stages to modify, 1-based as `inspect` numbers them: 3,4 or 2-4. Default: all. "
                                                 "Blocks there that cannot take the insertion are skipped with a note.")
]
BlocksOpt = Annotated[
    Optional[str], typer.Option("--blocks", "-b", help="Comma-separated globs over block names: 'layer3.*,layer4.2'. Default: all. "
                                                 "A named block that cannot take the insertion is an error.")
]
AfterOpt = Annotated[
    Optional[str], typer.Option("--after", help="Instead of --position: put the block on the output of every module whose name "
                                "matches, comma-separated globs (layer3.*.conv2, model.9, '**.conv2'; * stays within one "
                                "dotted name). `inspect MODEL --anchors` lists the modules. With --stages/--blocks: only "
                                "modules inside them.", show_default="none: --position applies")
]
BeforeOpt = Annotated[
    Optional[str], typer.Option("--before", help="Instead of --position: put the block on the input of every module whose name "
                                "matches (head, decoder.blocks.*.conv1); only that module reads the block's output.",
                                show_default="none: --position applies")
]
InitOpt = Annotated[str, typer.Option("--init", help=f"{' or '.join(INITS)}: identity makes every inserted block start as an "
                                      "exact identity.")]
InputSizeOpt = Annotated[
    Optional[str], typer.Option("--input-size", help="Sample input, any rank: S (image side), H,W, C,H,W; C,T,H,W or T,H,W "
                                "for video; C,L for 1-D signals. Default: the model's own (3,16,112,112 for r3d_18).")
]
TargetOpt = Annotated[
    Optional[str],
    typer.Option("--target", "-t", help="Submodule(s) to trace (and rewrite), dotted paths: backbone.body (comma-separated for several). "
                 "Default: the whole model, or where it does not trace (detectors) the largest parts that do."),
]
PretrainedOpt = Annotated[bool, typer.Option("--pretrained", help="Load the library's published weights (network or local cache).")]
WeightsOpt = Annotated[
    Optional[Path], typer.Option("--weights", help="Load a .safetensors or .pt/.pth state dict into the base model before surgery.",
                                 show_default="random weights, unless --pretrained")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
MemoryEfficientOpt = Annotated[bool, typer.Option("--memory-efficient", help="In training, recompute each inserted block "
                                                  "(and the norm before it) in the backward pass instead of keeping its "
                                                  "input: less memory, same outputs and gradients. Without --attn (profile): "
                                                  "the model's own attention, before and after.")]
_EXTENSIONS = ", ".join(ext for f in FORMATS.values() for ext in f.extensions)  # from the format registry
FormatOpt = Annotated[
    Optional[str], typer.Option("--format", help=f"{', '.join(FORMATS)}.", show_default="from the --out extension")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing --out file.")]
DynamicOpt = Annotated[bool, typer.Option("--static-batch/--dynamic-batch", help="Fix the batch size of the file at "
                                          "--batch-size; by default it is dynamic, checked at two batch sizes.")]
ExportBatchOpt = Annotated[int, typer.Option("--batch-size", help="Batch size of the export's sample input.")]
# profile settings: declared once, with profile's defaults; apply and sweep take the recipe's settings
# first (_recipe_default says so in their help)
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, float16 or bfloat16 (autocast).")]
BatchSizesOpt = Annotated[str, typer.Option("--batch-size", help="One or more batch sizes: 1,32 (a sweep's table uses the first).")]
ModeOpt = Annotated[str, typer.Option("--mode", help="inference, or train: a whole forward+backward step.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads.", show_default="torch's, one per core")]
ChannelsLastOpt = Annotated[bool, typer.Option("--channels-last", help="Run in channels-last memory format (channels_last_3d "
                                               "for video).")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile both models; compile time is reported on its own line.")]
MinTimeOpt = Annotated[float, typer.Option("--min-time", help="Seconds of timed runs per model and batch size, at least.")]
MaxTimeOpt = Annotated[float, typer.Option("--max-time", help="... and at most; timing stops early once IQR/median < 10%.")]
PROFILE_DEFAULTS = {"device": "cpu", "dtype": "float32", "batch_size": "1", "mode": "inference", "min_time": 1.0, "max_time": 4.0}


def _recipe_default(option: Any, default: Any) -> Any:
    """The same option for apply and sweep: unset (None) means the recipe's setting, else ``default``."""
    import copy

    info = copy.copy(option.__metadata__[0])
    info.show_default = f"the recipe's, else {default}"
    return Annotated[Optional[option.__origin__], info]


RecipeDeviceOpt = _recipe_default(DeviceOpt, PROFILE_DEFAULTS["device"])
RecipeDtypeOpt = _recipe_default(DtypeOpt, PROFILE_DEFAULTS["dtype"])
RecipeBatchSizesOpt = _recipe_default(BatchSizesOpt, PROFILE_DEFAULTS["batch_size"])
RecipeModeOpt = _recipe_default(ModeOpt, PROFILE_DEFAULTS["mode"])
RecipeMinTimeOpt = _recipe_default(MinTimeOpt, PROFILE_DEFAULTS["min_time"])
RecipeMaxTimeOpt = _recipe_default(MaxTimeOpt, PROFILE_DEFAULTS["max_time"])
ToleranceOpt = Annotated[
    float, typer.Option("--tolerance", help="Largest max-abs difference of the written file's outputs, relative to their scale.")
]

# figures (attnsurgeon.plot, attnsurgeon.explain): their own options, beside the insertion options
PlotOpt = Annotated[
    Optional[Path], typer.Option("--plot", help="Also draw a figure to this file: .png, .svg or .pdf (matplotlib).",
                                 show_default="none")
]
PlotMetricOpt = Annotated[str, typer.Option("--plot-metric", help="What colours the insertion map: each module's share of "
                                            "the added params or macs.")]


def _check_plot(plot: Path | None, metric: str = "params") -> None:
    """A wrong --plot file name or --plot-metric fails before any model is built."""
    from .plot import check_plot_metric, check_plot_path

    check_plot_metric(metric)
    if plot is not None:
        check_plot_path(plot)


def parse_ints(text: str | None, what: str) -> list[int] | None:
    """'3,4' / '2-4' / '3' -> [3, 4] / [2, 3, 4] / [3]."""
    if text is None:
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = (int(v) for v in part.split("-", 1))
                if lo > hi:
                    raise AttnSurgeonError(f"{what}: the range '{part}' runs backwards; write {hi}-{lo}")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise AttnSurgeonError(f"{what}: '{text}' is not a list of integers (e.g. 3,4 or 2-4)") from None
    if not out:
        raise AttnSurgeonError(f"{what}: '{text}' names nothing; give integers such as 3,4 or 2-4")
    return out


def parse_globs(text: str | None, what: str = "--blocks") -> list[str] | None:
    """'layer3.*, layer4.2' -> ['layer3.*', 'layer4.2']; an empty value is an error, not 'all'."""
    if text is None:
        return None
    globs = [g.strip() for g in text.split(",") if g.strip()]
    if not globs:
        raise AttnSurgeonError(f"{what}: '{text}' names no block; leave the option out to select every block")
    return globs


def check_insertion_args(attn: str, position: str | None, options: dict[str, Any], init: str = "default",
                         replace: bool = False, after: list[str] | None = None, before: list[str] | None = None) -> None:
    """Everything about an insertion that can be checked without a model: fail in a blink, not after a build."""
    from .schema import InsertionSpec, validate

    validate(InsertionSpec(attn, position, init=init, options=options, replace=replace, after=after, before=before))


def check_tolerance(tolerance: float) -> None:
    if not tolerance >= 0:
        raise AttnSurgeonError(f"--tolerance must be ≥ 0, got {tolerance}")


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
    from .blocks.options import OPTIONS

    opt = OPTIONS[name]
    takers = ", ".join(i.name if i.options[name] is None else f"{i.name} {i.options[name]}"
                       for i in BLOCKS.values() if name in i.options)
    help = f"{opt.help} Default: the block's own ({takers})."
    decls = [f"{opt.flag}/--no-{opt.flag[2:]}" if opt.negatable else opt.flag] + ([opt.short] if opt.short else [])
    if opt.kind == "bool":
        kind: Any = Optional[bool]
    elif opt.per_stage or opt.kind not in ("choice", "count"):
        kind = Optional[str]  # numbers, or one per stage: parsed by parse_numbers
    else:
        kind = Optional[str] if opt.kind == "choice" else Optional[int]
    return Annotated[kind, typer.Option(*decls, help=help, show_default=False)], None


def _block_option_value(name: str, raw: Any) -> Any:
    from .blocks.options import OPTIONS

    if raw is None or OPTIONS[name].kind in ("bool", "choice", "count"):
        return raw
    return parse_numbers(raw, OPTIONS[name].flag)


def _block_option_names() -> list[str]:
    from .blocks.options import OPTIONS

    return list(OPTIONS)


@dataclass
class InsertionArgs:
    """The insertion options of every command that inserts (insert, profile, sweep), declared once
    in :data:`INSERTION_PARAMS` (the block options: once in blocks/options.py) and handed to the
    command as one ``ins`` argument."""

    stages: str | None = None
    blocks: str | None = None
    init: str = "default"
    replace: bool = False
    after: str | None = None
    before: str | None = None
    raw_options: dict[str, Any] = field(default_factory=dict)  # block option -> as typed

    @property
    def anchors(self) -> dict[str, list[str]]:
        """``--after``/``--before`` as given, parsed: ``{"after": ["layer3.*.conv2"]}`` (empty: a position)."""
        given = {"after": self.after, "before": self.before}
        return {k: parse_globs(v, f"--{k}") for k, v in given.items() if v is not None}

    @property
    def options(self) -> dict[str, Any]:
        """The block options that were given, parsed (``-k 3,5,5,7`` -> ``[3, 5, 5, 7]``)."""
        opts = {k: _block_option_value(k, v) for k, v in self.raw_options.items()}
        return {k: v for k, v in opts.items() if v is not None}


INSERTION_PARAMS = [
    ("after", AfterOpt, None), ("before", BeforeOpt, None),
    ("stages", StagesOpt, None), ("blocks", BlocksOpt, None), ("init", InitOpt, "default"),
    *((name, *_block_option_param(name)) for name in _block_option_names()),
    ("replace", ReplaceOpt, False),
]


def insertion_options(fn: Callable) -> Callable:
    """Give a command the insertion options in place of its ``ins`` parameter; they reach it as
    one :class:`InsertionArgs`. Typer reads the signature this sets."""
    import inspect

    signature = inspect.signature(fn, eval_str=True)  # the module has `from __future__ import annotations`
    params: list[inspect.Parameter] = []
    for p in signature.parameters.values():
        if p.name == "ins":
            params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
                       for name, kind, default in INSERTION_PARAMS]
        else:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {name: kwargs.pop(name) for name, _, _ in INSERTION_PARAMS if name in kwargs}
        ins = InsertionArgs(**{k: given.pop(k) for k in ("stages", "blocks", "init", "replace", "after", "before")
                               if k in given},
                            raw_options=given)
        return fn(*args, ins=ins, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)
    return wrapper


# --------------------------------------------------------------------------- insert


@app.command()
@command
@insertion_options
def insert(
    model: ModelArg,
    attn: AttnOpt = "se",
    position: PositionOpt = None,
    ins: InsertionArgs = None,  # --stages, --blocks, --init, the block options and --replace (declared once)
    input_size: InputSizeOpt = None,
    target: TargetOpt = None,
    pretrained: PretrainedOpt = False,
    weights: WeightsOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help=f"Write the modified model: {_EXTENSIONS} (.safetensors "
                                                  "holds the recipe: reloadable). It is loaded back and checked.",
                                                  show_default="nothing written")] = None,
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
    _check_plot(plot, plot_metric)
    fmt = None
    if out is not None:
        from .export import check_target

        check_tolerance(tolerance)
        fmt = check_target(out, format_, force)  # unknown extension, missing folder, no --force: before any work
    stage_list = parse_ints(ins.stages, "--stages")
    block_list = parse_globs(ins.blocks)
    from .models import refuse_saved

    refuse_saved(model)  # before loading it
    with progress(f"Loading {model} …"):
        from .models import load_model

        loaded = load_model(model, pretrained=pretrained, weights=weights)
    if fmt is not None:
        from .export import check_exportable

        check_exportable(loaded.model, fmt)  # a detector cannot become .onnx: say so before the surgery
    with progress("Tracing and inserting …"):
        from .surgery import insert as do_insert

        model_out, report = do_insert(loaded, attn, position, stage_list, block_list, init, input_size=input_size,
                                      replace=replace, target=target, memory_efficient=memory_efficient, **ins.anchors,
                                      **options)
    written = None
    if out is not None:
        with progress(f"Writing {out} and checking it …"):
            from .export import export as do_export

            written = do_export(model_out, out, format=format_, batch_size=export_batch, dynamic_batch=not static_batch,
                                force=force, tolerance=tolerance)
    drawn = None
    if plot is not None:
        with progress(f"Drawing {plot} …"):
            from .plot import write_insertion_map

            drawn = write_insertion_map(loaded, model_out, report, plot, plot_metric)
    if json_out:
        emit_json({**report.to_dict(), **({"export": written.to_dict()} if written else {}),
                   **({"plot": str(drawn)} if drawn else {})})
    else:
        print_report(report)
        if written:
            print_export(written)
        if drawn:
            _stdout().print(f"Insertion map: {_escape(str(drawn))}")


@app.command()
@command
def export(
    saved: Annotated[str, typer.Argument(help="A .safetensors written by `insert --out` (or a model name: the unmodified model).",
                                         show_default=False, metavar="SAVED")],
    out: Annotated[Path, typer.Option("--out", "-o", help=f"Target file: {_EXTENSIONS}.", show_default=False)],
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
    from .export import check_target

    check_tolerance(tolerance)
    check_target(out, format_, force)
    with progress(f"Loading {saved} …"):
        from .models import load_model

        model = load_model(saved).model  # a saved file: the modified model it holds
    with progress(f"Writing {out} and checking it …"):
        from .export import export as do_export

        written = do_export(model, out, format=format_, input_size=input_size, batch_size=batch_size,
                            dynamic_batch=not static_batch, force=force, tolerance=tolerance)
    if json_out:
        emit_json(written.to_dict())
    else:
        print_export(written)


@app.command()
@command
def optimize(
    model: ModelArg,
    input_size: InputSizeOpt = None,
    target: TargetOpt = None,
    pretrained: PretrainedOpt = False,
    weights: WeightsOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help=f"Write the optimized model: {_EXTENSIONS} (.safetensors "
                                                  "holds the recipe; the other formats hold the plain graph).",
                                                  show_default="nothing written")] = None,
    format_: FormatOpt = None,
    force: ForceOpt = False,
    tolerance: ToleranceOpt = 1e-4,
    json_out: JsonOpt = False,
) -> None:
    """Make the attention MODEL already has memory-efficient: each gate (SE, ECA, ...) and the norm before it
    are recomputed in the backward pass; outputs, gradients, parameters and their names stay the same.

    Example: attnsurgeon optimize timm:seresnet50 --out seresnet50-me.safetensors
    """
    if out is not None:
        from .export import check_target

        check_tolerance(tolerance)
        check_target(out, format_, force)
    from .models import refuse_saved

    refuse_saved(model)
    with progress(f"Loading {model} …"):
        from .models import load_model

        loaded = load_model(model, pretrained=pretrained, weights=weights)
    with progress("Tracing and finding the attention …"):
        from .memory import optimize as do_optimize

        model_out, report = do_optimize(loaded, input_size=input_size, target=target)
    written = None
    if out is not None:
        with progress(f"Writing {out} and checking it …"):
            from .export import export as do_export

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


# --------------------------------------------------------------------------- profile


@app.command()
@command
@insertion_options
def profile(
    model: ModelArg,
    attn: Annotated[Optional[str], typer.Option("--attn", "-a", help=f"Attention block to insert: {', '.join(BLOCKS)} (none with "
                                                "--replace). Default: none; the model is profiled alone.")] = None,
    position: PositionOpt = None,
    ins: InsertionArgs = None,  # --stages, --blocks, --init, the block options and --replace (declared once)
    device: DeviceOpt = PROFILE_DEFAULTS["device"],
    dtype: DtypeOpt = PROFILE_DEFAULTS["dtype"],
    batch_size: BatchSizesOpt = PROFILE_DEFAULTS["batch_size"],
    mode: ModeOpt = PROFILE_DEFAULTS["mode"],
    threads: ThreadsOpt = None,
    channels_last: ChannelsLastOpt = False,
    compile_: CompileOpt = False,
    min_time: MinTimeOpt = PROFILE_DEFAULTS["min_time"],
    max_time: MaxTimeOpt = PROFILE_DEFAULTS["max_time"],
    input_size: InputSizeOpt = None,
    target: TargetOpt = None,
    pretrained: PretrainedOpt = False,
    weights: WeightsOpt = None,
    json_out: JsonOpt = False,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="Also write the figures as CSV to this file.", show_default="none")] = None,
    markdown_path: Annotated[Optional[Path], typer.Option("--markdown", help="Also write them as a markdown table.", show_default="none")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw per-insertion bars of Δ params, Δ MACs and, in --mode "
                                                 "train, the activation memory each keeps for backward: .png, .svg or .pdf.",
                                                 show_default="none")] = None,
    memory_efficient: MemoryEfficientOpt = False,
) -> None:
    """Measure MODEL and, with --attn, its modified twin side by side: params, MACs/FLOPs, latency, peak memory.

    Example: attnsurgeon profile resnet50 --attn se --stages 3,4 --batch-size 1,32
    """
    options, init, replace = ins.options, ins.init, ins.replace
    if attn is not None:
        check_insertion_args(attn, position, options, init, replace, **ins.anchors)
    elif options or ins.anchors:
        raise AttnSurgeonError("--after/--before and block options (--reduction, --kernel-size, ...) need --attn")
    elif replace:
        raise AttnSurgeonError("--replace needs --attn: the block to put in place of the model's attention, or none to remove it")
    sizes = parse_ints(batch_size, "--batch-size") or []
    _check_plot(plot)
    if plot is not None and attn is None and not model.lower().endswith(".safetensors"):
        raise AttnSurgeonError("--plot draws the cost of each insertion: give --attn (the model alone has none)")
    for path in (csv_path, markdown_path):
        if path is not None and not path.expanduser().parent.is_dir():
            raise AttnSurgeonError(f"folder '{path.parent}' does not exist")
    from .profiling import profile as do_profile

    with _Steps() as steps:
        result = do_profile(
            model, attn, position, parse_ints(ins.stages, "--stages"), parse_globs(ins.blocks),
            init, device=device, dtype=dtype, batch_sizes=sizes, input_size=input_size, mode=mode, threads=threads,
            channels_last=channels_last, compile=compile_, min_run_time=min_time, max_run_time=max_time,
            pretrained=pretrained, weights=weights, target=target, progress=steps, replace=replace,
            memory_efficient=memory_efficient, **ins.anchors, **options,
        )
    from ._io import write_text_atomic
    from .profiling.report import to_csv, to_markdown

    if csv_path is not None:
        write_text_atomic(csv_path, to_csv(result))
    if markdown_path is not None:
        write_text_atomic(markdown_path, to_markdown(result))
    if plot is not None:
        from .plot import draw_costs, save_figure

        save_figure(draw_costs(result), plot)
    if json_out:
        emit_json({**result.to_dict(), "memory_efficient": memory_efficient, **({"plot": str(plot)} if plot is not None else {})})
        return
    print_profile(result, memory_efficient)
    if plot is not None:
        _stdout().print(f"Cost plot: {_escape(str(plot))}")


# --------------------------------------------------------------------------- recipes and sweeps

RecipeArg = Annotated[str, typer.Argument(help="A YAML recipe (see recipes/).", show_default=False, metavar="RECIPE")]
def _profile_overrides(device, dtype, batch_size, mode, threads, min_time, max_time, channels_last=None) -> dict[str, Any]:
    overrides = {"device": device, "dtype": dtype, "mode": mode, "threads": threads, "min_run_time": min_time,
                 "max_run_time": max_time, "channels_last": channels_last or None,
                 "batch_sizes": parse_ints(batch_size, "--batch-size") if batch_size else None}
    return {k: v for k, v in overrides.items() if v is not None}


@app.command()
@command
def apply(
    recipe: RecipeArg,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help=f"Write the modified model ({_EXTENSIONS}).",
                                                  show_default="nothing written")] = None,
    format_: FormatOpt = None,
    force: ForceOpt = False,
    do_profile: Annotated[bool, typer.Option("--profile", help="Also profile base vs modified with the recipe's settings.")] = False,
    device: RecipeDeviceOpt = None,
    dtype: RecipeDtypeOpt = None,
    batch_size: RecipeBatchSizesOpt = None,
    mode: RecipeModeOpt = None,
    threads: ThreadsOpt = None,
    min_time: RecipeMinTimeOpt = None,
    max_time: RecipeMaxTimeOpt = None,
    input_size: InputSizeOpt = None,
    json_out: JsonOpt = False,
    memory_efficient: MemoryEfficientOpt = False,
) -> None:
    """Apply a recipe: its model and insertions (stacked in order); optionally profile and write it.

    Example: attnsurgeon apply recipes/eca-resnet50.yaml --profile
    """
    from .recipes import read_recipe

    spec = read_recipe(recipe)
    if spec.is_sweep:
        raise AttnSurgeonError(f"'{recipe}' is a sweep recipe (several configurations): run `attnsurgeon sweep {recipe} --out DIR`")
    if out is not None:
        from .export import check_target

        check_target(out, format_, force)
    try:
        with progress(f"Loading {spec.model} …"):
            from .models import load_model

            loaded = load_model(spec.model, **spec.model_kwargs)
        with progress("Inserting …"):
            from .surgery import apply_plan

            model_out, report = apply_plan(loaded, spec.insertions, input_size=input_size or spec.input_size,
                                           target=spec.target, memory_efficient=memory_efficient or spec.memory_efficient)
    except AttnSurgeonError as exc:  # say which file the problem comes from
        raise AttnSurgeonError(f"{recipe}: {exc}") from exc
    written = profiled = None
    if out is not None:
        with progress(f"Writing {out} and checking it …"):
            from .export import export as do_export

            written = do_export(model_out, out, format=format_, force=force)
    if do_profile:
        settings = {**(spec.profile or {}), **_profile_overrides(device, dtype, batch_size, mode, threads, min_time, max_time)}
        from .profiling import profile as run_profile

        with _Steps() as steps:
            profiled = run_profile(loaded, plan=spec.insertions, input_size=report.input_size, target=report.target,
                                   progress=steps, memory_efficient=memory_efficient or spec.memory_efficient, **settings)
    if json_out:
        emit_json({"recipe": spec.name or recipe, **report.to_dict(), "profile": profiled.to_dict() if profiled else None,
                   "export": written.to_dict() if written else None})
        return
    if spec.name or spec.description:
        _stdout().print(f"[bold]{_escape(spec.name or recipe)}[/]" + (f" — {_escape(spec.description)}" if spec.description else ""))
    print_report(report)
    if written:
        print_export(written)
    if profiled:
        print_profile(profiled)


# sweep --models / --ray / --ray-cpus (zoo sweeps, rows as Ray tasks: attnsurgeon.sweep)
SweepModelsOpt = Annotated[Optional[str], typer.Option(
    "--models", help="Several models, crossed with the configurations: a list or globs (timm:resnet*,convnext_tiny; "
    "`list models` shows the names). Instead of MODEL, or to run a sweep recipe over them.", show_default="MODEL alone")]
SweepRayOpt = Annotated[Optional[str], typer.Option(
    "--ray", metavar="[ADDRESS]", help="Run the rows as Ray tasks (pip install 'attnsurgeon\\[ray]'): --ray alone starts "
    "Ray on this machine; auto or ray://HEAD:10001 joins a cluster. Each row asks for --threads CPUs (1 if unset), "
    "or one GPU with --device cuda.", show_default="rows measured here, one after another")]
SweepRayCpusOpt = Annotated[Optional[int], typer.Option(
    "--ray-cpus", min=1, help="CPUs the local Ray instance may use (rows at once: this over --threads).",
    show_default="all of this machine's")]
RAY_LOCAL = "local"  # what `--ray` alone means (see _optional_ray_address)


@app.command()
@command
@insertion_options
def sweep(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for sweep.json, rows.jsonl, results.csv/.json and plot.png.", show_default=False)],
    model: Annotated[Optional[str], typer.Argument(help="A model name, or a sweep recipe (.yaml) with its configurations "
                                                   "(or --models instead).", show_default=False, metavar="MODEL|RECIPE")] = None,
    attn: Annotated[Optional[str], typer.Option("--attn", "-a", help=f"Attention blocks to sweep, a list of {','.join(BLOCKS)} "
                                                "(none with --replace); required without a sweep recipe.", show_default="none")] = None,
    position: Annotated[Optional[str], typer.Option("--position", "-p", help=f"Positions to sweep, a list of {','.join(POSITIONS)}. "
                                                    "Default: each block's natural position.", show_default=False)] = None,
    ins: InsertionArgs = None,  # --stages, --blocks, --init, the block options and --replace (declared once)
    device: RecipeDeviceOpt = None,
    dtype: RecipeDtypeOpt = None,
    batch_size: RecipeBatchSizesOpt = None,
    mode: RecipeModeOpt = None,
    threads: ThreadsOpt = None,
    channels_last: ChannelsLastOpt = False,
    min_time: RecipeMinTimeOpt = None,
    max_time: RecipeMaxTimeOpt = None,
    input_size: InputSizeOpt = None,
    target: TargetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Finish an interrupted sweep in --out: finished rows are kept.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over in an --out folder that holds a sweep.")] = False,
    models: SweepModelsOpt = None,
    ray: SweepRayOpt = None,
    ray_cpus: SweepRayCpusOpt = None,
    json_out: JsonOpt = False,
    memory_efficient: MemoryEfficientOpt = False,
) -> None:
    """Profile MODEL under every combination of --attn and --position (or a sweep recipe's configurations).

    Each row is written as soon as it is measured; an interrupted sweep keeps them, and --resume
    measures only the rest. A configuration that fails becomes a failed row with its reason.

    Example: attnsurgeon sweep resnet50 --attn se,eca,cbam --position standard,pre,post,identity --out sweeps/r50

    Zoo sweep on Ray: attnsurgeon sweep --models 'timm:resnet*,convnext_tiny' --attn se,eca --threads 1 --ray --out sweeps/zoo
    """
    from .recipes import parse_recipe, read_recipe

    if resume and force:
        raise AttnSurgeonError("--resume and --force conflict: --resume keeps the finished rows, --force discards them")
    options, init, replace, stages, blocks = ins.options, ins.init, ins.replace, ins.stages, ins.blocks
    if model is None and models is None:
        raise AttnSurgeonError("give a MODEL, a sweep RECIPE, or --models (a list or glob of models)")
    is_recipe = model is not None and model.lower().endswith((".yaml", ".yml"))
    if is_recipe:
        if attn or stages or blocks or options or replace or ins.anchors:
            raise AttnSurgeonError("give either a sweep recipe or --attn/--position/--after/--before/--stages/--blocks/"
                                   "--replace and block options, not both")
        spec = read_recipe(model)
        configurations = spec.configurations
        if configurations is None:  # a single recipe is a one-row sweep
            from .recipes import Configuration

            configurations = [Configuration(spec.name or Path(model).stem, spec.insertions)]
        settings = dict(spec.profile or {})
        size = input_size or spec.input_size
        memory_efficient = memory_efficient or spec.memory_efficient
        target = target or spec.target
    else:
        if model is not None and models is not None:
            raise AttnSurgeonError("give MODEL or --models, not both (--models takes a list: resnet18,resnet50)")
        if not attn:
            raise AttnSurgeonError("--attn is required (a list such as se,eca,cbam), or give a sweep recipe")
        attns = parse_globs(attn, "--attn")
        positions = parse_globs(position, "--position") if position is not None else [None]
        unused = [k for k in options if not any(k in _takes(a) for a in attns)]
        if unused:
            raise AttnSurgeonError(f"none of {', '.join(attns)} takes {', '.join(unused)}")
        configurations = []
        skipped = []  # a grid of blocks x positions leaves out what a block's kind does not allow (sk at pre)
        for a in attns:  # block options go to the blocks that take them (--reduction: se and cbam, not eca)
            own = {k: v for k, v in options.items() if k in _takes(a)}
            for p in positions:
                if p and len(attns) > 1 and a != "none" and a in BLOCKS and p not in BLOCKS[a].positions:
                    skipped.append(f"{a} at {p}")
                    continue
                check_insertion_args(a, p, own, init, replace, **ins.anchors)
                name = "/".join([a] * (len(attns) > 1) + [p] * (len(positions) > 1)) or a
                item = {"attn": a, **({"position": p} if p else {}), "init": init, "options": own,
                        **({"replace": True} if replace else {}), **ins.anchors}
                if stages is not None:
                    item["stages"] = parse_ints(stages, "--stages")
                if blocks is not None:
                    item["blocks"] = parse_globs(blocks)
                configurations.append({"name": name, "insertions": [item]})
        if skipped:
            if not configurations:
                raise AttnSurgeonError(f"no block of --attn goes at any --position given ({', '.join(skipped)}): conv blocks "
                                       "(sk, splat) go only at conv, gates anywhere but conv; leave --position out for "
                                       "each block's natural position")
            _stderr().print(f"[dim]note: left out {', '.join(skipped)}: a block's kind does not allow that position "
                            "(conv blocks go only at conv, gates anywhere but conv)[/]")
        spec = parse_recipe({"model": model or "", "configurations": configurations}, "the command line")
        configurations, settings, size = spec.configurations, {}, input_size
    settings.update(_profile_overrides(device, dtype, batch_size, mode, threads, min_time,
                                       max_time, channels_last))
    from .sweep import run_sweep

    swept = models.split(",") if models is not None else spec.models or spec.model  # --models overrides a recipe's
    try:
        with _SweepProgress() as bar:
            result = run_sweep(swept, configurations, out, settings=settings, input_size=size,
                               model_kwargs=spec.model_kwargs, target=target, resume=resume, force=force, progress=bar,
                               ray=ray, ray_cpus=ray_cpus, memory_efficient=memory_efficient)
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C, or SIGTERM (a timeout, a batch job's limit)
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        _say_interrupted(out, force)
        import signal

        # a SystemExit here is a termination: ours says 128 + SIGTERM, but where Ray's own handler
        # caught the signal it says 1, so the status is set here, as a shell expects it after SIGTERM
        raise typer.Exit(130 if isinstance(exc, KeyboardInterrupt) else 128 + signal.SIGTERM) from None
    if json_out:
        emit_json({"folder": str(result.folder), "measured": result.measured, "plot": str(result.plot) if result.plot else None,
                   "rows": result.rows})
        return
    print_sweep(result)


def _say_interrupted(out: Path, force: bool) -> None:
    """What an interrupted sweep left, and how to finish it."""
    from .sweep import ROWS_FILE, SWEEP_FILE

    folder = out.expanduser()
    if not (folder / SWEEP_FILE).exists():
        _stderr().print("[yellow]interrupted[/] before the sweep started")
        return
    rows = folder / ROWS_FILE
    kept = sum(1 for line in rows.read_text().splitlines() if line.strip()) if rows.exists() else 0
    _stderr().print(f"[yellow]interrupted:[/] {kept} finished row{'s' * (kept != 1)} kept in {_escape(str(out))}; "
                    "finish the sweep with the same arguments and --resume" + (" (in place of --force)" if force else ""))


def _optional_ray_address(argv: list[str]) -> list[str]:
    """``--ray`` takes an optional address: alone (last, or before another option or the model) it means a
    local Ray instance. An address is ``local``, ``auto``, ``SCHEME://...`` or ``HOST:PORT``."""
    import re

    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--ray":
            nxt = out[i + 1] if i + 1 < len(out) else None
            if nxt is None or not re.fullmatch(r"local|auto|\w[\w+.-]*://\S*|[\w.-]+:\d+", nxt):
                out.insert(i + 1, RAY_LOCAL)
    return out


def _takes(attn: str) -> tuple[str, ...]:
    from .blocks import get_block
    from .surgery import NONE

    return () if attn == NONE else get_block(attn).options


# --------------------------------------------------------------------------- inspect


@app.command()
@command
def inspect(
    model: ModelArg,
    input_size: InputSizeOpt = None,
    target: TargetOpt = None,
    plot: PlotOpt = None,
    anchors: Annotated[bool, typer.Option("--anchors", help="Also list every module that can be an anchor of --after/--before, "
                                          "with the maps it receives and gives.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Show MODEL's stages, blocks, the positions each block offers, and attention it already has."""
    _check_plot(plot)
    with progress(f"Loading {model} …"):
        from .models import load_model

        loaded = load_model(model)  # a saved file: the modified model it holds
        if loaded.saved:
            target = target or loaded.model.attnsurgeon_report.target
    with progress("Tracing …"):
        from .api import inspect_model

        _, anatomy = inspect_model(loaded, input_size=input_size, target=target)
        from .anatomy import attention_regions

        gates = [r.name for r in attention_regions(anatomy.gm) if r.gate] if anatomy.existing_attention else []
        if anchors:
            from .anchors import anchor_table

            table = anchor_table(anatomy)
    if plot is not None:
        with progress(f"Drawing {plot} …"):
            from .plot import draw_insertion_map, save_figure

            title = f"{loaded.spec.split(':', 1)[-1]}: {len(anatomy.blocks)} blocks in {len(anatomy.stages)} stages"
            save_figure(draw_insertion_map(anatomy, [], show_positions=True, title=title), plot)
    if json_out:
        emit_json({"model": loaded.spec, "source": loaded.origin, **anatomy.to_dict(), "replaceable_attention": gates,
                   **({"anchors": [a.to_dict() for a in table]} if anchors else {}),
                   **({"plot": str(plot)} if plot is not None else {})})
        return
    print_anatomy(loaded, anatomy, gates)
    if anchors:
        print_anchors(table)
    if plot is not None:
        _stdout().print(f"Block map: {_escape(str(plot))}")


# --------------------------------------------------------------------------- explain


@app.command()
@command
@insertion_options
def explain(
    model: ModelArg,
    image: Annotated[list[Path], typer.Option("--image", "-i", help="An image file, or a folder of images; repeat for several.",
                                              show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the sheets, summary.png and explain.json (must not exist, "
                                      "unless --force).", show_default=False)],
    attn: Annotated[Optional[str], typer.Option("--attn", "-a", help=f"Attention block to insert: {', '.join(BLOCKS)} (none with "
                                                "--replace). Default: none; the model is explained alone.")] = None,
    position: PositionOpt = None,
    ins: InsertionArgs = None,  # --stages, --blocks, --init, the block options and --replace (declared once)
    class_index: Annotated[Optional[int], typer.Option("--class", help="Class index for Grad-CAM.",
                                                       show_default="the base model's top class")] = None,
    layer: Annotated[Optional[str], typer.Option("--layer", help="Module whose output Grad-CAM reads (layer4, layer3.1).",
                                                 show_default="the last spatial feature map")] = None,
    input_size: InputSizeOpt = None,
    pretrained: PretrainedOpt = False,
    weights: WeightsOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out folder (once the new one is complete).")] = False,
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
    from ._io import check_new_dir

    check_new_dir(out, force)
    from .explain import collect_images

    files = collect_images(image)  # a missing or unreadable image fails before any model is built
    from .explain import explain as do_explain, write_explanation

    with _Steps() as steps:
        result = do_explain(model, files, attn, position, parse_ints(ins.stages, "--stages"), parse_globs(ins.blocks), init,
                            class_index=class_index, layer=layer, input_size=input_size, pretrained=pretrained,
                            weights=weights, replace=replace, progress=steps, **ins.anchors, **options)
        written = write_explanation(result, out, force=force, progress=steps)
    if json_out:
        emit_json({**result.to_dict(), "folder": str(out), "files": [str(w) for w in written]})
        return
    print_explanation(result, written)


# --------------------------------------------------------------------------- list


@list_app.command("attn")
@command
def list_attn(json_out: JsonOpt = False) -> None:
    """The attention blocks that can be inserted, with their options and papers."""
    from .blocks import REGISTRY

    if json_out:
        emit_json({"blocks": [i.to_dict() for i in REGISTRY.values()]})
        return

    from .blocks.options import OPTIONS

    def typed(name: str, default: Any) -> str:  # as it is typed: --lambda, not the API's e_lambda; --no-bias
        flag = OPTIONS[name].flag
        if isinstance(default, bool):
            return flag if default else f"--no-{flag[2:]}"
        return flag if default is None else f"{flag} {default}"

    def options(info: Any) -> str:
        return ", ".join(typed(k, v) for k, v in info.options.items()) or "-"

    print_table(("name", "what it does", "position", "options (default)", "paper"),
                [(i.name, i.summary, i.position, options(i), i.paper) for i in REGISTRY.values()])


@list_app.command("positions")
@command
def list_positions(json_out: JsonOpt = False) -> None:
    """The insertion positions (the SENet paper's integration study)."""
    from .positions import ANCHOR_HELP, POSITION_HELP

    if json_out:
        emit_json({"positions": [{"name": k, "kind": "position", "description": v} for k, v in POSITION_HELP.items()]
                   + [{"name": k, "kind": "anchor", "description": v} for k, v in ANCHOR_HELP.items()]})
        return
    print_table(("position", "where the block goes"), [*POSITION_HELP.items(), *ANCHOR_HELP.items()],
                caption="after/before are anchors: --after GLOB / --before GLOB instead of --position")


@list_app.command("models")
@command
def list_models_cmd(
    pattern: Annotated[Optional[str], typer.Argument(help="A glob (resnet*) or a substring (convnext); timm:PATTERN or "
                                                     "tv:PATTERN keeps one library.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Model names from torchvision and timm, with their source, named as MODEL and --models take them
    (tv:NAME / timm:NAME; a bare name in both libraries resolves to torchvision)."""
    from .models import list_models, model_spec

    rows = list_models(pattern)
    if json_out:
        emit_json({"models": [{"name": n, "source": s} for n, s in rows]})
        return
    if not rows:
        raise AttnSurgeonError(f"no model matches '{pattern}'")
    print_table(("model", "source"), [(model_spec(n, s), s) for n, s in rows], caption=f"{len(rows)} models")


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


if __name__ == "__main__":
    main()
