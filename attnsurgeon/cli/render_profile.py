"""``profile``'s tables: totals per batch size with their intervals, the per-insertion breakdown, the
timing note under them and one row per runtime (Rich, to stdout; notes and warnings to stderr)."""

from __future__ import annotations

from typing import Any

from .render import _digits, _escape, _stderr, _stdout


def print_profile(result: Any, memory_efficient: bool = False) -> None:
    """``profile``'s table; ``memory_efficient``: the modified model recomputes its attention in the
    backward pass, which the header says, with what the modified model then is."""
    from rich.table import Table

    from ..profiling import FLOP_CONVENTION
    from ..profiling.intervals import format_interval
    from ..profiling.report import delta_cell

    out = _stdout()
    s, env = result.settings, result.environment
    device = s.device if env["device_name"] == "cpu" else f"{s.device} ({env['device_name']})"
    out.print(
        f"[bold]{result.model}[/] ({result.source}) · input {'×'.join(map(str, result.input_size))} · "
        f"{device} · {s.dtype} · {s.mode} · {env['threads']} threads · torch {env['torch_version']}"
        + (" · channels-last" if s.channels_last else "")
        + (" · compiled" if s.compile else "")
        + (" · memory-efficient" if memory_efficient else "")
    )
    alone = result.modified is None
    table = Table()
    for col in ("metric", "value") if alone else ("metric", "base", "modified", "delta", "delta %"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for metric, b, base, mod, delta, pct, ci in result.rows():
        if alone:
            table.add_row(metric.row_label(b), metric.format(base))
        elif not metric.delta:  # a spread has no meaningful difference
            table.add_row(metric.row_label(b), metric.format(base), metric.format(mod), "", "")
        else:
            shown = _escape(format_interval(*ci)) if ci else "-" if pct is None else f"{pct:+.{_digits(pct)}f}%"
            table.add_row(
                metric.row_label(b), metric.format(base), metric.format(mod), delta_cell(metric, delta, ci), shown
            )
    out.print(table)
    print_timing(result)
    if result.base.compile_s is not None:
        mod = f", modified {result.modified.compile_s:.1f} s" if result.modified else ""
        out.print(f"compile time (not in latency): base {result.base.compile_s:.1f} s{mod}")
    out.print(f"[dim]{FLOP_CONVENTION}[/]")
    if memory_efficient:
        what = "the inserted blocks" if result.insertions else "modified = the same model with its own attention gates"
        out.print(
            f"memory-efficient: {what} (and the norm/activation before each) recomputed in the backward pass: "
            "the same parameters, MACs and outputs; what changes is a training step's peak memory and time"
            + ("" if s.mode == "train" else " (--mode train measures them; in inference nothing is recomputed)")
        )
    if result.insertions:
        per = Table(title="per insertion", title_justify="left")
        for col in ("module", "position", "params", "MACs"):
            per.add_column(col, justify="right" if col in ("params", "MACs") else "left")
        for i in result.insertions:
            per.add_row(i.module, i.where, f"{i.params:,}", f"{i.macs:,}")
        if result.unattributed_macs:
            per.add_row("(outside inserted modules)", "", "", f"{result.unattributed_macs:,}")
        per.add_row(
            "[bold]total[/]",
            "",
            f"{sum(i.params for i in result.insertions):,}",
            f"{sum(i.macs for i in result.insertions) + result.unattributed_macs:,}",
        )
        out.print(per)
    print_runtimes(result)
    err = _stderr()
    for note in result.notes:  # as insert says them
        err.print(f"[dim]note: {_escape(note)}[/]")
    for w in result.warnings:
        err.print(f"[yellow]warning:[/] {_escape(w)}")


def print_timing(result: Any) -> None:
    """Under the table: how latency was timed, what the machine was doing, and how to read the intervals."""
    from ..profiling.intervals import MIN_ROUNDS

    env = result.environment
    lines = []
    for b, lat in result.base.latency.items():
        mod = result.modified.latency.get(b) if result.modified else None
        warm = f"warm-up {lat.warmup}" + (f"/{mod.warmup}" if mod else "") + " calls until stable"
        lines.append(
            f"batch {b}: {lat.runs} {'paired, alternating ' if mod else ''}rounds of {lat.calls} call(s) · {warm}"
        )
    load = env.get("load_average") or {}
    if load.get("start") and load.get("end"):
        lines.append(
            f"load average {'/'.join(f'{v:.2f}' for v in load['start'])} at the start, "
            f"{'/'.join(f'{v:.2f}' for v in load['end'])} at the end (1/5/15 min) · "
            f"{env['threads']} thread{'s' if env['threads'] != 1 else ''}"
        )
    out = _stdout()
    out.print("[dim]timing: " + " · ".join(lines) + "[/]")
    if result.modified is None:
        return
    rounds = [lat.runs for lat in result.modified.latency.values()]
    out.print(
        "[dim]Δ latency %: median of the per-round ratios modified/base, [95 % interval] (order statistics); "
        "where it contains 0, no difference is resolved: --target-ci PCT times until it is within ±PCT, "
        "up to --max-time"
        + (f"; an interval needs {MIN_ROUNDS} rounds" if rounds and min(rounds) < MIN_ROUNDS else "")
        + "[/]"
    )


def print_runtimes(result: Any) -> None:
    """``profile --runtime``: latency and memory per runtime, base and modified, each checked against eager."""
    from rich.table import Table

    from ..profiling.intervals import format_interval
    from ..profiling.report import delta_cell

    if not result.runtimes or [r.runtime for r in result.runtimes] == ["eager"]:
        return
    out = _stdout()
    alone = result.modified is None
    table = Table(
        title="per runtime (outputs checked against eager first; the per-insertion figures are eager's)",
        title_justify="left",
    )
    for col in (
        "runtime",
        "metric",
        *(("value",) if alone else ("base", "modified", "delta", "delta %")),
        "output check",
    ):
        table.add_column(col, justify="left" if col in ("runtime", "metric", "output check") else "right")
    failures = []
    for r in result.runtimes:
        rows = r.rows(result.settings.batch_sizes)
        if r.error:
            failures.append(r)
            table.add_row(
                r.label, f"[red]not measured ({len(failures)})[/]", *[""] * (1 if alone else 4), "", end_section=True
            )
        for i, (metric, b, base, mod, delta, pct, ci) in enumerate(rows):
            shown = (
                _escape(format_interval(*ci))
                if ci
                else ""
                if pct is None or not metric.delta
                else f"{pct:+.{_digits(pct)}f}%"
            )
            cells = (
                [metric.format(base)]
                if alone
                else [metric.format(base), metric.format(mod), delta_cell(metric, delta, ci), shown]
            )
            table.add_row(
                r.label if i == 0 else "",
                metric.row_label(b),
                *cells,
                (r.check() if r.runtime != "eager" else "(the reference)") if i == 0 else "",
                end_section=i == len(rows) - 1,
            )
    out.print(table)
    for i, r in enumerate(failures, 1):
        out.print(f"[red]not measured ({i})[/] {r.label}: {_escape(r.error)}")
    int8 = [r for r in result.runtimes if r.precision == "int8" and r.max_abs_diff]
    for r in int8:
        out.print(
            f"{r.label} output error against the float model: "
            + ", ".join(f"{name} max abs diff {diff:.3g}" for name, diff in r.max_abs_diff.items())
            + f" (output scale {r.output_scale:.3g})"
        )
