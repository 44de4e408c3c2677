"""The `attnsurgeon` command line: a thin layer over the Python API.

Heavy imports (torch, torchvision, timm) happen inside the commands, so ``--help`` and
``attnsurgeon list attn`` answer at once. Output for people is a Rich table on stdout; ``--json``
prints exactly one JSON object on stdout; progress and errors go to stderr. A wrong argument exits
with status 2 and one line of explanation (``--debug`` shows the traceback).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from typing_extensions import Annotated

from .errors import AttnSurgeonError

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


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())


def _stdout():
    from rich.console import Console

    # Piped output (logs, `| less`) gets room for whole names instead of an 80-column cut.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


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


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


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

ModelArg = Annotated[
    str,
    typer.Argument(
        help="A torchvision or timm name (resnet50; tv:NAME / timm:NAME force the library), "
        "path/to/file.py:factory or package.module:factory.",
        show_default=False,
        metavar="MODEL",
    ),
]
AttnOpt = Annotated[str, typer.Option("--attn", "-a", help="Attention block: se, eca, cbam (see `attnsurgeon list attn`); "
                                      "none with --replace removes the model's own.")]
ReplaceOpt = Annotated[bool, typer.Option("--replace", help="Put the block in place of the attention gates the selected blocks "
                                          "already have (SE in EfficientNet, MobileNetV3, RegNetY...) instead of beside them; "
                                          "--attn none removes them.")]
PositionOpt = Annotated[
    str, typer.Option("--position", "-p", help="standard, pre, post, identity or 3x3 (see `attnsurgeon list positions`).")
]
StagesOpt = Annotated[
    Optional[str], typer.Option("--stages", "-s", help="Stages to modify, 1-based as `inspect` numbers them: 3,4 or 2-4. Default: all. "
                                                 "Blocks there that cannot take the insertion are skipped with a note.")
]
BlocksOpt = Annotated[
    Optional[str], typer.Option("--blocks", "-b", help="Comma-separated globs over block names: 'layer3.*,layer4.2'. Default: all. "
                                                 "A named block that cannot take the insertion is an error.")
]
InitOpt = Annotated[str, typer.Option("--init", help="default, or identity: every inserted block starts as an exact identity.")]
ReductionOpt = Annotated[
    Optional[str], typer.Option("--reduction", "-r", help="SE/CBAM reduction ratio r (hidden = C/r); one value or one per selected stage.")
]
BiasOpt = Annotated[
    Optional[bool], typer.Option("--bias/--no-bias", help="Biases in the SE/CBAM FC layers. Default: the block's own (SE yes, CBAM no).")
]
KernelOpt = Annotated[
    Optional[str],
    typer.Option("--kernel-size", "-k", help="ECA kernel (or CBAM spatial kernel): one value or one per selected stage, e.g. 3,5,5,7. "
                 "Default for ECA: the adaptive rule (gamma=2, b=1)."),
]
DivisorOpt = Annotated[
    Optional[int], typer.Option("--rd-divisor", help="Round SE/CBAM hidden widths to a multiple of this (timm: SE 8, CBAM 1).")
]
KeepDepthOpt = Annotated[
    Optional[bool], typer.Option("--keep-depth", help="SE/ECA on 3-D (video) maps: pool over H,W only and gate every "
                                 "(channel, frame) pair. Default: pool over T,H,W.", show_default=False)
]
InputSizeOpt = Annotated[
    Optional[str], typer.Option("--input-size", help="Sample input, any rank: S (image side), H,W, C,H,W; C,T,H,W or T,H,W "
                                "for video; C,L for 1-D signals. Default: the model's own (3,16,112,112 for r3d_18).")
]
TargetOpt = Annotated[
    Optional[str],
    typer.Option("--target", "-t", help="Submodule(s) to rewrite, dotted paths: backbone.body (comma-separated for several). "
                 "Default: the whole model, or where it does not trace (detectors) the largest parts that do."),
]
PretrainedOpt = Annotated[bool, typer.Option("--pretrained", help="Load the library's published weights (network or local cache).")]
WeightsOpt = Annotated[
    Optional[Path], typer.Option("--weights", help="Load a .safetensors or .pt/.pth state dict into the base model before surgery.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
FormatOpt = Annotated[
    Optional[str], typer.Option("--format", help="safetensors, pt2, onnx or ts; default: from the --out extension.")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing --out file.")]
DynamicOpt = Annotated[bool, typer.Option("--static-batch/--dynamic-batch", help="Fix the batch size of a .pt2/.onnx/.ts file at --batch-size (default: dynamic, checked at two batch sizes).")]
ExportBatchOpt = Annotated[int, typer.Option("--batch-size", help="Batch size of the export's sample input.")]
ToleranceOpt = Annotated[
    float, typer.Option("--tolerance", help="Largest max-abs difference of the written file's outputs, relative to their scale.")
]


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


def check_insertion_args(attn: str, position: str, options: dict[str, Any], init: str = "default",
                         replace: bool = False) -> None:
    """Everything about an insertion that can be checked without a model: fail in a blink, not after a build."""
    from .schema import InsertionSpec, validate

    validate(InsertionSpec(attn, position, init=init, options=options, replace=replace))


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


def block_options(reduction: str | None, bias: bool | None, kernel_size: str | None, rd_divisor: int | None,
                  keep_depth: bool | None = None) -> dict[str, Any]:
    opts = {
        "reduction": parse_numbers(reduction, "--reduction"),
        "bias": bias,
        "kernel_size": parse_numbers(kernel_size, "--kernel-size"),
        "rd_divisor": rd_divisor,
        "keep_depth": keep_depth,
    }
    return {k: v for k, v in opts.items() if v is not None}


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def progress(message: str):
    """A spinner on stderr while heavy work runs (silent where stderr is not a terminal)."""
    return _stderr().status(message, spinner="dots")


# --------------------------------------------------------------------------- insert


@app.command()
@command
def insert(
    model: ModelArg,
    attn: AttnOpt = "se",
    position: PositionOpt = "standard",
    stages: StagesOpt = None,
    blocks: BlocksOpt = None,
    init: InitOpt = "default",
    reduction: ReductionOpt = None,
    bias: BiasOpt = None,
    kernel_size: KernelOpt = None,
    rd_divisor: DivisorOpt = None,
    keep_depth: KeepDepthOpt = None,
    replace: ReplaceOpt = False,
    input_size: InputSizeOpt = None,
    target: TargetOpt = None,
    pretrained: PretrainedOpt = False,
    weights: WeightsOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the modified model: .safetensors (+recipe, "
                                                  "reloadable), .pt2, .onnx or .ts. It is loaded back and checked.")] = None,
    format_: FormatOpt = None,
    force: ForceOpt = False,
    static_batch: DynamicOpt = False,
    export_batch: ExportBatchOpt = 1,
    tolerance: ToleranceOpt = 1e-4,
    json_out: JsonOpt = False,
) -> None:
    """Insert attention blocks into MODEL and report what was added (and write it with --out).

    Example: attnsurgeon insert resnet50 --attn eca --stages 3,4 --out eca50.safetensors
    """
    options = block_options(reduction, bias, kernel_size, rd_divisor, keep_depth)
    check_insertion_args(attn, position, options, init, replace)  # typos fail before loading anything
    fmt = None
    if out is not None:
        from .export import check_target

        check_tolerance(tolerance)
        fmt = check_target(out, format_, force)  # unknown extension, missing folder, no --force: before any work
    stage_list = parse_ints(stages, "--stages")
    block_list = parse_globs(blocks)
    with progress(f"Loading {model} …"):
        from .models import load_model

        loaded = load_model(model, pretrained=pretrained, weights=weights)
    if fmt is not None:
        from .export import check_exportable

        check_exportable(loaded.model, fmt)  # a detector cannot become .onnx: say so before the surgery
    with progress("Tracing and inserting …"):
        from .surgery import insert as do_insert

        model_out, report = do_insert(loaded, attn, position, stage_list, block_list, init, input_size=input_size,
                                      replace=replace, target=target, **options)
    written = None
    if out is not None:
        with progress(f"Writing {out} and checking it …"):
            from .export import export as do_export

            written = do_export(model_out, out, format=format_, batch_size=export_batch, dynamic_batch=not static_batch,
                                force=force, tolerance=tolerance)
    if json_out:
        emit_json({**report.to_dict(), **({"export": written.to_dict()} if written else {})})
    else:
        print_report(report)
        if written:
            print_export(written)


def print_report(report: Any) -> None:
    from rich.table import Table

    out = _stdout()
    size = "×".join(map(str, report.input_size))
    weights = f" · weights: {report.weights}" if report.weights else ""
    part = f" · traced: {', '.join(report.target)}" if report.target else ""
    table = Table(title=f"{report.model} ({report.source}) · input {size}{weights}{part}", title_justify="left")
    swaps = [i for i in report.insertions if i.replaced]
    columns = [("block", {}), ("stage", {"justify": "right"}), ("position", {}), ("attn", {}),
               ("channels", {"justify": "right"}), ("params", {"justify": "right"}), ("module", {}), ("options", {})]
    if swaps:
        columns.insert(6, ("replaces (params)", {}))
    for col, kw in columns:
        table.add_column(col, overflow="fold", **kw)
    for i in report.insertions:
        opts = ", ".join(f"{k}={v}" for k, v in i.options.items())
        row = [i.block, str(i.stage), i.position, i.attn, str(i.channels), f"{i.params:,}", i.module, opts]
        if swaps:
            row.insert(6, f"{i.replaced} ({i.replaced_params:,})" if i.replaced else "")
        table.add_row(*row)
    out.print(table)
    p = report.params
    removed = sum(1 for i in swaps if i.attn == "none")
    counts = [(len(report.insertions) - len(swaps), "inserted"), (len(swaps) - removed, "replaced"), (removed, "removed")]
    said = " · ".join(f"{n} {'block' if what == 'inserted' else 'attention module'}{'s' if n != 1 else ''} {what}"
                      for n, what in counts if n or (what == "inserted" and not swaps))
    out.print(
        f"{said} · parameters "
        f"{p['base']:,} → {p['modified']:,} ([bold]{p['delta']:+,}[/], {p['percent']:+.{_digits(p['percent'])}f}%)"
    )
    for note in report.notes:
        _stderr().print(f"[dim]note: {_escape(note)}[/]")


def _digits(percent: float) -> int:
    """Enough decimals that a small change does not print as +0.00%."""
    small = abs(percent)
    return 2 if small >= 0.01 or small == 0 else 4 if small >= 0.0001 else 6


def print_export(written: Any) -> None:
    dyn = " (dynamic batch, checked at " + ", ".join(map(str, written.checked_batch_sizes)) + ")" if written.dynamic_batch else ""
    _stdout().print(
        f"wrote [bold]{_escape(written.path)}[/] · {written.format} · {written.size_bytes / 2**20:,.1f} MiB · "
        f"loaded back: max abs diff {written.max_abs_diff:.3g} on input {tuple(written.input_shape)}{dyn}"
    )
    for warning in written.warnings:
        _stderr().print(f"[yellow]warning:[/] {_escape(warning)}")


@app.command()
@command
def export(
    saved: Annotated[str, typer.Argument(help="A .safetensors written by `insert --out` (or a model name: the unmodified model).",
                                         show_default=False, metavar="SAVED")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Target file: .safetensors, .pt2, .onnx or .ts.", show_default=False)],
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
        if saved.lower().endswith(".safetensors"):
            from .export import load

            model = load(saved)
        else:
            from .models import load_model

            model = load_model(saved).model
    with progress(f"Writing {out} and checking it …"):
        from .export import export as do_export

        written = do_export(model, out, format=format_, input_size=input_size, batch_size=batch_size,
                            dynamic_batch=not static_batch, force=force, tolerance=tolerance)
    if json_out:
        emit_json(written.to_dict())
    else:
        print_export(written)


# --------------------------------------------------------------------------- profile


class _Steps:
    """A Rich progress line on stderr, drawn on a duplicate of fd 2 so that silencing native
    output (the profiler's start-up noise) never swallows it."""

    def __init__(self) -> None:
        import os

        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._file = os.fdopen(os.dup(2), "w")
        console = Console(file=self._file, highlight=False)
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                 console=console, transient=True, disable=not self._file.isatty())
        self.task = None

    def __enter__(self) -> "_Steps":
        self.progress.__enter__()
        self.task = self.progress.add_task("Starting", total=None)
        return self

    def __call__(self, message: str) -> None:
        self.progress.update(self.task, description=message)

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)
        self._file.close()


@app.command()
@command
def profile(
    model: ModelArg,
    attn: Annotated[Optional[str], typer.Option("--attn", "-a", help="Attention block to insert; without it the model is profiled alone.")] = None,
    position: PositionOpt = "standard",
    stages: StagesOpt = None,
    blocks: BlocksOpt = None,
    init: InitOpt = "default",
    reduction: ReductionOpt = None,
    bias: BiasOpt = None,
    kernel_size: KernelOpt = None,
    rd_divisor: DivisorOpt = None,
    keep_depth: KeepDepthOpt = None,
    replace: ReplaceOpt = False,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="float32, float16 or bfloat16 (autocast).")] = "float32",
    batch_size: Annotated[str, typer.Option("--batch-size", help="One or more batch sizes: 1,32.")] = "1",
    mode: Annotated[str, typer.Option("--mode", help="inference, or train: a whole forward+backward step.")] = "inference",
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: torch's).")] = None,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Run in channels-last memory format.")] = False,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile both models; compile time is reported on its own line.")] = False,
    min_time: Annotated[float, typer.Option("--min-time", help="Seconds of timed runs per model and batch size, at least.")] = 1.0,
    max_time: Annotated[float, typer.Option("--max-time", help="... and at most; timing stops early once IQR/median < 10%.")] = 4.0,
    input_size: InputSizeOpt = None,
    target: TargetOpt = None,
    pretrained: PretrainedOpt = False,
    weights: WeightsOpt = None,
    json_out: JsonOpt = False,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="Also write the figures as CSV to this file.")] = None,
    markdown_path: Annotated[Optional[Path], typer.Option("--markdown", help="Also write them as a markdown table.")] = None,
) -> None:
    """Measure MODEL and, with --attn, its modified twin side by side: params, MACs/FLOPs, latency, peak memory.

    Example: attnsurgeon profile resnet50 --attn se --stages 3,4 --batch-size 1,32
    """
    options = block_options(reduction, bias, kernel_size, rd_divisor, keep_depth)
    if attn is not None:
        check_insertion_args(attn, position, options, init, replace)
    elif options:
        raise AttnSurgeonError("--reduction/--bias/--kernel-size/--rd-divisor need --attn")
    elif replace:
        raise AttnSurgeonError("--replace needs --attn: the block to put in place of the model's attention, or none to remove it")
    sizes = parse_ints(batch_size, "--batch-size") or []
    for path in (csv_path, markdown_path):
        if path is not None and not path.expanduser().parent.is_dir():
            raise AttnSurgeonError(f"folder '{path.parent}' does not exist")
    from .profiling import profile as do_profile

    with _Steps() as steps:
        result = do_profile(
            model, attn, position, parse_ints(stages, "--stages"), parse_globs(blocks),
            init, device=device, dtype=dtype, batch_sizes=sizes, input_size=input_size, mode=mode, threads=threads,
            channels_last=channels_last, compile=compile_, min_run_time=min_time, max_run_time=max_time,
            pretrained=pretrained, weights=weights, target=target, progress=steps, replace=replace, **options,
        )
    from ._io import write_text_atomic
    from .profiling.report import to_csv, to_markdown

    if csv_path is not None:
        write_text_atomic(csv_path, to_csv(result))
    if markdown_path is not None:
        write_text_atomic(markdown_path, to_markdown(result))
    if json_out:
        emit_json(result.to_dict())
        return
    print_profile(result)


def print_profile(result: Any) -> None:
    from rich.table import Table

    from .profiling import FLOP_CONVENTION

    out = _stdout()
    s, env = result.settings, result.environment
    device = s.device if env["device_name"] == "cpu" else f"{s.device} ({env['device_name']})"
    out.print(f"[bold]{result.model}[/] ({result.source}) · input {'×'.join(map(str, result.input_size))} · "
              f"{device} · {s.dtype} · {s.mode} · {env['threads']} threads · torch {env['torch_version']}"
              + (" · channels-last" if s.channels_last else "") + (" · compiled" if s.compile else ""))
    alone = result.modified is None
    table = Table()
    for col in ("metric", "value") if alone else ("metric", "base", "modified", "delta", "delta %"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for metric, b, base, mod, delta, pct in result.rows():
        if alone:
            table.add_row(metric.row_label(b), metric.format(base))
        elif not metric.delta:  # a spread has no meaningful difference
            table.add_row(metric.row_label(b), metric.format(base), metric.format(mod), "", "")
        else:
            table.add_row(metric.row_label(b), metric.format(base), metric.format(mod), metric.format(delta, True),
                          "-" if pct is None else f"{pct:+.{_digits(pct)}f}%")
    out.print(table)
    if result.base.compile_s is not None:
        mod = f", modified {result.modified.compile_s:.1f} s" if result.modified else ""
        out.print(f"compile time (not in latency): base {result.base.compile_s:.1f} s{mod}")
    out.print(f"[dim]{FLOP_CONVENTION}[/]")
    if result.insertions:
        per = Table(title="per insertion", title_justify="left")
        for col in ("module", "position", "params", "MACs"):
            per.add_column(col, justify="right" if col in ("params", "MACs") else "left")
        for i in result.insertions:
            per.add_row(i.module, i.where, f"{i.params:,}", f"{i.macs:,}")
        if result.unattributed_macs:
            per.add_row("(outside inserted modules)", "", "", f"{result.unattributed_macs:,}")
        per.add_row("[bold]total[/]", "", f"{sum(i.params for i in result.insertions):,}",
                    f"{sum(i.macs for i in result.insertions) + result.unattributed_macs:,}")
        out.print(per)
    err = _stderr()
    for w in result.warnings:
        err.print(f"[yellow]warning:[/] {_escape(w)}")


# --------------------------------------------------------------------------- recipes and sweeps

RecipeArg = Annotated[str, typer.Argument(help="A YAML recipe (see recipes/).", show_default=False, metavar="RECIPE")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:N or mps (default: the recipe's, else cpu).")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="float32, float16 or bfloat16 (autocast).")]
ModeOpt = Annotated[Optional[str], typer.Option("--mode", help="inference, or train: a whole forward+backward step.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: torch's).")]
MinTimeOpt = Annotated[Optional[float], typer.Option("--min-time", help="Seconds of timed runs per model, at least.")]
MaxTimeOpt = Annotated[Optional[float], typer.Option("--max-time", help="... and at most (stops early once IQR/median < 10%).")]


def _profile_overrides(device, dtype, batch_size, mode, threads, min_time, max_time, channels_last=None) -> dict[str, Any]:
    overrides = {"device": device, "dtype": dtype, "mode": mode, "threads": threads, "min_run_time": min_time,
                 "max_run_time": max_time, "channels_last": channels_last or None,
                 "batch_sizes": parse_ints(batch_size, "--batch-size") if batch_size else None}
    return {k: v for k, v in overrides.items() if v is not None}


@app.command()
@command
def apply(
    recipe: RecipeArg,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the modified model (.safetensors, .pt2, .onnx, .ts).")] = None,
    format_: FormatOpt = None,
    force: ForceOpt = False,
    do_profile: Annotated[bool, typer.Option("--profile", help="Also profile base vs modified with the recipe's settings.")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    batch_size: Annotated[Optional[str], typer.Option("--batch-size", help="Batch sizes for --profile: 1,32.")] = None,
    mode: ModeOpt = None,
    threads: ThreadsOpt = None,
    min_time: MinTimeOpt = None,
    max_time: MaxTimeOpt = None,
    input_size: InputSizeOpt = None,
    json_out: JsonOpt = False,
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
                                           target=spec.target)
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
                                   progress=steps, **settings)
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


@app.command()
@command
def sweep(
    model: Annotated[str, typer.Argument(help="A model name, or a sweep recipe (.yaml) with its configurations.", show_default=False,
                                         metavar="MODEL|RECIPE")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for rows.jsonl, results.csv/.json and plot.png.", show_default=False)],
    attn: Annotated[Optional[str], typer.Option("--attn", "-a", help="Attention blocks to sweep: se,eca,cbam.")] = None,
    position: Annotated[str, typer.Option("--position", "-p", help="Positions to sweep: standard,pre,post,identity,3x3.")] = "standard",
    stages: StagesOpt = None,
    blocks: BlocksOpt = None,
    init: InitOpt = "default",
    reduction: ReductionOpt = None,
    bias: BiasOpt = None,
    kernel_size: KernelOpt = None,
    rd_divisor: DivisorOpt = None,
    keep_depth: KeepDepthOpt = None,
    replace: Annotated[bool, typer.Option("--replace", help="Every configuration replaces the model's own attention gates "
                                          "(--attn se,eca,none: what each block, or none, does in their place).")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="The one batch size of the sweep's table (default 1).")] = None,
    mode: ModeOpt = None,
    threads: ThreadsOpt = None,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Run in channels-last memory format.")] = False,
    min_time: MinTimeOpt = None,
    max_time: MaxTimeOpt = None,
    input_size: InputSizeOpt = None,
    target: TargetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Finish an interrupted sweep in --out: finished rows are kept.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over in an --out folder that holds a sweep.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Profile MODEL under every combination of --attn and --position (or a sweep recipe's configurations).

    Each row is written as soon as it is measured; an interrupted sweep keeps them, and --resume
    measures only the rest. A configuration that fails becomes a failed row with its reason.

    Example: attnsurgeon sweep resnet50 --attn se,eca,cbam --position standard,pre,post,identity --out sweeps/r50
    """
    from .recipes import parse_recipe, read_recipe

    if resume and force:
        raise AttnSurgeonError("--resume and --force conflict: --resume keeps the finished rows, --force discards them")
    options = block_options(reduction, bias, kernel_size, rd_divisor, keep_depth)
    is_recipe = model.lower().endswith((".yaml", ".yml"))
    if is_recipe:
        if attn or stages or blocks or options or replace:
            raise AttnSurgeonError("give either a sweep recipe or --attn/--position/--stages/--blocks/--replace and block "
                                   "options, not both")
        spec = read_recipe(model)
        configurations = spec.configurations
        if configurations is None:  # a single recipe is a one-row sweep
            from .recipes import Configuration

            configurations = [Configuration(spec.name or Path(model).stem, spec.insertions)]
        settings = dict(spec.profile or {})
        size = input_size or spec.input_size
        target = target or spec.target
    else:
        if not attn:
            raise AttnSurgeonError("--attn is required (a list such as se,eca,cbam), or give a sweep recipe")
        attns = parse_globs(attn, "--attn")
        positions = parse_globs(position, "--position")
        unused = [k for k in options if not any(k in _takes(a) for a in attns)]
        if unused:
            raise AttnSurgeonError(f"none of {', '.join(attns)} takes {', '.join(unused)}")
        configurations = []
        for a in attns:  # block options go to the blocks that take them (--reduction: se and cbam, not eca)
            own = {k: v for k, v in options.items() if k in _takes(a)}
            for p in positions:
                check_insertion_args(a, p, own, init, replace)
                name = "/".join([a] * (len(attns) > 1) + [p] * (len(positions) > 1)) or a
                item = {"attn": a, "position": p, "init": init, "options": own, **({"replace": True} if replace else {})}
                if stages is not None:
                    item["stages"] = parse_ints(stages, "--stages")
                if blocks is not None:
                    item["blocks"] = parse_globs(blocks)
                configurations.append({"name": name, "insertions": [item]})
        spec = parse_recipe({"model": model, "configurations": configurations}, "the command line")
        configurations, settings, size = spec.configurations, {}, input_size
    settings.update(_profile_overrides(device, dtype, str(batch_size) if batch_size else None, mode, threads, min_time,
                                       max_time, channels_last))
    from .sweep import run_sweep

    with _SweepProgress() as bar:
        result = run_sweep(spec.model, configurations, out, settings=settings, input_size=size,
                           model_kwargs=spec.model_kwargs, target=target, resume=resume, force=force, progress=bar)
    if json_out:
        emit_json({"folder": str(result.folder), "measured": result.measured, "plot": str(result.plot) if result.plot else None,
                   "rows": result.rows})
        return
    print_sweep(result)


def _takes(attn: str) -> tuple[str, ...]:
    from .blocks import get_block
    from .surgery import NONE

    return () if attn == NONE else get_block(attn).options


class _SweepProgress(_Steps):
    """A bar with ETA over the sweep's rows, on stderr."""

    def __init__(self) -> None:
        import os

        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._file = os.fdopen(os.dup(2), "w")
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=Console(file=self._file), transient=True,
                                 disable=not self._file.isatty())
        self.task = None

    def __enter__(self) -> "_SweepProgress":
        self.progress.__enter__()
        self.task = self.progress.add_task("sweep", total=None)
        return self

    def __call__(self, name: str, done: int, total: int) -> None:  # type: ignore[override]
        self.progress.update(self.task, total=total, completed=done, description=f"measuring {name}" if name else "done")


def print_sweep(result: Any) -> None:
    from rich.table import Table

    from .profiling.metrics import METRICS, get

    out = _stdout()
    rows = result.rows
    ok = [r for r in rows if r["status"] == "ok"]
    title = f"{ok[0]['model']} · batch {ok[0]['batch_size']}" if ok else str(result.folder)
    table = Table(title=title, title_justify="left")
    shown = [m for m in METRICS if m.summary]
    table.add_column("configuration")
    for m in shown:
        table.add_column(m.label + (f" ({m.unit})" if m.unit else ""), justify="right")
        table.add_column(f"Δ {m.label}", justify="right")
    failures, noisy = [], False
    for r in rows:
        if r["status"] != "ok":
            failures.append(r)
            table.add_row(r["name"], f"[red]failed ({len(failures)})[/]", *[""] * (2 * len(shown) - 1))
            continue
        base = r["name"] == "base"
        flag = "[yellow]![/]" if any("noisy" in w for w in r.get("warnings", [])) else ""
        noisy = noisy or bool(flag)
        cells = [f"[bold]{r['name']}[/]" if base else r["name"]]
        for m in shown:
            value, pct = get(r, m.key), get(r["delta_percent"], m.key)
            cells.append(m.format(value, unit=False) + (flag if m.key.startswith("latency") else ""))
            cells.append("" if base or pct is None else
                         f"{m.format(get(r['delta'], m.key), True, unit=False)} ({pct:+.{_digits(pct)}f}%)")
        table.add_row(*cells)
    out.print(table)
    for i, r in enumerate(failures, 1):
        out.print(f"[red]failed ({i})[/] {r['name']}: {_escape(r['reason'])}")
    if noisy:
        out.print("[yellow]![/] noisy timing: IQR above 10% of the median (other work on the machine, or more threads "
                  "than free cores: try --threads 1 or a longer --max-time); treat those Δ latency figures with care.")
    reused = len(rows) - len(result.measured)
    out.print(f"Δ figures compare each row with the base model measured alongside it. "
              f"{len(result.measured)} row(s) measured now" + (f", {reused} kept from the earlier run" if reused else "") + ".")
    out.print(f"wrote {result.folder}/results.csv, results.json, rows.jsonl" + (", plot.png" if result.plot else ""))


# --------------------------------------------------------------------------- inspect


@app.command()
@command
def inspect(
    model: ModelArg,
    input_size: InputSizeOpt = None,
    target: TargetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show MODEL's stages, blocks, the positions each block offers, and attention it already has."""
    with progress(f"Loading {model} …"):
        if model.lower().endswith(".safetensors"):  # a saved modified model
            from .export import load
            from .models import LoadedModel

            saved = load(model)
            report = saved.attnsurgeon_report
            loaded = LoadedModel(saved, report.model, report.source, tuple(report.input_size))
            loaded.source = f"{report.source}, saved in {model}"
            target = target or report.target
        else:
            from .models import load_model

            loaded = load_model(model)
    with progress("Tracing …"):
        from .api import inspect_model

        _, anatomy = inspect_model(loaded, input_size=input_size, target=target)
        from .anatomy import attention_regions

        gates = [r.name for r in attention_regions(anatomy.gm) if r.gate] if anatomy.existing_attention else []
    if json_out:
        emit_json({"model": loaded.spec, "source": loaded.source, **anatomy.to_dict(), "replaceable_attention": gates})
        return
    from rich.table import Table

    out = _stdout()
    size = "×".join(map(str, anatomy.input_size))
    if anatomy.target:  # the parts that were traced, and the input each one sees
        sizes = anatomy.input_size if len(anatomy.target) > 1 else [anatomy.input_size]
        size = f"{'×'.join(map(str, loaded.input_size))} · traced: " + ", ".join(
            f"{t} (input {'×'.join(map(str, s))})" for t, s in zip(anatomy.target, sizes))
    out.print(f"[bold]{loaded.spec}[/] ({loaded.source}) · input {size} · {len(anatomy.blocks)} blocks in "
              f"{len(anatomy.stages)} stages (grouped by {anatomy.grouping})")
    table = Table(show_lines=False)
    for col in ("stage", "block", "type", "kind", "skip", "channels", "resolution", "layout", "positions"):
        table.add_column(col, justify="right" if col in ("stage", "channels") else "left")
    for stage in anatomy.stages:
        for i, b in enumerate(stage.blocks):
            table.add_row(
                f"{stage.index} {stage.name}" if i == 0 else "",
                b.name, b.type, b.kind, b.skip or "-", str(b.channels), "×".join(map(str, b.resolution)), b.layout,
                " ".join(b.positions),
                end_section=i == len(stage.blocks) - 1,
            )
    out.print(table)
    if anatomy.existing_attention:
        out.print("Attention already in the model: " + ", ".join(f"{n} ({t})" for n, t in anatomy.existing_attention))
        out.print(f"--replace can take the place of {len(gates)} channel/spatial gate{'s' if len(gates) != 1 else ''}"
                  + (f": {', '.join(gates[:3])}{', …' if len(gates) > 3 else ''}" if gates else "") + "; other attention is kept")
    for note in anatomy.notes:
        out.print(f"[dim]note: {note}[/]")


# --------------------------------------------------------------------------- list


@list_app.command("attn")
@command
def list_attn(json_out: JsonOpt = False) -> None:
    """The attention blocks that can be inserted, with their options and papers."""
    from .blocks import REGISTRY

    if json_out:
        emit_json({"blocks": [{"name": i.name, "summary": i.summary, "options": list(i.options), "paper": i.paper}
                              for i in REGISTRY.values()]})
        return
    from rich.table import Table

    table = Table()
    for col in ("name", "what it does", "options", "paper"):
        table.add_column(col)
    for info in REGISTRY.values():
        table.add_row(info.name, info.summary, ", ".join(info.options), info.paper)
    _stdout().print(table)


@list_app.command("positions")
@command
def list_positions(json_out: JsonOpt = False) -> None:
    """The insertion positions (the SENet paper's integration study)."""
    from rich.table import Table

    from .positions import POSITION_HELP

    if json_out:
        emit_json({"positions": [{"name": k, "description": v} for k, v in POSITION_HELP.items()]})
        return

    table = Table()
    table.add_column("position")
    table.add_column("where the block goes")
    for name, text in POSITION_HELP.items():
        table.add_row(name, text)
    _stdout().print(table)


@list_app.command("models")
@command
def list_models_cmd(
    pattern: Annotated[Optional[str], typer.Argument(help="A glob (resnet*) or a substring (convnext).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Model names from torchvision and timm, with their source. A bare name in both resolves to torchvision."""
    from .models import list_models

    rows = list_models(pattern)
    if json_out:
        emit_json({"models": [{"name": n, "source": s} for n, s in rows]})
        return
    if not rows:
        raise AttnSurgeonError(f"no model matches '{pattern}'")
    from rich.table import Table

    table = Table(caption=f"{len(rows)} models")
    table.add_column("name")
    table.add_column("source")
    for name, source in rows:
        table.add_row(name, source)
    _stdout().print(table)


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
    app(args=argv, prog_name="attnsurgeon")


if __name__ == "__main__":
    main()
