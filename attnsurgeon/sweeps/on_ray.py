"""The sweep's rows as Ray tasks, on this machine or a cluster: the same :func:`~.rows.measure_row` as
the local loop, only scheduled differently. ``import ray`` happens only here, and only when asked for."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

from ..core.errors import AttnSurgeonError, one_line
from .rows import Row, failed_row, measure_row

__all__ = ["LOCAL", "run_on_ray", "task_resources", "import_ray"]

LOCAL = "local"


def run_on_ray(
    jobs: list[Row], address: str, cpus: int | None, progress: Callable[..., None] | None, retries: int
) -> Generator[dict[str, Any], None, None]:
    """The same rows as Ray tasks, each asking for one measurement's resources; rows come back as they finish.

    At most as many tasks are submitted as the cluster can run at once (re-read as it grows), so
    the rows in flight are the rows being measured. A task that Ray gives up on (its worker or node
    died ``retries`` times) becomes a failed row; Ctrl-C cancels the tasks in flight.
    """
    ray = import_ray()
    say = progress or (lambda *args: None)
    if not jobs:
        say("", 0, 0, 0)
        return
    started = _connect(ray, address, cpus)
    try:
        task_cpus, gpus, settings = task_resources(jobs[0].settings)
        measure = ray.remote(measure_row).options(
            num_cpus=task_cpus, num_gpus=gpus, max_retries=retries, retry_exceptions=False
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
                        row = failed_row(job.name, job.model, job.configuration, _ray_reason(exc, retries))
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


def import_ray() -> Any:
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


def _ray_reason(exc: BaseException, retries: int) -> str:
    cause = getattr(exc, "cause", None)  # RayTaskError: the exception the task raised
    if isinstance(cause, BaseException):
        return f"the Ray task raised {type(cause).__name__}: {cause}"
    text = str(exc).strip().splitlines()
    return f"the Ray task failed ({type(exc).__name__}, after {retries} retries): {text[0] if text else ''}"
