"""Latency (paired, interleaved rounds) and peak memory of one step: inference, or forward+backward."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..planning.settings import Settings
from .intervals import MIN_ROUNDS, RatioInterval, ratio_interval


@dataclass
class Latency:
    median_ms: float
    iqr_ms: float
    runs: int  # timed rounds
    batch_size: int
    rounds_ms: list[float] = field(default_factory=list)  # each round's time per call, in the order timed
    calls: int = 1  # calls per round
    warmup: int = 0  # untimed calls before the rounds (until three in a row agreed within 10 %)
    vs_base: RatioInterval | None = None  # the modified model's: paired per-round ratio to the base

    @property
    def throughput(self) -> float:
        """Images per second."""
        return 1000.0 * self.batch_size / self.median_ms if self.median_ms > 0 else float("nan")

    @property
    def noisy(self) -> bool:
        return self.iqr_ms / self.median_ms > 0.10 if self.median_ms > 0 else False


def make_step(model: Any, x: tuple, settings: Settings) -> Callable[[], None]:
    """One inference pass, or one training step (forward, backward; no optimizer update) on the
    positional arguments ``x``; the loss is the sum of the means of every output tensor."""
    import torch

    device_type = torch.device(settings.device).type
    autocast = (
        (lambda: torch.autocast(device_type, dtype=getattr(torch, settings.dtype)))
        if settings.dtype != "float32"
        else contextlib.nullcontext
    )
    from ..loading.samples import flatten_outputs

    if settings.mode == "inference":

        def step() -> None:
            with torch.inference_mode(), autocast():
                model(*x)
    else:

        def step() -> None:
            for p in model.parameters():
                p.grad = None
            with autocast():
                out = model(*x)
            sum(o.float().mean() for o in flatten_outputs(out) if o.is_floating_point()).backward()

    return step


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    elif device == "mps":
        torch.mps.synchronize()


def timed_call(step: Callable[[], None], device: str) -> float:
    """Seconds one call takes, synchronised (used for warm-up and compile time)."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


# (step, calls) -> seconds per call of one block of ``calls`` calls; a test passes a fake one
Clock = Callable[[Callable[[], None], int], float]

ROUNDS = 10  # paired rounds at least (more while --target-ci is not met, up to --max-time)
WARMUP_MAX = 10  # untimed calls at most, per model, before the rounds


def block_time(step: Callable[[], None], calls: int, device: str) -> float:
    """Seconds per call of ``calls`` back-to-back calls, synchronised, with the garbage collector off
    (as ``timeit`` and ``torch.utils.benchmark`` time)."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            step()
        synchronize(device)
        return (time.perf_counter() - start) / calls
    finally:
        if enabled:
            gc.enable()


def measure_latency(
    steps: dict[str, Callable[[], None]],
    batch_size: int,
    settings: Settings,
    pairs: list[tuple[str, str]] | None = None,
    clock: Clock | None = None,
) -> dict[str, Latency]:
    """Time several models in paired, interleaved rounds: each model warmed up until stable, then in
    every round each model once, the order reversed every other round (AB, BA, AB, ...: neither always goes
    first), so that drift on a shared machine hits them alike and cancels in the per-round ratios.

    Stops once every model has ``min_run_time`` seconds of timed calls and ``ROUNDS`` rounds, and
    either the interval of each pair in ``pairs`` (modified, reference; default: every model against
    the first) is within ``±target_ci`` %, or, without a target, no model is noisy (IQR/median under
    10 %); and at ``max_run_time`` whatever the state, once there are ``MIN_ROUNDS`` (6) rounds, the fewest
    that give an interval (a model slower than max_run_time / 6 a call is timed longer than that). Each
    pair's first model gets ``vs_base``, the paired interval (:mod:`attnsurgeon.profiling.intervals`)."""
    clock = clock or (lambda step, calls: block_time(step, calls, settings.device))
    names = list(steps)
    pairs = pairs if pairs is not None else [(n, names[0]) for n in names[1:]]
    warmup, per_call = {}, {}
    for name in names:  # allocator, caches, lazy init; until three calls in a row agree within 10 %
        clock(steps[name], 1)
        seen: list[float] = []
        while len(seen) < WARMUP_MAX and sum(seen) < settings.max_run_time / 4:
            seen.append(clock(steps[name], 1))
            if len(seen) >= 3 and max(seen[-3:]) <= 1.1 * min(seen[-3:]):
                break
        warmup[name], per_call[name] = 1 + len(seen), statistics.median(seen[-3:])
    # One call count for all: each round's calls of base and modified take about as long, and a round
    # takes about min_run_time / ROUNDS.
    same = max(1, round(settings.min_run_time / ROUNDS / max(statistics.mean(per_call.values()), 1e-9)))
    calls = dict.fromkeys(names, same)
    rounds: dict[str, list[float]] = {n: [] for n in names}
    spent = dict.fromkeys(names, 0.0)
    r, next_look = 0, ROUNDS
    while True:
        for name in names if r % 2 == 0 else reversed(names):
            t = clock(steps[name], calls[name])
            rounds[name].append(t)
            spent[name] += t * calls[name]
        r += 1
        if (
            max(spent.values()) >= settings.max_run_time and r >= MIN_ROUNDS
        ):  # the fewest with an interval, whatever the budget
            break
        if r < next_look or min(spent.values()) < settings.min_run_time:
            continue
        if _settled(rounds, pairs, settings.target_ci):
            break
        # Looked at every round, an interval that narrows by chance would stop the timing more often when its
        # rounds happen to agree, and cover less than 95 %; a quarter more rounds before each new look keeps that small.
        next_look = max(r + 1, math.ceil(1.25 * r)) if settings.target_ci is not None else r + 1
    out = {name: _latency(values, batch_size, calls[name], warmup[name]) for name, values in rounds.items()}
    for mod, ref in pairs:
        out[mod].vs_base = ratio_interval(rounds[mod], rounds[ref])
    return out


def _settled(rounds: dict[str, list[float]], pairs: list[tuple[str, str]], target_ci: float | None) -> bool:
    if target_ci is None:
        return not any(_latency(v, 1, 1, 0).noisy for v in rounds.values())
    for mod, ref in pairs:
        interval = ratio_interval(rounds[mod], rounds[ref])
        if interval is None or interval.half_width is None or interval.half_width > target_ci:
            return False
    return True


def _latency(seconds: list[float], batch_size: int, calls: int, warmup: int) -> Latency:
    ms = [1000 * t for t in seconds]
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return Latency(statistics.median(ms), q[2] - q[0], len(ms), batch_size, ms, calls, warmup)


@dataclass
class Memory:
    peak_bytes: int  # resident (weights, buffers, input) + the step's own peak
    step_peak_bytes: int  # the step's peak above what was resident before it


def measure_memory(model: Any, x: Any, step: Callable[[], None], settings: Settings) -> Memory:
    """Peak tensor memory of one step.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the running peak of
    the profiler's allocation records during the step (tensor bytes, not process RSS), plus the
    bytes resident before it.
    """
    import torch

    # Gradients of an earlier step are freed outside the measurement: freeing them inside it
    # would subtract bytes the step never allocated.
    for p in model.parameters():
        p.grad = None
    if settings.device.startswith("cuda"):
        torch.cuda.synchronize(settings.device)
        resident = torch.cuda.memory_allocated(settings.device)
        torch.cuda.reset_peak_memory_stats(settings.device)
        step()
        torch.cuda.synchronize(settings.device)
        peak = torch.cuda.max_memory_allocated(settings.device)
        return Memory(int(peak), int(peak - resident))
    resident = _resident_bytes(model, x)
    step_peak = _cpu_step_peak(step)
    return Memory(resident + step_peak, step_peak)


def _resident_bytes(model: Any, x: Any) -> int:
    seen: dict[int, int] = {}
    from ..loading.samples import flatten_outputs

    for t in [*model.parameters(), *model.buffers(), *flatten_outputs(x)]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _cpu_step_peak(step: Callable[[], None]) -> int:
    from torch.profiler import ProfilerActivity, profile

    from ..core.native import quiet_native_output

    with quiet_native_output():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    records = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type().name == "CPU"
    )
    current = peak = 0
    for _, nbytes in records:
        current += nbytes
        peak = max(peak, current)
    return int(peak)


def saved_bytes_by_module(model: Any, x: tuple, modules: list[str], settings: Settings) -> dict[str, int]:
    """What each of ``modules`` adds to a training step's activation memory: the bytes of the tensors
    autograd keeps for the backward pass because the module is there (one forward pass in train
    mode, ``saved_tensors_hooks``). Those tensors live from the forward pass to the backward pass,
    so they are the module's share of the step's peak. A module adds

    * what is kept while it runs and by nothing outside ``modules`` (SE at the standard position
      keeps its input, which the base model never keeps, and its small pooled and gate tensors);
    * its output, where a base op keeps it (SE at ``pre``: the block's first conv now keeps SE's
      output) — less its input, if the module itself kept that: the base op kept the input before.

    Parameters, temporaries freed within the forward pass, gradients and allocator rounding are
    not counted: they cannot be told apart per module. A storage kept by several of ``modules``
    counts for the first of them."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current: list[str] = []
    owners: dict[int, tuple[int, str | None]] = {}  # storage -> (bytes, first module keeping it; None: a base op)
    ends: dict[str, tuple[Any, Any]] = {}  # module -> (input storage, output storage)

    def key_of(t: Any) -> tuple[int, int] | None:
        try:
            storage = t.untyped_storage()
            return storage.data_ptr(), storage.nbytes()
        except Exception:  # noqa: BLE001  (not a tensor, or one without storage)
            return None

    kept: list[Any] = []  # alive until the count is done, so that no storage address is reused

    def pack(t: Any) -> None:
        # The graph gets None: no backward pass follows. (Returning ``t`` itself kept it through a
        # reference cycle in autograd's C++ graph that Python's collector cannot see: every call
        # leaked a forward pass's activations, and a 22-row train sweep ran out of memory.)
        kept.append(t)
        key = key_of(t)
        if key is None or key[0] in params:
            return None
        owner = current[-1] if current else None
        known = owners.get(key[0])
        if known is None or (known[1] is not None and owner is None):
            owners[key[0]] = (key[1], owner)  # kept by a base op too: nobody's addition
        return None

    def unpack(_: Any) -> Any:
        raise RuntimeError("saved_bytes_by_module runs no backward pass")

    def enter(name: str, args: tuple) -> None:
        current.append(name)
        ends[name] = (key_of(args[0]) if args else None, None)

    def leave(name: str, out: Any) -> None:
        current.pop()
        ends[name] = (ends[name][0], key_of(out))

    handles = []
    for name in modules:
        sub = model.get_submodule(name)
        handles.append(sub.register_forward_pre_hook(lambda m, a, name=name: enter(name, a)))
        handles.append(sub.register_forward_hook(lambda m, a, o, name=name: leave(name, o)))
    device_type = torch.device(settings.device).type
    autocast = (
        torch.autocast(device_type, dtype=getattr(torch, settings.dtype))
        if settings.dtype != "float32"
        else contextlib.nullcontext()
    )
    was_training = model.training
    model.train(True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack), autocast:
            out = model(*x)
        del out  # the graph goes with it: no backward pass is needed
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    kept.clear()
    return _saved_totals(modules, owners, ends)


def _saved_totals(
    modules: list[str], owners: dict[int, tuple[int, str | None]], ends: dict[str, tuple[Any, Any]]
) -> dict[str, int]:
    """Each module's bytes from what :func:`saved_bytes_by_module` recorded: the storages it kept first,
    and its output where a base op keeps that (less its input, where the module itself kept the input)."""
    totals = {name: 0 for name in modules}
    for nbytes, owner in owners.values():
        if owner is not None:
            totals[owner] += nbytes
    for name, (inp, outp) in ends.items():
        kept_by = owners.get(outp[0]) if outp is not None else None
        if kept_by is None or kept_by[1] is not None or outp == inp:
            continue
        totals[name] += outp[1]  # a base op keeps the module's output: it kept the module's input before
        if inp is not None and owners.get(inp[0], (0, None))[1] == name:
            totals[name] -= inp[1]
    return totals
