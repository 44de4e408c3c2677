"""What the command line shows people: tables, one-line reports, progress on stderr.

The commands in :mod:`attnsurgeon.cli` parse options and call the Python API; everything they
print is drawn here (Rich). Output for people goes to stdout; progress, notes and warnings to
stderr; ``--json`` objects are written by :func:`emit_json`. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from ..blocks.external import display_name

if TYPE_CHECKING:
    from rich.progress import TaskID


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())


def _stdout():
    from rich.console import Console

    # Piped output (logs, `| less`) gets room for whole names instead of an 80-column cut.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


_json_out: list[Any] = []  # where emit_json writes while a --json command runs (see json_stdout)


def emit_json(obj: Any) -> None:
    out = _json_out[-1] if _json_out else sys.stdout
    out.write(json.dumps(obj, indent=2, default=str) + "\n")
    out.flush()


@contextmanager
def json_stdout() -> Iterator[None]:
    """Under ``--json`` stdout holds the one JSON object and nothing else: while the command runs, whatever
    else writes to stdout goes to stderr, whether it prints, logs through a handler that kept the stream
    it found at import (ultralytics' model summary), or writes to file descriptor 1 from native code."""
    real = sys.stdout
    real.flush()
    try:
        fd = real.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (the test runner's capture): Python level only
        fd = None
    out: TextIO
    if fd == 1:
        out = os.fdopen(os.dup(1), "w", encoding=getattr(real, "encoding", None) or "utf-8")
        sys.stderr.flush()
        os.dup2(2, 1)
    else:
        out = real
    _json_out.append(out)
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = real
        _json_out.pop()
        if out is not real:
            sys.stderr.flush()
            real.flush()  # what went to fd 1 in the meantime, by its stream's buffer, lands on stderr
            os.dup2(out.fileno(), 1)
            out.close()


def progress(message: str):
    """A spinner on stderr while heavy work runs (silent where stderr is not a terminal)."""
    return _stderr().status(message, spinner="dots")


def print_report(report: Any) -> None:
    from rich.table import Table

    out = _stdout()
    size = "×".join(map(str, report.input_size))
    key = f" ({report.weights_key})" if getattr(report, "weights_key", None) else ""
    weights = f" · weights: {_escape(report.weights)}{key}" if report.weights else ""
    part = f" · traced: {', '.join(report.target)}" if report.target else ""
    table = Table(title=f"{report.model} ({report.source}) · input {size}{weights}{part}", title_justify="left")
    swaps = [i for i in report.insertions if i.replaced]
    columns: list[tuple[str, dict[str, Any]]] = [
        ("block", {}),
        ("stage", {"justify": "right"}),
        ("position", {}),
        ("attn", {}),
        ("channels", {"justify": "right"}),
        ("params", {"justify": "right"}),
        ("module", {}),
        ("options", {}),
    ]
    if swaps:
        columns.insert(6, ("replaces (params)", {}))
    for col, kw in columns:
        table.add_column(col, overflow="fold", **kw)
    for i in report.insertions:
        opts = ", ".join(f"{k}={v}" for k, v in i.options.items())
        where = f"{i.position} {i.anchor}" if getattr(i, "anchor", None) else i.position
        row = [
            i.block,
            str(i.stage or "-"),
            where,
            display_name(i.attn),
            str(i.channels),
            f"{i.params:,}",
            i.module,
            opts,
        ]
        if swaps:
            row.insert(6, f"{i.replaced} ({i.replaced_params:,})" if i.replaced else "")
        table.add_row(*row)
    out.print(table)
    p = report.params
    removed = sum(1 for i in swaps if i.attn == "none")
    convs = sum(1 for i in swaps if i.position == "conv")  # a conv block (sk, splat) in a convolution's place
    counts = [
        (len(report.insertions) - len(swaps), "block", "inserted"),
        (len(swaps) - removed - convs, "attention module", "replaced"),
        (removed, "attention module", "removed"),
        (convs, "convolution", "replaced"),
    ]
    said = " · ".join(
        f"{n} {noun}{'s' if n != 1 else ''} {what}" for n, noun, what in counts if n or (noun == "block" and not swaps)
    )
    out.print(
        f"{said} · parameters "
        f"{p['base']:,} → {p['modified']:,} ([bold]{p['delta']:+,}[/], {p['percent']:+.{_digits(p['percent'])}f}%)"
    )
    print_memory_efficient(report)
    for note in report.notes:
        _stderr().print(f"[dim]note: {_escape(note)}[/]")


def print_memory_efficient(report: Any, table: bool = False) -> None:
    """The recomputed segments of a memory-efficient model: a summary line, and with ``table`` one row each."""
    segments = getattr(report, "memory_efficient", None)
    if segments is None:
        return
    out = _stdout()
    if table:
        from rich.table import Table

        t = Table(
            title=f"{report.model} ({report.source}) · attention recomputed in the backward pass", title_justify="left"
        )
        for col in ("attention module", "recomputed from", "ops", "method"):
            t.add_column(col, overflow="fold", justify="right" if col == "ops" else "left")
        for s in segments:  # method: "selective" (the maps rebuilt from the norm's input) or "checkpoint" (all re-run)
            t.add_row(s.module, s.start or "(the module alone)", str(s.ops), s.method)
        out.print(t)
    widened = sum(1 for s in segments if s.start)
    methods = Counter(s.method for s in segments)
    out.print(
        f"memory-efficient: {len(segments)} attention module{'s' if len(segments) != 1 else ''} recomputed in the "
        f"backward pass ({widened} with the norm/activation before {'them' if widened != 1 else 'it'}; "
        f"{', '.join(f'{n} {method}' for method, n in sorted(methods.items(), reverse=True))}) · "
        "outputs, parameters and names unchanged"
    )


def _digits(percent: float) -> int:
    """Enough decimals that a small change does not print as +0.00%."""
    small = abs(percent)
    return 2 if small >= 0.01 or small == 0 else 4 if small >= 0.0001 else 6


def print_export(written: Any) -> None:
    dyn = (
        " (dynamic batch, checked at " + ", ".join(map(str, written.checked_batch_sizes)) + ")"
        if written.dynamic_batch
        else ""
    )
    _stdout().print(
        f"wrote [bold]{_escape(written.path)}[/] · {written.format} · {written.size_bytes / 2**20:,.1f} MiB · "
        f"loaded back: max abs diff {written.max_abs_diff:.3g} on input {tuple(written.input_shape)}{dyn}"
    )
    for warning in written.warnings:
        _stderr().print(f"[yellow]warning:[/] {_escape(warning)}")


class _Steps:
    """A Rich progress line on stderr, drawn on a duplicate of fd 2 so that silencing native
    output (the profiler's start-up noise) never swallows it."""

    def __init__(self) -> None:
        import os

        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._file = os.fdopen(os.dup(2), "w")
        console = Console(file=self._file, highlight=False)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not self._file.isatty(),
        )
        self.task: TaskID | None = None  # set on entering the with block

    def __enter__(self) -> _Steps:
        self.progress.__enter__()
        self.task = self.progress.add_task("Starting", total=None)
        return self

    def __call__(self, message: str) -> None:
        assert self.task is not None, "a progress line is used inside its with block"
        self.progress.update(self.task, description=message)

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)
        self._file.close()


def print_anatomy(loaded: Any, anatomy: Any, gates: list[str]) -> None:
    """`inspect`: stages and blocks, the positions each offers, the attention the model has."""
    from rich.table import Table

    out = _stdout()
    size = "×".join(map(str, anatomy.input_size))
    if anatomy.target:  # the parts that were traced, and the input each one sees
        sizes = anatomy.input_size if len(anatomy.target) > 1 else [anatomy.input_size]
        size = f"{'×'.join(map(str, anatomy.model_input_size))} · traced: " + ", ".join(
            f"{t} (input {'×'.join(map(str, s))})" for t, s in zip(anatomy.target, sizes, strict=False)
        )
    out.print(
        f"[bold]{loaded.spec}[/] ({loaded.origin}) · input {size} · {len(anatomy.blocks)} blocks in "
        f"{len(anatomy.stages)} stages (grouped by {anatomy.grouping})"
    )
    table = Table(show_lines=False)
    for col in ("stage", "block", "type", "kind", "skip", "channels", "resolution", "layout", "positions"):
        table.add_column(col, justify="right" if col in ("stage", "channels") else "left")
    for stage in anatomy.stages:
        for i, b in enumerate(stage.blocks):
            table.add_row(
                f"{stage.index} {stage.name}" if i == 0 else "",
                b.name,
                b.type,
                b.kind,
                b.skip or "-",
                str(b.channels),
                "×".join(map(str, b.resolution)),
                b.layout,
                " ".join(b.positions),
                end_section=i == len(stage.blocks) - 1,
            )
    out.print(table)
    if anatomy.existing_attention:
        out.print("Attention already in the model: " + ", ".join(f"{n} ({t})" for n, t in anatomy.existing_attention))
        out.print(
            f"--replace can take the place of {len(gates)} channel/spatial gate{'s' if len(gates) != 1 else ''}"
            + (f": {', '.join(gates[:3])}{', …' if len(gates) > 3 else ''}" if gates else "")
            + "; other attention is kept"
        )
    for note in anatomy.notes:  # on stderr, as insert prints its notes
        _stderr().print(f"[dim]note: {_escape(note)}[/]")


def print_anchors(rows: list[Any], glob: str = "**", left_out: int = 0) -> None:
    """``inspect --anchors [GLOB]``: the modules, what each receives and gives, and whether a block fits there;
    with a glob, how many rows it left out."""
    from rich.table import Table

    def shape(value: Any, layout: str | None) -> str:
        if value is None:
            return "-"
        text = "×".join(map(str, value[1:]))
        return f"{text} {layout}" if layout else f"[dim]{text}[/]"

    table = Table(
        title="Anchors: --after MODULE gates its output, --before MODULE its input (dim: no block fits)",
        title_justify="left",
    )
    columns: list[tuple[str, dict[str, Any]]] = [
        ("module", {}),
        ("type", {}),
        ("stage", {"justify": "right"}),
        ("input (--before)", {}),
        ("output (--after)", {}),
    ]
    for col, kw in columns:
        table.add_column(col, overflow="fold", **kw)
    for r in rows:
        table.add_row(
            _escape(r.name),
            r.type,
            str(r.stage or "-"),
            shape(r.input, r.layout_in),
            shape(r.output, r.layout_out) if not r.why_not else f"[dim]{_escape(r.why_not)}[/]",
        )
    _stdout().print(table)
    if left_out:
        _stdout().print(
            f"{len(rows)} rows shown (the modules matching '{_escape(glob)}' and those inside them), "
            f"{left_out} left out: `--anchors` alone lists every module"
        )


def print_table(columns: tuple[str, ...], rows: list[tuple], caption: str | None = None) -> None:
    """A plain table of strings on stdout (the `list` commands)."""
    from rich.table import Table

    table = Table(caption=caption)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    _stdout().print(table)


def print_explanation(result: Any, written: list[Any]) -> None:
    """``explain``: per image the class and where Grad-CAM peaks, then each gate's statistics
    (averaged over the images), then the files written."""
    from rich.table import Table

    out = _stdout()
    data = result.to_dict()
    views = [v for v in ("base", "modified") if data["images"] and v in data["images"][0]]
    table = Table(title=f"{_escape(data['model'])}: Grad-CAM at {_escape(data['gradcam']['layer'])}")
    for col in ("image", "class", *(f"{v} top-1 (p)" for v in views), *(f"{v} peak (y, x)" for v in views)):
        table.add_column(col)
    for im in data["images"]:
        name = f"{im['class']}" + (f" {im['class_name']}" if im.get("class_name") else "")
        tops = [f"{im[v]['top5'][0]['class']} ({im[v]['top5'][0]['probability']:.2f})" for v in views]
        peaks = [", ".join(map(str, im[v]["gradcam"]["peak_yx"])) for v in views]
        table.add_row(_escape(im["image"]), _escape(name), *tops, *peaks)
    out.print(table)
    gates = Table(title=f"attention gates of the {result.gate_view} model (mean over {len(data['images'])} image(s))")
    for col in ("module", "gate", "origin", "kind", "mean", "std", "near 0", "near 1"):
        gates.add_column(col, justify="right" if col in ("mean", "std", "near 0", "near 1") else "left")
    for g in data["gates"]:
        rows = [
            e
            for im in data["images"]
            for e in im[result.gate_view]["gates"]
            if e["module"] == g["module"] and e["gate"] == g["gate"]
        ]
        if not rows:
            continue
        avg = {k: sum(r[k] for r in rows) / len(rows) for k in ("mean", "std", "near_0", "near_1")}
        gates.add_row(
            _escape(g["module"]),
            _escape(g["gate"]),
            g["origin"],
            g["kind"] or "",
            f"{avg['mean']:.3f}",
            f"{avg['std']:.3f}",
            f"{100 * avg['near_0']:.0f}%",
            f"{100 * avg['near_1']:.0f}%",
        )
    if data["gates"]:
        out.print(gates)
    else:
        out.print("No attention gate in the model.")
    for note in data["notes"]:
        _stderr().print(f"[yellow]note:[/] {_escape(note)}")
    out.print("wrote " + ", ".join(_escape(str(w)) for w in written))
