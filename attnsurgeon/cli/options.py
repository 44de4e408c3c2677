"""The options the commands share, each declared once (Typer ``Annotated`` aliases whose help is
derived from the registries: blocks, positions, formats), the parsers of their values, and
:func:`insertion_options`, which gives every inserting command the same insertion flags."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

# --------------------------------------------------------------------------- shared options
# Each option is declared once here; help texts name what the registries hold (torch-free imports).
from ..blocks import INITS  # noqa: E402
from ..blocks import REGISTRY as BLOCKS
from ..core.errors import AttnSurgeonError, one_line
from ..core.lists import split_list
from ..core.positions import POSITIONS  # noqa: E402
from ..profiling.runtimes import RUNTIMES  # the runtime registry (torch-free)
from ..saving.export import FORMATS  # the format registry (torch-free)

ModelArg = Annotated[
    str,
    typer.Argument(
        help="A torchvision or timm name (resnet50; tv:NAME / timm:NAME force the library), "
        "yolo:NAME, hf:NAME, smp:ARCH[:ENCODER], path/to/file.py:factory or package.module:factory. "
        "yolo:PATH.pt starts from an ultralytics checkpoint (best.pt), smp:./FOLDER from smp's save_pretrained; "
        "ultralytics' .pt is a pickle, loaded as YOLO(PATH) loads it: only a file you trust.",
        show_default=False,
        metavar="MODEL",
    ),
]
ATTN_HELP = (
    f"{', '.join(BLOCKS)} (see `attnsurgeon list attn`), or your own class by reference: path/to/file.py:Class, "
    "package.module:Class, timm:NAME"
)
AttnOpt = Annotated[
    str,
    typer.Option("--attn", "-a", help=f"Attention block: {ATTN_HELP}; none with --replace removes the model's own."),
]
OptionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--option",
        "-O",
        help="A block option as key=value, repeatable; the value is read as YAML (4, 0.5, true, [4, 8] one per "
        "selected stage). Any option of a zoo block, or any parameter of a class given by reference.",
        show_default="none",
    ),
]
ReplaceOpt = Annotated[
    bool,
    typer.Option(
        "--replace",
        help="Put the block in place of the attention gates the selected blocks "
        "already have (SE in EfficientNet, MobileNetV3, RegNetY...) instead of beside them; "
        "--attn none removes them.",
    ),
]
PositionOpt = Annotated[
    str | None,
    typer.Option(
        "--position",
        "-p",
        help=f"{', '.join(POSITIONS)} (see `attnsurgeon list positions`). "
        "Default: the block's natural position (`attnsurgeon list attn`).",
        show_default=False,
    ),
]
StagesOpt = Annotated[
    str | None,
    typer.Option(
        "--stages",
        "-s",
        help="Stages to modify, 1-based as `inspect` numbers them: 3,4 or 2-4. Default: all. "
        "Blocks there that cannot take the insertion are skipped with a note.",
    ),
]
BlocksOpt = Annotated[
    str | None,
    typer.Option(
        "--blocks",
        "-b",
        help="Comma-separated globs over block names: 'layer3.*,layer4.2'. Default: all. "
        "A named block that cannot take the insertion is an error.",
    ),
]
AfterOpt = Annotated[
    str | None,
    typer.Option(
        "--after",
        help="Instead of --position: put the block on the output of every module whose name "
        "matches, comma-separated globs (layer3.*.conv2, model.9, '**.conv2'; * stays within one "
        "dotted name). `inspect MODEL --anchors` lists the modules. With --stages/--blocks: only "
        "modules inside them.",
        show_default="none: --position applies",
    ),
]
BeforeOpt = Annotated[
    str | None,
    typer.Option(
        "--before",
        help="Instead of --position: put the block on the input of every module whose name "
        "matches (head, decoder.blocks.*.conv1); only that module reads the block's output.",
        show_default="none: --position applies",
    ),
]
InitOpt = Annotated[
    str,
    typer.Option(
        "--init", help=f"{' or '.join(INITS)}: identity makes every inserted block start as an exact identity."
    ),
]
InputSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--input-size",
        help="Sample input, any rank: S (image side), H,W, C,H,W; C,T,H,W or T,H,W "
        "for video; C,L for 1-D signals. Default: the model's own (3,16,112,112 for r3d_18).",
    ),
]
TargetOpt = Annotated[
    str | None,
    typer.Option(
        "--target",
        "-t",
        help="Submodule(s) to trace (and rewrite), dotted paths: backbone.body (comma-separated for several). "
        "Default: the whole model, or where it does not trace (detectors) the largest parts that do.",
    ),
]
PretrainedOpt = Annotated[
    bool, typer.Option("--pretrained", help="Load the library's published weights (network or local cache).")
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option(
        "--weights",
        help="Load a state dict or a training checkpoint (.safetensors, .pt, .pth, "
        ".pth.tar, .ckpt, .bin) into the base model before surgery; read without running a "
        "pickle. A checkpoint's EMA weights are taken first, then state_dict, model, "
        "model_state_dict; module./model. prefixes are taken off where that fits the names.",
        show_default="random weights, unless --pretrained",
    ),
]
WeightsKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--weights-key",
        help="The entry of the --weights checkpoint to load (state_dict, state_dict_ema, model, ...).",
        show_default="the first found, EMA first",
    ),
]
ModelArgsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model-arg",
        help="KEY=VALUE, repeatable: an argument of the model's builder "
        "(num_classes=7, in_chans=1 for timm/torchvision; nc=2 for YOLO; num_labels=3 for "
        "hf; classes=3 for smp). VALUE is read as YAML: 7, 0.1, true, null, [64, 64], text.",
        show_default="the builder's defaults",
        metavar="KEY=VALUE",
    ),
]
# names the loader takes itself: given as --model-arg they would shadow its own options
_LOADER_ARGS = {"pretrained": "--pretrained", "weights": "--weights", "weights_key": "--weights-key"}


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``["num_classes=7", "drop_rate=0.1"]`` -> ``{"num_classes": 7, "drop_rate": 0.1}`` (values as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise AttnSurgeonError(f"--model-arg '{item}': expected KEY=VALUE, such as num_classes=7")
        if key in _LOADER_ARGS:
            raise AttnSurgeonError(f"--model-arg {key}: use {_LOADER_ARGS[key]}")
        if key in out:
            raise AttnSurgeonError(f"--model-arg {key} is given twice")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise AttnSurgeonError(
                f"--model-arg '{item}': '{text}' is not a YAML value (quote text: name='a: b')"
            ) from None
        if isinstance(value, dict):
            raise AttnSurgeonError(
                f"--model-arg '{item}': a value is a number, true/false, null, text or a list; "
                "give a mapping in a recipe's model_args"
            )
        out[key] = value
    return out


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
MemoryEfficientOpt = Annotated[
    bool,
    typer.Option(
        "--memory-efficient",
        help="In training, recompute each inserted block "
        "(and the norm before it) in the backward pass instead of keeping its "
        "input: less memory, same outputs and gradients. Without --attn (profile): "
        "the model's own attention, before and after.",
    ),
]
_EXTENSIONS = ", ".join(ext for f in FORMATS.values() for ext in f.extensions)  # from the format registry
FormatOpt = Annotated[
    str | None, typer.Option("--format", help=f"{', '.join(FORMATS)}.", show_default="from the --out extension")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing --out file.")]
DynamicOpt = Annotated[
    bool,
    typer.Option(
        "--static-batch/--dynamic-batch",
        help="Fix the batch size of the file at --batch-size; by default it is dynamic, checked at two batch sizes.",
    ),
]
ExportBatchOpt = Annotated[int, typer.Option("--batch-size", help="Batch size of the export's sample input.")]
# profile settings: declared once, with profile's defaults; apply and sweep take the recipe's settings
# first (_recipe_default says so in their help)
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, float16 or bfloat16 (autocast).")]
BatchSizesOpt = Annotated[
    str, typer.Option("--batch-size", help="One or more batch sizes: 1,32 (a sweep's table uses the first).")
]
ModeOpt = Annotated[str, typer.Option("--mode", help="inference, or train: a whole forward+backward step.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="CPU threads.", show_default="torch's, one per core")]
ChannelsLastOpt = Annotated[
    bool, typer.Option("--channels-last", help="Run in channels-last memory format (channels_last_3d for video).")
]
CompileOpt = Annotated[
    bool, typer.Option("--compile", help="torch.compile both models; compile time is reported on its own line.")
]
MinTimeOpt = Annotated[
    float, typer.Option("--min-time", help="Seconds of timed runs per model and batch size, at least.")
]
MaxTimeOpt = Annotated[
    float,
    typer.Option(
        "--max-time",
        help="... and at most; timing stops early once IQR/median < 10% "
        "(or, with --target-ci, once the intervals are that narrow).",
    ),
]
TargetCiOpt = Annotated[
    Optional[float],
    typer.Option(
        "--target-ci",
        metavar="PCT",
        help="Keep timing, up to --max-time, until the 95% interval of every Δ latency is within ±PCT "
        "percent (e.g. 1).",
        show_default="none: stop at --min-time once timings are steady",
    ),
]
RuntimeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--runtime",
        help=f"Where to time both models, one or several: {', '.join(RUNTIMES)} (each exported, loaded there and "
        "checked against eager's outputs first). A sweep measures every configuration in each.",
        show_default="eager",
    ),
]
QuantizeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--quantize",
        help="int8: also time ONNX Runtime's static int8 quantization (calibrated on 4 sample batches) and "
        "print its output error against the float model.",
        show_default="none",
    ),
]
PROFILE_DEFAULTS = {
    "device": "cpu",
    "dtype": "float32",
    "batch_size": "1",
    "mode": "inference",
    "min_time": 1.0,
    "max_time": 4.0,
}


def _recipe_default(option: Any, default: Any) -> Any:
    """The same option for apply and sweep: unset (None) means the recipe's setting, else ``default``."""
    import copy

    info = copy.copy(option.__metadata__[0])
    info.show_default = f"the recipe's, else {default}"
    return Annotated[option.__origin__ | None, info]


RecipeDeviceOpt = _recipe_default(DeviceOpt, PROFILE_DEFAULTS["device"])
RecipeDtypeOpt = _recipe_default(DtypeOpt, PROFILE_DEFAULTS["dtype"])
RecipeBatchSizesOpt = _recipe_default(BatchSizesOpt, PROFILE_DEFAULTS["batch_size"])
RecipeModeOpt = _recipe_default(ModeOpt, PROFILE_DEFAULTS["mode"])
RecipeMinTimeOpt = _recipe_default(MinTimeOpt, PROFILE_DEFAULTS["min_time"])
RecipeMaxTimeOpt = _recipe_default(MaxTimeOpt, PROFILE_DEFAULTS["max_time"])
ToleranceOpt = Annotated[
    float,
    typer.Option(
        "--tolerance", help="Largest max-abs difference of the written file's outputs, relative to their scale."
    ),
]

# figures (attnsurgeon.pictures.plot, attnsurgeon.pictures.explain): their own options, beside the insertion options
PlotOpt = Annotated[
    Path | None,
    typer.Option(
        "--plot", help="Also draw a figure to this file: .png, .svg or .pdf (matplotlib).", show_default="none"
    ),
]
PlotMetricOpt = Annotated[
    str,
    typer.Option(
        "--plot-metric", help="What colours the insertion map: each module's share of the added params or macs."
    ),
]


def _check_plot(plot: Path | None, metric: str = "params") -> None:
    """A wrong --plot file name or --plot-metric fails before any model is built."""
    from ..pictures.plot import check_plot_metric, check_plot_path

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


def parse_runtimes(text: str | None) -> list[str]:
    """``eager,onnxruntime`` -> the runtime names, refused in one line if unknown; eager by default."""
    names = [n.lower() for n in split_list(text or "eager") or []]
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown or not names:
        raise AttnSurgeonError(f"unknown runtime '{', '.join(unknown) or text}': choose from {', '.join(RUNTIMES)}")
    return list(dict.fromkeys(names))


def parse_globs(text: str | None, what: str = "--blocks") -> list[str] | None:
    """'layer3.*, layer4.2' -> ['layer3.*', 'layer4.2']; an empty value is an error, not 'all'."""
    globs = split_list(text)
    if globs is None:
        return None
    if not globs:
        raise AttnSurgeonError(f"{what}: '{text}' names no block; leave the option out to select every block")
    return globs


def check_insertion_args(
    attn: str,
    position: str | None,
    options: dict[str, Any],
    init: str = "default",
    replace: bool = False,
    after: list[str] | None = None,
    before: list[str] | None = None,
) -> None:
    """Everything about an insertion that can be checked without a model: fail in a blink, not after a build."""
    from ..planning.schema import InsertionSpec, validate

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
    from ..blocks.options import OPTIONS

    opt = OPTIONS[name]
    takers = ", ".join(
        i.name if i.options[name] is None else f"{i.name} {i.options[name]}"
        for i in BLOCKS.values()
        if name in i.options
    )
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
    from ..blocks.options import OPTIONS

    if raw is None or OPTIONS[name].kind in ("bool", "choice", "count"):
        return raw
    return parse_numbers(raw, OPTIONS[name].flag)


def _block_option_names() -> list[str]:
    from ..blocks.options import OPTIONS

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
    option: list[str] | None = None  # --option key=value, as typed
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
        opts = {k: v for k, v in opts.items() if v is not None}
        for key, value in parse_key_values(self.option).items():
            if key in opts:
                raise AttnSurgeonError(f"--option {key}=… and {_flag(key)} both given: give one")
            opts[key] = value
        return opts


def _flag(name: str) -> str:
    from ..blocks.options import OPTIONS

    return OPTIONS[name].flag if name in OPTIONS else f"--{name}"


def parse_key_values(items: list[str] | None, what: str = "--option") -> dict[str, Any]:
    """``['reduction=4', 'stages=[4, 8]']`` -> ``{'reduction': 4, 'stages': [4, 8]}``: YAML values."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or ():
        key, eq, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key.isidentifier():
            raise AttnSurgeonError(f"{what} '{item}': expected key=value (reduction=4, act=relu, kernel_sizes=[3, 5])")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise AttnSurgeonError(f"{what} '{item}': the value is not YAML ({one_line(exc)})") from None
        if key in out:
            raise AttnSurgeonError(f"{what} {key} given twice")
        out[key] = value
    return out


INSERTION_PARAMS = [
    ("after", AfterOpt, None),
    ("before", BeforeOpt, None),
    ("stages", StagesOpt, None),
    ("blocks", BlocksOpt, None),
    ("init", InitOpt, "default"),
    *((name, *_block_option_param(name)) for name in _block_option_names()),
    ("option", OptionOpt, None),
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
            params += [
                inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
                for name, kind, default in INSERTION_PARAMS
            ]
        else:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {name: kwargs.pop(name) for name, _, _ in INSERTION_PARAMS if name in kwargs}
        ins = InsertionArgs(
            **{
                k: given.pop(k)
                for k in ("stages", "blocks", "init", "replace", "after", "before", "option")
                if k in given
            },
            raw_options=given,
        )
        return fn(*args, ins=ins, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)
    return wrapper


def _profile_overrides(
    device, dtype, batch_size, mode, threads, min_time, max_time, channels_last=None, target_ci=None
) -> dict[str, Any]:
    overrides = {
        "device": device,
        "dtype": dtype,
        "mode": mode,
        "threads": threads,
        "min_run_time": min_time,
        "max_run_time": max_time,
        "channels_last": channels_last or None,
        "target_ci": target_ci,
        "batch_sizes": parse_ints(batch_size, "--batch-size") if batch_size else None,
    }
    return {k: v for k, v in overrides.items() if v is not None}


def _takes(attn: str) -> tuple[str, ...]:
    from ..blocks import get_block
    from ..planning.schema import NONE

    return () if attn == NONE else get_block(attn).options
