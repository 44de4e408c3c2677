"""One row of a sweep: what it needs (:class:`Row`), the one function that measures it anywhere
(:func:`measure_row`, in this process or in a Ray task), and the row it becomes, measured or failed."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from ..core.errors import AttnSurgeonError
from ..planning.recipes import Configuration

__all__ = ["Row", "measure_row", "forget_loaded", "failed_row"]


@dataclass
class Row:
    """What one row needs to be measured anywhere: in this process, or in a Ray task on another node."""

    model: str
    configuration: Configuration | None  # None: the base model
    name: str
    settings: dict[str, Any]
    input_size: Any
    model_kwargs: dict[str, Any]
    target: Any
    memory_efficient: bool = False  # the configuration's blocks recomputed in backward (the base stays plain)


_loaded: dict[str, Any] = {}  # the last model built in this process and its snapshot, reused by the rows that follow it


def measure_row(job: Row) -> dict[str, Any]:
    """Measure one row (its base measured alongside by :func:`attnsurgeon.profile`) and return it.

    The one function behind every row, local or on Ray; a failure is returned as a failed row.
    """
    from ..graph.layout import resolve_input_size
    from ..profiling import profile

    start = time.perf_counter()
    config = job.configuration
    try:
        loaded = _load(job.model, job.model_kwargs)
        start = time.perf_counter()  # the row's seconds: its measurement, not the (shared) build
        size = resolve_input_size(job.input_size, loaded.input_size)
        if config is None:
            result = profile(loaded, input_size=size, **job.settings)
        else:
            result = profile(
                loaded,
                plan=config.insertions,
                input_size=size,
                target=job.target,
                memory_efficient=job.memory_efficient,
                **job.settings,
            )
        row = _measured_row(job.name, job.model, result)
    except KeyboardInterrupt:
        raise
    except AttnSurgeonError as exc:
        row = failed_row(job.name, job.model, config, str(exc))
    except Exception as exc:  # a bug or a model that breaks: recorded, and the sweep goes on
        row = failed_row(job.name, job.model, config, f"{type(exc).__name__}: {exc}")
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _load(model: str, kwargs: dict[str, Any]) -> Any:
    from ..core.module_state import snapshot
    from ..saving.saved import load_model

    key = json.dumps([model, kwargs], sort_keys=True, default=str)
    if key not in _loaded:
        _loaded.clear()  # one model at a time: a zoo sweep does not keep forty backbones in memory
        loaded = load_model(model, **kwargs)
        _loaded[key] = (loaded, snapshot(loaded.model, getattr(loaded, "base", None)))
    loaded, as_built = _loaded[key]
    as_built.restore()  # each row starts from the model as built, not with what earlier rows' runs cached on it
    return loaded


def forget_loaded() -> None:
    _loaded.clear()


def _measured_row(name: str, model: str, result: Any) -> dict[str, Any]:
    """The row of one configuration: its figures at the first batch size, nested as in ``profile
    --json``, and the base model's, measured alongside in the same run, with the differences."""
    from ..profiling.metrics import TABLE_METRICS, change, difference, interval, nested

    b = result.settings.batch_sizes[0]
    base, fig = result.base, result.modified or result.base
    timed = result.runtimes[0] if result.runtimes and result.runtimes[0].runtime != "eager" else None
    if timed is not None and timed.error:
        raise AttnSurgeonError(f"{timed.label}: {timed.error}")

    mine, theirs = ((timed.modified or timed.base), timed.base) if timed is not None else (None, None)
    read = lambda m, figures, timed_figures: m.read(timed_figures if timed is not None and m.per_batch else figures, b)  # noqa: E731
    changes = [m for m in TABLE_METRICS if m.delta]
    pick = lambda m: (theirs, mine) if timed is not None and m.per_batch else (base, fig)  # noqa: E731
    modified = (timed.modified if timed is not None else None) or result.modified
    ci = {"delta_ci": nested([m for m in changes if m.interval], [b], lambda m, _: interval(m, modified, b))}
    return {
        "name": name,
        "status": "ok",
        "model": model,  # as the sweep names it (the key of the row with its name)
        "batch_size": b,
        **({"runtime": timed.runtime} if timed is not None else {}),
        "insertions": [vars(i) for i in result.insertions],
        **nested(TABLE_METRICS, [b], lambda m, _: read(m, fig, mine)),
        "base": nested(TABLE_METRICS, [b], lambda m, _: read(m, base, theirs)),
        "delta": nested(changes, [b], lambda m, _: difference(read(m, base, theirs), read(m, fig, mine))),
        "delta_percent": nested(changes, [b], lambda m, _: change(m, *pick(m), b)),
        "notes": result.notes,
        **(ci if result.modified is not None else {}),  # the paired 95 % interval of Δ latency and Δ throughput
        "warnings": result.warnings,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def failed_row(name: str, model: str, config: Configuration | None, reason: str) -> dict[str, Any]:
    return {
        "name": name,
        "status": "failed",
        "model": model,
        "reason": reason,
        "insertions": [s.to_dict() for s in config.insertions] if config else [],
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
