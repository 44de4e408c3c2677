"""Latency (torch.utils.benchmark) and peak memory of one step: inference, or forward+backward."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..planning.settings import Settings


@dataclass
class Latency:
    median_ms: float
    iqr_ms: float
    runs: int
    batch_size: int

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
        if settings.dtype != "float32" else contextlib.nullcontext
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


def measure_latency(steps: dict[str, Callable[[], None]], batch_size: int, settings: Settings,
                    rounds: int = 2) -> dict[str, Latency]:
    """Time several models side by side: ``rounds`` alternating adaptive_autorange passes each,
    merged, so that drift on a shared machine hits them alike. CUDA timings are synchronised by
    torch.utils.benchmark's timer."""
    benchmark = _benchmark()

    threads = settings.threads or _default_threads()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for name, step in steps.items():  # warm-up: allocator, caches, lazy init
        for _ in range(2):
            step()
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            timer = benchmark.Timer(stmt="step()", globals={"step": steps[name]}, num_threads=threads,
                                    label=name, description=f"batch {batch_size}")
            m = timer.adaptive_autorange(threshold=0.1, min_run_time=settings.min_run_time / rounds,
                                         max_run_time=settings.max_run_time / rounds)
            times[name].extend(m.times)
    out = {}
    for name, values in times.items():
        q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
        out[name] = Latency(1000 * statistics.median(values), 1000 * (q[2] - q[0]), len(values), batch_size)
    return out


def _benchmark() -> Any:
    """torch.utils.benchmark, imported without its 'No CUDA runtime is found' log line on CPU machines."""
    from ..core.native import quiet_torch_logs

    quiet_torch_logs()
    import torch.utils.benchmark as benchmark

    return benchmark


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()


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
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type().name == "CPU")
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
    autocast = (torch.autocast(device_type, dtype=getattr(torch, settings.dtype)) if settings.dtype != "float32"
                else contextlib.nullcontext())
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
