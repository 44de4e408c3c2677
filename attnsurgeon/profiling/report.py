"""A ProfileResult as a table for people, CSV for spreadsheets, markdown for papers."""

from __future__ import annotations

import csv
import io
from typing import Any

from . import ProfileResult
from .intervals import format_interval, unresolved
from .metrics import Metric

UNRESOLVED = "no difference resolved"


def delta_cell(metric: Metric, delta: float | None, ci: tuple | None) -> str:
    """The Δ column: the difference, or where its 95 % interval contains 0, "no difference resolved"."""
    if not metric.delta:
        return ""
    if ci is not None and unresolved(ci[1], ci[2]):
        return UNRESOLVED
    return metric.format(delta, True)


def to_csv(result: ProfileResult) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        ["model", "metric", "base", "modified", "delta", "delta_percent", "delta_ci_low", "delta_ci_high", "runtime"]
    )
    eager = [("eager" if metric.per_batch else "", row) for row in result.rows() for metric in row[:1]]
    timed = [
        (r.label, row)
        for r in result.runtimes
        if r.runtime != "eager"  # eager's rows are the ones above
        for row in r.rows(result.settings.batch_sizes)
    ]
    for label, (metric, b, base, mod, delta, pct, ci) in [*eager, *timed]:
        name = f"{metric.key} (bs={b})" if metric.per_batch else metric.key
        low, high = ci[1:] if ci else (None, None)
        writer.writerow(
            [result.model, name, _num(base), _num(mod), _num(delta), _num(pct, 4), _num(low, 4), _num(high, 4), label]
        )
    for r in result.runtimes:
        if r.error:
            writer.writerow([result.model, "error", r.error, "", "", "", "", "", r.label])
    return buf.getvalue()


def to_markdown(result: ProfileResult) -> str:
    s = result.settings
    lines = [
        f"**{result.model}** ({result.source}), input {'×'.join(map(str, result.input_size))}, "
        f"{s.device}, {s.dtype}, {s.mode}, {result.environment['threads']} threads, "
        f"torch {result.environment['torch_version']}",
        "",
        "| metric | base | modified | delta | delta % |",
        "|---|---:|---:|---:|---:|",
    ]
    for metric, b, base, mod, delta, pct, ci in result.rows():
        shown = format_interval(*ci) if ci else "-" if pct is None else f"{pct:+.2f}%"
        lines.append(
            f"| {metric.row_label(b)} | {metric.format(base)} | {metric.format(mod)} | "
            f"{delta_cell(metric, delta, ci)} | {shown} |"
        )
    if result.runtimes and [r.runtime for r in result.runtimes] != ["eager"]:
        lines += [
            "",
            "| runtime | metric | base | modified | delta | delta % | output check |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for r in result.runtimes:
            if r.error:
                lines.append(f"| {r.label} | not measured: {r.error} | | | | | |")
            for metric, b, base, mod, delta, pct, ci in r.rows(s.batch_sizes):
                shown = format_interval(*ci) if ci else "-" if pct is None else f"{pct:+.2f}%"
                lines.append(
                    f"| {r.label} | {metric.row_label(b)} | {metric.format(base)} | {metric.format(mod)} | "
                    f"{delta_cell(metric, delta, ci)} | {shown} | {r.check()} |"
                )
    if result.insertions:
        lines += ["", "| inserted module | position | params | MACs |", "|---|---|---:|---:|"]
        for i in result.insertions:
            lines.append(f"| {i.module} | {i.where} | {i.params:,} | {i.macs:,} |")
    return "\n".join(lines) + "\n"


def _num(value: Any, digits: int = 6) -> Any:
    if value is None:
        return ""
    return round(value, digits) if isinstance(value, float) else value
