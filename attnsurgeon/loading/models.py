"""Resolve a model name, build the model, load its weights.

Names, in the order they are tried:

* ``tv:NAME`` / ``timm:NAME`` force the library;
* ``yolo:NAME``, ``hf:NAME``, ``smp:ARCH[:ENCODER]`` build from Ultralytics, Hugging Face
  transformers and segmentation_models_pytorch, each an optional extra
  (:mod:`attnsurgeon.loading.sources`: one module per library, one registry);
* ``path/to/file.py:factory`` and ``package.module:factory`` call a user's factory;
* a bare ``NAME`` is looked up in ``torchvision.models.list_models()`` first, then
  ``timm.list_models()`` (a name present in both resolves to torchvision).

Weights come from the library (``pretrained=True``) or from a file (``weights=PATH``): a state dict
or a training checkpoint, read without running a pickle (:mod:`attnsurgeon.loading.weights`).
Builder arguments (``num_classes=7``; ``--model-arg`` on the command line, ``model_args:`` in a
recipe) go to the library's constructor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import AttnSurgeonError, one_line
from .builders import build_timm, build_torchvision, build_user
from .names import (
    expand_models,
    integration_rows,
    list_models,
    model_spec,
    parse_model_spec,
    resolve_source,
    timm_names,
    torchvision_names,
)
from .sizes import VIDEO_FRAMES, default_input_size, detector_input_size, torchvision_input_size
from .sources import BY_SOURCE, INTEGRATIONS
from .weights import check_weights_path, load_weights

__all__ = [
    "CLASSES_ARGS",
    "SOURCES",
    "VIDEO_FRAMES",
    "LoadedModel",
    "as_loaded",
    "build_model",
    "default_input_size",
    "expand_models",
    "integration_rows",
    "is_saved",
    "list_models",
    "model_spec",
    "parse_model_spec",
    "refuse_saved",
    "resolve_source",
    "timm_names",
    "torchvision_names",
]

SOURCES = ("torchvision", "timm", *BY_SOURCE, "file", "module", "object")
# the builder argument that sets the number of classes, named where a weights file's classifier differs
CLASSES_ARGS = {
    "torchvision": "num_classes",
    "timm": "num_classes",
    **{i.source: i.classes_arg for i in INTEGRATIONS.values() if i.classes_arg},
}


@dataclass
class LoadedModel:
    """A built model and what was used to build it."""

    model: Any  # torch.nn.Module
    name: str  # the name without a source prefix (``resnet50``, ``my.py:build``)
    source: str  # one of SOURCES
    input_size: tuple[int, ...] | None  # (C, H, W), (C, T, H, W), (C, L) the model expects; None: unknown
    weights: str | None = None  # "pretrained", a file path, or None (random init)
    kwargs: dict = field(default_factory=dict)  # constructor arguments (num_classes=10)
    saved: str | None = None  # a model saved by attnsurgeon: its file; ``model`` is then the modified model
    base: Any = None  # ... and this its base model, with the saved weights (``profile SAVED`` compares them)
    weights_key: str | None = None  # the checkpoint's entry the weights were taken from (``state_dict_ema``)
    notes: list[str] = field(default_factory=list)  # what the loading did that a report should say

    @property
    def origin(self) -> str:
        """Where the model came from, for reports: ``torchvision`` or ``torchvision, saved in m.safetensors``."""
        return f"{self.source}, saved in {self.saved}" if self.saved else self.source

    @property
    def spec(self) -> str:
        """A name that resolves to the same model again (``tv:resnet50``; ``object:Net`` cannot)."""
        if self.source == "torchvision":
            return f"tv:{self.name}"
        if self.source == "timm":
            return f"timm:{self.name}"
        if self.source == "object":
            return f"object:{self.name}"
        if self.source in BY_SOURCE:
            return f"{BY_SOURCE[self.source].prefix}:{self.name}"
        return self.name


def build_model(
    spec: str,
    *,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    weights_key: str | None = None,
    **model_kwargs: Any,
) -> LoadedModel:
    """Build the model named by ``spec`` and load its weights.

    A saved modified model (``.safetensors`` with its recipe) is not built here but rebuilt by
    :func:`attnsurgeon.load_model`, which applies its recipe (:mod:`attnsurgeon.saving.saved`).

    Args:
        spec: a model name (see the module docstring).
        pretrained: load the library's published weights (network or local cache).
        weights: a state dict or a training checkpoint (``.safetensors``, ``.pt``, ``.pth``, ``.pth.tar``,
            ``.ckpt``, ``.bin``: :mod:`attnsurgeon.loading.weights`) loaded into the model.
        weights_key: the checkpoint's entry to take (``state_dict``); by default the first of
            :data:`~attnsurgeon.loading.weights.CHECKPOINT_KEYS` it has (timm's EMA weights first).
        **model_kwargs: passed to the library's constructor (``num_classes=10``; ``nc=2`` for YOLO).

    Example:
        >>> loaded = build_model("tv:resnet18", num_classes=10)
        >>> loaded.source, loaded.input_size
        ('torchvision', (3, 224, 224))
    """
    if pretrained and weights is not None:
        raise AttnSurgeonError("give either --pretrained or --weights, not both")
    if is_saved(spec):
        raise AttnSurgeonError(
            f"'{spec}' is a model saved by attnsurgeon: open it with attnsurgeon.load_model "
            "(or attnsurgeon.load), which rebuilds it from its recipe"
        )
    if weights is not None:
        check_weights_path(weights)  # before building: a typo should not cost a model build
    elif weights_key is not None:
        raise AttnSurgeonError("--weights-key chooses an entry of a --weights checkpoint: give --weights")
    source, name = resolve_source(spec)
    try:
        return _load(source, name, pretrained, weights, weights_key, model_kwargs)
    except TypeError as exc:  # model_kwargs the constructor does not take
        if model_kwargs and "argument" in str(exc):
            raise AttnSurgeonError(f"building '{spec}' with {model_kwargs} failed: {one_line(exc)}") from exc
        raise


def is_saved(spec: Any) -> bool:
    """A model saved by attnsurgeon (``.safetensors`` with its recipe), rather than a model name."""
    return isinstance(spec, (str, os.PathLike)) and str(spec).lower().endswith(".safetensors")


def refuse_saved(model: Any) -> None:
    """Insertions go into a base model, not into a saved modified one (a path or a loaded one)."""
    saved = getattr(model, "saved", None) or (str(model) if is_saved(model) else None)
    if saved:
        raise AttnSurgeonError(
            f"'{saved}' is a file, not a model name: a model saved by attnsurgeon carries its own "
            "insertions; put them and the new ones in one recipe (`attnsurgeon apply`), or "
            "`profile`, `export` or `inspect` it as it is"
        )


def _load(
    source: str, name: str, pretrained: bool, weights: Any, weights_key: str | None, model_kwargs: dict
) -> LoadedModel:
    input_size: tuple[int, ...] | None
    if source == "torchvision":
        model = build_torchvision(name, pretrained, model_kwargs)
        input_size = torchvision_input_size(name)
        if isinstance(getattr(model, "image_size", None), int):  # ViTs fix it at build time
            input_size = (input_size[0], model.image_size, model.image_size)
        input_size = detector_input_size(model, input_size)
    elif source == "timm":
        model = build_timm(name, pretrained, model_kwargs)
        input_size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    elif source in BY_SOURCE:
        library = BY_SOURCE[source].load()
        model = library.build(name, pretrained, model_kwargs)
        input_size = library.input_size(model, name)
        if getattr(library, "is_local", lambda n: False)(name):  # a file or folder: recorded absolute
            name = str(Path(name).expanduser().resolve())
    else:
        if pretrained:
            raise AttnSurgeonError(
                f"--pretrained needs a torchvision or timm model; load '{name}' weights with --weights FILE"
            )
        model = build_user(source, name, model_kwargs)
        input_size = default_input_size(model)
    if source == "file":  # recorded absolute, so that a saved recipe rebuilds from anywhere
        target, _, factory = name.rpartition(":")
        name = f"{Path(target).expanduser().resolve()}:{factory}"
    loaded = LoadedModel(model, name, source, input_size, "pretrained" if pretrained else None, dict(model_kwargs))
    if weights is not None:
        _load_file(loaded, weights, weights_key)
    return loaded


def _load_file(loaded: LoadedModel, path: Any, key: str | None) -> None:
    """Load a weights file into ``loaded.model`` and record where the weights came from."""
    found = load_weights(loaded.model, path, key, CLASSES_ARGS.get(loaded.source))
    loaded.weights, loaded.weights_key = str(Path(path).expanduser().resolve()), found.key
    if found.note:
        loaded.notes.append(found.note)


def as_loaded(model_or_spec: Any, **load_kwargs: Any) -> LoadedModel:
    """Accept a spec string, a :class:`LoadedModel` or an ``nn.Module``; return a LoadedModel."""
    if isinstance(model_or_spec, LoadedModel):
        return model_or_spec
    if isinstance(model_or_spec, (str, os.PathLike)):
        return build_model(str(model_or_spec), **load_kwargs)
    import torch

    if isinstance(model_or_spec, torch.nn.Module):
        if load_kwargs.get("pretrained"):
            raise AttnSurgeonError("pretrained=True needs a model name, not a module")
        builder = {k: v for k, v in load_kwargs.items() if k not in ("pretrained", "weights", "weights_key")}
        if builder:
            raise AttnSurgeonError(f"builder arguments ({builder}) need a model name, not a built module")
        size = detector_input_size(model_or_spec, default_input_size(model_or_spec))
        loaded = LoadedModel(model_or_spec, type(model_or_spec).__name__, "object", size)
        if load_kwargs.get("weights") is not None:
            _load_file(loaded, load_kwargs["weights"], load_kwargs.get("weights_key"))
        return loaded
    raise AttnSurgeonError(f"expected a model name or an nn.Module, got {type(model_or_spec).__name__}")
