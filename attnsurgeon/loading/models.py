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

import fnmatch
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import AttnSurgeonError, did_you_mean, one_line
from ..core.lists import split_list
from .network import hf_cached_file, require_network
from .sources import BY_SOURCE, INTEGRATIONS
from .weights import WEIGHT_SUFFIXES, check_weights_path, load_weights

SOURCES = ("torchvision", "timm", *BY_SOURCE, "file", "module", "object")
_PREFIXES = {"tv": "torchvision", "torchvision": "torchvision", "timm": "timm"}
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


def torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models())


def timm_names() -> list[str]:
    import timm

    return list(timm.list_models())


def list_models(pattern: str | None = None) -> list[tuple[str, str]]:
    """``(name, source)`` for every model matching ``pattern`` (a glob, or a substring); a ``timm:`` or
    ``tv:`` prefix keeps one library, as it does in a model name (``timm:resnet*``). The library sources'
    models are named with their prefix (``yolo:yolov8n``)."""
    prefix, sep, rest = (pattern or "").partition(":")
    only = _PREFIXES.get(prefix.lower()) if sep else None
    if only is not None:
        pattern = rest
    rows = [(n, "torchvision") for n in torchvision_names()] if only in (None, "torchvision") else []
    rows += [(n, "timm") for n in timm_names()] if only in (None, "timm") else []
    rows += integration_rows() if only is None else []
    if pattern:
        pat = pattern.lower()
        if not any(ch in pat for ch in "*?["):
            pat = f"*{pat}*"
        rows = [r for r in rows if fnmatch.fnmatchcase(r[0].lower(), pat)]
    return sorted(rows, key=lambda r: (r[0], r[1]))


def model_spec(name: str, source: str) -> str:
    """The name with its library's prefix (``tv:resnet18``, ``timm:resnet18``; a library source's rows carry
    theirs: ``yolo:yolov8n``): what resolves to that model."""
    if source in BY_SOURCE:
        return name
    return f"{'tv' if source == 'torchvision' else 'timm'}:{name}"


def integration_rows() -> list[tuple[str, str]]:
    """``(prefix:name, source)`` for the models of every installed library source (``yolo:yolov8n``)."""
    return [(f"{i.prefix}:{n}", i.source) for i in INTEGRATIONS.values() if i.installed for n in i.load().names()]


def expand_models(patterns: str | Iterable[str]) -> list[str]:
    """The models of a zoo sweep, from ``'timm:resnet*,convnext_tiny'`` or a list of such items.

    A glob (``*``, ``?``, ``[``) expands through :func:`list_models` (``timm:``/``tv:`` keep one
    library), each match named with its library's prefix (``timm:resnet18``); any other item is kept
    as given, a library name checked first (an unknown name is an error with suggestions). Repeats
    are dropped, the order kept.
    """
    items = [str(p) for p in split_list(patterns) or []]
    if not items:
        raise AttnSurgeonError("no models given: expected a list such as 'timm:resnet*,convnext_tiny'")
    out: list[str] = []
    for item in items:
        source, name = parse_model_spec(item)
        if source not in ("torchvision", "timm", "auto", *BY_SOURCE):
            out.append(item)  # a user's factory: built (or refused) where its rows run
        elif any(ch in name for ch in "*?["):
            hits = list_models(item)  # the listing `attnsurgeon list models` shows, prefix and all
            if not hits:
                raise AttnSurgeonError(f"'{item}' matches no model; `attnsurgeon list models '{item}'` lists the names")
            out += [model_spec(n, s) for n, s in hits]
        else:
            resolve_source(item)
            out.append(item)
    return list(dict.fromkeys(out))


def parse_model_spec(spec: str) -> tuple[str, str]:
    """Split a model spec into ``(source, name)`` without importing any library.

    ``source`` is ``torchvision``, ``timm``, a library of :data:`INTEGRATIONS` (``ultralytics``,
    ``huggingface``, ``smp``), ``file``, ``module`` or ``auto`` (a bare name).
    """
    spec = spec.strip()
    if not spec:
        raise AttnSurgeonError("the model name is empty")
    prefix, sep, rest = spec.partition(":")
    if sep and prefix.lower() in _PREFIXES:
        if not rest:
            raise AttnSurgeonError(f"'{spec}' names no model after '{prefix}:'")
        return _PREFIXES[prefix.lower()], rest
    if sep and prefix.lower() in INTEGRATIONS:
        if not rest:
            raise AttnSurgeonError(f"'{spec}' names no model after '{prefix}:'")
        return INTEGRATIONS[prefix.lower()].source, rest
    saved = (*WEIGHT_SUFFIXES, ".onnx", ".pt2", ".ts", ".yaml", ".yml")
    if not sep and spec.lower().endswith(saved):
        hint = {
            ".pt": "an ultralytics checkpoint (best.pt) is named yolo:PATH.pt; load a state dict or a training "
            "checkpoint into a named model with --weights",
            ".safetensors": "a model saved by attnsurgeon: `profile`, `export` and `inspect` take it (they load it first); "
            "load plain weights with --weights",
            ".yaml": "a recipe: run it with `attnsurgeon apply` or `attnsurgeon sweep`",
            ".yml": "a recipe: run it with `attnsurgeon apply` or `attnsurgeon sweep`",
        }.get(
            Path(spec).suffix.lower(),
            "load a state dict into a named model with --weights; .onnx/.pt2/.ts files are outputs, not inputs",
        )
        raise AttnSurgeonError(f"'{spec}' is a file, not a model name: {hint}")
    if sep:
        # ``path/file.py:factory`` or ``pkg.mod:factory``; a Windows drive letter never reaches here
        path, _, factory = spec.rpartition(":")
        if not factory.isidentifier():
            raise AttnSurgeonError(f"'{spec}': expected FILE.py:FACTORY or package.module:FACTORY")
        if path.endswith(".py") or os.sep in path or "/" in path:
            return "file", spec
        return "module", spec
    return "auto", spec


def resolve_source(spec: str) -> tuple[str, str]:
    """``(source, name)`` with a bare name looked up; an unknown name is an error with suggestions."""
    source, name = parse_model_spec(spec)
    if source == "auto":
        if name in set(torchvision_names()):
            return "torchvision", name
        if name in set(timm_names()):
            return "timm", name
        raise AttnSurgeonError(
            f"unknown model '{name}' (not in torchvision or timm)."
            + did_you_mean(name, torchvision_names() + timm_names())
            + " `attnsurgeon list models PATTERN` lists the names."
        )
    if source == "torchvision" and name not in set(torchvision_names()):
        raise AttnSurgeonError(f"unknown torchvision model '{name}'." + did_you_mean(name, torchvision_names()))
    if source == "timm" and name not in set(timm_names()):
        raise AttnSurgeonError(f"unknown timm model '{name}'." + did_you_mean(name, timm_names()))
    if source in BY_SOURCE:
        BY_SOURCE[source].load(spec).check(name)  # the library missing: one line naming the extra
    return source, name


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
    if source == "torchvision":
        model = _build_torchvision(name, pretrained, model_kwargs)
        input_size = _torchvision_input_size(name)
        if isinstance(getattr(model, "image_size", None), int):  # ViTs fix it at build time
            input_size = (input_size[0], model.image_size, model.image_size)
        input_size = _detector_input_size(model, input_size)
    elif source == "timm":
        model = _build_timm(name, pretrained, model_kwargs)
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
        model = _build_user(source, name, model_kwargs)
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
        size = _detector_input_size(model_or_spec, default_input_size(model_or_spec))
        loaded = LoadedModel(model_or_spec, type(model_or_spec).__name__, "object", size)
        if load_kwargs.get("weights") is not None:
            _load_file(loaded, load_kwargs["weights"], load_kwargs.get("weights_key"))
        return loaded
    raise AttnSurgeonError(f"expected a model name or an nn.Module, got {type(model_or_spec).__name__}")


# --------------------------------------------------------------------------- building


def _build_torchvision(name: str, pretrained: bool, kwargs: Mapping[str, Any]):
    import torch
    import torchvision

    if not pretrained:
        # Segmentation and detection builders download their backbone's ImageNet weights unless told not to.
        off = {arg: None for arg in _backbone_weight_args(name) if arg not in kwargs}
        return torchvision.models.get_model(name, weights=None, **off, **kwargs)
    try:
        enum = torchvision.models.get_model_weights(name)
    except Exception as exc:
        raise AttnSurgeonError(f"torchvision publishes no weights for '{name}'; pass --weights FILE") from exc
    url = enum.DEFAULT.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    tried = f"the local cache ({cached}) and {url}"
    if not cached.is_file():
        require_network(url, tried)
    try:
        return torchvision.models.get_model(name, weights="DEFAULT", **kwargs)
    except Exception as exc:  # a broken download, a corrupt cache entry
        raise AttnSurgeonError(
            f"could not get torchvision's pretrained weights for '{name}' (tried {tried}): {one_line(exc)}. "
            "Download them where the network is reachable and pass --weights FILE."
        ) from exc


def _backbone_weight_args(name: str) -> list[str]:
    """The builder's arguments that load weights for a part of the model (``weights_backbone``)."""
    import inspect

    import torchvision

    params = inspect.signature(torchvision.models.get_model_builder(name)).parameters
    return [p for p in params if p.startswith("weights") and p != "weights"]


def _build_timm(name: str, pretrained: bool, kwargs: Mapping[str, Any]):
    import timm

    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise AttnSurgeonError(f"timm publishes no weights for '{name}'; pass --weights FILE")
    overlay = {}
    cached = hf_cached_file(cfg.hf_hub_id, cfg.hf_hub_filename) if cfg.hf_hub_id else None
    where = f"huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
    tried = f"the local Hugging Face cache and {where}"
    if cached:
        overlay = {"file": cached}  # no network round trip (and no retry loop) when the file is here
    else:
        require_network(
            f"https://{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').split('://')[-1]}"
            if cfg.hf_hub_id
            else cfg.url,
            tried,
        )
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay or None, **kwargs)
    except Exception as exc:
        raise AttnSurgeonError(
            f"could not get timm's pretrained weights for '{name}' (tried {tried}): {one_line(exc)}. "
            "Download them where the network is reachable and pass --weights FILE."
        ) from exc


def _build_user(source: str, spec: str, kwargs: Mapping[str, Any]):
    import torch

    target, _, factory_name = spec.rpartition(":")
    if source == "file":
        path = Path(target).expanduser()
        if not path.is_file():
            raise AttnSurgeonError(f"model file '{target}' does not exist")
        mod_name = f"_attnsurgeon_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        if module_spec is None or module_spec.loader is None:
            raise AttnSurgeonError(f"cannot import '{target}' as Python")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module  # dataclasses and pickling look the module up by name
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise AttnSurgeonError(f"importing '{target}' failed: {one_line(exc)}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise AttnSurgeonError(f"cannot import module '{target}': {one_line(exc)}") from exc
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise AttnSurgeonError(f"'{target}' has no callable '{factory_name}'." + did_you_mean(factory_name, names))
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise AttnSurgeonError(f"'{spec}' raised while building the model: {one_line(exc)}") from exc
    if not isinstance(model, torch.nn.Module):
        raise AttnSurgeonError(f"'{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


# torchvision's video models are trained and evaluated on clips of 16 frames (references/video_classification)
VIDEO_FRAMES = 16


def _torchvision_input_size(name: str) -> tuple[int, ...]:
    """The crop size of the model's default weights' transforms (224 where there is none); video
    models take clips of :data:`VIDEO_FRAMES` frames: ``(3, 16, H, W)``."""
    import torchvision

    video = name in torchvision.models.list_models(module=torchvision.models.video)
    try:
        transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        crop = transforms.crop_size
        h = w = int(crop[0]) if isinstance(crop, (list, tuple)) else int(crop)
        if isinstance(crop, (list, tuple)) and len(crop) == 2:
            h, w = int(crop[0]), int(crop[1])
    except Exception:  # models without weights, or transforms without a crop size
        h = w = 224
    return (3, VIDEO_FRAMES, h, w) if video else (3, h, w)


def default_input_size(model: Any) -> tuple[int, ...] | None:
    """What a model says it takes: ``default_input_size`` or a timm ``pretrained_cfg``; else read
    from its first convolution: a Conv2d takes ``(in_channels, 224, 224)``; a Conv1d/Conv3d's length
    or frames cannot be guessed (None: the user must give --input-size). No conv: 3×224×224."""
    import torch

    size = getattr(model, "default_input_size", None) or (getattr(model, "pretrained_cfg", None) or {}).get(
        "input_size"
    )
    if size:
        return tuple(int(v) for v in size)
    first = next((m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    if first is None:
        return (3, 224, 224)
    if isinstance(first, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
        return (first.in_channels, 224, 224)
    return None


def _detector_input_size(model: Any, default: tuple[int, ...]) -> tuple[int, ...]:
    """A detector resizes every image to its transform's ``min_size``: that is its working size
    (3×320×320 where the model says nothing; its weights' transforms have no crop size)."""
    from .samples import IMAGES, input_kind

    if input_kind(model)[0] != IMAGES:
        return default
    transform = getattr(model, "transform", None)
    side = getattr(transform, "min_size", None) or getattr(transform, "size", None)
    side = side[0] if isinstance(side, (list, tuple)) else side
    return (3, int(side), int(side)) if isinstance(side, int) else (3, 320, 320)
