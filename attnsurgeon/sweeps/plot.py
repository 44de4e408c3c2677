"""The sweep's plot: latency against parameters, one labelled point per configuration, each with the
95 % interval of its Δ latency as an error bar, each label placed where it covers no other label and
no point."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ..core.files import atomic_path

BASE = "base"


def write_plot(out: Path, rows: list[dict]) -> Path | None:
    """Latency against parameters, one labelled point per finished row (matplotlib's Agg canvas, no pyplot)."""
    if importlib.util.find_spec("matplotlib") is None:  # the plot is optional: no matplotlib, no plot
        return None
    fig = draw_plot(rows)
    if fig is None:
        return None
    path = out / "plot.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def draw_plot(rows: list[dict]) -> Any:
    """The figure of :func:`write_plot`, or None when no row finished: each point labelled where its
    label collides with no other label and no point (see :func:`_place_labels`), and a configuration's
    point with the 95 % interval of its Δ latency (:func:`latency_bar`) as a vertical error bar."""
    import matplotlib

    from ..pictures.figure import new_figure

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    fig = new_figure(7, 4.5, dpi=120)
    ax = fig.add_subplot()
    models = list(dict.fromkeys(r["model"] for r in ok))  # one colour per model, its base a black-edged square
    colours = matplotlib.colormaps["tab10" if len(models) <= 10 else "tab20"]
    points: list[tuple[float, float, str]] = []
    for k, model in enumerate(models):
        colour = "tab:blue" if len(models) == 1 else colours(k % colours.N)
        for r in (r for r in ok if r["model"] == model):
            is_base = r["name"] == BASE
            xy = (r["params"] / 1e6, r["latency_ms"]["median"])
            ax.scatter(
                *xy,
                marker="s" if is_base else "o",
                s=40,
                zorder=3,
                color=("black" if len(models) == 1 else colour) if is_base else colour,
                edgecolors="black" if is_base else "none",
            )
            bar = None if is_base else latency_bar(r)
            if bar is not None:
                ax.errorbar(
                    *xy,
                    yerr=[[xy[1] - bar[0]], [bar[1] - xy[1]]],
                    fmt="none",
                    ecolor=colour,
                    elinewidth=1,
                    capsize=3,
                    zorder=2,
                )
            points.append((*xy, model if is_base and len(models) > 1 else r["name"]))
        if len(models) > 1:
            ax.scatter([], [], color=colour, label=model)
    if len(models) > 1:
        ax.legend(fontsize=7, loc="best")
    ax.margins(0.12)  # room for the labels of the outermost points
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(f"latency (ms), batch {ok[0].get('batch_size', 1)}")
    ax.set_title(
        f"{models[0] if len(models) == 1 else f'{len(models)} models'}: latency against parameters"
        + (
            "\n(bars: 95 % interval of Δ latency against the base measured alongside)"
            if any(latency_bar(r) for r in ok)
            else ""
        ),
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _place_labels(ax, points)
    return fig


def latency_bar(row: dict) -> tuple[float, float] | None:
    """The ends, in ms, of a row's error bar: the 95 % interval of its Δ latency (the paired per-round
    ratios against the base measured alongside it) applied to its own latency, or None (the base, a
    row without an interval, or too few rounds for one)."""
    ci = (row.get("delta_ci") or {}).get("latency_ms", {}).get("median")
    pct = (row.get("delta_percent") or {}).get("latency_ms", {}).get("median")
    if not ci or ci.get("low") is None or ci.get("high") is None or pct is None:
        return None
    y = row["latency_ms"]["median"]
    return y * (1 + ci["low"] / 100) / (1 + pct / 100), y * (1 + ci["high"] / 100) / (1 + pct / 100)


# where a label may go around its point, nearest first: (dx, dy) directions, at growing distances in points
_DIRECTIONS = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
_DISTANCES = [5, 14, 26, 40, 56]


def _place_labels(ax: Any, points: list[tuple[float, float, str]]) -> None:
    """Label each point at the first spot around it (nearest first) where its text overlaps no label
    placed before, no point and nothing outside the axes; where none is free, at the spot with the
    least overlap. A label set away from its point gets a thin leader line to it."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    dots = []
    for x, y, _ in points:  # each marker's box, in pixels
        px, py = ax.transData.transform((x, y))
        r = 4 * fig.dpi / 72
        dots.append(Bbox.from_extents(px - r, py - r, px + r, py + r))
    placed: list[Any] = []

    def overlap(a: Any, b: Any) -> float:
        w = min(a.x1, b.x1) - max(a.x0, b.x0)
        h = min(a.y1, b.y1) - max(a.y0, b.y0)
        return w * h if w > 0 and h > 0 else 0.0

    for x, y, text in points:
        best: tuple[float, int, int, int, Any] | None = None  # (cost, distance, dx, dy, box)
        for distance in _DISTANCES:
            for dx, dy in _DIRECTIONS:
                label = _label(ax, text, (x, y), dx, dy, distance)
                box = label.get_window_extent(renderer)
                cost = (
                    sum(overlap(box, b) for b in placed)
                    + sum(overlap(box, d) for d in dots)
                    + box.width * box.height
                    - overlap(box, inside)
                )  # the part outside the axes
                label.remove()
                if best is None or cost < best[0]:
                    best = (cost, distance, dx, dy, box)
                if cost == 0:
                    break
            if best is not None and best[0] == 0:
                break
        assert best is not None  # _DISTANCES and _DIRECTIONS are not empty: every label has a spot
        _, distance, dx, dy, box = best
        far = distance > _DISTANCES[0]
        arrow = dict(arrowstyle="-", lw=0.5, color="0.5", shrinkA=0, shrinkB=3) if far else None
        _label(ax, text, (x, y), dx, dy, distance, arrowprops=arrow)
        placed.append(box)


def _label(ax: Any, text: str, xy: tuple[float, float], dx: int, dy: int, distance: int, **extra: Any) -> Any:
    """``text`` at ``distance`` points from ``xy`` in direction (``dx``, ``dy``), aligned away from it."""
    return ax.annotate(
        text,
        xy,
        textcoords="offset points",
        fontsize=8,
        xytext=(dx * distance, dy * distance),
        ha={1: "left", -1: "right", 0: "center"}[dx],
        va={1: "bottom", -1: "top", 0: "center"}[dy],
        **extra,
    )
