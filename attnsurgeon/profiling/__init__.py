"""What an insertion costs: parameters, MACs/FLOPs, latency and peak memory, base vs modified.

:func:`profile` loads the model once, applies the insertions with :func:`attnsurgeon.apply_plan`
(the same code path as ``insert``), and measures both models in one run, side by side:

* parameters from ``model.parameters()`` (shared tensors once), split per insertion;
* MACs with fvcore plus element-wise handles (``profiling.flops``), FLOPs = 2 × MACs, with a
  per-insertion breakdown whose rows sum exactly to the total delta;
* latency in paired, interleaved rounds (warm-up until stable, CUDA synchronisation, median and IQR),
  and for each Δ latency the median of the per-round ratios with its 95 % interval; throughput in images/s;
* peak tensor memory of one step (inference, or forward+backward with ``mode='train'``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..core.errors import AttnSurgeonError
from .macs import count_model_macs, insertion_macs
from .measure import Latency, Memory
from .metrics import METRICS, TABLE_METRICS, Metric, change, difference, interval, nested
from ..planning.settings import Settings

FLOP_CONVENTION = (
    "MACs: one multiply-add in a conv/linear/matmul counts 1 (fvcore); element-wise ops count 1 per element, "
    "reductions 1 per input element, pooling its window per output element. FLOPs = 2 x MACs. "
    "Per image, forward pass only (whatever the batch size and mode)."
)


@dataclass
class ModelFigures:
    params: int
    macs: int
    latency: dict[int, Latency] = field(default_factory=dict)
    memory: dict[int, Memory] = field(default_factory=dict)
    compile_s: float | None = None

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def to_dict(self, batch_sizes: list[int]) -> dict[str, Any]:
        return nested(METRICS, batch_sizes, lambda m, b: m.read(self, b))


@dataclass
class InsertionCost:
    module: str
    block: str
    stage: int
    position: str
    attn: str
    params: int  # with ``replaced``: the new module's less the old one's (what the swap added)
    macs: int
    replaced: str | None = None  # class of the model's own attention module this one replaced
    memory_bytes: int | None = None  # --mode train: activations it keeps for backward that no base module keeps
    anchor: str | None = None  # the module an 'after'/'before' insertion is anchored to

    @property
    def where(self) -> str:
        """The position (``after layer3.0.conv2`` for an anchor), or what the row replaced (``replaces SqueezeExcitation``)."""
        if not self.replaced:
            return f"{self.position} {self.anchor}" if self.anchor else self.position
        if self.position == "conv":  # a conv block (sk, splat) in a convolution's place
            return f"conv: replaces {self.replaced}"
        return f"{'removes' if self.attn == 'none' else 'replaces'} {self.replaced}"


@dataclass
class ProfileResult:
    model: str
    source: str
    input_size: tuple[int, ...]
    settings: Settings
    base: ModelFigures
    modified: ModelFigures | None
    insertions: list[InsertionCost]
    unattributed_macs: int  # delta MACs not inside an inserted module (0 unless the rewrite moved work)
    uncounted_ops: dict[str, int]
    fvcore_default_macs: dict[str, int]
    warnings: list[str]
    environment: dict[str, Any]
    unattributed_memory_bytes: int | None = (
        None  # --mode train: Δ peak memory (first batch size) less the per-insertion rows
    )
    notes: list[str] = field(
        default_factory=list
    )  # the insertion's notes (what it skipped, the parts traced), as insert says them
    runtimes: list[Any] = field(default_factory=list)  # runtimes.RuntimeFigures, one per --runtime (and precision)

    def rows(self) -> list[tuple[Metric, int, Any, Any, float | None, float | None, tuple | None]]:
        """(metric, batch size, base, modified, delta, delta %, interval) for tables, CSV and Markdown;
        the interval is (Δ %, low %, high %) of the paired rounds (latency, throughput), else None."""
        out = []
        m = self.modified
        for metric in TABLE_METRICS:
            for b in self.settings.batch_sizes if metric.per_batch else self.settings.batch_sizes[:1]:
                base = metric.read(self.base, b)
                mod = metric.read(m, b) if m else None
                if metric.per_batch and base is None and mod is None:  # not measured in eager (--runtime without it)
                    continue
                delta, pct = (difference(base, mod), change(metric, self.base, m, b)) if metric.delta else (None, None)
                out.append((metric, b, base, mod, delta, pct, metric.ci(m, b) if metric.delta else None))
        return out

    def delta(self) -> dict[str, Any] | None:
        if self.modified is None:
            return None
        changes = [m for m in METRICS if m.delta]
        return nested(
            changes, self.settings.batch_sizes, lambda m, b: difference(m.read(self.base, b), m.read(self.modified, b))
        )

    def delta_percent(self) -> dict[str, Any] | None:
        """Δ % per metric; for latency and throughput the median of the paired per-round ratios."""
        if self.modified is None:
            return None
        changes = [m for m in METRICS if m.delta]
        return nested(changes, self.settings.batch_sizes, lambda m, b: change(m, self.base, self.modified, b))

    def delta_ci(self) -> dict[str, Any] | None:
        """The 95 % interval of each Δ % that has one: ``{"low", "high", "confidence", "rounds", "resolved"}``."""
        if self.modified is None:
            return None
        return nested(
            [m for m in METRICS if m.interval], self.settings.batch_sizes, lambda m, b: interval(m, self.modified, b)
        )

    def to_dict(self) -> dict[str, Any]:
        bs = self.settings.batch_sizes
        return {
            "model": self.model,
            "source": self.source,
            "input_size": list(self.input_size),
            "base": self.base.to_dict(bs),
            "modified": self.modified.to_dict(bs) if self.modified else None,
            "delta": self.delta(),
            "delta_percent": self.delta_percent(),
            "delta_ci": self.delta_ci(),
            "insertions": [vars(i) for i in self.insertions],
            "unattributed_macs": self.unattributed_macs,
            "uncounted_ops": self.uncounted_ops,
            "fvcore_default_macs": self.fvcore_default_macs,
            "flop_convention": FLOP_CONVENTION,
            "settings": {**self.settings.to_dict(), "input_size": list(self.input_size), **self.environment},
            "notes": self.notes,
            "warnings": self.warnings,
            "unattributed_memory_bytes": self.unattributed_memory_bytes,
            "runtimes": [r.to_dict(bs) for r in self.runtimes],
        }


ProgressFn = Callable[[str], None]


def profile(
    model: Any,
    attn: str | None = None,
    position: str | None = None,
    stages: Iterable[int] | None = None,
    blocks: Iterable[str] | str | None = None,
    init: str = "default",
    *,
    plan: list | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_sizes: Iterable[int] | int = (1,),
    input_size: Any = None,
    mode: str = "inference",
    threads: int | None = None,
    channels_last: bool = False,
    compile: bool = False,
    min_run_time: float = 1.0,
    max_run_time: float = 4.0,
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
    import torch

    from ..loading.models import is_saved
    from ..saving.saved import open_model
    from ..graph.layout import resolve_input_size
    from ..rewriting.apply import apply_plan, make_spec
    from ..rewriting.surgery import count_params
    from ..loading.samples import sample_args
    from ..planning.settings import check_settings

    from ..core.module_state import snapshot
    from ..core.native import quiet_torch_logs

    quiet_torch_logs()
    say = progress or (lambda message: None)
    settings = check_settings(
        Settings(
            device,
            dtype,
            list([batch_sizes] if isinstance(batch_sizes, int) else batch_sizes),
            mode,
            threads,
            channels_last,
            compile,
            min_run_time,
            max_run_time,
            target_ci,
            list(dict.fromkeys([runtimes] if isinstance(runtimes, str) else runtimes)),
            quantize,
        )
    )
    from .runtimes import check_runtimes

    check_runtimes(settings.runtimes, settings, settings.quantize)
    specs = list(plan or [])
    if attn is not None:
        specs.append(make_spec(attn, position, stages, blocks, init, replace=replace, **block_options))
    elif block_options and any(v is not None for v in block_options.values()):
        raise AttnSurgeonError("block options were given without --attn")
    elif replace:
        raise AttnSurgeonError(
            "--replace needs --attn: the block to put in place of the model's attention, or none to remove it"
        )

    say("Loading the model")
    if is_saved(model):  # what a saved modified model cannot take, said before loading it
        if specs:
            raise AttnSurgeonError("a saved model carries its own insertions; profile it without --attn")
        if pretrained or weights is not None or model_args:
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
    loaded = open_model(model, pretrained=pretrained, weights=weights, weights_key=weights_key, **(model_args or {}))
    spec, source = loaded.spec, loaded.source
    size = resolve_input_size(input_size, loaded.input_size)
    _check_mode(loaded.model, settings.mode)  # settings the model cannot take, before any insertion or measurement
    if settings.channels_last:
        from ..graph.layout import channels_last_format

        channels_last_format(1 + len(size))  # before any measurement: 1-D inputs have no such format
    if loaded.saved:  # the saved modified model and its base, rebuilt from the recipe with the saved weights
        base, modified = loaded.base, loaded.model
        report = modified.attnsurgeon_report
    else:
        base = loaded.model
        modified, report = None, None
        if specs or memory_efficient:
            say("Inserting" if specs else "Making the attention memory-efficient")
            modified, report = apply_plan(
                loaded, specs, input_size=size, target=target, memory_efficient=memory_efficient
            )
        elif target is not None:
            raise AttnSurgeonError("--target chooses where blocks go: it needs --attn")

    as_built = snapshot(base, modified)  # before anything runs them: a forward may cache on its module (YOLO)
    say("Counting FLOPs")
    one = sample_args(base, size, 1, generator=torch.Generator().manual_seed(0))
    counted: list[str] = []  # the parts fvcore counted, where it cannot count the whole model
    base_flops = count_model_macs(base, one, size, report.target if report else None, counted)
    figures = {"base": ModelFigures(count_params(base), base_flops.macs)}
    models = {"base": base}
    insertions: list[InsertionCost] = []
    unattributed = 0
    uncounted = dict(base_flops.uncounted)
    fvcore_default = {"base": base_flops.fvcore_default_macs}
    if modified is not None:
        mod_flops = count_model_macs(modified, one, size, report.target, counted)
        figures["modified"] = ModelFigures(count_params(modified), mod_flops.macs)
        models["modified"] = modified
        per_insertion = insertion_macs(report, base_flops, mod_flops)
        for ins in report.insertions:
            macs = per_insertion[ins.module]
            insertions.append(
                InsertionCost(
                    ins.module,
                    ins.block,
                    ins.stage,
                    ins.position,
                    ins.attn,
                    ins.params - ins.replaced_params,
                    macs,
                    ins.replaced,
                    anchor=ins.anchor,
                )
            )
        unattributed = (mod_flops.macs - base_flops.macs) - sum(i.macs for i in insertions)
        for op, calls in mod_flops.uncounted.items():
            uncounted[op] = max(uncounted.get(op, 0), calls)
        fvcore_default["modified"] = mod_flops.fvcore_default_macs

    if modified is not None:
        # Time and weigh the base through the same fx code path as the modified model: the
        # generated forward frees intermediates earlier than hand-written code, and that must
        # not show up as a saving of the attention block (Δ memory of ECA came out negative).
        from ..graph.parts import base_like

        models["base"] = base_like(base, report.target)

    previous_threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    load_start = _load_average()
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
        if settings.mode == "train" and modified is not None and insertions:
            say("Attributing memory to the insertions")
            unattributed_memory = _attribute_memory(models["modified"], insertions, figures, size, settings)
    finally:
        torch.set_num_threads(previous_threads)

    notes = list(report.notes if report is not None else loaded.notes)  # what loading and the insertion did, say
    warnings = []  # what the measurement doubts
    for name, fig in figures.items():
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
    if counted:
        warnings.append(counted[0])
    if uncounted:
        warnings.append(
            "ops without a FLOP handle (not counted): " + ", ".join(f"{k} ×{v}" for k, v in sorted(uncounted.items()))
        )
    environment = {
        "threads": settings.threads or previous_threads,
        "torch_version": torch.__version__,
        "device_name": torch.cuda.get_device_name(settings.device) if settings.device.startswith("cuda") else "cpu",
        "load_average": {"start": load_start, "end": _load_average()},  # 1, 5, 15 min; None where the OS has none
    }
    return ProfileResult(
        spec,
        source,
        size,
        settings,
        figures["base"],
        figures.get("modified"),
        insertions,
        unattributed,
        uncounted,
        fvcore_default,
        warnings,
        environment,
        unattributed_memory,
        notes,
        measured_runtimes,
    )


def _load_average() -> list[float] | None:
    import os

    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # Windows
        return None


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


def _check_mode(model: Any, mode: str) -> None:
    from ..loading.samples import takes_targets

    if mode == "train" and takes_targets(model):
        raise AttnSurgeonError(
            f"{type(model).__name__} computes its training loss from labelled targets (boxes, labels), which a "
            "profile with random inputs does not have: profile it with --mode inference"
        )


def _time_and_measure(
    models: dict[str, Any], figures: dict[str, ModelFigures], size: tuple[int, ...], settings: Settings, say: ProgressFn
) -> None:
    import torch

    from .measure import make_step, measure_latency, measure_memory, timed_call

    from ..graph.layout import channels_last_format
    from ..loading.samples import sample_args

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
    finally:
        for model in models.values():
            model.train(False)
            for p in model.parameters():
                p.grad = None
