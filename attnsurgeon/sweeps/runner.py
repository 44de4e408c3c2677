"""Sweeps: profile many configurations of one model, one row each, like the papers' tables.

Every row goes through :func:`attnsurgeon.profile` (base and modified measured side by side), so a
sweep is the same measurement as ``attnsurgeon profile``, repeated. The output folder holds:

* ``sweep.json`` — what is being swept (model, settings, configurations), checked on ``--resume``;
* ``rows.jsonl`` — one line per finished row, appended and flushed as soon as it is measured;
* ``results.csv`` / ``results.json`` — every finished row, rewritten (atomically) after each one;
* ``plot.png`` — latency against parameters, one labelled point per configuration,
  each label placed where it covers no other label and no point.

An interrupted sweep (Ctrl-C, a crash, a kill) keeps every finished row; ``resume=True`` measures
only the rest. A configuration that fails (a position the model lacks) is recorded as a failed row
with its reason, and the sweep goes on.

A zoo sweep crosses several models with the configurations: every model gets its own ``base`` row,
and a row is known by its model and its name. With ``ray=...`` the rows run as Ray tasks, on this
machine or a cluster: the same function measures a row either way (:func:`measure_row`), only the
scheduling differs, and the driver writes the rows as they arrive, exactly as the local loop does.
``import ray`` happens only then.

This module composes the sweep (:func:`run_sweep`); :mod:`.rows` measures and builds one row,
:mod:`.on_ray` schedules rows on Ray, :mod:`.folder` writes and resumes the folder, :mod:`.plot` draws.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import AttnSurgeonError
from ..planning.recipes import Configuration
from .folder import ROWS_FILE, SWEEP_FILE, append_row, prepare_folder, write_tables
from .on_ray import LOCAL, import_ray, run_on_ray, task_resources
from .plot import BASE, draw_plot, write_plot
from .rows import Row, forget_loaded, measure_row

# the names callers import from here, whichever module of the sweep defines them
__all__ = [
    "SweepResult",
    "ProgressFn",
    "RAY_RETRIES",
    "run_sweep",
    "measure_row",
    "Row",
    "task_resources",
    "draw_plot",
    "SWEEP_FILE",
    "ROWS_FILE",
    "LOCAL",
]


@dataclass
class SweepResult:
    folder: Path
    rows: list[dict[str, Any]]
    measured: list[str]  # rows measured in this run (the rest came from an earlier run): their labels, see _label
    plot: Path | None


# (row name, rows done in this run, rows to do in this run); on Ray a fourth argument: the rows in flight
ProgressFn = Callable[..., None]

RAY_RETRIES = 3  # Ray's retries of a task whose worker or node died, before its row is recorded as failed


def run_sweep(
    model: str | list[str],
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
    ray: str | None = None,
    ray_cpus: int | None = None,
    memory_efficient: bool = False,
) -> SweepResult:
    """Profile ``model`` unmodified and under each configuration; write rows as they finish.

    Args:
        model: a model name (a spec that rebuilds it: a sweep can be resumed in a new process), or a
            list of them (globs allowed: ``["timm:resnet*", "convnext_tiny"]``, see
            :func:`attnsurgeon.loading.models.expand_models`) crossed with the configurations: a zoo sweep.
        configurations: the rows (``recipes.Configuration``: a name and a plan).
        folder: where the rows, CSV, JSON and plot go; created if missing.
        settings: profile settings (``batch_sizes`` with one size, ``device``, ``dtype``, ``mode``...).
        target: the submodule(s) every configuration rewrites (see :func:`attnsurgeon.insert`).
        memory_efficient: every configuration's blocks are recomputed in backward (:mod:`attnsurgeon.rewriting.memory`).
        resume: continue a sweep in ``folder``: finished rows are kept, the rest measured.
        force: start over in a folder that already holds a sweep.
        ray: run the rows as Ray tasks: ``"local"`` starts a Ray instance on this machine (or uses
            the one this process is connected to), ``"auto"`` or ``"ray://HOST:10001"`` joins a cluster.
        ray_cpus: the CPUs a local Ray instance may use (default: all of this machine's).
    """
    settings, runtimes = _check_arguments(configurations, settings, ray, ray_cpus)
    models = _expand(model)
    out = Path(folder).expanduser()
    definition = _definition(model, models, configurations, settings, runtimes, input_size, model_kwargs, target)
    if memory_efficient:  # only when set: folders written before it existed still resume
        definition["memory_efficient"] = True
    if runtimes != ["eager"]:  # likewise
        definition["runtimes"] = runtimes
    single = models[0] if isinstance(model, str) else None
    done = prepare_folder(out, definition, resume, force, single)

    by_name = {c.name: c for c in configurations}
    grid = [(m, rt, n) for m in models for rt in runtimes for n in [BASE] + [c.name for c in configurations]]
    order = [(m, _in_runtime(n, rt, runtimes)) for m, rt, n in grid]  # the rows, in the order of the tables
    jobs = [
        Row(
            m,
            by_name.get(n),
            _in_runtime(n, rt, runtimes),
            {**settings, "runtimes": [rt]},
            input_size,
            model_kwargs or {},
            target,
            memory_efficient,
        )
        for m, rt, n in grid
        if (m, _in_runtime(n, rt, runtimes)) not in done
    ]
    run = run_on_ray(jobs, ray, ray_cpus, progress, RAY_RETRIES) if ray is not None else _run_here(jobs, progress)
    return _write_rows(out, run, done, order, single)


def _check_arguments(
    configurations: list[Configuration], settings: dict[str, Any] | None, ray: str | None, ray_cpus: int | None
) -> tuple[dict[str, Any], list[str]]:
    """The settings every row is profiled with (one batch size) and the runtimes, the sweep's grid axis;
    what the sweep cannot run said before any folder is written."""
    settings = dict(settings or {})
    sizes = settings.get("batch_sizes", [1])
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    if len(sizes) != 1:
        raise AttnSurgeonError(f"a sweep measures one batch size (its table has one latency column); got {sizes}")
    settings["batch_sizes"] = sizes
    runtimes = list(settings.pop("runtimes", None) or ["eager"])  # a grid axis: every row in each runtime
    names = [c.name for c in configurations]
    if not configurations:
        raise AttnSurgeonError("the sweep has no configurations")
    if len(set(names)) != len(names) or BASE in names:
        raise AttnSurgeonError(f"configuration names must be unique and not '{BASE}': {names}")
    if ray_cpus is not None and (ray is None or ray != LOCAL):
        raise AttnSurgeonError(
            "--ray-cpus sizes a local Ray instance (--ray without an address); a cluster's "
            "CPUs are set where it is started"
        )
    if ray is not None:
        import_ray()  # a missing Ray is said before any folder is written
    return settings, runtimes


def _expand(model: str | list[str]) -> list[str]:
    """The sweep's models: one name, or a zoo's names with their globs expanded."""
    from ..loading.models import expand_models

    models = expand_models([model] if isinstance(model, str) else model)
    if isinstance(model, str) and models != [model]:
        raise AttnSurgeonError(f"'{model}' names several models: give them as a list (--models) for a zoo sweep")
    return models


def _definition(
    model: str | list[str],
    models: list[str],
    configurations: list[Configuration],
    settings: dict[str, Any],
    runtimes: list[str],
    input_size: Any,
    model_kwargs: dict[str, Any] | None,
    target: Any,
) -> dict[str, Any]:
    """What is being swept, as ``sweep.json`` records it (and ``--resume`` checks it)."""
    definition = {
        "model": model if isinstance(model, str) else models,
        "model_kwargs": model_kwargs or {},
        "input_size": list(input_size) if isinstance(input_size, (list, tuple)) else input_size,
        "settings": settings,
        "configurations": [c.to_dict() for c in configurations],
    }
    if target is not None:  # only when given: folders written before it existed still resume
        definition["target"] = target
    return definition


def _write_rows(
    out: Path,
    run: Generator[dict[str, Any], None, None],
    done: dict[tuple, dict],
    order: list[tuple],
    single: str | None,
) -> SweepResult:
    """Write each row as it arrives, whichever order the rows finish in; the plot once they are done."""
    measured: list[str] = []
    try:
        for row in run:
            append_row(out, row)
            key = (row["model"], row["name"])
            done[key] = row
            measured.append(_label(key, single))
            write_tables(out, [done[k] for k in order if k in done])
    finally:
        run.close()  # on Ray: cancels the tasks in flight, stops the instance it started
        forget_loaded()
        rows = [done[k] for k in order if k in done]
        plot = write_plot(out, rows) if rows else None
    return SweepResult(out, rows, measured, plot)


def _in_runtime(name: str, runtime: str, runtimes: list[str]) -> str:
    """A row's name: the configuration's, with ``@runtime`` where the sweep measures in other runtimes than eager."""
    return name if runtimes == ["eager"] else f"{name}@{runtime}"


def _label(key: tuple[str, str], single: str | None) -> str:
    """A row's name in messages: the configuration's, with its model in a zoo sweep (``timm:resnet18/se``)."""
    return key[1] if single is not None else f"{key[0]}/{key[1]}"


def _run_here(jobs: list[Row], progress: ProgressFn | None) -> Generator[dict[str, Any], None, None]:
    """One row after another in this process."""
    say = progress or (lambda *args: None)
    for i, job in enumerate(jobs):
        say(job.name, i, len(jobs))
        yield measure_row(job)
    say("", len(jobs), len(jobs))
