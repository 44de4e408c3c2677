"""Figures: where the blocks went (the insertion map) and what each insertion costs.

:func:`draw_insertion_map` (:mod:`.insertion_map`) draws a model's stages and blocks with every
inserted module as a marker at its position; :func:`draw_costs` draws ``profile``'s per-insertion
bars. Both return a matplotlib ``Figure`` (no pyplot state); :func:`save_figure` (:mod:`.figure`)
writes it, PNG, SVG or PDF by the extension, atomically. The names other folders use are all
importable from here.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import AttnSurgeonError
from .figure import (
    PLOT_FORMATS,
    PLOT_METRICS,
    block_labels,
    check_plot_metric,
    check_plot_path,
    new_figure,
    save_figure,
    short_name,
)
from .insertion_map import (
    FALLBACK_STYLE,
    POSITION_STYLES,
    PositionStyle,
    draw_insertion_map,
    map_title,
    style_of,
    write_insertion_map,
)

__all__ = [
    "PLOT_FORMATS",
    "PLOT_METRICS",
    "PositionStyle",
    "POSITION_STYLES",
    "FALLBACK_STYLE",
    "style_of",
    "check_plot_path",
    "check_plot_metric",
    "new_figure",
    "save_figure",
    "short_name",
    "block_labels",
    "draw_insertion_map",
    "map_title",
    "draw_costs",
    "write_insertion_map",
]


def draw_costs(result: Any, max_rows: int = 400) -> Any:
    """``profile --plot``: per insertion, bars of Δ parameters, Δ MACs and (``--mode train``) the
    activation memory it keeps for the backward pass, in forward order."""
    rows = list(result.insertions)[:max_rows]
    if not rows:
        raise AttnSurgeonError(
            "profile --plot draws the cost of each insertion: give --attn (the model alone has none)"
        )
    memory = [getattr(r, "memory_bytes", None) for r in rows]
    has_memory = any(m is not None for m in memory)
    panels = [
        ("Δ parameters", [r.params for r in rows], 1.0, ""),
        ("Δ MACs (per image)", [r.macs for r in rows], 1.0, ""),
    ]
    if has_memory:
        top = max(abs(m or 0) for m in memory)
        unit, size = next(
            ((u, z) for u, z in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if top >= z), ("bytes", 1)
        )
        panels.append((f"kept for backward ({unit}, train step)", [m or 0 for m in memory], 1.0 / size, unit))
    n = len(rows)
    height = max(2.6, 0.16 * n + 1.9)
    fig = new_figure(3.0 * len(panels) + 2.2, height)
    axes = fig.subplots(1, len(panels), sharey=True)
    labels = [f"{short_name(r.module, 26)}" for r in rows]
    ys = list(range(n))
    stage_colours = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
    colours = [stage_colours[(r.stage - 1) % len(stage_colours)] if r.stage else "#777" for r in rows]
    for ax, (name, vals, factor, unit) in zip(axes, panels, strict=True):  # one axes per panel
        scaled = [v * factor for v in vals]
        ax.barh(ys, scaled, color=colours, height=0.72)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.axvline(0, color="black", lw=0.6)
        if not unit:
            ax.xaxis.set_major_formatter(_engineering())
    axes[0].set_yticks(ys, labels, fontsize=max(4.5, min(7.5, 260 / max(n, 1))))
    axes[0].invert_yaxis()
    model = result.model.split(":", 1)[-1]
    fig.suptitle(
        f"{model}: what each inserted module adds (input {'×'.join(map(str, result.input_size))})", fontsize=10
    )
    notes = []
    if has_memory:
        unattributed = getattr(result, "unattributed_memory_bytes", None)
        notes.append(
            "memory: the activations each module keeps for the backward pass that no base module keeps "
            f"(batch {result.settings.batch_sizes[0]})."
        )
        if unattributed is not None:
            notes.append(
                f"Not attributable to a module: {unattributed / 2**20:+.2f} MiB of the Δ peak "
                "(gradients of the new weights, transient buffers, allocator timing)."
            )
    elif result.settings.mode != "train":
        notes.append("Memory per module is attributed in --mode train only (the activations kept for backward).")
    if getattr(result, "unattributed_macs", 0):
        notes.append(f"Δ MACs outside the inserted modules: {result.unattributed_macs:+,}.")
    if len(result.insertions) > max_rows:
        notes.append(f"First {max_rows} of {len(result.insertions)} insertions shown.")
    stages = sorted({r.stage for r in rows if r.stage})
    if len(stages) > 1:
        from matplotlib.patches import Patch

        fig.legend(
            handles=[Patch(color=stage_colours[(k - 1) % len(stage_colours)], label=f"stage {k}") for k in stages],
            loc="upper right",
            ncol=min(len(stages), 8),
            fontsize=6.8,
            frameon=False,
            bbox_to_anchor=(0.99, 1.0),
        )
    bottom_in = 0.1 + 0.13 * len(notes)
    if notes:
        fig.text(0.01, 0.02 / height, "\n".join(notes), fontsize=6.8, color="#444", va="bottom")
    fig.subplots_adjust(
        left=1.9 / fig.get_figwidth(), right=0.98, top=1 - 0.6 / height, bottom=(bottom_in + 0.3) / height, wspace=0.12
    )
    return fig


def _engineering() -> Any:
    from matplotlib.ticker import EngFormatter

    return EngFormatter(sep="")
