"""``sweep``'s progress bar (or, in a log, one line per change) and its tables, one per model (Rich,
to stdout; the bar to stderr)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .render import _digits, _escape, _stdout, _Steps

if TYPE_CHECKING:
    from rich.progress import TaskID


class _SweepProgress(_Steps):
    """A bar with ETA over the sweep's rows, on stderr; where stderr is not a terminal (a log, a batch
    job), one line per change instead, so that a sweep stopped from outside has said how far it got."""

    def __init__(self) -> None:
        import os

        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._file = os.fdopen(os.dup(2), "w")
        self.lines = not self._file.isatty()
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(file=self._file),
            transient=True,
            disable=self.lines,
        )
        self.task: TaskID | None = None  # set on entering the with block
        self._said = ""

    def __enter__(self) -> _SweepProgress:
        self.progress.__enter__()
        self.task = self.progress.add_task("sweep", total=None)
        return self

    def __call__(self, name: str, done: int, total: int, in_flight: int | None = None) -> None:  # type: ignore[override]
        if in_flight is not None:  # on Ray: several rows at once
            text = f"{in_flight} row(s) in flight" if in_flight else "done"
        else:
            text = f"measuring {name}" if name else "done"
        assert self.task is not None, "a progress bar is used inside its with block"
        self.progress.update(self.task, total=total, completed=done, description=text)
        line = f"sweep: {done}/{total} rows done · {text}"
        if self.lines and line != self._said:
            self._said = line
            self._file.write(line + "\n")
            self._file.flush()


def print_sweep(result: Any) -> None:
    from rich.table import Table

    from ..profiling.intervals import format_interval, unresolved
    from ..profiling.metrics import METRICS, get
    from ..profiling.report import UNRESOLVED

    out = _stdout()
    rows = result.rows
    shown = [m for m in METRICS if m.summary]
    failures, noisy = [], False
    models = list(dict.fromkeys(r.get("model", "") for r in rows))
    for model in models:  # one table per model (a zoo sweep has several)
        mine = [r for r in rows if r.get("model", "") == model]
        ok = [r for r in mine if r["status"] == "ok"]
        title = f"{model} · batch {ok[0]['batch_size']}" if ok else f"{model} ({result.folder})"
        table = Table(title=title, title_justify="left")
        table.add_column("configuration")
        for m in shown:
            table.add_column(m.label + (f" ({m.unit})" if m.unit else ""), justify="right")
            table.add_column(f"Δ {m.label}", justify="right")
        for r in mine:
            if r["status"] != "ok":
                failures.append(r)
                table.add_row(r["name"], f"[red]failed ({len(failures)})[/]", *[""] * (2 * len(shown) - 1))
                continue
            base = r["name"] == "base"
            flag = "[yellow]![/]" if any("noisy" in w for w in r.get("warnings", [])) else ""
            noisy = noisy or bool(flag)
            cells = [f"[bold]{r['name']}[/]" if base else r["name"]]
            for m in shown:
                value, pct = get(r, m.key), get(r["delta_percent"], m.key)
                cells.append(m.format(value, unit=False) + (flag if m.key.startswith("latency") else ""))
                ci = get(r.get("delta_ci") or {}, m.key) if m.interval else None
                if base or pct is None:
                    cells.append("")
                elif ci:  # the paired interval: "+1.23 (+3.2% [+1.9, +4.6])", or no difference resolved
                    unclear = unresolved(ci["low"], ci["high"])
                    delta = UNRESOLVED if unclear else m.format(get(r["delta"], m.key), True, unit=False)
                    cells.append(f"{delta} ({_escape(format_interval(pct, ci['low'], ci['high']))})")
                else:
                    cells.append(f"{m.format(get(r['delta'], m.key), True, unit=False)} ({pct:+.{_digits(pct)}f}%)")
            table.add_row(*cells)
        out.print(table)
    for i, r in enumerate(failures, 1):
        where = f"{r.get('model')}/" if len(models) > 1 else ""
        out.print(f"[red]failed ({i})[/] {_escape(where + r['name'])}: {_escape(r['reason'])}")
    if noisy:
        out.print(
            "[yellow]![/] noisy timing: IQR above 10% of the median (other work on the machine, or more threads "
            "than free cores: try --threads 1 or a longer --max-time); treat those Δ latency figures with care."
        )
    reused = len(rows) - len(result.measured)
    out.print(
        f"Δ figures compare each row with the base model measured alongside it; Δ latency: median of the paired "
        "per-round ratios [95 % interval]. "
        f"{len(result.measured)} row(s) measured now"
        + (f", {reused} kept from the earlier run" if reused else "")
        + "."
    )
    out.print(f"wrote {result.folder}/results.csv, results.json, rows.jsonl" + (", plot.png" if result.plot else ""))
