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

import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..core.files import atomic_path, existing_folder
from ..core.native import quiet_torch_warnings
from ..core.errors import AttnSurgeonError
from .saved import FORMAT_KEY, FORMAT_VERSION, RECIPE_KEY, VERSIONS_KEY, load, recipe_of, versions

if TYPE_CHECKING:
    from ..planning.recipes import Recipe


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


def format_by_extension() -> dict[str, Format]:
    return {ext: f for f in FORMATS.values() for ext in f.extensions}


def resolve_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The format for ``path``: ``fmt`` if given, else from the extension. Refused before any work."""
    suffix = Path(path).suffix.lower()
    by_ext = format_by_extension()
    if fmt:
        fmt = fmt.lower().lstrip(".")
        if fmt not in FORMATS:
            raise AttnSurgeonError(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
        if suffix in by_ext and by_ext[suffix].name != fmt:
            raise AttnSurgeonError(
                f"'{path}' says {by_ext[suffix].name} but --format says {fmt}: a file named "
                f"{suffix} would not hold what its name promises; rename it or drop --format"
            )
        return fmt
    if suffix not in by_ext:
        raise AttnSurgeonError(
            f"cannot tell the format of '{path}' from its extension '{suffix or '(none)'}': "
            f"use {', '.join(by_ext)} or --format"
        )
    return by_ext[suffix].name


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
    from ..loading.models import default_input_size

    fmt = check_target(path, format, force)
    spec = FORMATS[fmt]
    if isinstance(model, (str, os.PathLike)):
        model = load(model)
    if batch_size < 1:
        raise AttnSurgeonError(f"batch size must be ≥ 1, got {batch_size}")
    report = getattr(model, "attnsurgeon_report", None)
    default = tuple(report.input_size) if report is not None else default_input_size(model)
    size = resolve_input_size(input_size, default)
    if spec.needs_recipe and report is None:
        raise AttnSurgeonError(
            f"a .{fmt} export needs the recipe of a model made by attnsurgeon "
            "(attnsurgeon.insert or attnsurgeon.load); save plain weights with safetensors directly"
        )
    if spec.needs_recipe and report.model.startswith("object:") and getattr(report, "base_object", None) is None:
        raise AttnSurgeonError(
            f"this model was made from a model object ({report.model[7:]}) that its report no longer "
            "holds, so the written file cannot be checked; insert into the object again and export that"
        )
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
            raise _NotDynamic(f"the model itself fails at batch {batch_of(c)} ({_first_line(exc)})") from exc
    try:
        spec.writer(model, tmp, checks[0], dynamic)
    except AttnSurgeonError as exc:
        if not dynamic:
            raise
        raise _NotDynamic(f"{spec.title} could not make it dynamic ({_why_not_dynamic(exc)})") from exc
    run = spec.reader(tmp, model)
    diffs, scale = [], max(1.0, max(output_scale(r) for r in references))
    for i, (c, ref) in enumerate(zip(checks, references)):
        try:
            diffs.append(max_abs_diff(run(*c), ref))
        except Exception as exc:
            if i == 0:
                raise
            raise _NotDynamic(f"the written file fails at batch {batch_of(c)} ({_first_line(exc)})") from exc
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
    return ExportReport(
        spec.name, str(tmp), 0, max(diffs), tolerance, [batch, *size], dynamic, [batch_of(c) for c in checks]
    )


def _why_not_dynamic(exc: BaseException) -> str:
    import re

    text = "\n".join(str(e) for e in _exception_chain(exc))
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


# --------------------------------------------------------------------------- safetensors + recipe


def _write_safetensors(model: Any, tmp: Path, x: Any, dynamic: bool) -> None:
    from safetensors.torch import save_file

    recipe = recipe_of(model)
    tensors: dict[str, Any] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # safetensors refuses shared storage: tied weights are stored twice
            t = t.clone()
        seen.add(ptr)
        tensors[name] = t
    metadata = {RECIPE_KEY: recipe.to_json(), VERSIONS_KEY: json.dumps(versions()), FORMAT_KEY: FORMAT_VERSION}
    save_file(tensors, str(tmp), metadata=metadata)


def _read_safetensors(tmp: Path, model: Any) -> Callable[..., Any]:
    """The written file rebuilt as :func:`load` rebuilds it; a model made from a module object is
    rebuilt on a copy of that object (the caller's own is left as it is), as ``load(path, base=...)`` does."""
    import copy

    base = getattr(model.attnsurgeon_report, "base_object", None)
    return _no_grad(load(tmp, base=copy.deepcopy(base) if base is not None else None).eval())


# --------------------------------------------------------------------------- torch.export


def _write_pt2(model: Any, tmp: Path, x: Any, dynamic: bool) -> None:
    import torch

    try:
        program = torch.export.export(model, x, dynamic_shapes=_dynamic_shapes(x, dynamic))
    except Exception as exc:
        raise AttnSurgeonError(f"torch.export failed: {_first_line(exc)}") from exc
    torch.export.save(program, str(tmp))


def _read_pt2(tmp: Path, model: Any) -> Callable[..., Any]:
    import torch

    return _no_grad(torch.export.load(str(tmp)).module())


# --------------------------------------------------------------------------- ONNX


def _write_onnx(model: Any, tmp: Path, x: Any, dynamic: bool) -> None:
    import re

    import torch

    from ..core.native import quiet_native_output

    names = ["input"] if len(x) == 1 else [f"input{i}" for i in range(len(x))]
    try:
        with warnings.catch_warnings(), quiet_native_output():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, x, dynamo=True, dynamic_shapes=_dynamic_shapes(x, dynamic), input_names=names, verbose=False
            )
            program.save(str(tmp))
    except Exception as exc:
        chain = _exception_chain(exc)
        text = "\n".join(str(e) for e in chain)
        op = re.search(r"target=torch\.ops\.([\w.]+)", text) or re.search(r"\b(aten(?:\.|::)\w+(?:\.\w+)?)", text)
        where = f" at op {op.group(1)}" if op else ""
        raise AttnSurgeonError(f"ONNX export failed{where}: {_first_line(chain[-1])}") from exc


def _read_onnx(tmp: Path, model: Any) -> Callable[..., Any]:
    import torch

    session = onnx_session(tmp)
    names = [i.name for i in session.get_inputs()]
    return lambda *args: [torch.from_numpy(o) for o in session.run(None, {n: t.numpy() for n, t in zip(names, args)})]


def onnx_session(
    path: str | os.PathLike, threads: int | None = None, providers: tuple[str, ...] = ("CPUExecutionProvider",)
) -> Any:
    """An ONNX Runtime session on ``path``: the one place an ONNX file is opened (the export check
    and ``profile --runtime onnxruntime``); ``threads`` sets its intra-op thread pool."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are not the user's
    return ort.InferenceSession(str(path), options, providers=list(providers))


def quantize_onnx(source: str | os.PathLike, target: str | os.PathLike, calibration: list[tuple]) -> None:
    """An int8 copy of an ONNX file by ONNX Runtime's static quantization (QDQ, int8 weights, uint8
    activations), its activation ranges calibrated on ``calibration``: a few batches of sample inputs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    names = [i.name for i in onnx_session(source).get_inputs()]

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{n: t.numpy() for n, t in zip(names, args)} for args in calibration])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    import logging

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)  # its advice to pre-process, logged on the root logger
            quantize_static(str(source), str(target), Batches(), quant_format=QuantFormat.QDQ)
    except Exception as exc:
        raise AttnSurgeonError(f"ONNX Runtime int8 quantization failed: {_first_line(exc)}") from exc
    finally:
        logging.disable(logging.NOTSET)


def _dynamic_shapes(x: tuple, dynamic: bool) -> Any:
    """The batch dimension of every input dynamic (one shared Dim), or None."""
    import torch

    if not dynamic:
        return None
    batch = torch.export.Dim("batch", min=1, max=4096)
    return tuple({0: batch} for _ in x)


# --------------------------------------------------------------------------- TorchScript


def _write_ts(model: Any, tmp: Path, x: Any, dynamic: bool) -> None:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, x, check_trace=False, strict=False)  # strict=False: dict outputs
            torch.jit.save(traced, str(tmp))
    except Exception as exc:
        raise AttnSurgeonError(f"TorchScript tracing failed: {_first_line(exc)}") from exc


def _read_ts(tmp: Path, model: Any) -> Callable[..., Any]:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _no_grad(torch.jit.load(str(tmp)))


def _no_grad(module: Any) -> Callable[..., Any]:
    import torch

    def run(*args: Any) -> Any:
        with torch.no_grad():
            return module(*args)

    return run


# --------------------------------------------------------------------------- the formats


@dataclass(frozen=True)
class Format:
    """One file format: everything :func:`export`, the CLI and the README say about it."""

    name: str  # also the --format value
    extensions: tuple[str, ...]
    title: str  # how messages name it
    writer: Callable[[Any, Path, tuple, bool], None]  # (model, path, sample args, dynamic batch)
    reader: Callable[[Path, Any], Callable[..., Any]]  # (path, the model written) -> a function from inputs to outputs
    holds_batch: bool  # the file fixes its input shapes, so its batch is static or dynamic
    needs_recipe: bool = False  # only a model made by attnsurgeon can be written
    requires: tuple[str, ...] = ()  # modules it imports beyond attnsurgeon's own dependencies...
    extra: str | None = None  # ...and the pip extra that installs them

    def check_requirements(self) -> None:
        """Refuse, before any work, a format whose extra packages are missing."""
        import importlib

        for module in self.requires:
            try:
                importlib.import_module(module)
            except ImportError:
                raise AttnSurgeonError(
                    f"{self.title} export needs {_and(self.requires)} ({module} is missing): "
                    f"pip install 'attnsurgeon[{self.extra}]'"
                ) from None


def _and(items: tuple[str, ...]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "safetensors",
            (".safetensors",),
            "safetensors",
            _write_safetensors,
            _read_safetensors,
            holds_batch=False,
            needs_recipe=True,
        ),
        Format("pt2", (".pt2",), "torch.export", _write_pt2, _read_pt2, holds_batch=True),
        Format(
            "onnx",
            (".onnx",),
            "ONNX",
            _write_onnx,
            _read_onnx,
            holds_batch=True,
            requires=("onnx", "onnxscript", "onnxruntime"),
            extra="onnx",
        ),
        Format("ts", (".ts",), "TorchScript", _write_ts, _read_ts, holds_batch=True),
    )
}
"""Every format, by name; :func:`format_by_extension` maps file extensions to them."""


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, outermost first: the root cause says what really failed."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _first_line(exc: BaseException) -> str:
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # exporters colour their messages
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
