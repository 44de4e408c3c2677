"""Shared by the benchmarks: the timing protocol `attnsurgeon profile` uses (paired, interleaved rounds,
warm-up until stable; attnsurgeon.profiling.measure.measure_latency) and the intervals it reports."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def paired(
    steps: dict[str, Callable[[], None]],
    min_time: float,
    max_time: float,
    threads: int,
    pairs: list[tuple[str, str]] | None = None,
    target_ci: float | None = None,
) -> dict:
    """Time the steps side by side in alternating rounds; returns attnsurgeon's ``Latency`` per step,
    each pair's first step with ``vs_base``, the paired ratio's median and 95 % interval."""
    import torch

    from attnsurgeon.planning.settings import Settings
    from attnsurgeon.profiling.measure import measure_latency

    torch.set_num_threads(threads)
    settings = Settings(min_run_time=min_time, max_run_time=max_time, threads=threads, target_ci=target_ci)
    return measure_latency(steps, 1, settings, pairs=pairs)


def interval_text(latency) -> str:
    """``+3.2 % [+1.9, +4.6]`` from a Latency's ``vs_base`` (``resolved`` or not said after it)."""
    from attnsurgeon.profiling.intervals import format_interval

    r = latency.vs_base
    if r is None:
        return "—"
    change, low, high = r.percent()
    resolved = "" if r.low is None or r.resolved else " (no difference resolved)"
    return format_interval(change, low, high).replace("%", " %") + resolved


def machine() -> str:
    """The load average now (1/5/15 min) and the clock, for the lines above and under a table."""
    try:
        load = "/".join(f"{v:.2f}" for v in os.getloadavg())
    except (AttributeError, OSError):
        load = "n/a"
    return f"load average {load} · {time.strftime('%Y-%m-%d %H:%M:%S')}"
