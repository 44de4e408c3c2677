"""Take the modified model away: safetensors + recipe, torch.export, ONNX, TorchScript.

The format follows the file's extension (or ``format=``):

* ``.safetensors`` — every weight, base and inserted, plus the recipe that rebuilds the
  architecture (model, insertions, input size, package versions) in the file's metadata.
  :func:`load` rebuilds the exact modified model; no pickle is ever read. For fine-tuning.
* ``.pt2`` — a ``torch.export`` ExportedProgram (eval mode), loadable with ``torch.export.load``
  where attnsurgeon is not installed.
* ``.onnx`` — through ``torch.onnx``, then run in onnxruntime and compared with PyTorch.
* ``.ts`` — TorchScript (traced), loadable with ``torch.jit.load``.

Every export is written to a temporary file beside the target, loaded back and compared with the
in-memory model on a sample input, and only then renamed into place: a failure leaves no file.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._io import atomic_path
from .errors import AttnSurgeonError

if TYPE_CHECKING:
    from .recipes import Recipe

FORMATS = {".safetensors": "safetensors", ".pt2": "pt2", ".onnx": "onnx", ".ts": "ts"}
RECIPE_KEY = "attnsurgeon.recipe"
VERSIONS_KEY = "attnsurgeon.versions"
FORMAT_KEY = "attnsurgeon.format"
FORMAT_VERSION = "1"


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The format for ``path``: ``fmt`` if given, else from the extension. Refused before any work."""
    suffix = Path(path).suffix.lower()
    if fmt:
        fmt = fmt.lower().lstrip(".")
        if fmt not in FORMATS.values():
            raise AttnSurgeonError(f"unknown format '{fmt}' (choose from {', '.join(FORMATS.values())})")
        if suffix in FORMATS and FORMATS[suffix] != fmt:
            raise AttnSurgeonError(f"'{path}' says {FORMATS[suffix]} but --format says {fmt}: a file named "
                                   f"{suffix} would not hold what its name promises; rename it or drop --format")
        return fmt
    if suffix not in FORMATS:
        raise AttnSurgeonError(
            f"cannot tell the format of '{path}' from its extension '{suffix or '(none)'}': "
            f"use {', '.join(FORMATS)} or --format"
        )
    return FORMATS[suffix]


def check_target(path: str | os.PathLike, fmt: str | None = None, force: bool = False) -> str:
    """Every check that can fail before a model is built: format, folder, overwrite."""
    fmt = resolve_format(path, fmt)
    p = Path(path).expanduser()
    if p.is_dir():
        raise AttnSurgeonError(f"'{p}' is a folder; give a file name such as {p / ('model.' + fmt)}")
    if not p.parent.is_dir():
        raise AttnSurgeonError(f"folder '{p.parent}' does not exist")
    if p.exists() and not force:
        raise AttnSurgeonError(f"'{p}' exists; pass --force to overwrite it")
    if fmt == "onnx":
        _require_onnx()
    return fmt


def export(
    model: Any,
    path: str | os.PathLike,
    *,
    format: str | None = None,
    input_size: Any = None,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    force: bool = False,
    tolerance: float = 1e-4,
) -> ExportReport:
    """Write ``model`` to ``path`` and check the written file reproduces it.

    Args:
        model: a model from :func:`attnsurgeon.insert` / :func:`load`, any ``nn.Module`` (not for
            ``.safetensors``, which needs a recipe), or the path of a saved ``.safetensors``.
        path: the target; its extension picks the format unless ``format`` is given.
        input_size, batch_size: the sample input (``input_size`` defaults to the recipe's).
        dynamic_batch: make the batch dimension dynamic (pt2, onnx); checked at a second batch size.
        force: overwrite an existing file.
        tolerance: the largest max-abs difference allowed, relative to the output's scale
            (``max|diff| <= tolerance * max(1, max|reference|)``).

    Example:
        >>> model, _ = attnsurgeon.insert("resnet18", attn="se")
        >>> export(model, "se18.onnx", input_size=224).max_abs_diff < 1e-4
        True
    """
    import torch

    from .layout import resolve_input_size
    from .models import default_input_size
    from .samples import batch_of, max_abs_diff, output_scale, sample_args

    fmt = check_target(path, format, force)
    if isinstance(model, (str, os.PathLike)):
        model = load(model)
    if batch_size < 1:
        raise AttnSurgeonError(f"batch size must be ≥ 1, got {batch_size}")
    report = getattr(model, "attnsurgeon_report", None)
    default = tuple(report.input_size) if report is not None else default_input_size(model)
    size = resolve_input_size(input_size, default)
    if fmt == "safetensors" and report is None:
        raise AttnSurgeonError("a .safetensors export needs the recipe of a model made by attnsurgeon "
                               "(attnsurgeon.insert or attnsurgeon.load); save plain weights with safetensors directly")
    check_exportable(model, fmt)
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(0)
    sample_batch = max(batch_size, 2) if dynamic_batch else batch_size  # torch.export specialises size 1
    x = sample_args(model, size, sample_batch, generator=gen)
    checks = [x] + ([sample_args(model, size, sample_batch + 1, generator=gen)] if dynamic_batch else [])
    try:
        with torch.no_grad():
            references = [model(*c) for c in checks]
        with atomic_path(path, force=force) as tmp:
            _WRITERS[fmt](model, tmp, x, dynamic_batch)
            outputs = _READERS[fmt](tmp, checks)
            diff = max(max_abs_diff(o, r) for o, r in zip(outputs, references))
            scale = max(1.0, max(output_scale(r) for r in references))
            if not diff <= tolerance * scale:  # also catches NaN
                raise AttnSurgeonError(
                    f"the written {fmt} file does not reproduce the model: max abs diff {diff:.3g} "
                    f"exceeds the tolerance {tolerance:g} x {scale:.3g}; nothing was written"
                )
            size_bytes = tmp.stat().st_size
    finally:
        model.train(was_training)
    return ExportReport(fmt, str(Path(path).expanduser()), size_bytes, diff, tolerance, [sample_batch, *size],
                        dynamic_batch, [batch_of(c) for c in checks])


def check_exportable(model: Any, fmt: str) -> None:
    """Refuse, before any work, a format the model cannot be written in: torch.export, ONNX and
    TorchScript tracing need tensors in; a detector takes a list of images and loops over it."""
    from .samples import IMAGES, input_kind

    if fmt != "safetensors" and input_kind(model)[0] == IMAGES:
        raise AttnSurgeonError(
            f"{type(model).__name__} takes a list of images and runs Python loops and data-dependent control flow "
            f"over them (resizing, anchors, non-maximum suppression), which {fmt} cannot capture; "
            "write it as .safetensors (weights + recipe, reloaded with attnsurgeon.load)"
        )


# --------------------------------------------------------------------------- safetensors + recipe


def recipe_of(model: Any) -> Recipe:
    """The recipe that rebuilds a model made by attnsurgeon."""
    from .recipes import Recipe

    report = getattr(model, "attnsurgeon_report", None)
    if report is None:
        raise AttnSurgeonError("this model carries no attnsurgeon recipe (it was not made by attnsurgeon.insert/load)")
    return Recipe(report.model, list(report.plan), list(report.input_size), model_kwargs=dict(report.model_kwargs),
                  target=getattr(report, "target", None))


def _versions() -> dict[str, str]:
    import timm
    import torch
    import torchvision

    from . import __version__

    return {"attnsurgeon": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__}


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
    metadata = {RECIPE_KEY: recipe.to_json(), VERSIONS_KEY: json.dumps(_versions()), FORMAT_KEY: FORMAT_VERSION}
    save_file(tensors, str(tmp), metadata=metadata)


def _read_safetensors(tmp: Path, checks: list) -> list:
    import torch

    model = load(tmp).eval()
    with torch.no_grad():
        return [model(*c) for c in checks]


def read_saved(path: str | os.PathLike) -> tuple[Recipe, dict[str, Any], dict[str, str]]:
    """The recipe, the tensors and the versions of a saved model; a missing recipe is an error."""
    from safetensors import SafetensorError, safe_open

    from .recipes import parse_recipe

    p = Path(path).expanduser()
    if not p.is_file():
        raise AttnSurgeonError(f"'{path}' does not exist")
    if p.suffix.lower() != ".safetensors":
        raise AttnSurgeonError(f"'{path}' is not a .safetensors file written by attnsurgeon")
    try:
        with safe_open(str(p), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AttnSurgeonError(f"'{path}' is not a readable safetensors file: {exc}") from exc
    if RECIPE_KEY not in metadata:
        raise AttnSurgeonError(f"'{path}' has no attnsurgeon recipe in its metadata: it holds weights only. "
                               "Load them into a model with --weights instead")
    try:
        data = json.loads(metadata[RECIPE_KEY])
    except json.JSONDecodeError as exc:
        raise AttnSurgeonError(f"'{path}': its recipe is not valid JSON ({exc})") from exc
    recipe = parse_recipe(data, f"the recipe in '{path}'")
    versions = json.loads(metadata.get(VERSIONS_KEY, "{}") or "{}")
    return recipe, tensors, versions


def load(path: str | os.PathLike, *, base: Any = None) -> Any:
    """Rebuild a saved modified model with its weights.

    Args:
        path: a ``.safetensors`` file written by ``insert --out`` or :func:`export`.
        base: the base ``nn.Module`` to rebuild on, for recipes made from a module object
            (its weights are overwritten with the saved ones).

    Example:
        >>> model = load("se50.safetensors")
    """
    _, model = load_base(path, base=base)
    return model


def load_base(path: str | os.PathLike, *, base: Any = None) -> tuple[Any, Any]:
    """``(base model, modified model)`` from a saved file, both with the saved weights.

    The rewritten graph shares the base model's modules, so loading the file into it loads the
    base weights too: the base comes for free (``profile SAVED`` compares the two).
    """
    from .models import as_loaded, check_state_dict, load_model
    from .surgery import apply_plan

    recipe, tensors, _ = read_saved(path)
    if base is not None:
        loaded = as_loaded(base)
        loaded.name, loaded.source = recipe.model, "object"
    elif recipe.model.startswith("object:"):
        raise AttnSurgeonError(f"'{path}' was made from a model object ({recipe.model[7:]}); "
                               "rebuild it with attnsurgeon.load(path, base=that_model)")
    else:
        loaded = load_model(recipe.model, **recipe.model_kwargs)
    if recipe.insertions:
        model, _ = apply_plan(loaded, recipe.insertions, input_size=recipe.input_size, target=recipe.target)
    else:
        model = loaded.model
    try:
        check_state_dict(model, tensors, f"'{path}'")
    except AttnSurgeonError as exc:
        raise AttnSurgeonError(f"the recipe in '{path}' does not match its tensors: {exc}") from exc
    model.load_state_dict(tensors, strict=True)
    model.eval()
    loaded.model.eval()
    return loaded.model, model


# --------------------------------------------------------------------------- torch.export


def _write_pt2(model: Any, tmp: Path, x: Any, dynamic: bool) -> None:
    import torch

    try:
        program = torch.export.export(model, x, dynamic_shapes=_dynamic_shapes(x, dynamic))
    except Exception as exc:
        raise AttnSurgeonError(f"torch.export failed: {_first_line(exc)}") from exc
    torch.export.save(program, str(tmp))


def _read_pt2(tmp: Path, checks: list) -> list:
    import torch

    module = torch.export.load(str(tmp)).module()
    with torch.no_grad():
        return [module(*c) for c in checks]


# --------------------------------------------------------------------------- ONNX


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise AttnSurgeonError(
            f"ONNX export needs onnx, onnxscript and onnxruntime ({exc.name} is missing): "
            "pip install 'attnsurgeon[onnx]'"
        ) from None


def _write_onnx(model: Any, tmp: Path, x: Any, dynamic: bool) -> None:
    import re

    import torch

    from ._native import quiet_native_output

    _require_onnx()
    names = ["input"] if len(x) == 1 else [f"input{i}" for i in range(len(x))]
    try:
        with warnings.catch_warnings(), quiet_native_output():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, x, dynamo=True, dynamic_shapes=_dynamic_shapes(x, dynamic),
                                        input_names=names, verbose=False)
            program.save(str(tmp))
    except Exception as exc:
        chain = _exception_chain(exc)
        text = "\n".join(str(e) for e in chain)
        op = re.search(r"target=torch\.ops\.([\w.]+)", text) or re.search(r"\b(aten(?:\.|::)\w+(?:\.\w+)?)", text)
        where = f" at op {op.group(1)}" if op else ""
        raise AttnSurgeonError(f"ONNX export failed{where}: {_first_line(chain[-1])}") from exc


def _read_onnx(tmp: Path, checks: list) -> list:
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [[torch.from_numpy(o) for o in session.run(None, {n: t.numpy() for n, t in zip(names, c)})] for c in checks]


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


def _read_ts(tmp: Path, checks: list) -> list:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(tmp))
    with torch.no_grad():
        return [module(*c) for c in checks]


_WRITERS = {"safetensors": _write_safetensors, "pt2": _write_pt2, "onnx": _write_onnx, "ts": _write_ts}
_READERS = {"safetensors": _read_safetensors, "pt2": _read_pt2, "onnx": _read_onnx, "ts": _read_ts}


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
