"""The options the commands share, each declared once (Typer ``Annotated`` aliases whose help is
derived from the registries: formats, runtimes), and the parsers of their values: the model and its
weights, what is written, the profile settings (with the recipe-first variants of apply and sweep)
and the figures. The insertion options live in :mod:`~attnsurgeon.cli.insertion`; an option only one
command has is declared in that command's module."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypedDict, overload

import typer

from ..core.errors import AttnSurgeonError
from ..core.lists import split_list
from ..profiling.runtimes import RUNTIMES  # the runtime registry (torch-free)
from ..saving.export import FORMATS  # the format registry (torch-free)

# --------------------------------------------------------------------------- shared options
# Each option is declared once here; help texts name what the registries hold (torch-free imports).

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
    float | None,
    typer.Option(
        "--target-ci",
        metavar="PCT",
        help="Keep timing, up to --max-time, until the 95% interval of every Δ latency is within ±PCT "
        "percent (e.g. 1).",
        show_default="none: stop at --min-time once timings are steady",
    ),
]
RuntimeOpt = Annotated[
    str | None,
    typer.Option(
        "--runtime",
        help=f"Where to time both models, one or several: {', '.join(RUNTIMES)} (each exported, loaded there and "
        "checked against eager's outputs first). A sweep measures every configuration in each.",
        show_default="eager",
    ),
]
QuantizeOpt = Annotated[
    str | None,
    typer.Option(
        "--quantize",
        help="int8: also time ONNX Runtime's static int8 quantization (calibrated on 4 sample batches) and "
        "print its output error against the float model.",
        show_default="none",
    ),
]


class _ProfileDefaults(TypedDict):
    device: str
    dtype: str
    batch_size: str
    mode: str
    min_time: float
    max_time: float


def _profile_defaults() -> _ProfileDefaults:
    """profile's defaults as the CLI shows them, read from planning.settings.Settings (torch-free), where they
    are stated once."""
    from ..planning.settings import Settings

    s = Settings()
    return {
        "device": s.device,
        "dtype": s.dtype,
        "batch_size": ",".join(map(str, s.batch_sizes)),
        "mode": s.mode,
        "min_time": s.min_run_time,
        "max_time": s.max_run_time,
    }


PROFILE_DEFAULTS = _profile_defaults()


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


@overload
def parse_globs(text: str, what: str = ...) -> list[str]: ...
@overload
def parse_globs(text: None, what: str = ...) -> None: ...
@overload
def parse_globs(text: str | None, what: str = ...) -> list[str] | None: ...
def parse_globs(text: str | None, what: str = "--blocks") -> list[str] | None:
    """'layer3.*, layer4.2' -> ['layer3.*', 'layer4.2']; an empty value is an error, not 'all'."""
    globs = split_list(text)
    if globs is None:
        return None
    if not globs:
        raise AttnSurgeonError(f"{what}: '{text}' names no block; leave the option out to select every block")
    return globs


def check_tolerance(tolerance: float) -> None:
    if not tolerance >= 0:
        raise AttnSurgeonError(f"--tolerance must be ≥ 0, got {tolerance}")


def _profile_overrides(
    device: str | None,
    dtype: str | None,
    batch_size: str | None,
    mode: str | None,
    threads: int | None,
    min_time: float | None,
    max_time: float | None,
    channels_last: bool | None = None,
    target_ci: float | None = None,
) -> dict[str, Any]:
    """The profile settings given on the command line (apply, sweep), under the API's names; an unset
    one is left out, so that the recipe's setting holds."""
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
