"""The formats :func:`attnsurgeon.saving.export.export` writes, one :class:`Format` record each in
:data:`FORMATS`: its extensions, its writer, and its reader, which opens the written file the way a
user would (the check that the file reproduces the model runs on what the reader gives):

* ``safetensors`` — the weights and the recipe (:mod:`attnsurgeon.saving.saved`), read back by ``load``;
* ``pt2`` — ``torch.export``; ``onnx`` — ``torch.onnx`` (dynamo), read in ONNX Runtime
  (:func:`onnx_session`, also ``profile --runtime onnxruntime``'s, with :func:`quantize_onnx`);
* ``ts`` — TorchScript (traced).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import AttnSurgeonError, one_line
from .saved import FORMAT_KEY, FORMAT_VERSION, RECIPE_KEY, VERSIONS_KEY, load, recipe_of, versions


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
        raise AttnSurgeonError(f"torch.export failed: {one_line(exc)}") from exc
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
            assert program is not None  # with dynamo=True, torch.onnx.export returns the program
            program.save(str(tmp))
    except Exception as exc:
        chain = exception_chain(exc)
        text = "\n".join(str(e) for e in chain)
        op = re.search(r"target=torch\.ops\.([\w.]+)", text) or re.search(r"\b(aten(?:\.|::)\w+(?:\.\w+)?)", text)
        where = f" at op {op.group(1)}" if op else ""
        raise AttnSurgeonError(f"ONNX export failed{where}: {one_line(chain[-1])}") from exc


def _read_onnx(tmp: Path, model: Any) -> Callable[..., Any]:
    import torch

    session = onnx_session(tmp)
    names = [i.name for i in session.get_inputs()]  # zip not strict: a file with fewer inputs keeps working

    def run(*args: Any) -> list[Any]:
        return [
            torch.from_numpy(o) for o in session.run(None, {n: t.numpy() for n, t in zip(names, args, strict=False)})
        ]

    return run


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
            # not strict, as the reader: the file may take fewer inputs than the sample has
            self.batches = iter([{n: t.numpy() for n, t in zip(names, args, strict=False)} for args in calibration])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    import logging

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)  # its advice to pre-process, logged on the root logger
            quantize_static(str(source), str(target), Batches(), quant_format=QuantFormat.QDQ)
    except Exception as exc:
        raise AttnSurgeonError(f"ONNX Runtime int8 quantization failed: {one_line(exc)}") from exc
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


def _write_ts(model: Any, tmp: Path, x: Any, dynamic: bool) -> list[str]:
    import torch

    notes = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                traced = torch.jit.trace(model, x, check_trace=False, strict=False)  # strict=False: dict outputs
            except RuntimeError as exc:
                if "Tracer cannot infer type of" not in str(exc):
                    raise
                # outputs TorchScript cannot type (YOLO's tensor beside a dict of tensors and a list):
                # written as the flat tuple of their tensors, in order, as ONNX writes them
                traced = torch.jit.trace(_flat_outputs(model), x, check_trace=False, strict=False)
                notes.append(
                    f"TorchScript cannot type the model's outputs ({_untypeable(exc)}): the file returns "
                    "them as one flat tuple of tensors, in order, as an ONNX file does"
                )
            torch.jit.save(traced, str(tmp))
    except Exception as exc:
        raise AttnSurgeonError(f"TorchScript tracing failed: {one_line(exc)}") from exc
    return notes


def _untypeable(exc: BaseException) -> str:
    """The tracer's reason, from the last line of its message (the first holds the whole output printed)."""
    lines = [line.strip(" :") for line in str(exc).strip().splitlines() if line.strip(" :")]
    return lines[-1] if lines else type(exc).__name__


def _flat_outputs(model: Any) -> Any:
    """``model`` returning the flat tuple of its outputs' tensors, in the order the file check compares
    them (:func:`attnsurgeon.loading.samples.flatten_outputs`); torch is imported here, not with the registry."""
    import torch

    from ..loading.samples import flatten_outputs

    class FlatOutputs(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *x: Any) -> tuple:
            return tuple(flatten_outputs(self.inner(*x)))

    return FlatOutputs(model)


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
    writer: Callable[[Any, Path, tuple, bool], list[str] | None]  # (model, path, sample args, dynamic) -> notes
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


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, outermost first: the root cause says what really failed."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain
