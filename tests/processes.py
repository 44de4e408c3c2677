"""Waiting on a command the tests run as a separate process."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def wait_for_a_row(proc: subprocess.Popen, rows_file: Path, timeout: float = 300.0) -> None:
    """Poll until the sweep running in ``proc`` has written its first finished row to ``rows_file``,
    or has ended, or ``timeout`` seconds have passed (the caller then checks which)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if rows_file.exists() and rows_file.read_text().count("\n") >= 1:
            return
        time.sleep(0.2)
