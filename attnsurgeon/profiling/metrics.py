"""The metric registry: every figure a profile reports, declared once (torch-free).

Tables, ``--json``, CSV, Markdown and sweep rows all iterate over :data:`METRICS`; a new metric is
one measurement stored on :class:`~attnsurgeon.profiling.ModelFigures` and one entry here. A
metric's ``key`` is its place in the JSON objects (``latency_ms.median`` nests as
``{"latency_ms": {"median": …}}``, in ``profile --json`` and in sweep rows alike).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    key: str  # the JSON path, '.'-separated
    label: str  # what a table calls it
    read: Callable[[Any, int], Any]  # (ModelFigures, batch size) -> value, None where not measured
    unit: str = ""  # shown after the number
    scale: float = 1.0  # the number shown is value / scale
    digits: int = 3
    thousands: bool = True
    per_batch: bool = False  # measured at every batch size (latency) or once (params)
    delta: bool = True  # a difference means something (not for a spread or a run count)
    table: bool = True  # in tables, CSV, Markdown and sweep rows (False: the JSON objects only)
    summary: bool = False  # a column of the sweep's one-line-per-configuration table
    # (modified figures, batch size) -> the paired interval of the change (intervals.RatioInterval), None where none
    interval: Callable[[Any, int], Any] | None = None
    inverse: bool = False  # a rate (throughput): its change is 1 / the latency ratio

    def ci(self, fig: Any, batch: int) -> tuple[float, float | None, float | None] | None:
        """(change %, low %, high %) of this figure from the paired rounds, or None (no interval kept)."""
        r = self.interval(fig, batch) if self.interval is not None and fig is not None else None
        return r.percent(self.inverse) if r is not None else None

    def format(self, value: float | None, signed: bool = False, unit: bool = True) -> str:
        if value is None:
            return "-"
        spec = f"{'+' if signed else ''}{',' if self.thousands else ''}.{self.digits}f"
        return f"{value / self.scale:{spec}}" + (f" {self.unit}" if self.unit and unit else "")

    def row_label(self, batch: int | None = None) -> str:
        return f"{self.label} (bs={batch})" if self.per_batch and batch is not None else self.label

    @property
    def column(self) -> str:
        """Its name as one flat column (CSV): ``latency_ms_median``."""
        return self.key.replace(".", "_")


def _latency(attr: str) -> Callable[[Any, int], Any]:
    return lambda fig, b: getattr(fig.latency[b], attr) if b in fig.latency else None


def _vs_base(fig: Any, b: int) -> Any:
    return fig.latency[b].vs_base if b in fig.latency else None


def _memory(attr: str) -> Callable[[Any, int], Any]:
    return lambda fig, b: getattr(fig.memory[b], attr) if b in fig.memory else None


METRICS: tuple[Metric, ...] = (
    Metric("params", "params", lambda fig, b: fig.params, digits=0, summary=True),
    Metric("macs", "MACs", lambda fig, b: fig.macs, unit="G", scale=1e9, digits=4, thousands=False, summary=True),
    Metric("flops", "FLOPs", lambda fig, b: fig.flops, unit="G", scale=1e9, digits=4, thousands=False, summary=True),
    Metric(
        "latency_ms.median",
        "latency",
        _latency("median_ms"),
        unit="ms",
        per_batch=True,
        summary=True,
        interval=_vs_base,
    ),
    Metric("latency_ms.iqr", "latency IQR", _latency("iqr_ms"), unit="ms", per_batch=True, delta=False),
    Metric("latency_ms.runs", "timed runs", _latency("runs"), per_batch=True, delta=False, table=False, digits=0),
    Metric(
        "throughput",
        "throughput",
        _latency("throughput"),
        unit="img/s",
        per_batch=True,
        digits=1,
        interval=_vs_base,
        inverse=True,
    ),
    Metric(
        "peak_memory_bytes",
        "peak memory",
        _memory("peak_bytes"),
        unit="MiB",
        scale=2**20,
        digits=2,
        per_batch=True,
        summary=True,
    ),
    Metric(
        "step_peak_memory_bytes",
        "step peak memory",
        _memory("step_peak_bytes"),
        unit="MiB",
        scale=2**20,
        digits=2,
        per_batch=True,
        delta=False,
        table=False,
    ),
    Metric("compile_s", "compile time", lambda fig, b: fig.compile_s, unit="s", digits=1, delta=False, table=False),
)
TABLE_METRICS = tuple(m for m in METRICS if m.table)


def percent(base: float | None, value: float | None) -> float | None:
    if base is None or value is None or not base:
        return None
    return 100.0 * (value - base) / base


def change(metric: Metric, base: Any, fig: Any, batch: int) -> float | None:
    """Δ % of ``metric`` from ``base`` to ``fig`` (ModelFigures): the median of the paired per-round
    ratios where the rounds were kept (latency, throughput), else the ratio of the two figures."""
    ci = metric.ci(fig, batch)
    return ci[0] if ci is not None else percent(metric.read(base, batch), metric.read(fig, batch) if fig else None)


def interval(metric: Metric, fig: Any, batch: int) -> dict | None:
    """``delta_ci``'s entry: ``{"low", "high", "confidence", "rounds", "resolved"}`` in percent, or None."""
    r = metric.interval(fig, batch) if metric.interval is not None and fig is not None else None
    return r.to_dict(metric.inverse) if r is not None else None


def difference(base: float | None, value: float | None) -> float | None:
    return None if base is None or value is None else value - base


def put(target: dict, key: str, value: Any) -> None:
    """``put(d, 'latency_ms.median', 3.2)`` -> ``d['latency_ms']['median'] = 3.2``."""
    *parents, leaf = key.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value


def get(source: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(source, dict) or part not in source:
            return None
        source = source[part]
    return source


def nested(metrics: Iterable[Metric], batch_sizes: list[int], value: Callable[[Metric, int], Any]) -> dict[str, Any]:
    """One object holding ``value(metric, batch)`` at each metric's key, None values left out.

    With several batch sizes a per-batch figure is keyed by batch size under its first key part:
    ``{"latency_ms": {"1": {"median": …}, "32": {…}}}``; with one, ``{"latency_ms": {"median": …}}``.
    """
    out: dict[str, Any] = {}
    for m in metrics:
        for b in batch_sizes if m.per_batch else batch_sizes[:1]:
            v = value(m, b)
            if v is None:
                continue
            key = m.key
            if m.per_batch and len(batch_sizes) > 1:
                head, _, rest = key.partition(".")
                key = f"{head}.{b}" + (f".{rest}" if rest else "")
            put(out, key, rounded(v))
    return out


def rounded(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value
