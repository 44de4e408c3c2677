"""The insertion map: a model's stages and blocks in forward order, one box per block (name, channels,
resolution), stages folded into rows, and every inserted module as one marker at its position — a
shape per position, the way the SENet paper draws its integration designs — coloured by its share of
the added parameters or MACs.

Every insertion marker carries the gid ``insertion:<module>`` (an SVG ``<g id=...>``), so that a
figure can be checked element by element.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..blocks.external import display_name
from .figure import block_labels, check_plot_metric, new_figure, save_figure, short_name, size_text

__all__ = [
    "PositionStyle",
    "POSITION_STYLES",
    "FALLBACK_STYLE",
    "style_of",
    "draw_insertion_map",
    "map_title",
    "write_insertion_map",
]


@dataclass(frozen=True)
class PositionStyle:
    """How a position is drawn: its marker and where on the block box it sits.

    ``x`` is the fraction of the box width; ``lane`` is ``branch`` (the residual branch, inside the
    box), ``skip`` (the skip path under the box), ``after`` (on the connector after the block) or
    ``top`` (above the box: positions this table does not know)."""

    marker: str
    x: float
    lane: str
    label: str
    size: float = 7.0


POSITION_STYLES: dict[str, PositionStyle] = {
    "pre": PositionStyle(">", 0.12, "branch", "pre: start of the residual branch"),
    "conv": PositionStyle("*", 0.36, "branch", "conv: in place of the spatial conv", 10.0),
    "3x3": PositionStyle("D", 0.58, "branch", "3x3: after the spatial conv", 6.0),
    "replace": PositionStyle("X", 0.58, "branch", "replace: in place of the model's own attention", 7.5),
    "standard": PositionStyle("o", 0.86, "branch", "standard: end of the residual branch"),
    "identity": PositionStyle("s", 0.50, "skip", "identity: on the skip path", 6.0),
    "post": PositionStyle("P", 1.0, "after", "post: after the merge", 8.0),
    "stage": PositionStyle("h", 1.0, "stage", "stage: after the stage's last block", 10.0),
    # anchors (--after/--before a module): on the branch of the block the module lies in, or, for a module
    # outside every block (a whole stage, a head), after its stage
    "before": PositionStyle("^", 0.30, "branch", "before: on a module's input (--before)", 7.0),
    "after": PositionStyle("d", 0.70, "branch", "after: on a module's output (--after)", 7.0),
    "before (outside blocks)": PositionStyle("<", 1.0, "after", "before a module outside the blocks", 8.0),
    "after (outside blocks)": PositionStyle(
        "8", 1.0, "after", "after a module outside the blocks (a stage, a head)", 8.0
    ),
}
FALLBACK_STYLE = PositionStyle("v", 0.5, "top", "other position", 7.0)

# geometry, in data units (one unit is about 0.9 inch in the figure)
_BOX_W, _BOX_H, _PITCH_X, _PITCH_Y = 1.0, 0.72, 1.34, 1.12
_LABEL_W = 1.9  # room for the stage labels at the left


def style_of(position: str) -> PositionStyle:
    return POSITION_STYLES.get(position, FALLBACK_STYLE)


# --------------------------------------------------------------------------- the map


def draw_insertion_map(
    anatomy: Any,
    insertions: Iterable[Any] = (),
    *,
    values: dict[str, float] | None = None,
    metric: str = "params",
    title: str | None = None,
    show_positions: bool = False,
    max_columns: int = 10,
) -> Any:
    """The model's stages (rows, folded every ``max_columns`` blocks) and blocks (boxes), with one
    marker per inserted module at its position, coloured by ``values[module]`` as a share of their sum.

    ``insertions`` are :class:`attnsurgeon.rewriting.surgery.Insertion` (or anything with ``block``, ``stage``,
    ``position`` and ``module``); ``values`` defaults to each insertion's ``params`` less what it
    replaced. ``show_positions`` draws the positions each block offers as hollow grey markers
    (``inspect --plot``).
    """
    import matplotlib

    insertions = list(insertions)
    if values is None:
        values = {i.module: float(i.params - getattr(i, "replaced_params", 0)) for i in insertions}
    total = sum(abs(values.get(i.module, 0.0)) for i in insertions)
    shares = {i.module: (100.0 * abs(values.get(i.module, 0.0)) / total if total else 0.0) for i in insertions}
    vmax = max(shares.values(), default=0.0) or 1.0
    cmap = _truncated("plasma_r", 0.12, 1.0)
    norm = matplotlib.colors.Normalize(vmin=0.0, vmax=vmax)

    rows = _fold_rows(anatomy, max_columns)
    where: dict[str, tuple[float, float, Any]] = {}  # block name -> (x0, y0, block)
    for r, (_, blocks, _) in enumerate(rows):
        for c, block in enumerate(blocks):
            where[block.name] = (_LABEL_W + c * _PITCH_X, -r * _PITCH_Y, block)
    fig, ax = _map_axes(rows, title)
    _draw_rows(ax, anatomy, rows, where, {i.block for i in insertions}, show_positions)
    colour = {i.module: cmap(norm(shares[i.module])) for i in insertions}
    used_styles, undrawn = _draw_insertions(ax, anatomy, insertions, where, colour)
    _draw_legend(fig, anatomy, insertions, used_styles)
    if insertions:
        _draw_colour_bar(fig, norm, cmap, metric, any(values.get(i.module, 0.0) < 0 for i in insertions))
    if undrawn:
        from ..core.errors import few

        fig.text(
            0.5,
            1 - 0.5 / fig.get_figheight(),
            f"not drawn (outside the blocks and stages): {few(undrawn, 3)}",
            fontsize=6.5,
            ha="center",
            va="top",
            color="#555",
        )
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.18 / fig.get_figheight(), va="top")
    return fig


def _fold_rows(anatomy: Any, max_columns: int) -> list[tuple[Any, list[Any], bool]]:
    """The map's rows: each stage starts a row and is folded every ``max_columns`` blocks;
    (stage, blocks, first row of the stage)."""
    rows: list[tuple[Any, list[Any], bool]] = []
    for stage in anatomy.stages:
        for k in range(0, len(stage.blocks), max_columns):
            rows.append((stage, stage.blocks[k : k + max_columns], k == 0))
    return rows


def _map_axes(rows: list[tuple[Any, list[Any], bool]], title: str | None) -> tuple[Any, Any]:
    """The figure, sized to the rows and the title's lines, and its axes in data units, without frame."""
    columns = max((len(b) for _, b, _ in rows), default=1)
    width_units = _LABEL_W + columns * _PITCH_X + 0.2
    height_units = len(rows) * _PITCH_Y + 0.3
    scale = 0.82
    title_lines = title.count("\n") + 1 if title else 0
    fig = new_figure(max(7.0, width_units * scale), height_units * scale + 1.55 + 0.18 * max(0, title_lines - 1))
    top = 1 - (0.45 + 0.18 * max(0, title_lines - 1)) / fig.get_figheight()
    bottom = 1.0 / fig.get_figheight()
    ax = fig.add_axes((0.01, bottom, 0.98, top - bottom))
    ax.set_xlim(0, width_units)
    ax.set_ylim(-(len(rows) - 1) * _PITCH_Y - 0.35, _BOX_H + 0.3)
    ax.set_aspect("equal", adjustable="box")
    ax.axis("off")
    return fig, ax


def _draw_rows(
    ax: Any,
    anatomy: Any,
    rows: list[tuple[Any, list[Any], bool]],
    where: dict[str, tuple[float, float, Any]],
    inserted_blocks: set[str],
    show_positions: bool,
) -> None:
    """Each row: its stage's label (or ``(cont.)``), the connector through its blocks, and the blocks."""
    labels: dict[str, str] = {}
    prefixes: dict[int, str] = {}
    for stage in anatomy.stages:
        prefixes[stage.index], own = block_labels([b.name for b in stage.blocks])
        labels.update(own)
    for r, (stage, blocks, first) in enumerate(rows):
        y0 = -r * _PITCH_Y
        if first:
            _draw_stage_label(ax, stage, prefixes[stage.index], y0)
        else:
            ax.text(0.05, y0 + _BOX_H * 0.45, "  (cont.)", fontsize=6.5, va="center", color="#888")
        # the connector through the row's blocks
        x_first = _LABEL_W
        x_last = _LABEL_W + (len(blocks) - 1) * _PITCH_X + _BOX_W
        ax.plot([x_first - 0.12, x_last + 0.14], [y0 + _BOX_H / 2] * 2, color="#bbb", lw=0.8, zorder=0)
        for block in blocks:
            x0, _, _ = where[block.name]
            _draw_block(ax, block, x0, y0, labels[block.name], block.name in inserted_blocks)
            if show_positions:
                _draw_offered(ax, block, x0, y0)


def _draw_stage_label(ax: Any, stage: Any, prefix: str, y0: float) -> None:
    prefix = prefix.rstrip(".")
    second = prefix or stage.name  # where names lost their shared prefix, the stage label says it
    chans = sorted({b.channels for b in stage.blocks})
    ch = f"{chans[0]}" if len(chans) == 1 else f"{chans[0]}–{chans[-1]}"
    ax.text(0.05, y0 + _BOX_H * 0.62, f"stage {stage.index}", fontsize=8.5, fontweight="bold", va="center")
    ax.text(0.05, y0 + _BOX_H * 0.30, short_name(second, 26), fontsize=7, va="center", color="#444")
    ax.text(
        0.05,
        y0 + _BOX_H * 0.02,
        f"{ch} ch · {size_text(stage.blocks[0].resolution)}",
        fontsize=6.5,
        va="center",
        color="#666",
    )


def _draw_block(ax: Any, block: Any, x0: float, y0: float, label: str, used: bool) -> None:
    """A block's box (white where something was inserted), its name, channels and size, its residual
    branch and, for a residual block, its skip path."""
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(
        FancyBboxPatch(
            (x0, y0),
            _BOX_W,
            _BOX_H,
            boxstyle="round,pad=0,rounding_size=0.06",
            facecolor="white" if used else "#f3f3f3",
            edgecolor="#555" if used else "#aaa",
            lw=0.9,
            zorder=1,
        )
    )
    ax.text(
        x0 + _BOX_W / 2,
        y0 + _BOX_H * 0.80,
        label,
        fontsize=6.2 if len(label) <= 14 else 5.3,
        ha="center",
        va="center",
        zorder=2,
        color="#111" if used else "#555",
    )
    ax.text(
        x0 + _BOX_W / 2,
        y0 + _BOX_H * 0.58,
        f"{block.channels} · {size_text(block.resolution)}",
        fontsize=5.6,
        ha="center",
        va="center",
        color="#555",
        zorder=2,
    )
    lane = y0 + _BOX_H * 0.28  # the residual branch
    ax.plot([x0 + 0.05, x0 + _BOX_W - 0.05], [lane, lane], color="#c8c8c8", lw=0.7, zorder=1.5)
    if block.kind == "residual":  # the skip path, under the box, merging at its right end
        ax.plot(
            [x0 + 0.02, x0 + _BOX_W - 0.02],
            [y0 - 0.07, y0 - 0.07],
            color="#c8c8c8",
            lw=0.7,
            ls=(0, (2, 1.5)),
            zorder=1.5,
        )


def _draw_offered(ax: Any, block: Any, x0: float, y0: float) -> None:
    """The positions ``block`` offers, as hollow grey markers (``inspect --plot``)."""
    for pos in block.sites:
        x, y = _marker_xy(x0, y0, style_of(pos), 0, 1)
        ax.plot(
            [x],
            [y],
            marker=style_of(pos).marker,
            ms=style_of(pos).size * 0.8,
            mfc="none",
            mec="#999",
            mew=0.7,
            ls="none",
            zorder=3,
            gid=f"offered:{block.name}:{pos}",
        )


def _draw_insertions(
    ax: Any, anatomy: Any, insertions: list[Any], where: dict[str, tuple[float, float, Any]], colour: dict[str, Any]
) -> tuple[dict[str, PositionStyle], list[str]]:
    """One marker per inserted module; several at one spot are spread out. Returns the styles drawn,
    by position, and the modules not drawn (anchored outside every block and stage: a decoder, a head)."""
    spots: dict[tuple[str, str], list[Any]] = {}
    stage_last = {s.index: s.blocks[-1].name for s in anatomy.stages if s.blocks}
    undrawn: list[str] = []
    for ins in insertions:
        block = ins.block if ins.block in where else stage_last.get(getattr(ins, "stage", 0))
        if block is None:
            undrawn.append(ins.module)
            continue
        outside = getattr(ins, "anchor", None) and ins.block not in where
        spots.setdefault((block, f"{ins.position} (outside blocks)" if outside else ins.position), []).append(ins)
    used_styles: dict[str, PositionStyle] = {}
    for (block, pos), items in spots.items():
        x0, y0, _ = where[block]
        st = style_of(pos)
        used_styles[pos] = st
        for k, ins in enumerate(items):
            x, y = _marker_xy(x0, y0, st, k, len(items))
            ax.plot(
                [x],
                [y],
                marker=st.marker,
                ms=st.size + 1.5,
                mfc=colour[ins.module],
                mec="black",
                mew=0.6,
                ls="none",
                zorder=4,
                gid=f"insertion:{ins.module}",
            )
            if st is FALLBACK_STYLE:
                ax.text(x, y + 0.12, pos, fontsize=5, ha="center", va="bottom", color="#333", zorder=4)
    return used_styles, undrawn


def _draw_legend(fig: Any, anatomy: Any, insertions: list[Any], used_styles: dict[str, PositionStyle]) -> None:
    """The positions, by shape: those drawn, or without insertions those the blocks offer."""
    from matplotlib.lines import Line2D

    handles = []
    shown = used_styles if insertions else {p: style_of(p) for b in anatomy.blocks for p in b.sites}
    for pos in [*POSITION_STYLES, *sorted(set(shown) - set(POSITION_STYLES))]:
        if pos in shown:
            st = shown[pos]
            handles.append(
                Line2D(
                    [],
                    [],
                    marker=st.marker,
                    ms=st.size,
                    ls="none",
                    mfc="#ddd" if insertions else "none",
                    mec="black" if insertions else "#777",
                    label=st.label if st is not FALLBACK_STYLE else f"{pos}",
                )
            )
    if handles:
        fig.legend(
            handles=handles,
            loc="lower left",
            bbox_to_anchor=(0.01, 0.01),
            ncol=2 if len(handles) > 3 else 1,
            fontsize=7,
            frameon=False,
            title="position" if insertions else "positions offered (hollow)",
            title_fontsize=7.5,
            alignment="left",
        )


def _draw_colour_bar(fig: Any, norm: Any, cmap: Any, metric: str, removed: bool) -> None:
    """The colour bar: each marker's share of the metric (of the change, where some insertions save)."""
    from matplotlib.cm import ScalarMappable

    cax = fig.add_axes((0.62, 0.55 / fig.get_figheight(), 0.34, 0.16 / fig.get_figheight()))
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal")
    what = {"params": "parameters", "macs": "MACs"}.get(metric, metric)
    bar.set_label(f"share of the {'change in ' + what if removed else 'added ' + what} (%)", fontsize=7.5)
    bar.ax.tick_params(labelsize=6.5)


def _truncated(name: str, lo: float, hi: float) -> Any:
    """A colormap without its palest end (pale yellow markers vanish on white boxes)."""
    import matplotlib
    import numpy as np
    from matplotlib.colors import ListedColormap

    return ListedColormap(matplotlib.colormaps[name](np.linspace(lo, hi, 256)), name=f"{name}_{lo}")


def _marker_xy(x0: float, y0: float, st: PositionStyle, k: int, n: int) -> tuple[float, float]:
    spread = (k - (n - 1) / 2) * 0.13
    if st.lane == "branch":
        return x0 + st.x * _BOX_W + spread, y0 + _BOX_H * 0.28
    if st.lane == "skip":
        return x0 + st.x * _BOX_W + spread, y0 - 0.07
    if st.lane == "after":
        return x0 + _BOX_W + (_PITCH_X - _BOX_W) / 2 + spread, y0 + _BOX_H / 2
    if st.lane == "stage":
        return x0 + _BOX_W + (_PITCH_X - _BOX_W) / 2 + spread, y0 + _BOX_H + 0.08
    return x0 + st.x * _BOX_W + spread, y0 + _BOX_H + 0.1


def map_title(report: Any, metric: str, values: dict[str, float]) -> str:
    """``resnet50 + se (standard): 16 modules, +2.51 M parameters (+9.9 %)``."""
    ins = report.insertions
    kinds = list(dict.fromkeys(f"{display_name(i.attn)} ({i.position})" for i in ins))  # in the plan's order
    head = f"{report.model.split(':', 1)[-1]} + {', '.join(kinds)}" if kinds else report.model
    delta = report.params.get("delta", 0)
    pct = report.params.get("percent")
    sep = "\n" if len(head) > 60 else ": "  # a long head gets a line of its own
    text = f"{head}{sep}{len(ins)} module{'s' if len(ins) != 1 else ''}, {_signed(delta)} parameters"
    if pct is not None:
        text += f" ({pct:+.1f} %)"
    if metric == "macs":
        text += f", {_signed(sum(values.values()))} MACs"
    return text


def _signed(n: float) -> str:
    a = abs(n)
    s = "+" if n >= 0 else "−"
    if a >= 1e9:
        return f"{s}{a / 1e9:.2f} G"
    if a >= 1e6:
        return f"{s}{a / 1e6:.2f} M"
    if a >= 1e3:
        return f"{s}{a / 1e3:.1f} k"
    return f"{s}{a:.0f}"


def write_insertion_map(
    loaded: Any, modified: Any, report: Any, path: str | os.PathLike, metric: str = "params"
) -> Path:
    """``insert --plot``: the base model's anatomy (traced again, as ``inspect`` does) with the
    report's insertions, coloured by ``metric``; written to ``path``."""
    from ..graph.inspect import inspect_model

    check_plot_metric(metric)
    _, anatomy = inspect_model(loaded, input_size=report.input_size, target=report.target)
    from ..profiling.macs import count_insertion_macs

    macs = count_insertion_macs(loaded.model, modified, report) if metric == "macs" else None
    values = {k: float(v) for k, v in macs.items()} if macs is not None else None
    shown = values or {i.module: float(i.params - i.replaced_params) for i in report.insertions}
    fig = draw_insertion_map(
        anatomy, report.insertions, values=values, metric=metric, title=map_title(report, metric, shown)
    )
    return save_figure(fig, path)
