"""Where the model will run: eager PyTorch, torch.compile, TorchScript, ONNX Runtime, OpenVINO.

:data:`RUNTIMES` holds one :class:`Runtime` per runtime: its name (the ``--runtime`` value), the
package and pip extra it needs, and how it loads a model (``load``: the model written once per
format through :func:`attnsurgeon.saving.export.export`, which checks the file, then opened in the
runtime) into a :class:`Loaded`: a function from inputs to outputs, for the output check against
eager, and a timed step on a fixed sample input. :func:`measure_runtimes` checks and times every
runtime with :func:`~attnsurgeon.profiling.measure.measure_latency`, base and modified alternating,
exactly as eager is timed. A runtime that cannot be measured (its package missing, the model not
exportable, its outputs differing from eager's) gives a row with the reason instead of figures;
the other rows are measured all the same.

``eager`` has no ``load``: its figures are the ones :func:`attnsurgeon.profile` has always measured.
"""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import AttnSurgeonError
from ..core.module_state import Snapshot
from ..planning.settings import Settings
from .measure import Latency, Memory
from .metrics import METRICS, change, difference, interval, nested

TOLERANCE = 1e-3
"""A float runtime agrees with eager when max |runtime − eager| ≤ TOLERANCE × max(1, max |eager|)."""
CALIBRATION_BATCHES = 4  # sample batches ONNX Runtime's static quantization calibrates its int8 ranges on
PRECISIONS = ("float32", "int8")


@dataclass
class Loaded:
    """A model loaded in a runtime."""

    run: Callable[..., list]  # torch inputs -> output tensors (the output check)
    step: Callable[[tuple], Callable[[], Any]]  # torch inputs -> one inference call on them, as timed (result unused)
    memory: Callable[[tuple, Callable[[], None]], Memory] | None = None  # (inputs, step) -> peak memory, where known


@dataclass(frozen=True)
class Runtime:
    name: str  # the --runtime value
    title: str  # how messages name it
    load: (
        Callable[[Any, Exports, str, Settings, str], Loaded] | None
    )  # (model, exports, base/modified, settings, precision)
    requires: tuple[str, ...] = ()  # modules it imports beyond attnsurgeon's own dependencies...
    extra: str | None = None  # ...and the pip extra that installs them
    devices: tuple[str, ...] = ("cpu",)  # device types it is measured on here
    quantizes: bool = False  # --quantize int8 gives it a second, int8 row

    def missing(self) -> str | None:
        """Why it cannot run here (a package is not installed), in one line; None if it can."""
        for module in self.requires:
            try:
                importlib.import_module(module)
            except ImportError:
                return f"{self.title} needs the {module} package: pip install 'attnsurgeon[{self.extra}]'"
        return None


@dataclass
class Timed:
    """What a runtime measured of one model, read by the per-batch metrics of ``METRICS``."""

    latency: dict[int, Latency] = field(default_factory=dict)
    memory: dict[int, Memory] = field(default_factory=dict)


@dataclass
class RuntimeFigures:
    """One row of ``profile --runtime``: a runtime (at a precision) and its figures, or why it has none."""

    runtime: str
    precision: str = "float32"
    base: Any = None  # Timed (ModelFigures for eager)
    modified: Any = None
    error: str | None = None  # why there are no figures: refused, not exported, outputs differ, failed
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # per model: vs eager (int8: vs its float self)
    output_scale: float | None = None  # max |eager output|, to read the differences against

    @property
    def status(self) -> str:
        return "ok" if self.error is None else "failed"

    @property
    def label(self) -> str:
        return self.runtime if self.precision == "float32" else f"{self.runtime} {self.precision}"

    def rows(self, batch_sizes: list[int]) -> list[tuple]:
        """(metric, batch size, base, modified, delta, delta %, interval) of the per-batch table metrics it
        measured, as :meth:`ProfileResult.rows` gives them (the interval from the paired rounds)."""
        out = []
        for metric in (m for m in METRICS if m.per_batch and m.table):
            for b in batch_sizes:
                base = metric.read(self.base, b) if self.base is not None else None
                mod = metric.read(self.modified, b) if self.modified is not None else None
                if base is None and mod is None:
                    continue
                delta, pct = (
                    (difference(base, mod), change(metric, self.base, self.modified, b))
                    if metric.delta
                    else (None, None)
                )
                out.append((metric, b, base, mod, delta, pct, metric.ci(self.modified, b) if metric.delta else None))
        return out

    def check(self) -> str:
        """The output check in a few words: the largest difference against eager (int8: the error)."""
        if not self.max_abs_diff:
            return "-"
        worst = max(self.max_abs_diff.values())
        if self.precision == "float32":
            return f"ok (max abs diff {worst:.2g})"
        scale = self.output_scale or 1.0
        return f"error {worst:.3g} ({100 * worst / scale:.1f}% of output scale)"

    def to_dict(self, batch_sizes: list[int]) -> dict[str, Any]:
        timed = [m for m in METRICS if m.per_batch]
        changes = [m for m in timed if m.delta]
        read = lambda fig: lambda m, b: m.read(fig, b) if fig is not None else None  # noqa: E731
        both = self.modified is not None and self.base is not None
        return {
            "runtime": self.runtime,
            "precision": self.precision,
            "status": self.status,
            "reason": self.error,
            "base": nested(timed, batch_sizes, read(self.base)),
            "modified": nested(timed, batch_sizes, read(self.modified)) if self.modified is not None else None,
            "delta": nested(
                changes, batch_sizes, lambda m, b: difference(m.read(self.base, b), m.read(self.modified, b))
            )
            if both
            else None,
            "delta_percent": nested(changes, batch_sizes, lambda m, b: change(m, self.base, self.modified, b))
            if both
            else None,
            "delta_ci": nested(
                [m for m in changes if m.interval], batch_sizes, lambda m, b: interval(m, self.modified, b)
            )
            if both
            else None,
            "output_check": {
                "against": "eager float32" if self.precision == "float32" else "its float32 self (eager)",
                "max_abs_diff": self.max_abs_diff,
                "output_scale": self.output_scale,
                "tolerance": TOLERANCE if self.precision == "float32" else None,
            },
        }


def check_runtimes(names: list[str], settings: Settings, quantize: str | None) -> None:
    """Refuse, before any model is built, an unknown runtime or settings that only eager takes."""
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown or not names:
        raise AttnSurgeonError(f"unknown runtime '{', '.join(unknown)}': choose from {', '.join(RUNTIMES)}")
    others = [n for n in names if n != "eager"]
    if others:
        for what, given in (
            ("--mode train", settings.mode == "train"),
            (f"--dtype {settings.dtype}", settings.dtype != "float32"),
            ("--channels-last", settings.channels_last),
        ):
            if given:
                raise AttnSurgeonError(
                    f"{what} is measured in eager PyTorch only; --runtime {', '.join(others)} "
                    "runs float32 inference: drop it or profile with --runtime eager"
                )
    if quantize is not None:
        if quantize not in PRECISIONS[1:]:
            raise AttnSurgeonError(f"unknown --quantize '{quantize}': choose int8")
        if not any(RUNTIMES[n].quantizes for n in names):
            raise AttnSurgeonError(
                "--quantize int8 uses ONNX Runtime's static quantization: add onnxruntime to --runtime"
            )


class Exports:
    """Each model written once per format, through :func:`attnsurgeon.saving.export.export` (which
    checks the file against the model), into one temporary folder; a failure is kept and raised again."""

    def __init__(self, folder: Path, size: tuple[int, ...], batch_sizes: list[int], as_built: Snapshot) -> None:
        self.folder, self.size, self.batch_sizes, self.as_built = folder, size, batch_sizes, as_built
        self._done: dict[tuple[str, str], Path | AttnSurgeonError] = {}

    def path(self, name: str, model: Any, fmt: str) -> Path:
        from ..saving.export import FORMATS, export

        def write() -> Path:
            path = self.folder / f"{name}{FORMATS[fmt].extensions[0]}"
            # one batch size: a static batch; several: a dynamic one (export falls back to static and says why)
            export(
                model,
                path,
                format=fmt,
                input_size=self.size,
                batch_size=self.batch_sizes[0],
                dynamic_batch=len(self.batch_sizes) > 1,
                force=True,
            )
            return path

        return self._once((name, fmt), name, write)

    def quantized(self, name: str, model: Any) -> Path:
        from ..loading.samples import sample_args
        from ..saving.export import quantize_onnx

        def write() -> Path:
            import torch

            source = self.path(name, model, "onnx")
            gen = torch.Generator().manual_seed(1)  # other batches than the timed and checked ones
            batches = [
                sample_args(model, self.size, self.batch_sizes[0], generator=gen) for _ in range(CALIBRATION_BATCHES)
            ]
            target = self.folder / f"{name}.int8.onnx"
            quantize_onnx(source, target, batches)
            return target

        return self._once((name, "onnx-int8"), name, write)

    def _once(self, key: tuple[str, str], name: str, write: Callable[[], Path]) -> Path:
        """``write()``'s file the first time, the same file after; a failure is kept and raised again."""
        if key not in self._done:
            try:
                with self.as_built.as_taken():  # what running the model cached on it (YOLO's anchors) is not exported
                    self._done[key] = write()
            except AttnSurgeonError as exc:
                self._done[key] = AttnSurgeonError(f"{name} model: {exc}")
        done = self._done[key]
        if isinstance(done, AttnSurgeonError):
            raise done
        return done


# --------------------------------------------------------------------------- the runtimes


def _threads(settings: Settings) -> int:
    import torch

    return settings.threads or torch.get_num_threads()


def _torch_memory(model: Any, settings: Settings) -> Callable[[tuple, Callable[[], None]], Memory]:
    """Peak tensor memory as eager measures it: the runtime runs on torch's allocator."""
    from .measure import measure_memory

    return lambda x, step: measure_memory(model, x, step, settings)


def _load_compile(model: Any, exports: Exports, name: str, settings: Settings, precision: str) -> Loaded:
    import torch

    compiled = torch.compile(model)

    def run(*x: Any) -> list:
        from ..loading.samples import flatten_outputs

        with torch.inference_mode():
            return flatten_outputs(compiled(*x))

    return Loaded(run, lambda x: lambda: run(*x), _torch_memory(model, settings))


def _load_torchscript(model: Any, exports: Exports, name: str, settings: Settings, precision: str) -> Loaded:
    from ..saving.export import FORMATS

    fmt = FORMATS["ts"]
    forward = fmt.reader(exports.path(name, model, fmt.name), model)  # under no_grad

    def run(*x: Any) -> list:
        from ..loading.samples import flatten_outputs

        return flatten_outputs(forward(*x))

    return Loaded(run, lambda x: lambda: forward(*x), _torch_memory(model, settings))


def _load_onnxruntime(model: Any, exports: Exports, name: str, settings: Settings, precision: str) -> Loaded:
    import onnxruntime as ort
    import torch

    from ..saving.export import onnx_session

    providers = ("CPUExecutionProvider",)
    if settings.device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise AttnSurgeonError("this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
        providers = ("CUDAExecutionProvider",)
    path = exports.quantized(name, model) if precision == "int8" else exports.path(name, model, "onnx")
    session = onnx_session(path, _threads(settings), providers)
    names = [i.name for i in session.get_inputs()]

    def feed(x: tuple) -> dict:
        return {n: t.detach().cpu().numpy() for n, t in zip(names, x, strict=False)}  # as many as the graph kept

    def run(*x: Any) -> list:
        return [torch.from_numpy(o) for o in session.run(None, feed(x))]

    def step(x: tuple) -> Callable[[], None]:
        inputs = feed(x)  # made once: the timed call is session.run alone
        return lambda: session.run(None, inputs)

    return Loaded(run, step)


def _load_openvino(model: Any, exports: Exports, name: str, settings: Settings, precision: str) -> Loaded:
    import numpy as np
    import openvino as ov
    import torch

    config = {
        "INFERENCE_NUM_THREADS": _threads(settings),
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
    }  # not bf16 where the CPU has it: the float model is what is compared
    compiled = ov.Core().compile_model(str(exports.path(name, model, "onnx")), "CPU", config)
    request = compiled.create_infer_request()

    def run(*x: Any) -> list:
        result = request.infer([t.detach().cpu().numpy() for t in x])
        return [torch.from_numpy(np.array(result[o])) for o in compiled.outputs]

    def step(x: tuple) -> Callable[[], None]:
        inputs = [t.detach().cpu().numpy() for t in x]
        return lambda: request.infer(inputs)

    return Loaded(run, step)


RUNTIMES: dict[str, Runtime] = {
    r.name: r
    for r in (
        Runtime("eager", "eager PyTorch", None, devices=("cpu", "cuda", "mps")),
        Runtime("compile", "torch.compile", _load_compile),
        Runtime("torchscript", "TorchScript", _load_torchscript),
        Runtime(
            "onnxruntime",
            "ONNX Runtime",
            _load_onnxruntime,
            ("onnx", "onnxscript", "onnxruntime"),
            "onnx",
            devices=("cpu", "cuda"),
            quantizes=True,
        ),  # cuda: the CUDA provider, fed from the CPU
        Runtime("openvino", "OpenVINO", _load_openvino, ("onnx", "onnxscript", "openvino"), "openvino"),
    )
}
"""Every runtime ``profile --runtime`` measures in, by name."""


def measure_runtimes(
    models: dict[str, Any],
    eager: dict[str, Any],
    size: tuple[int, ...],
    settings: Settings,
    runtimes: list[str],
    quantize: str | None,
    say: Callable[[str], None],
    as_built: Snapshot,
) -> list[RuntimeFigures]:
    """One :class:`RuntimeFigures` per runtime (and per precision, with ``quantize``), in order;
    ``eager`` holds the figures profile measured in eager PyTorch; ``as_built``, the models' modules
    before anything ran them: each is exported as it was built."""
    from ..core.native import quiet_torch_warnings

    rows = []
    with tempfile.TemporaryDirectory(prefix="attnsurgeon-runtimes-") as folder, quiet_torch_warnings():
        exports = Exports(Path(folder), size, settings.batch_sizes, as_built)
        for name in runtimes:
            runtime = RUNTIMES[name]
            if runtime.load is None:
                rows.append(RuntimeFigures(name, base=eager["base"], modified=eager.get("modified")))
                continue
            floats = None
            for precision in PRECISIONS if quantize and runtime.quantizes else PRECISIONS[:1]:
                row = _measure(runtime, runtime.load, precision, models, exports, size, settings, say)
                if precision != "float32" and floats is not None and floats.error and not row.error:
                    row.error = f"not compared: the float32 row failed ({floats.error})"
                floats = floats or row
                rows.append(row)
    return rows


def _measure(
    runtime: Runtime,
    load: Callable[[Any, Exports, str, Settings, str], Loaded],  # runtime.load, known not None (not eager)
    precision: str,
    models: dict[str, Any],
    exports: Exports,
    size: tuple[int, ...],
    settings: Settings,
    say: Callable[[str], None],
) -> RuntimeFigures:
    import torch

    from ..loading.samples import max_abs_diff, output_scale, sample_args
    from .measure import measure_latency

    row = RuntimeFigures(runtime.name, precision)
    row.error = runtime.missing()
    device = torch.device(settings.device).type
    if row.error is None and device not in runtime.devices:
        row.error = f"{runtime.title} is measured on {' or '.join(runtime.devices)} here, not {settings.device}"
    if row.error is not None:
        return row
    timed = {name: Timed() for name in models}
    try:
        say(f"Exporting to {runtime.title}" + (f" ({precision})" if precision != "float32" else ""))
        loaded = {name: load(model, exports, name, settings, precision) for name, model in models.items()}
        for b in settings.batch_sizes:
            x = sample_args(models["base"], size, b)  # on the CPU: the models are exported from it
            for name, model in models.items():
                with torch.inference_mode():
                    reference = model(*x)
                diff = max_abs_diff(loaded[name].run(*x), reference)  # the first call: compiles, warms up
                scale = max(1.0, output_scale(reference))
                row.max_abs_diff[name] = max(row.max_abs_diff.get(name, 0.0), diff)
                row.output_scale = max(row.output_scale or 0.0, scale)
                if not diff <= (TOLERANCE * scale if precision == "float32" else float("inf")):  # NaN too
                    row.error = (
                        f"{name} outputs differ from eager at batch {b}: max abs diff {diff:.3g} exceeds "
                        f"{TOLERANCE:g} × {scale:.3g}; not timed"
                    )
                    return row
            steps = {name: loaded[name].step(x) for name in models}
            say(f"Timing batch {b} in {runtime.title}")
            for name, latency in measure_latency(steps, b, settings).items():
                timed[name].latency[b] = latency
            for name, step in steps.items():
                memory = loaded[name].memory
                if memory is not None:
                    timed[name].memory[b] = memory(x, step)
    except AttnSurgeonError as exc:
        row.error = str(exc)
        return row
    except Exception as exc:  # noqa: BLE001  (a runtime fails in its own ways; the other rows go on)
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        row.error = f"{runtime.title} failed: {type(exc).__name__}: {lines[0] if lines else ''}"
        return row
    row.base, row.modified = timed["base"], timed.get("modified")
    return row
