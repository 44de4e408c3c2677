"""The figures of both models: parameters and MACs (with each insertion's share), then latency and
memory in eager and in the other runtimes, and in train mode the memory each insertion keeps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.errors import AttnSurgeonError
from ..core.module_state import Snapshot
from ..planning.settings import Settings
from .macs import CountedParts, count_model_macs, insertion_macs
from .result import InsertionCost, ModelFigures

__all__ = ["ProgressFn", "Counts", "Measured", "count_models", "measure_models", "load_average"]

ProgressFn = Callable[[str], None]  # profile's progress: one message per step


# --------------------------------------------------------------------------- parameters and MACs


@dataclass
class Counts:
    """Parameters and MACs of both models, and the MACs and parameters each insertion added."""

    figures: dict[str, ModelFigures]
    insertions: list[InsertionCost]
    unattributed: int  # delta MACs not inside an inserted module
    uncounted: dict[str, int]
    fvcore_default: dict[str, int]
    counted: CountedParts  # the parts fvcore counted, where it cannot count the whole model


def count_models(base: Any, modified: Any, report: Any, size: tuple[int, ...]) -> Counts:
    """Parameters and MACs of ``base`` and ``modified`` (None: the base alone), and each insertion's."""
    import torch

    from ..loading.samples import sample_args
    from ..rewriting.surgery import count_params

    one = sample_args(base, size, 1, generator=torch.Generator().manual_seed(0))
    counted = CountedParts()
    base_flops = count_model_macs(base, one, size, report.target if report else None, counted)
    counts = Counts(
        {"base": ModelFigures(count_params(base), base_flops.macs)},
        [],
        0,
        dict(base_flops.uncounted),
        {"base": base_flops.fvcore_default_macs},
        counted,
    )
    if modified is None:
        return counts
    mod_flops = count_model_macs(modified, one, size, report.target, counted)
    counts.figures["modified"] = ModelFigures(count_params(modified), mod_flops.macs)
    per_insertion = insertion_macs(report, base_flops, mod_flops)
    for ins in report.insertions:
        counts.insertions.append(
            InsertionCost(
                ins.module,
                ins.block,
                ins.stage,
                ins.position,
                ins.attn,
                ins.params - ins.replaced_params,
                per_insertion[ins.module],
                ins.replaced,
                anchor=ins.anchor,
            )
        )
    counts.unattributed = (mod_flops.macs - base_flops.macs) - sum(i.macs for i in counts.insertions)
    for op, calls in mod_flops.uncounted.items():
        counts.uncounted[op] = max(counts.uncounted.get(op, 0), calls)
    counts.fvcore_default["modified"] = mod_flops.fvcore_default_macs
    return counts


# --------------------------------------------------------------------------- latency and memory


@dataclass
class Measured:
    runtimes: list[Any]  # runtimes.RuntimeFigures, one per --runtime other than eager (and precision)
    unattributed_memory: int | None
    threads: int  # torch's threads before the profile set its own
    load_start: list[float] | None


def measure_models(
    base: Any,
    modified: Any,
    report: Any,
    counts: Counts,
    size: tuple[int, ...],
    settings: Settings,
    say: ProgressFn,
    as_built: Snapshot,
) -> Measured:
    """Time and weigh both models (into ``counts.figures``), in eager and the other runtimes (each
    exported as ``as_built`` recorded it, before anything ran it); in train mode, attribute the Δ
    memory to the insertions."""
    import torch

    models = {"base": base}
    if modified is not None:
        # Time and weigh the base through the same fx code path as the modified model: the
        # generated forward frees intermediates earlier than hand-written code, and that must
        # not show up as a saving of the attention block (Δ memory of ECA came out negative).
        from ..graph.parts import base_like

        models = {"base": base_like(base, report.target), "modified": modified}
    figures = counts.figures
    previous_threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    load_start = load_average()
    try:
        if "eager" in settings.runtimes:
            _time_and_measure(models, figures, size, settings, say)
        measured_runtimes = []
        if settings.runtimes != ["eager"]:
            from .runtimes import measure_runtimes

            for m in models.values():
                m.to("cpu").eval()  # exported from the CPU
            measured_runtimes = measure_runtimes(
                models, figures, size, settings, settings.runtimes, settings.quantize, say, as_built
            )
        unattributed_memory = None
        if settings.mode == "train" and modified is not None and counts.insertions:
            say("Attributing memory to the insertions")
            unattributed_memory = _attribute_memory(models["modified"], counts.insertions, figures, size, settings)
    finally:
        torch.set_num_threads(previous_threads)
    return Measured(measured_runtimes, unattributed_memory, previous_threads, load_start)


def _time_and_measure(
    models: dict[str, Any], figures: dict[str, ModelFigures], size: tuple[int, ...], settings: Settings, say: ProgressFn
) -> None:
    import torch

    from ..graph.layout import channels_last_format
    from ..loading.samples import sample_args
    from .measure import make_step

    memory_format = None
    if settings.channels_last:  # channels_last for images, channels_last_3d for video
        memory_format = getattr(torch, channels_last_format(1 + len(size)))
    runnable: dict[str, Any] = {}
    for name, model in models.items():
        model.to(settings.device)
        if settings.channels_last:
            model.to(memory_format=memory_format)
        model.train(settings.mode == "train")
        runnable[name] = torch.compile(model) if settings.compile else model
    try:
        for b in settings.batch_sizes:
            x = sample_args(models["base"], size, b, device=settings.device, memory_format=memory_format)
            steps = {name: make_step(m, x, settings) for name, m in runnable.items()}
            _measure_batch(models, steps, figures, x, b, settings, say)
    finally:
        for model in models.values():
            model.train(False)
            for p in model.parameters():
                p.grad = None


def _measure_batch(
    models: dict[str, Any],
    steps: dict[str, Callable[[], None]],
    figures: dict[str, ModelFigures],
    x: tuple,
    b: int,
    settings: Settings,
    say: ProgressFn,
) -> None:
    """Compile (with ``--compile``), time and weigh both models' steps at batch size ``b``."""
    from .measure import measure_latency, measure_memory, timed_call

    if settings.compile:
        for name, step in steps.items():
            say(f"Compiling {name} (batch {b})")
            seconds = timed_call(step, settings.device)  # the first call compiles
            if figures[name].compile_s is None:
                figures[name].compile_s = seconds
    say(f"Timing batch {b}")
    try:
        latencies = measure_latency(steps, b, settings)
    except ValueError as exc:
        if "more than 1 value per channel" not in str(exc):
            raise
        raise AttnSurgeonError(
            f"--mode train at batch {b}: a BatchNorm in the model normalises a single value per channel (a "
            "pooled (N, C, 1, 1) map, as in sk's and splat's attention, or a 1×1 feature map); "
            "train needs a batch of 2 or more: give --batch-size 2"
        ) from exc
    for name, lat in latencies.items():
        figures[name].latency[b] = lat
    say(f"Measuring memory at batch {b}")
    for name, step in steps.items():
        figures[name].memory[b] = measure_memory(models[name], x, step, settings)


def _attribute_memory(
    model: Any,
    insertions: list[InsertionCost],
    figures: dict[str, ModelFigures],
    size: tuple[int, ...],
    settings: Settings,
) -> int | None:
    """Each insertion's activations kept for backward (``measure.saved_bytes_by_module``) at the first
    batch size; returns what of the Δ peak memory they do not explain."""
    from ..loading.samples import sample_args
    from .measure import saved_bytes_by_module

    b = settings.batch_sizes[0]
    modules = [i.module for i in insertions if i.attn != "none"]
    x = sample_args(model, size, b, device=settings.device)
    saved = saved_bytes_by_module(model, x, modules, settings)
    for i in insertions:
        i.memory_bytes = saved.get(i.module, 0) if i.attn != "none" else None
    base, mod = figures["base"].memory.get(b), figures["modified"].memory.get(b)
    if base is None or mod is None:
        return None
    return (mod.peak_bytes - base.peak_bytes) - sum(saved.values())


def load_average() -> list[float] | None:
    import os

    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # Windows
        return None
