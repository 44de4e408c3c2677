"""What :func:`~attnsurgeon.profiling.profile` returns: the figures of each model, the cost of each
insertion, and the whole run as a :class:`ProfileResult` that the tables, CSV, Markdown and JSON read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..planning.settings import Settings
from .measure import Latency, Memory
from .metrics import METRICS, TABLE_METRICS, Metric, change, difference, interval, nested

__all__ = ["FLOP_CONVENTION", "ModelFigures", "InsertionCost", "ProfileResult"]

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
        """The position (``after layer3.0.conv2`` for an anchor), or what the row replaced
        (``replaces SqueezeExcitation``)."""
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
