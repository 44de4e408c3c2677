"""What every figure of the package shares: the formats and metrics a plot may have, a Figure on the
Agg canvas (no pyplot state), writing it atomically, and block names shortened to fit a box."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..core.errors import AttnSurgeonError
from ..core.files import existing_folder

__all__ = [
    "PLOT_FORMATS",
    "PLOT_METRICS",
    "check_plot_path",
    "check_plot_metric",
    "new_figure",
    "save_figure",
    "short_name",
    "block_labels",
    "size_text",
]

PLOT_FORMATS = ("png", "svg", "pdf")
PLOT_METRICS = ("params", "macs")
_MAX_NAME = 18


def check_plot_path(path: str | os.PathLike) -> str:
    """The figure format from the extension; an unknown one or a missing folder is an error, said before any work."""
    p = Path(path).expanduser()
    fmt = p.suffix.lower().lstrip(".")
    if fmt not in PLOT_FORMATS:
        raise AttnSurgeonError(
            f"--plot: cannot tell the figure format from '{p.name}'; end the name with "
            + ", ".join(f".{f}" for f in PLOT_FORMATS)
        )
    existing_folder(p, "--plot: ")
    if p.is_dir():
        raise AttnSurgeonError(f"--plot: '{p}' is a folder; give a file name such as {p / 'map.png'}")
    return fmt


def check_plot_metric(metric: str) -> str:
    if metric not in PLOT_METRICS:
        raise AttnSurgeonError(f"--plot-metric must be one of {', '.join(PLOT_METRICS)}, got '{metric}'")
    return metric


def new_figure(width: float, height: float, dpi: int = 110) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG/SVG/PDF (by extension) through a temporary file: nothing half-written."""
    from ..core.files import atomic_path

    fmt = check_plot_path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    return Path(path).expanduser()


def short_name(name: str, limit: int = _MAX_NAME) -> str:
    """A middle ellipsis past ``limit`` characters: ``features.denseblock2`` -> ``features…eblock2``."""
    if len(name) <= limit:
        return name
    tail = (limit - 1) // 2 + 1
    return name[: limit - 1 - tail] + "…" + name[-tail:]


def block_labels(names: list[str], limit: int = _MAX_NAME) -> tuple[str, dict[str, str]]:
    """(the dotted prefix the names share, each name's label). Names longer than ``limit`` lose the
    prefix their stage shares (``features.denseblock2.denselayer1.conv1`` -> ``denselayer1.conv1``,
    the stage label says the rest), then what is still too long its middle."""
    parts = [n.split(".") for n in names]
    common: list[str] = []
    if len(names) > 1 or (names and len(names[0]) > limit):
        for column in zip(*[p[:-1] for p in parts], strict=False):  # up to the shortest name's depth
            if len(set(column)) != 1:
                break
            common.append(column[0])
    prefix = ".".join(common) + "." if common else ""
    labels = {}
    for n in names:
        rest = n[len(prefix) :] if len(n) > limit and prefix else n
        labels[n] = short_name(rest, limit)
    return (prefix if any(len(n) > limit for n in names) else ""), labels


def size_text(resolution: Iterable[int]) -> str:
    res = tuple(resolution)
    return "×".join(map(str, res)) if res else ""
