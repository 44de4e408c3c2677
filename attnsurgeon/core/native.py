"""Keep native libraries' chatter away from the user's terminal.

The CUDA build of torch, on a machine without a GPU, prints lines such as
``ERROR: ... gpuGetDeviceCount failed with code 35`` and ``USDT: ... profiler_start`` straight to
file descriptor 2 when the profiler starts. Python-level redirection cannot catch that, so
:func:`quiet_native_output` points fds 1 and 2 at a temporary file while the block runs and then
passes on every line that is not such noise.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

NOISE = re.compile(
    r"gpuGetDeviceCount failed|^USDT:|SyncActivityProfilerHandler|profiler_(start|stop)\]|"
    r"CUPTI|libcupti|Failed to initialize NVML|DeviceProperties\.cpp|allocated before the profiling started"
)


@contextmanager
def quiet_native_output() -> Iterator[None]:
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        saved = {fd: os.dup(fd) for fd in (1, 2)}
    except OSError:  # no real descriptors (an embedding host): nothing to guard
        yield
        return
    with tempfile.TemporaryFile() as sink:
        for fd in saved:
            os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            kept = [
                line
                for line in sink.read().decode(errors="replace").splitlines()
                if line.strip() and not NOISE.search(line)
            ]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()


def quiet_torch_logs() -> None:
    """torch logs 'No CUDA runtime is found' (cpp_extension, imported by the benchmark timer and
    by inductor) on CPU-only machines: not the user's concern."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


@contextmanager
def quiet_torch_warnings() -> Iterator[None]:
    """Within: torch's own loggers at ERROR, and what Python code prints dropped. torch.export, the
    ONNX exporter and torch.compile log warnings and print graphs (thousands of lines for a detector
    whose export fails, a recompile each new shape) where attnsurgeon says in one line what failed:
    their failures reach the caller as exceptions."""
    import contextlib
    import io
    import logging

    names = ["torch", *(n for n in list(logging.root.manager.loggerDict) if n.startswith("torch."))]
    saved = [(logger, logger.level) for logger in map(logging.getLogger, names)]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)
