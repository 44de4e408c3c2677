"""Model names: split into a library and a name, looked up, listed and expanded, without building anything.

A name's forms and the order they are tried are those of :mod:`attnsurgeon.loading.models`; the
library sources' prefixes come from :data:`attnsurgeon.loading.sources.INTEGRATIONS`.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from pathlib import Path

from ..core.errors import AttnSurgeonError, did_you_mean
from ..core.lists import split_list
from .sources import BY_SOURCE, INTEGRATIONS
from .weights import WEIGHT_SUFFIXES

_PREFIXES = {"tv": "torchvision", "torchvision": "torchvision", "timm": "timm"}


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
            ".safetensors": "a model saved by attnsurgeon: `profile`, `export` and `inspect` take it "
            "(they load it first); load plain weights with --weights",
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
