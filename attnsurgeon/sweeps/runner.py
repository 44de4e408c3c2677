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
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..core.files import write_text_atomic
from ..core.errors import AttnSurgeonError, one_line
from ..planning.recipes import Configuration
from .plot import BASE, draw_plot, write_plot as _write_plot  # noqa: F401  (draw_plot: the figure, for callers)

SWEEP_FILE = "sweep.json"
ROWS_FILE = "rows.jsonl"


def _csv_columns() -> list[str]:
    """name, status, then per metric its value, delta, delta % and the base's value; then the rest."""
    from ..profiling.metrics import TABLE_METRICS

    columns = ["model", "name", "status"]
    for m in TABLE_METRICS:
        columns += [m.column] + ([f"{m.column}_delta", f"{m.column}_delta_pct", f"base_{m.column}"] if m.delta else [])
        columns += [f"{m.column}_delta_ci_low", f"{m.column}_delta_ci_high"] if m.delta and m.interval else []
    return columns + ["reason", "insertions", "seconds"]


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
    from ..loading.models import expand_models

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
        _import_ray()  # a missing Ray is said before any folder is written
    models = expand_models([model] if isinstance(model, str) else model)
    if isinstance(model, str) and models != [model]:
        raise AttnSurgeonError(f"'{model}' names several models: give them as a list (--models) for a zoo sweep")

    out = Path(folder).expanduser()
    definition = {
        "model": model if isinstance(model, str) else models,
        "model_kwargs": model_kwargs or {},
        "input_size": list(input_size) if isinstance(input_size, (list, tuple)) else input_size,
        "settings": settings,
        "configurations": [c.to_dict() for c in configurations],
    }
    if target is not None:  # only when given: folders written before it existed still resume
        definition["target"] = target
    single = models[0] if isinstance(model, str) else None
    if memory_efficient:  # only when set: folders written before it existed still resume
        definition["memory_efficient"] = True
    if runtimes != ["eager"]:  # likewise
        definition["runtimes"] = runtimes
    done = _prepare_folder(out, definition, resume, force, single)

    by_name = {c.name: c for c in configurations}
    grid = [(m, rt, n) for m in models for rt in runtimes for n in [BASE] + names]
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
    measured: list[str] = []
    run = _run_on_ray(jobs, ray, ray_cpus, progress) if ray is not None else _run_here(jobs, progress)
    try:
        for row in run:  # each row written as it arrives, whichever order the rows finish in
            _append_row(out, row)
            key = (row["model"], row["name"])
            done[key] = row
            measured.append(_label(key, single))
            _write_tables(out, [done[k] for k in order if k in done])
    finally:
        run.close()  # on Ray: cancels the tasks in flight, stops the instance it started
        _forget_loaded()
        rows = [done[k] for k in order if k in done]
        plot = _write_plot(out, rows) if rows else None
    return SweepResult(out, rows, measured, plot)


def _in_runtime(name: str, runtime: str, runtimes: list[str]) -> str:
    """A row's name: the configuration's, with ``@runtime`` where the sweep measures in other runtimes than eager."""
    return name if runtimes == ["eager"] else f"{name}@{runtime}"


def _label(key: tuple[str, str], single: str | None) -> str:
    """A row's name in messages: the configuration's, with its model in a zoo sweep (``timm:resnet18/se``)."""
    return key[1] if single is not None else f"{key[0]}/{key[1]}"


# --------------------------------------------------------------------------- rows: one function, two schedulers


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
    from ..profiling import profile
    from ..graph.layout import resolve_input_size

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
        row = _row(job.name, job.model, result)
    except KeyboardInterrupt:
        raise
    except AttnSurgeonError as exc:
        row = _failed(job.name, job.model, config, str(exc))
    except Exception as exc:  # a bug or a model that breaks: recorded, and the sweep goes on
        row = _failed(job.name, job.model, config, f"{type(exc).__name__}: {exc}")
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _load(model: str, kwargs: dict[str, Any]) -> Any:
    from ..saving.saved import load_model

    from ..core.module_state import snapshot

    key = json.dumps([model, kwargs], sort_keys=True, default=str)
    if key not in _loaded:
        _loaded.clear()  # one model at a time: a zoo sweep does not keep forty backbones in memory
        loaded = load_model(model, **kwargs)
        _loaded[key] = (loaded, snapshot(loaded.model, getattr(loaded, "base", None)))
    loaded, as_built = _loaded[key]
    as_built.restore()  # each row starts from the model as built, not with what earlier rows' runs cached on it
    return loaded


def _forget_loaded() -> None:
    _loaded.clear()


def _run_here(jobs: list[Row], progress: ProgressFn | None) -> Iterator[dict[str, Any]]:
    """One row after another in this process."""
    say = progress or (lambda *args: None)
    for i, job in enumerate(jobs):
        say(job.name, i, len(jobs))
        yield measure_row(job)
    say("", len(jobs), len(jobs))


LOCAL = "local"


def _run_on_ray(
    jobs: list[Row], address: str, cpus: int | None, progress: ProgressFn | None
) -> Iterator[dict[str, Any]]:
    """The same rows as Ray tasks, each asking for one measurement's resources; rows come back as they finish.

    At most as many tasks are submitted as the cluster can run at once (re-read as it grows), so
    the rows in flight are the rows being measured. A task that Ray gives up on (its worker or node
    died RAY_RETRIES times) becomes a failed row; Ctrl-C cancels the tasks in flight.
    """
    ray = _import_ray()
    say = progress or (lambda *args: None)
    if not jobs:
        say("", 0, 0, 0)
        return
    started = _connect(ray, address, cpus)
    try:
        task_cpus, gpus, settings = task_resources(jobs[0].settings)
        measure = ray.remote(measure_row).options(
            num_cpus=task_cpus, num_gpus=gpus, max_retries=RAY_RETRIES, retry_exceptions=False
        )
        queue = [Row(**{**vars(job), "settings": settings}) for job in jobs]
        running: dict[Any, Row] = {}
        finished = 0
        last = ""
        try:
            while queue or running:
                slots = _slots(ray, task_cpus, gpus)
                if slots == 0 and started:
                    raise AttnSurgeonError(
                        f"the local Ray instance has no {'GPU' if gpus else f'{task_cpus} free CPUs'} "
                        "for a row; " + ("run on a node with a GPU" if gpus else "lower --threads or raise --ray-cpus")
                    )
                while queue and len(running) < max(slots, 1):
                    job = queue.pop(0)
                    running[measure.remote(job)] = job
                say(last, finished, len(jobs), len(running))
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    job = running.pop(ref)
                    try:
                        row = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        row = _failed(job.name, job.model, job.configuration, _ray_reason(exc))
                    finished += 1
                    last = row["name"]
                    yield row
            say("", finished, len(jobs), 0)
        finally:
            for ref in running:  # an interrupted sweep leaves nothing running on the cluster
                ray.cancel(ref, force=True)
    finally:
        if started:
            ray.shutdown()


def task_resources(settings: dict[str, Any]) -> tuple[int, int, dict[str, Any]]:
    """What one row's task asks Ray for, and the settings it measures with: ``--threads`` CPUs (1 if
    unset, and then 1 thread), plus one GPU on CUDA, which the task sees as ``cuda`` whatever its index."""
    settings = dict(settings)
    cpus = settings.get("threads") or 1
    gpus = 1 if str(settings.get("device", "cpu")).startswith("cuda") else 0
    if gpus:
        settings["device"] = "cuda"  # Ray gives the task one GPU, which it sees as cuda:0
    settings["threads"] = cpus
    return cpus, gpus, settings


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise AttnSurgeonError(
            f"--ray needs Ray, which is not installed ({exc}): pip install 'attnsurgeon[ray]'"
        ) from None
    return ray


def _connect(ray: Any, address: str, cpus: int | None) -> bool:
    """Start a local Ray instance or join a cluster; True when this call started (and must stop) it."""
    import logging

    if ray.is_initialized():
        if address == LOCAL and cpus is None:
            return False  # the instance this process already runs (a notebook, the tests)
        raise AttnSurgeonError(
            "this process is already connected to Ray; run the sweep with --ray alone (no address "
            "or --ray-cpus), or call ray.shutdown() first"
        )
    # Ray's own logging stays in its log files: only its errors reach the terminal (not the notice that
    # token authentication is on, nor the workers' output)
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address == LOCAL:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if cpus is not None and not 1 <= cpus <= available:
            raise AttnSurgeonError(f"--ray-cpus must be between 1 and the {available} CPUs of this machine, got {cpus}")
        with _keep_sigterm():
            ray.init(num_cpus=cpus or available, include_dashboard=False, **quiet)
        return True

    try:  # the cluster's workers run this driver's attnsurgeon, whatever the nodes have installed
        with _keep_sigterm():
            ray.init(address=address, runtime_env={"py_modules": [str(Path(__file__).resolve().parents[1])]}, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise AttnSurgeonError(
            f"cannot join the Ray cluster at '{address}' ({one_line(exc, with_type=False)}); "
            "start one with `ray start --head` and pass its address (auto on a node of the cluster, "
            "or ray://HEAD:10001)"
        ) from None
    return True


@contextlib.contextmanager
def _keep_sigterm() -> Iterator[None]:
    """Keep this process's SIGTERM handler across ``ray.init``, which installs a native one that dumps
    a stack trace and kills the driver on the spot. With ours (the CLI's: SIGTERM unwinds like Ctrl-C)
    a stopped sweep cancels its tasks, stops Ray, and keeps and draws the rows that finished."""
    import signal
    import threading

    ours = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(ours) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, ours)


def _slots(ray: Any, cpus: int, gpus: int) -> int:
    """How many rows the cluster can measure at once (GPUs, or CPUs in units of --threads)."""
    total = ray.cluster_resources()
    return int(total.get("GPU", 0)) if gpus else int(total.get("CPU", 0) // cpus)


def _ray_reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)  # RayTaskError: the exception the task raised
    if isinstance(cause, BaseException):
        return f"the Ray task raised {type(cause).__name__}: {cause}"
    text = str(exc).strip().splitlines()
    return f"the Ray task failed ({type(exc).__name__}, after {RAY_RETRIES} retries): {text[0] if text else ''}"


# --------------------------------------------------------------------------- files


def _prepare_folder(out: Path, definition: dict, resume: bool, force: bool, single: str | None) -> dict[tuple, dict]:
    """Create or check the folder; return the rows already finished (on resume), by (model, name)."""
    sweep_file, rows_file = out / SWEEP_FILE, out / ROWS_FILE
    if out.exists() and not out.is_dir():
        raise AttnSurgeonError(f"'{out}' exists and is not a folder")
    if sweep_file.exists():
        if not force:
            try:
                previous = json.loads(sweep_file.read_text())
            except json.JSONDecodeError as exc:
                raise AttnSurgeonError(f"'{sweep_file}' is not valid JSON ({exc}); start over with --force") from exc
            wanted = json.loads(json.dumps(definition))
            changed = [k for k in {**previous, **wanted} if previous.get(k) != wanted.get(k)]
            if changed:  # another sweep: --resume cannot finish this one there
                raise AttnSurgeonError(
                    f"'{out}' already holds a different sweep, with other values for: {', '.join(changed)}; "
                    + ("resume it with the arguments it was started with, " if resume else "")
                    + "give this sweep another --out, or pass --force to replace that one"
                )
            if resume:
                return _read_rows(rows_file, single)
            finished = len(_read_rows(rows_file, single))
            raise AttnSurgeonError(
                f"'{out}' already holds a sweep with these arguments ({finished} "
                f"row{'s' * (finished != 1)} finished): pass --resume to finish it, or --force to start over"
            )
        for name in (SWEEP_FILE, ROWS_FILE, "results.csv", "results.json", "plot.png"):
            (out / name).unlink(missing_ok=True)
    elif resume:
        raise AttnSurgeonError(f"nothing to resume in '{out}' (no {SWEEP_FILE})")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(sweep_file, json.dumps(definition, indent=2) + "\n")
    return {}


def _read_rows(rows_file: Path, single: str | None) -> dict[tuple, dict]:
    """The finished rows by (model, name); in a one-model sweep every row is that model's."""
    rows: dict[tuple, dict] = {}
    if rows_file.exists():
        for line in rows_file.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that row is measured again
            if single is not None:
                row["model"] = single
            rows[(row["model"], row["name"])] = row
    return rows


def _append_row(out: Path, row: dict) -> None:
    with open(out / ROWS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_tables(out: Path, rows: list[dict]) -> None:
    from ..profiling.metrics import TABLE_METRICS, get

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
            ci = get(row.get("delta_ci") or {}, m.key) if m.interval else None
            if ci:
                flat[f"{m.column}_delta_ci_low"], flat[f"{m.column}_delta_ci_high"] = ci["low"], ci["high"]
        writer.writerow(flat)
    write_text_atomic(out / "results.csv", buf.getvalue())
    write_text_atomic(out / "results.json", json.dumps(rows, indent=2) + "\n")


# --------------------------------------------------------------------------- rows


def _row(name: str, model: str, result: Any) -> dict[str, Any]:
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


def _failed(name: str, model: str, config: Configuration | None, reason: str) -> dict[str, Any]:
    return {
        "name": name,
        "status": "failed",
        "model": model,
        "reason": reason,
        "insertions": [s.to_dict() for s in config.insertions] if config else [],
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
