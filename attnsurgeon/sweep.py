"""Sweeps: profile many configurations of one model, one row each, like the papers' tables.

Every row goes through :func:`attnsurgeon.profile` (base and modified measured side by side), so a
sweep is the same measurement as ``attnsurgeon profile``, repeated. The output folder holds:

* ``sweep.json`` — what is being swept (model, settings, configurations), checked on ``--resume``;
* ``rows.jsonl`` — one line per finished row, appended and flushed as soon as it is measured;
* ``results.csv`` / ``results.json`` — every finished row, rewritten (atomically) after each one;
* ``plot.png`` — latency against parameters, one labelled point per configuration.

An interrupted sweep (Ctrl-C, a crash, a kill) keeps every finished row; ``resume=True`` measures
only the rest. A configuration that fails (a position the model lacks) is recorded as a failed row
with its reason, and the sweep goes on.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ._io import atomic_path, write_text_atomic
from .errors import AttnSurgeonError
from .recipes import Configuration

SWEEP_FILE = "sweep.json"
ROWS_FILE = "rows.jsonl"
BASE = "base"
def _csv_columns() -> list[str]:
    """name, status, then per metric its value, delta, delta % and the base's value; then the rest."""
    from .profiling.metrics import TABLE_METRICS

    columns = ["name", "status"]
    for m in TABLE_METRICS:
        columns += [m.column] + ([f"{m.column}_delta", f"{m.column}_delta_pct", f"base_{m.column}"] if m.delta else [])
    return columns + ["reason", "insertions", "seconds"]


@dataclass
class SweepResult:
    folder: Path
    rows: list[dict[str, Any]]
    measured: list[str]  # names measured in this run (the rest came from an earlier run)
    plot: Path | None


ProgressFn = Callable[[str, int, int], None]  # (row name, rows done in this run, rows to do in this run)


def run_sweep(
    model: str,
    configurations: list[Configuration],
    folder: str | os.PathLike,
    *,
    settings: dict[str, Any] | None = None,
    input_size: Any = None,
    model_kwargs: dict[str, Any] | None = None,
    target: Any = None,
    resume: bool = False,
    force: bool = False,
    progress: ProgressFn | None = None,
    memory_efficient: bool = False,
) -> SweepResult:
    """Profile ``model`` unmodified and under each configuration; write rows as they finish.

    Args:
        model: a model name (a spec that rebuilds it: a sweep can be resumed in a new process).
        configurations: the rows (``recipes.Configuration``: a name and a plan).
        folder: where the rows, CSV, JSON and plot go; created if missing.
        settings: profile settings (``batch_sizes`` with one size, ``device``, ``dtype``, ``mode``...).
        target: the submodule(s) every configuration rewrites (see :func:`attnsurgeon.insert`).
        memory_efficient: every configuration's blocks are recomputed in backward (:mod:`attnsurgeon.memory`).
        resume: continue a sweep in ``folder``: finished rows are kept, the rest measured.
        force: start over in a folder that already holds a sweep.
    """
    from .models import load_model
    from .surgery import resolve_input_size

    settings = dict(settings or {})
    sizes = settings.get("batch_sizes", [1])
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    if len(sizes) != 1:
        raise AttnSurgeonError(f"a sweep measures one batch size (its table has one latency column); got {sizes}")
    settings["batch_sizes"] = sizes
    names = [c.name for c in configurations]
    if not configurations:
        raise AttnSurgeonError("the sweep has no configurations")
    if len(set(names)) != len(names) or BASE in names:
        raise AttnSurgeonError(f"configuration names must be unique and not '{BASE}': {names}")

    out = Path(folder).expanduser()
    definition = {
        "model": model,
        "model_kwargs": model_kwargs or {},
        "input_size": list(input_size) if isinstance(input_size, (list, tuple)) else input_size,
        "settings": settings,
        "configurations": [c.to_dict() for c in configurations],
    }
    if target is not None:  # only when given: folders written before it existed still resume
        definition["target"] = target
    if memory_efficient:  # likewise
        definition["memory_efficient"] = True
    done = _prepare_folder(out, definition, resume, force)

    from .profiling import profile

    todo = [BASE] + names
    pending = [n for n in todo if n not in done]
    loaded = load_model(model, **(model_kwargs or {})) if pending else None
    size = resolve_input_size(input_size, loaded.input_size) if loaded else None
    by_name = {c.name: c for c in configurations}
    measured: list[str] = []
    say = progress or (lambda name, i, n: None)
    try:
        for i, name in enumerate(pending):
            say(name, i, len(pending))
            start = time.perf_counter()
            try:
                if name == BASE:
                    result = profile(loaded, input_size=size, **settings)
                else:
                    result = profile(loaded, plan=by_name[name].insertions, input_size=size, target=target,
                                     memory_efficient=memory_efficient, **settings)
                row = _row(name, result)
            except KeyboardInterrupt:
                raise
            except AttnSurgeonError as exc:
                row = _failed(name, by_name.get(name), str(exc))
            except Exception as exc:  # a bug or a model that breaks: recorded, and the sweep goes on
                row = _failed(name, by_name.get(name), f"{type(exc).__name__}: {exc}")
            row["seconds"] = round(time.perf_counter() - start, 2)
            _append_row(out, row)
            done[name] = row
            measured.append(name)
            _write_tables(out, [done[n] for n in todo if n in done])
        say("", len(pending), len(pending))
    finally:
        rows = [done[n] for n in todo if n in done]
        plot = _write_plot(out, rows) if rows else None
    return SweepResult(out, rows, measured, plot)


# --------------------------------------------------------------------------- files


def _prepare_folder(out: Path, definition: dict, resume: bool, force: bool) -> dict[str, dict]:
    """Create or check the folder; return the rows already finished (on resume)."""
    sweep_file, rows_file = out / SWEEP_FILE, out / ROWS_FILE
    if out.exists() and not out.is_dir():
        raise AttnSurgeonError(f"'{out}' exists and is not a folder")
    if sweep_file.exists():
        if resume:
            try:
                previous = json.loads(sweep_file.read_text())
            except json.JSONDecodeError as exc:
                raise AttnSurgeonError(f"'{sweep_file}' is not valid JSON ({exc}); start over with --force") from exc
            if previous != json.loads(json.dumps(definition)):
                changed = [k for k in definition if previous.get(k) != json.loads(json.dumps(definition[k]))]
                raise AttnSurgeonError(f"the sweep in '{out}' was started with other values for: {', '.join(changed)}; "
                                       "resume it with the same arguments, or start over with --force")
            return _read_rows(rows_file)
        if not force:
            raise AttnSurgeonError(f"'{out}' already holds a sweep: pass --resume to finish it, or --force to start over")
        for name in (SWEEP_FILE, ROWS_FILE, "results.csv", "results.json", "plot.png"):
            (out / name).unlink(missing_ok=True)
    elif resume:
        raise AttnSurgeonError(f"nothing to resume in '{out}' (no {SWEEP_FILE})")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(sweep_file, json.dumps(definition, indent=2) + "\n")
    return {}


def _read_rows(rows_file: Path) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    if rows_file.exists():
        for line in rows_file.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that row is measured again
            rows[row["name"]] = row
    return rows


def _append_row(out: Path, row: dict) -> None:
    with open(out / ROWS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_tables(out: Path, rows: list[dict]) -> None:
    from .profiling.metrics import TABLE_METRICS, get

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_csv_columns(), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        flat = {**row, "insertions": json.dumps(row.get("insertions", []))}
        for m in TABLE_METRICS:  # the nested figures, one column each
            flat[m.column] = get(row, m.key)
            flat[f"{m.column}_delta"] = get(row.get("delta", {}), m.key)
            flat[f"{m.column}_delta_pct"] = get(row.get("delta_percent", {}), m.key)
            flat[f"base_{m.column}"] = get(row.get("base", {}), m.key)
        writer.writerow(flat)
    write_text_atomic(out / "results.csv", buf.getvalue())
    write_text_atomic(out / "results.json", json.dumps(rows, indent=2) + "\n")


def _write_plot(out: Path, rows: list[dict]) -> Path | None:
    """Latency against parameters, one labelled point per finished row (matplotlib, Agg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in ok:
        is_base = r["name"] == BASE
        latency = r["latency_ms"]["median"]
        ax.scatter(r["params"] / 1e6, latency, marker="s" if is_base else "o", s=40,
                   color="black" if is_base else "tab:blue", zorder=3)
        ax.annotate(r["name"], (r["params"] / 1e6, latency), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(f"latency (ms), batch {ok[0].get('batch_size', 1)}")
    ax.set_title(f"{ok[0].get('model', '')}: latency against parameters", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "plot.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- rows


def _row(name: str, result: Any) -> dict[str, Any]:
    """The row of one configuration: its figures at the first batch size, nested as in ``profile
    --json``, and the base model's, measured alongside in the same run, with the differences."""
    from .profiling.metrics import TABLE_METRICS, difference, nested, percent

    b = result.settings.batch_sizes[0]
    base, fig = result.base, result.modified or result.base
    changes = [m for m in TABLE_METRICS if m.delta]
    return {
        "name": name,
        "status": "ok",
        "model": result.model,
        "batch_size": b,
        "insertions": [vars(i) for i in result.insertions],
        **nested(TABLE_METRICS, [b], lambda m, _: m.read(fig, b)),
        "base": nested(TABLE_METRICS, [b], lambda m, _: m.read(base, b)),
        "delta": nested(changes, [b], lambda m, _: difference(m.read(base, b), m.read(fig, b))),
        "delta_percent": nested(changes, [b], lambda m, _: percent(m.read(base, b), m.read(fig, b))),
        "warnings": result.warnings,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _failed(name: str, config: Configuration | None, reason: str) -> dict[str, Any]:
    return {
        "name": name,
        "status": "failed",
        "reason": reason,
        "insertions": [s.to_dict() for s in config.insertions] if config else [],
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
