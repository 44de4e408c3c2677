"""A ProfileResult as a table for people, CSV for spreadsheets, markdown for papers."""

from __future__ import annotations

import csv
import io
from typing import Any

from . import ProfileResult


def to_csv(result: ProfileResult) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["model", "metric", "base", "modified", "delta", "delta_percent"])
    for metric, b, base, mod, delta, pct in result.rows():
        name = f"{metric.key} (bs={b})" if metric.per_batch else metric.key
        writer.writerow([result.model, name, _num(base), _num(mod), _num(delta), _num(pct, 4)])
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
    if result.insertions:
        lines += ["", "| inserted module | position | params | MACs |", "|---|---|---:|---:|"]
        for i in result.insertions:
            lines.append(f"| {i.module} | {i.where} | {i.params:,} | {i.macs:,} |")
    return "\n".join(lines) + "\n"


def _num(value: Any, digits: int = 6) -> Any:
    if value is None:
        return ""
    return round(value, digits) if isinstance(value, float) else value
