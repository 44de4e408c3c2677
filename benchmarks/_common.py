"""Shared by the benchmarks: alternate rounds of torch.utils.benchmark, pooled medians."""

from __future__ import annotations

import logging
import statistics
from typing import Callable

logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def alternate(steps: dict[str, Callable[[], None]], rounds: int, seconds: float, threads: int) -> dict[str, list[float]]:
    """Run each step in alternating rounds (ABAB...); returns every timed block per step, in ms."""
    import torch.utils.benchmark as benchmark

    for step in steps.values():
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            m = benchmark.Timer("step()", globals={"step": steps[name]}, num_threads=threads).blocked_autorange(min_run_time=seconds)
            times[name].extend(1000 * t for t in m.times)
    return times


def summary(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}
