"""The pictures and files of ``attnsurgeon explain``: one sheet per image (the image, Grad-CAM of
the base and modified models, each gate's map or channel profile), a summary across the images,
and ``explain.json`` with every number behind them, written into a temporary folder renamed into
place at the end (:func:`write_explanation`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .explain import Explanation, ModelView


def write_explanation(
    e: Explanation, out: str | os.PathLike, *, force: bool = False, progress: Callable[[str], None] | None = None
) -> list[Path]:
    """One sheet per image (``sheet_<image>.png``), ``summary.png`` for several images and
    ``explain.json``, written into a temporary folder renamed onto ``out`` at the end."""
    from ..core.files import atomic_dir

    say = progress or (lambda message: None)
    names = _sheet_names(e.images)
    written = []
    with atomic_dir(out, force=force) as tmp:
        for i, name in enumerate(names):
            say(f"Drawing {name} ({i + 1}/{len(names)})")
            fig = draw_sheet(e, i)
            fig.savefig(tmp / name, format="png")
            written.append(name)
        if len(e.images) > 1:
            say("Drawing the summary")
            draw_summary(e).savefig(tmp / "summary.png", format="png")
            written.append("summary.png")
        data = e.to_dict()
        for entry, name in zip(data["images"], names, strict=True):  # one sheet per image
            entry["sheet"] = name
        (tmp / "explain.json").write_text(json.dumps(data, indent=2) + "\n")
        written.append("explain.json")
    return [Path(out) / w for w in written]


def _sheet_names(images: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for image in images:
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(image).stem) or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"sheet_{stem}.png" if seen[stem] == 1 else f"sheet_{stem}_{seen[stem]}.png")
    return names


def _overlay(ax: Any, pixels: Any, heat: Any, title: str, cmap: str = "jet", alpha: float = 0.45) -> None:
    ax.imshow(pixels, interpolation="bilinear")
    ax.imshow(
        heat,
        cmap=cmap,
        alpha=alpha,
        vmin=0,
        vmax=1,
        interpolation="bilinear",
        extent=(-0.5, pixels.shape[1] - 0.5, pixels.shape[0] - 0.5, -0.5),
    )
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _upsample(t: Any, h: int, w: int) -> Any:
    import torch.nn.functional as F

    m = t.float().reshape(1, 1, *t.shape[-2:])
    return F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()


def _class_text(e: Explanation, view: ModelView, i: int) -> str:
    k = e.class_index[i]
    p = dict(view.top).get(k)
    name = f" {e.class_names[i]}" if e.class_names[i] else ""
    if p is None:
        import math

        p = math.nan
    return f"class {k}{name} (p={p:.2f})" if p == p else f"class {k}{name}"


def draw_sheet(e: Explanation, i: int) -> Any:
    """One image: the input, Grad-CAM of base and modified, channel gate strips, spatial gate maps."""
    from matplotlib.gridspec import GridSpec

    from .figure import new_figure

    shown = getattr(e, e.gate_view)[i]
    channel = [g for g in e.gates if g.kind != "spatial" and (g.module, g.name) in shown.gates]
    spatial = [g for g in e.gates if g.kind == "spatial" and (g.module, g.name) in shown.gates][:24]
    spatial_rows = -(-len(spatial) // _SPATIAL_COLUMNS) if spatial else 0
    strip_h = min(0.16 * len(channel) + 0.6, 9.0) if channel else 0
    spacer = [0.25] if spatial else []  # room for the spatial section's heading
    heights = [2.6] + ([strip_h] if channel else []) + spacer + [1.9] * spatial_rows
    fig = new_figure(10.0, sum(heights) + 1.2 + 0.25 * bool(spatial), dpi=100)
    gs = GridSpec(
        len(heights),
        1,
        figure=fig,
        height_ratios=heights,
        hspace=0.35,
        top=1 - 0.85 / fig.get_figheight(),
        bottom=0.35 / fig.get_figheight(),
        left=0.15,
        right=0.95,
    )
    _draw_cams(fig, gs[0], e, i)
    row = 1
    if channel:
        _draw_channel_strips(fig, fig.add_subplot(gs[row]), shown, channel)
        row += 1
    if spatial:
        row += 1  # the spacer
        _draw_spatial_maps(fig, gs[row:].subgridspec(spatial_rows, _SPATIAL_COLUMNS, wspace=0.06, hspace=0.4), e, i)
    return fig


_SPATIAL_COLUMNS = 4


def _draw_cams(fig: Any, cell: Any, e: Explanation, i: int) -> None:
    """The sheet's top row: the image, then Grad-CAM of each model over it; and the sheet's title."""
    views = e.views()
    top = cell.subgridspec(1, 1 + len(views), wspace=0.08)
    pixels = e.pixels[i]
    ax = fig.add_subplot(top[0, 0])
    ax.imshow(pixels)
    ax.set_title(Path(e.images[i]).name, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    for c, (name, vs) in enumerate(views.items()):
        ax = fig.add_subplot(top[0, c + 1])
        label = "base" if name == "base" else "modified: " + _what(e)
        _overlay(ax, pixels, vs[i].cam, f"{label}\nGrad-CAM, {_class_text(e, vs[i], i)}")
    model = e.model.split(":", 1)[-1]
    fig.suptitle(
        f"{model} — Grad-CAM at {e.layer}; gates of the {e.gate_view} model",
        fontsize=10,
        y=1 - 0.12 / fig.get_figheight(),
        va="top",
    )


def _draw_channel_strips(fig: Any, ax: Any, shown: ModelView, channel: list[Any]) -> None:
    """One strip per channel gate, its values sorted high to low (SENet's excitation plots)."""
    import numpy as np

    from .figure import short_name

    vmax = max(1.0, max(float(shown.gates[(g.module, g.name)].max()) for g in channel))
    for r, g in enumerate(channel):
        t = shown.gates[(g.module, g.name)]
        values = np.sort(t.reshape(t.shape[0], -1).mean(-1).numpy() if t.dim() > 1 else t.numpy())[::-1]
        im = ax.imshow(
            values[None, :],
            aspect="auto",
            cmap="viridis",
            vmin=0,
            vmax=vmax,
            extent=(0, 1, r + 0.5, r - 0.5),
            interpolation="nearest",
        )
    ax.set_ylim(len(channel) - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.set_yticks(
        range(len(channel)),
        [
            f"{short_name(g.module, 22)}{'' if g.name in ('channel', 'gate') else ' · ' + g.name}"
            f"{' (own)' if g.origin == 'existing' else ''}"
            for g in channel
        ],
        fontsize=max(4.5, min(7, 150 / len(channel))),
    )
    ax.set_xticks([0, 0.5, 1], ["highest", "channels, sorted by gate value", "lowest"], fontsize=7)
    ax.set_title("channel gates (one strip per module, like SENet's excitation plots)", fontsize=8.5)
    bar = fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    bar.set_label("gate", fontsize=7)
    bar.ax.tick_params(labelsize=6.5)


def _draw_spatial_maps(fig: Any, sub: Any, e: Explanation, i: int) -> None:
    """The spatial gates (the first 24), each upsampled over the image and scaled to its own range."""
    import numpy as np

    from .figure import short_name

    shown = getattr(e, e.gate_view)[i]
    spatial = [g for g in e.gates if g.kind == "spatial" and (g.module, g.name) in shown.gates][:24]
    pixels = e.pixels[i]
    h, w = pixels.shape[:2]
    for k, g in enumerate(spatial):
        ax = fig.add_subplot(sub[k // _SPATIAL_COLUMNS, k % _SPATIAL_COLUMNS])
        if k == 0:
            top_y = ax.get_position().y1 + 0.42 / fig.get_figheight()
            fig.text(
                0.55,
                top_y,
                "spatial gates, upsampled over the image (each map scaled to its own range, in its title)",
                ha="center",
                va="bottom",
                fontsize=8.5,
            )
        t = shown.gates[(g.module, g.name)]
        heat = _upsample(t, h, w)
        lo, hi = float(heat.min()), float(heat.max())
        _overlay(
            ax,
            pixels,
            (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat),
            f"{short_name(g.module, 24)}\n{g.name}: {lo:.2f}–{hi:.2f}",
            alpha=0.5,
        )
    if len(e.gates) and len([g for g in e.gates if g.kind == "spatial"]) > len(spatial):
        fig.text(
            0.5, 0.005, f"first {len(spatial)} spatial gates shown; explain.json holds all", ha="center", fontsize=7
        )


def _what(e: Explanation) -> str:
    kinds = sorted({f"{i['attn']} ({i['position']})" for i in e.insertions})
    return ", ".join(kinds) if len(kinds) <= 2 else f"{len(kinds)} insertions"


def draw_summary(e: Explanation) -> Any:
    """Across images: each gate's mean per image (one line per image), how much its values vary
    between images (SENet: early gates are shared across classes, late ones class-specific), and
    the last channel gate's value per channel for each image (SENet's excitation plots)."""
    from matplotlib.gridspec import GridSpec

    from .figure import new_figure, short_name

    summary = e.summary()[e.gate_view]
    shown = getattr(e, e.gate_view)
    fig = new_figure(max(8.0, 0.22 * len(summary) + 2.5), 8.2)
    if not summary:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no attention gate to read", ha="center", va="center")
        return fig
    gs = GridSpec(3, 1, figure=fig, height_ratios=[1, 1, 1.1], hspace=0.62)
    ax1 = fig.add_subplot(gs[0])
    ax2 = fig.add_subplot(gs[1], sharex=ax1)
    xs = range(len(summary))
    for i, view in enumerate(shown):
        means = [float(view.gates[(r["module"], r["gate"])].mean()) for r in summary]
        ax1.plot(xs, means, marker="o", ms=3, lw=1, alpha=0.8, label=Path(e.images[i]).name)
    ax1.set_ylabel("mean gate", fontsize=8)
    ax1.grid(alpha=0.3)
    ax1.tick_params(labelbottom=False)
    if len(shown) <= 10:
        ax1.legend(fontsize=6.5, ncol=min(5, len(shown)), loc="best", frameon=False)
    ax2.bar(xs, [r["std_across_images"] for r in summary], color="#4C72B0")
    ax2.set_ylabel("std across images\n(mean over channels)", fontsize=8)
    ax2.grid(axis="y", alpha=0.3)
    ax2.set_xticks(
        list(xs),
        [
            f"{short_name(r['module'], 18)}{'' if r['gate'] in ('channel', 'gate') else '·' + r['gate'][:2]}"
            for r in summary
        ],
        rotation=70,
        fontsize=max(4.5, min(7, 300 / len(summary))),
        ha="right",
    )
    last = next(
        (g for g in reversed(e.gates) if g.kind != "spatial" and all((g.module, g.name) in v.gates for v in shown)),
        None,
    )
    ax3 = fig.add_subplot(gs[2])
    if last is not None:
        for i, view in enumerate(shown):
            t = view.gates[(last.module, last.name)]
            ax3.plot(t.reshape(t.shape[0], -1).mean(-1).numpy(), lw=0.9, alpha=0.8, label=Path(e.images[i]).name)
        ax3.set_xlabel(f"channel of {last.module} ({last.name} gate), in index order", fontsize=8)
        ax3.set_ylabel("gate", fontsize=8)
        ax3.grid(alpha=0.3)
    for ax in (ax1, ax2, ax3):
        ax.tick_params(labelsize=7)
    model = e.model.split(":", 1)[-1]
    fig.suptitle(f"{model}: gates of the {e.gate_view} model across {len(shown)} images", fontsize=10)
    fig.subplots_adjust(left=0.1, right=0.98, top=0.94, bottom=0.07)
    return fig
