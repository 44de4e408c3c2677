"""What a measurement runs on: device, dtype, batch sizes, mode — parsed and checked up front."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.errors import AttnSurgeonError

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
MODES = ("inference", "train")


@dataclass
class Settings:
    device: str = "cpu"
    dtype: str = "float32"
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    mode: str = "inference"
    threads: int | None = None  # None: torch's default
    channels_last: bool = False
    compile: bool = False
    min_run_time: float = 1.0  # seconds of timed runs per model and batch size, at least
    max_run_time: float = 4.0  # ... and at most (adaptive stopping in between)
    target_ci: float | None = (
        None  # keep timing (up to max_run_time) until each Δ latency's 95 % interval is within ±this %
    )
    runtimes: list[str] = field(default_factory=lambda: ["eager"])  # where the models run (profiling.runtimes)
    quantize: str | None = None  # int8: the runtimes that quantize get an int8 row too

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_settings(s: Settings) -> Settings:
    """Normalise and validate; an unavailable device is an error before any model is built."""
    import torch

    s.dtype = DTYPES.get(str(s.dtype).lower(), "")
    if not s.dtype:
        raise AttnSurgeonError("unknown dtype: choose float32, float16 or bfloat16")
    if s.mode not in MODES:
        raise AttnSurgeonError(f"unknown mode '{s.mode}': choose {' or '.join(MODES)}")
    sizes = [s.batch_sizes] if isinstance(s.batch_sizes, int) else list(s.batch_sizes)
    if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes):
        raise AttnSurgeonError(f"batch sizes must be positive integers, got {sizes}")
    s.batch_sizes = list(dict.fromkeys(sizes))
    if s.threads is not None and s.threads < 1:
        raise AttnSurgeonError(f"--threads must be ≥ 1, got {s.threads}")
    if s.min_run_time <= 0 or s.max_run_time < s.min_run_time:
        raise AttnSurgeonError(
            f"timing needs 0 < --min-time ≤ --max-time (min_run_time ≤ max_run_time), "
            f"got {s.min_run_time} and {s.max_run_time}"
        )
    if s.target_ci is not None and not s.target_ci > 0:
        raise AttnSurgeonError(
            f"--target-ci must be a positive percentage (the interval's half-width), got {s.target_ci}"
        )
    s.device = _check_device(str(s.device).lower(), torch)
    return s


def _check_device(device: str, torch: Any) -> str:
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
            raise AttnSurgeonError(
                f"device '{device}' is not available: this torch {torch.__version__} is {built} and sees no GPU"
            )
        index = int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()
        if not 0 <= index < torch.cuda.device_count():
            raise AttnSurgeonError(f"device '{device}' does not exist: {torch.cuda.device_count()} GPU(s) visible")
        return f"cuda:{index}"
    if device == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise AttnSurgeonError("device 'mps' is not available on this machine")
        return device
    raise AttnSurgeonError(f"unknown device '{device}': choose cpu, cuda, cuda:N or mps")
