"""Take the modified model away: safetensors + recipe, torch.export, ONNX, TorchScript.

The format follows the file's extension (or ``format=``); :data:`FORMATS` holds one record per format:

* ``.safetensors`` — every weight, base and inserted, plus the recipe that rebuilds the
  architecture (model, insertions, input size, package versions) in the file's metadata.
  :func:`load` rebuilds the exact modified model; no pickle is ever read. For fine-tuning.
* ``.pt2`` — a ``torch.export`` ExportedProgram (eval mode), loadable with ``torch.export.load``
  where attnsurgeon is not installed.
* ``.onnx`` — through ``torch.onnx``, then run in onnxruntime and compared with PyTorch.
* ``.ts`` — TorchScript (traced), loadable with ``torch.jit.load``.

Every export is written to a temporary file beside the target, loaded back and compared with the
in-memory model on a sample input, and only then renamed into place: a failure leaves no file.
The batch is dynamic by default (checked at two batch sizes); a model whose code fixes its batch
size is written with a static batch instead, with a warning saying why.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import AttnSurgeonError, one_line
from ..core.files import atomic_path, existing_folder
from ..core.native import quiet_torch_warnings
from .formats import FORMATS, Format, exception_chain, format_by_extension, onnx_session, quantize_onnx, resolve_format
from .saved import load

__all__ = [
    "FORMATS",
    "ExportReport",
    "Format",
    "check_exportable",
    "check_target",
    "export",
    "format_by_extension",
    "onnx_session",
    "quantize_onnx",
    "resolve_format",
]


@dataclass
class ExportReport:
    format: str
    path: str
    size_bytes: int
    max_abs_diff: float
    tolerance: float
    input_shape: list[int]
    dynamic_batch: bool
    checked_batch_sizes: list[int]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_target(path: str | os.PathLike, fmt: str | None = None, force: bool = False) -> str:
    """Every check that can fail before a model is built: format, folder, overwrite, extra packages."""
    fmt = resolve_format(path, fmt)
    p = Path(path).expanduser()
    if p.is_dir():
        raise AttnSurgeonError(f"'{p}' is a folder; give a file name such as {p / ('model.' + fmt)}")
    existing_folder(p)
    if p.exists() and not force:
        raise AttnSurgeonError(f"'{p}' exists; pass --force to overwrite it")
    FORMATS[fmt].check_requirements()
    return fmt


def export(
    model: Any,
    path: str | os.PathLike,
    *,
    format: str | None = None,
    input_size: Any = None,
    batch_size: int = 1,
    dynamic_batch: bool = True,
    force: bool = False,
    tolerance: float = 1e-4,
) -> ExportReport:
    """Write ``model`` to ``path`` and check the written file reproduces it.

    Args:
        model: a model from :func:`attnsurgeon.insert` / :func:`load`, any ``nn.Module`` (not for
            ``.safetensors``, which needs a recipe), or the path of a saved ``.safetensors``.
        path: the target; its extension picks the format unless ``format`` is given.
        input_size, batch_size: the sample input (``input_size`` defaults to the recipe's).
        dynamic_batch: make the batch dimension dynamic (pt2, onnx, ts), checked at two batch sizes
            (``batch_size``, at least 2, and one more). A model whose code fixes its batch size is
            written with a static batch of ``batch_size`` instead, and the report's ``warnings``
            say why. ``False`` writes a static batch of ``batch_size``. A ``.safetensors`` file
            holds no input shape: its rebuilt model takes any batch.
        force: overwrite an existing file.
        tolerance: the largest max-abs difference allowed, relative to the output's scale
            (``max|diff| <= tolerance * max(1, max|reference|)``).

    Example:
        >>> model, _ = attnsurgeon.insert("resnet18", attn="se")
        >>> export(model, "se18.onnx", input_size=224).dynamic_batch
        True
    """
    from ..graph.layout import resolve_input_size
    from ..loading.sizes import default_input_size

    fmt = check_target(path, format, force)
    spec = FORMATS[fmt]
    if isinstance(model, (str, os.PathLike)):
        model = load(model)
    if batch_size < 1:
        raise AttnSurgeonError(f"batch size must be ≥ 1, got {batch_size}")
    report = getattr(model, "attnsurgeon_report", None)
    default = tuple(report.input_size) if report is not None else default_input_size(model)
    size = resolve_input_size(input_size, default)
    if spec.needs_recipe:
        _check_recipe(report, fmt)
    check_exportable(model, fmt)
    if not spec.needs_recipe:  # pt2/onnx/ts hold the plain graph: a memory-efficient model's segments inlined
        from ..rewriting.memory import plain

        model = plain(model)
    was_training = model.training
    model.eval()
    try:
        with atomic_path(path, force=force) as tmp, quiet_torch_warnings():
            if dynamic_batch and spec.holds_batch:
                try:
                    result = _write_and_check(spec, model, tmp, size, max(batch_size, 2), True, tolerance)
                except _NotDynamic as exc:  # the model's code fixes its batch size: write that instead
                    result = _write_and_check(spec, model, tmp, size, batch_size, False, tolerance)
                    result.warnings.append(f"the batch is static ({batch_size}): {exc}")
            else:
                result = _write_and_check(spec, model, tmp, size, batch_size, False, tolerance)
            result.size_bytes = tmp.stat().st_size
    finally:
        model.train(was_training)
    result.path = str(Path(path).expanduser())
    return result


def _check_recipe(report: Any, fmt: str) -> None:
    """A format that holds the recipe needs a model made by attnsurgeon, with what rebuilds it."""
    if report is None:
        raise AttnSurgeonError(
            f"a .{fmt} export needs the recipe of a model made by attnsurgeon "
            "(attnsurgeon.insert or attnsurgeon.load); save plain weights with safetensors directly"
        )
    if report.model.startswith("object:") and getattr(report, "base_object", None) is None:
        raise AttnSurgeonError(
            f"this model was made from a model object ({report.model[7:]}) that its report no longer "
            "holds, so the written file cannot be checked; insert into the object again and export that"
        )


class _NotDynamic(Exception):
    """The file could not be written, or does not run, with a dynamic batch: the message says why."""


def _write_and_check(
    spec: Format, model: Any, tmp: Path, size: tuple, batch: int, dynamic: bool, tolerance: float
) -> ExportReport:
    """Write ``tmp`` at sample batch ``batch`` and compare it with ``model`` (at ``batch + 1`` too when
    ``dynamic``); a failure that only the dynamic batch causes raises :class:`_NotDynamic`."""
    import torch

    from ..loading.samples import batch_of, max_abs_diff, output_scale, sample_args

    gen = torch.Generator().manual_seed(0)
    checks = [sample_args(model, size, b, generator=gen) for b in ([batch, batch + 1] if dynamic else [batch])]
    references = []
    for i, c in enumerate(checks):
        try:
            with torch.no_grad():
                references.append(model(*c))
        except Exception as exc:
            if i == 0:
                raise
            raise _NotDynamic(f"the model itself fails at batch {batch_of(c)} ({one_line(exc)})") from exc
    try:
        notes = spec.writer(model, tmp, checks[0], dynamic) or []  # what the format changed, said
    except AttnSurgeonError as exc:
        if not dynamic:
            raise
        raise _NotDynamic(f"{spec.title} could not make it dynamic ({_why_not_dynamic(exc)})") from exc
    run = spec.reader(tmp, model)
    diffs, scale = [], max(1.0, max(output_scale(r) for r in references))
    for i, (c, ref) in enumerate(zip(checks, references, strict=True)):  # one reference per check, or raised
        try:
            diffs.append(max_abs_diff(run(*c), ref))
        except Exception as exc:
            if i == 0:
                raise
            raise _NotDynamic(f"the written file fails at batch {batch_of(c)} ({one_line(exc)})") from exc
        if not diffs[-1] <= tolerance * scale:  # also catches NaN
            if i > 0:
                raise _NotDynamic(
                    f"the written file does not reproduce the model at batch {batch_of(c)} "
                    f"(max abs diff {diffs[-1]:.3g})"
                )
            raise AttnSurgeonError(
                f"the written {spec.name} file does not reproduce the model: max abs diff {diffs[-1]:.3g} "
                f"exceeds the tolerance {tolerance:g} x {scale:.3g}; nothing was written"
            )
    report = ExportReport(
        spec.name, str(tmp), 0, max(diffs), tolerance, [batch, *size], dynamic, [batch_of(c) for c in checks]
    )
    report.warnings += notes
    return report


def _why_not_dynamic(exc: BaseException) -> str:
    import re

    text = "\n".join(str(e) for e in exception_chain(exc))
    fixed = re.search(r"specialized it to be a constant \((\d+)\)", text)
    if fixed:
        return f"the model's code fixes the batch size at {fixed.group(1)}"
    guard = re.search(r"satisfy the generated guard (.+?)\.?$", text, re.M)
    if guard:
        return "the model's code only holds when " + re.sub(r"L\['\w+'\]\.size\(\)\[0\]", "batch", guard.group(1))
    return str(exc)


def check_exportable(model: Any, fmt: str) -> None:
    """Refuse, before any work, a format the model cannot be written in: torch.export, ONNX and
    TorchScript tracing need tensors in; a detector takes a list of images and loops over it."""
    from ..loading.samples import IMAGES, input_kind

    if FORMATS[fmt].holds_batch and input_kind(model)[0] == IMAGES:
        raise AttnSurgeonError(
            f"{type(model).__name__} takes a list of images and runs Python loops and data-dependent control flow "
            f"over them (resizing, anchors, non-maximum suppression), which {fmt} cannot capture; "
            "write it as .safetensors (weights + recipe, reloaded with attnsurgeon.load)"
        )
