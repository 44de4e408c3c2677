"""A ProfileResult as a table for people, CSV for spreadsheets, markdown for papers."""

from __future__ import annotations

import csv
import io
from typing import Any

from . import ProfileResult


def to_csv(result: ProfileResult) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["model", "metric", "base", "modified", "delta", "delta_percent", "runtime"])
    for metric, b, base, mod, delta, pct in result.rows():
        name = f"{metric.key} (bs={b})" if metric.per_batch else metric.key
        writer.writerow([result.model, name, _num(base), _num(mod), _num(delta), _num(pct, 4), "eager" if metric.per_batch else ""])
    for r in result.runtimes:
        if r.runtime == "eager":  # its rows are the ones above
            continue
        if r.error:
            writer.writerow([result.model, "error", r.error, "", "", "", r.label])
        for metric, b, base, mod, delta, pct in r.rows(result.settings.batch_sizes):
            writer.writerow([result.model, f"{metric.key} (bs={b})", _num(base), _num(mod), _num(delta), _num(pct, 4), r.label])
    return buf.getvalue()


def to_markdown(result: ProfileResult) -> str:
    s = result.settings
    lines = [
        f"**{result.model}** ({result.source}), input {'×'.join(map(str, result.input_size))}, "
        f"{s.device}, {s.dtype}, {s.mode}, {result.environment['threads']} threads, torch {result.environment['torch_version']}",
        "",
        "| metric | base | modified | delta | delta % |",
        "|---|---:|---:|---:|---:|",
    ]
    for metric, b, base, mod, delta, pct in result.rows():
        lines.append(f"| {metric.row_label(b)} | {metric.format(base)} | {metric.format(mod)} | "
                     f"{metric.format(delta, True) if metric.delta else ''} | {'-' if pct is None else f'{pct:+.2f}%'} |")
    if result.runtimes and [r.runtime for r in result.runtimes] != ["eager"]:
        lines += ["", "| runtime | metric | base | modified | delta | delta % | output check |", "|---|---|---:|---:|---:|---:|---|"]
        for r in result.runtimes:
            if r.error:
                lines.append(f"| {r.label} | not measured: {r.error} | | | | | |")
            for metric, b, base, mod, delta, pct in r.rows(s.batch_sizes):
                lines.append(f"| {r.label} | {metric.row_label(b)} | {metric.format(base)} | {metric.format(mod)} | "
                             f"{metric.format(delta, True) if metric.delta else ''} | {'-' if pct is None else f'{pct:+.2f}%'} | "
                             f"{r.check()} |")
    if result.insertions:
        lines += ["", "| inserted module | position | params | MACs |", "|---|---|---:|---:|"]
        for i in result.insertions:
            lines.append(f"| {i.module} | {i.where} | {i.params:,} | {i.macs:,} |")
    return "\n".join(lines) + "\n"


def _num(value: Any, digits: int = 6) -> Any:
    if value is None:
        return ""
    return round(value, digits) if isinstance(value, float) else value
