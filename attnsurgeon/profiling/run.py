"""The profile itself: open the model, insert, count, measure, and say what the measurement doubts.

:func:`profile` reads as its steps: the settings and insertions checked (:func:`_check_settings`,
:func:`_specs`), the models opened (:func:`_open_models`: load, insert), counted and measured
(:mod:`.figures`), and the result put together with what the measurement doubts (:func:`_result`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..core.errors import AttnSurgeonError
from ..planning.settings import Settings
from .figures import Counts, Measured, ProgressFn, count_models, load_average, measure_models
from .result import ProfileResult

DEFAULT = Settings()  # the one statement of profile's defaults: Settings' own (the CLI reads them too)

__all__ = ["ProgressFn", "profile"]


def profile(
    model: Any,
    attn: str | None = None,
    position: str | None = None,
    stages: Iterable[int] | None = None,
    blocks: Iterable[str] | str | None = None,
    init: str = "default",
    *,
    plan: list | None = None,
    device: str = DEFAULT.device,
    dtype: str = DEFAULT.dtype,
    batch_sizes: Iterable[int] | int = tuple(DEFAULT.batch_sizes),
    input_size: Any = None,
    mode: str = DEFAULT.mode,
    threads: int | None = None,
    channels_last: bool = False,
    compile: bool = False,
    min_run_time: float = DEFAULT.min_run_time,
    max_run_time: float = DEFAULT.max_run_time,
    target_ci: float | None = None,
    pretrained: bool = False,
    weights: Any = None,
    weights_key: str | None = None,
    model_args: dict[str, Any] | None = None,
    target: Any = None,
    progress: ProgressFn | None = None,
    replace: bool = False,
    memory_efficient: bool = False,
    runtimes: Iterable[str] | str = ("eager",),
    quantize: str | None = None,
    **block_options: Any,
) -> ProfileResult:
    """Measure a model and, with ``attn`` or ``plan``, its modified twin, side by side.

    Takes the insertion arguments of :func:`attnsurgeon.insert` (or ``plan``, a list of
    :class:`~attnsurgeon.InsertionSpec`); without them the model is profiled alone. With
    ``attn="none", replace=True`` the modified model is the model without its attention gates.
    ``target`` names the submodules to rewrite (see :func:`attnsurgeon.insert`); the figures are
    always those of the whole model on its own input (a detector: a list of images, inference only).
    ``memory_efficient`` recomputes the inserted blocks in the backward pass (see
    :mod:`attnsurgeon.rewriting.memory`); without insertions, the modified model is the model with its own
    attention gates recomputed (:func:`attnsurgeon.optimize`): before and after, side by side.
    ``pretrained``, ``weights``, ``weights_key`` and ``model_args`` (the builder's arguments) load a
    model given by name, as :func:`attnsurgeon.load_model` does.

    Latency is timed in paired, alternating rounds; each Δ latency and Δ throughput comes with the 95 %
    interval of the per-round ratios (``to_dict()["delta_ci"]``, :mod:`attnsurgeon.profiling.intervals`);
    ``target_ci`` keeps timing, up to ``max_run_time``, until every such interval is within ±that %.

    ``runtimes`` (names of :data:`~attnsurgeon.profiling.runtimes.RUNTIMES`, ``"eager"`` by default)
    times both models in each runtime too, after checking its outputs against eager's; ``quantize="int8"``
    adds an int8 row for ONNX Runtime (static quantization). The per-insertion figures are eager's.

    Example:
        >>> result = profile("resnet50", attn="se", batch_sizes=[1, 8])
        >>> result.to_dict()["delta"]["params"]
        2514944
    """
    from ..core.module_state import snapshot
    from ..core.native import quiet_torch_logs

    quiet_torch_logs()
    say = progress or (lambda message: None)
    sizes = list([batch_sizes] if isinstance(batch_sizes, int) else batch_sizes)
    names = list(dict.fromkeys([runtimes] if isinstance(runtimes, str) else runtimes))
    between = (threads, channels_last, compile, min_run_time, max_run_time, target_ci)  # Settings' fields, in order
    settings = _check_settings(Settings(device, dtype, sizes, mode, *between, names, quantize))
    specs = _specs(plan, attn, position, stages, blocks, init, replace, block_options)
    say("Loading the model")
    loading = {"pretrained": pretrained, "weights": weights, "weights_key": weights_key, "model_args": model_args}
    opened = _open_models(model, specs, settings, input_size, target, memory_efficient, say, loading)
    as_built = snapshot(opened.base, opened.modified)  # before anything runs them: a forward may cache on its module
    say("Counting FLOPs")
    counts = count_models(opened.base, opened.modified, opened.report, opened.size)
    measured = measure_models(opened.base, opened.modified, opened.report, counts, opened.size, settings, say, as_built)
    return _result(opened, settings, counts, measured)


def _result(opened: _Opened, settings: Settings, counts: Counts, measured: Measured) -> ProfileResult:
    notes = list(opened.report.notes if opened.report is not None else opened.loaded.notes)  # what loading did
    warnings = _warnings(counts, measured.runtimes)
    return ProfileResult(
        opened.loaded.spec,
        opened.loaded.source,
        opened.size,
        settings,
        counts.figures["base"],
        counts.figures.get("modified"),
        counts.insertions,
        counts.unattributed,
        counts.uncounted,
        counts.fvcore_default,
        warnings,
        _environment(settings, measured),
        measured.unattributed_memory,
        notes,
        measured.runtimes,
    )


# --------------------------------------------------------------------------- arguments


def _check_settings(settings: Settings) -> Settings:
    from ..planning.settings import check_settings
    from .runtimes import check_runtimes

    settings = check_settings(settings)
    check_runtimes(settings.runtimes, settings, settings.quantize)
    return settings


def _specs(
    plan: list | None,
    attn: str | None,
    position: str | None,
    stages: Iterable[int] | None,
    blocks: Iterable[str] | str | None,
    init: str,
    replace: bool,
    block_options: dict[str, Any],
) -> list:
    """The insertions: ``plan``'s, and the one the insertion arguments describe."""
    from ..rewriting.apply import make_spec

    specs = list(plan or [])
    if attn is not None:
        specs.append(make_spec(attn, position, stages, blocks, init, replace=replace, **block_options))
    elif block_options and any(v is not None for v in block_options.values()):
        raise AttnSurgeonError("block options were given without --attn")
    elif replace:
        raise AttnSurgeonError(
            "--replace needs --attn: the block to put in place of the model's attention, or none to remove it"
        )
    return specs


def _check_saved(specs: list, loading: dict[str, Any], target: Any, memory_efficient: bool) -> None:
    """What a saved modified model cannot take, said before loading it."""
    if specs:
        raise AttnSurgeonError("a saved model carries its own insertions; profile it without --attn")
    if loading["pretrained"] or loading["weights"] is not None or loading["model_args"]:
        raise AttnSurgeonError(
            "a saved model carries its own weights and builder arguments; drop --pretrained/--weights/--model-arg"
        )
    if target is not None:
        raise AttnSurgeonError("a saved model carries its own target; profile it without --target")
    if memory_efficient:
        raise AttnSurgeonError(
            "a saved model carries its own recipe; make it memory-efficient before saving it "
            "(insert/optimize --memory-efficient --out)"
        )


def _check_mode(model: Any, mode: str) -> None:
    from ..loading.samples import takes_targets

    if mode == "train" and takes_targets(model):
        raise AttnSurgeonError(
            f"{type(model).__name__} computes its training loss from labelled targets (boxes, labels), which a "
            "profile with random inputs does not have: profile it with --mode inference"
        )


# --------------------------------------------------------------------------- the models


@dataclass
class _Opened:
    """The loaded model, its input size, and the modified model with the insertion's report (or None)."""

    loaded: Any
    size: tuple[int, ...]
    base: Any
    modified: Any
    report: Any


def _open_models(
    model: Any,
    specs: list,
    settings: Settings,
    input_size: Any,
    target: Any,
    memory_efficient: bool,
    say: ProgressFn,
    loading: dict[str, Any],
) -> _Opened:
    """Load the model (a name or a saved file) and, with insertions, make its modified twin."""
    from ..graph.layout import resolve_input_size
    from ..loading.models import is_saved
    from ..rewriting.apply import apply_plan
    from ..saving.saved import open_model

    if is_saved(model):
        _check_saved(specs, loading, target, memory_efficient)
    loaded = open_model(
        model,
        pretrained=loading["pretrained"],
        weights=loading["weights"],
        weights_key=loading["weights_key"],
        **(loading["model_args"] or {}),
    )
    size = resolve_input_size(input_size, loaded.input_size)
    _check_mode(loaded.model, settings.mode)  # settings the model cannot take, before any insertion or measurement
    if settings.channels_last:
        from ..graph.layout import channels_last_format

        channels_last_format(1 + len(size))  # before any measurement: 1-D inputs have no such format
    if loaded.saved:  # the saved modified model and its base, rebuilt from the recipe with the saved weights
        return _Opened(loaded, size, loaded.base, loaded.model, loaded.model.attnsurgeon_report)
    modified, report = None, None
    if specs or memory_efficient:
        say("Inserting" if specs else "Making the attention memory-efficient")
        modified, report = apply_plan(loaded, specs, input_size=size, target=target, memory_efficient=memory_efficient)
    elif target is not None:
        raise AttnSurgeonError("--target chooses where blocks go: it needs --attn")
    return _Opened(loaded, size, loaded.model, modified, report)


# --------------------------------------------------------------------------- what the result says about itself


def _warnings(counts: Counts, measured_runtimes: list[Any]) -> list[str]:
    """What the measurement doubts: noisy latencies, MACs counted in parts, ops without a FLOP handle."""
    warnings = []
    for name, fig in counts.figures.items():
        for b, lat in fig.latency.items():
            if lat.noisy:
                warnings.append(
                    f"{name} latency at batch {b} is noisy: IQR {lat.iqr_ms:.2f} ms is "
                    f"{100 * lat.iqr_ms / lat.median_ms:.0f}% of the median; other work competes for the CPU "
                    "(try --threads 1 or fewer than the free cores) or raise --max-time"
                )
    for row in measured_runtimes:
        for name, timed in (("base", row.base), ("modified", row.modified)):
            for b, lat in timed.latency.items() if row.runtime != "eager" and timed is not None else ():
                if lat.noisy:
                    warnings.append(
                        f"{name} latency in {row.label} at batch {b} is noisy: IQR {lat.iqr_ms:.2f} ms is "
                        f"{100 * lat.iqr_ms / lat.median_ms:.0f}% of the median"
                    )
    if counts.counted.warning:
        warnings.append(counts.counted.warning)
    if counts.uncounted:
        warnings.append(
            "ops without a FLOP handle (not counted): "
            + ", ".join(f"{k} ×{v}" for k, v in sorted(counts.uncounted.items()))
        )
    return warnings


def _environment(settings: Settings, measured: Measured) -> dict[str, Any]:
    import torch

    return {
        "threads": settings.threads or measured.threads,
        "torch_version": torch.__version__,
        "device_name": torch.cuda.get_device_name(settings.device) if settings.device.startswith("cuda") else "cpu",
        "load_average": {"start": measured.load_start, "end": load_average()},  # 1, 5, 15 min; None: no such OS
    }
