"""A ProfileResult as a table for people, CSV for spreadsheets, markdown for papers."""

from __future__ import annotations

import csv
import io
from typing import Any

from . import ProfileResult


def fmt(metric: str, value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    sign = "+" if signed else ""
    if metric in ("MACs", "FLOPs"):
        return f"{value / 1e9:{sign}.4f} G"
    if metric == "params":
        return f"{value:{sign},.0f}"
    if metric.startswith("peak memory"):
        return f"{value / 2**20:{sign},.2f} MiB"
    if metric.startswith("throughput"):
        return f"{value:{sign},.1f}"
    return f"{value:{sign},.3f}"


def label(metric: str) -> str:
    return (metric.replace("peak memory bytes", "peak memory").replace("latency IQR ms", "latency IQR (ms)")
            .replace("latency ms", "latency (ms)"))


def to_csv(result: ProfileResult) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["model", "metric", "base", "modified", "delta", "delta_percent"])
    for metric, base, mod, delta, pct in result.rows():
        writer.writerow([result.model, metric, _num(base), _num(mod), _num(delta), _num(pct, 4)])
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
    for metric, base, mod, delta, pct in result.rows():
        lines.append(f"| {label(metric)} | {fmt(metric, base)} | {fmt(metric, mod)} | {fmt(metric, delta, True)} | "
                     f"{'-' if pct is None else f'{pct:+.2f}%'} |")
    if result.insertions:
        lines += ["", "| inserted module | position | params | MACs |", "|---|---|---:|---:|"]
        for i in result.insertions:
            lines.append(f"| {i.module} | {i.where} | {i.params:,} | {i.macs:,} |")
    return "\n".join(lines) + "\n"


def _num(value: Any, digits: int = 6) -> Any:
    if value is None:
        return ""
    return round(value, digits) if isinstance(value, float) else value
