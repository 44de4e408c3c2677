"""attnsurgeon: insert attention blocks into any torchvision/timm model and measure what they cost.

The public API (imported lazily, so that ``import attnsurgeon`` and the CLI's ``--help`` do not
import torch):

* :func:`insert` / :func:`apply_plan` — rewrite a model (``attnsurgeon.rewriting.surgery``);
* :func:`inspect_model` — its stages, blocks and insertion positions (``attnsurgeon.graph.anatomy``);
* :func:`load_model` — build a model by name and load weights (``attnsurgeon.loading.models``), or
  rebuild a saved one (``attnsurgeon.saving.saved``);
* :func:`profile` — params, MACs/FLOPs, latency, peak memory, base vs modified (``attnsurgeon.profiling``);
* :func:`export` / :func:`load` — write safetensors+recipe, pt2, onnx, ts; rebuild a saved model;
* :class:`Recipe` / :func:`read_recipe` — insertion plans as data (``attnsurgeon.planning.recipes``);
* :class:`InsertionSpec`, :class:`AttnSurgeonError`.
"""

from __future__ import annotations

from typing import Any

from .core.errors import AttnSurgeonError
from .core.version import __version__

_LAZY = {
    "insert": ("rewriting.apply", "insert"),
    "apply_plan": ("rewriting.apply", "apply_plan"),
    "InsertionSpec": ("planning.schema", "InsertionSpec"),
    "SurgeryReport": ("rewriting.surgery", "SurgeryReport"),
    "inspect_model": ("graph.inspect", "inspect_model"),
    "load_model": ("saving.saved", "load_model"),
    "list_models": ("loading.models", "list_models"),
    "profile": ("profiling", "profile"),
    "optimize": ("rewriting.apply", "optimize"),
    "export": ("saving.export", "export"),
    "load": ("saving.saved", "load"),
    "Recipe": ("planning.recipes", "Recipe"),
    "read_recipe": ("planning.recipes", "read_recipe"),
}

__all__ = ["AttnSurgeonError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attnsurgeon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
