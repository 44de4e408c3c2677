"""The sweep's folder: ``sweep.json`` (what is swept, checked on resume), ``rows.jsonl`` (each finished
row, appended as it arrives) and the tables rewritten after each row (``results.csv``, ``results.json``)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from ..core.errors import AttnSurgeonError
from ..core.files import write_text_atomic

__all__ = ["SWEEP_FILE", "ROWS_FILE", "prepare_folder", "append_row", "write_tables"]

SWEEP_FILE = "sweep.json"
ROWS_FILE = "rows.jsonl"


def _csv_columns() -> list[str]:
    """name, status, then per metric its value, delta, delta % and the base's value; then the rest."""
    from ..profiling.metrics import TABLE_METRICS

    columns = ["model", "name", "status"]
    for m in TABLE_METRICS:
        columns += [m.column] + ([f"{m.column}_delta", f"{m.column}_delta_pct", f"base_{m.column}"] if m.delta else [])
        columns += [f"{m.column}_delta_ci_low", f"{m.column}_delta_ci_high"] if m.delta and m.interval else []
    return columns + ["reason", "insertions", "seconds"]


def prepare_folder(out: Path, definition: dict, resume: bool, force: bool, single: str | None) -> dict[tuple, dict]:
    """Create or check the folder; return the rows already finished (on resume), by (model, name)."""
    sweep_file, rows_file = out / SWEEP_FILE, out / ROWS_FILE
    if out.exists() and not out.is_dir():
        raise AttnSurgeonError(f"'{out}' exists and is not a folder")
    if sweep_file.exists():
        if not force:
            try:
                previous = json.loads(sweep_file.read_text())
            except json.JSONDecodeError as exc:
                raise AttnSurgeonError(f"'{sweep_file}' is not valid JSON ({exc}); start over with --force") from exc
            wanted = json.loads(json.dumps(definition))
            changed = [k for k in {**previous, **wanted} if previous.get(k) != wanted.get(k)]
            if changed:  # another sweep: --resume cannot finish this one there
                raise AttnSurgeonError(
                    f"'{out}' already holds a different sweep, with other values for: {', '.join(changed)}; "
                    + ("resume it with the arguments it was started with, " if resume else "")
                    + "give this sweep another --out, or pass --force to replace that one"
                )
            if resume:
                return _read_rows(rows_file, single)
            finished = len(_read_rows(rows_file, single))
            raise AttnSurgeonError(
                f"'{out}' already holds a sweep with these arguments ({finished} "
                f"row{'s' * (finished != 1)} finished): pass --resume to finish it, or --force to start over"
            )
        for name in (SWEEP_FILE, ROWS_FILE, "results.csv", "results.json", "plot.png"):
            (out / name).unlink(missing_ok=True)
    elif resume:
        raise AttnSurgeonError(f"nothing to resume in '{out}' (no {SWEEP_FILE})")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(sweep_file, json.dumps(definition, indent=2) + "\n")
    return {}


def _read_rows(rows_file: Path, single: str | None) -> dict[tuple, dict]:
    """The finished rows by (model, name); in a one-model sweep every row is that model's."""
    rows: dict[tuple, dict] = {}
    if rows_file.exists():
        for line in rows_file.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that row is measured again
            if single is not None:
                row["model"] = single
            rows[(row["model"], row["name"])] = row
    return rows


def append_row(out: Path, row: dict) -> None:
    with open(out / ROWS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_tables(out: Path, rows: list[dict]) -> None:
    from ..profiling.metrics import TABLE_METRICS, get

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_csv_columns(), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        flat = {**row, "insertions": json.dumps(row.get("insertions", []))}
        for m in TABLE_METRICS:  # the nested figures, one column each
            flat[m.column] = get(row, m.key)
            flat[f"{m.column}_delta"] = get(row.get("delta", {}), m.key)
            flat[f"{m.column}_delta_pct"] = get(row.get("delta_percent", {}), m.key)
            flat[f"base_{m.column}"] = get(row.get("base", {}), m.key)
            ci = get(row.get("delta_ci") or {}, m.key) if m.interval else None
            if ci:
                flat[f"{m.column}_delta_ci_low"], flat[f"{m.column}_delta_ci_high"] = ci["low"], ci["high"]
        writer.writerow(flat)
    write_text_atomic(out / "results.csv", buf.getvalue())
    write_text_atomic(out / "results.json", json.dumps(rows, indent=2) + "\n")
