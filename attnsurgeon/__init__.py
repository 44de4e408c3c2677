"""attnsurgeon: insert attention blocks into any torchvision/timm model and measure what they cost.

The public API (imported lazily, so that ``import attnsurgeon`` and the CLI's ``--help`` do not
import torch):

* :func:`insert` / :func:`apply_plan` — rewrite a model (``attnsurgeon.surgery``);
* :func:`inspect_model` — its stages, blocks and insertion positions (``attnsurgeon.anatomy``);
* :func:`load_model` — build a model by name and load weights (``attnsurgeon.models``);
* :func:`profile` — params, MACs/FLOPs, latency, peak memory, base vs modified (``attnsurgeon.profiling``);
* :func:`export` / :func:`load` — write safetensors+recipe, pt2, onnx, ts; rebuild a saved model;
* :class:`Recipe` / :func:`read_recipe` — insertion plans as data (``attnsurgeon.recipes``);
* :class:`InsertionSpec`, :class:`AttnSurgeonError`.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .errors import AttnSurgeonError

__version__ = "0.1.0"

_LAZY = {
    "insert": ("surgery", "insert"),
    "apply_plan": ("surgery", "apply_plan"),
    "InsertionSpec": ("schema", "InsertionSpec"),
    "SurgeryReport": ("surgery", "SurgeryReport"),
    "inspect_model": ("api", "inspect_model"),
    "load_model": ("models", "load_model"),
    "list_models": ("models", "list_models"),
    "profile": ("profiling", "profile"),
    "optimize": ("memory", "optimize"),
    "export": ("export", "export"),
    "load": ("export", "load"),
    "Recipe": ("recipes", "Recipe"),
    "read_recipe": ("recipes", "read_recipe"),
}

__all__ = ["AttnSurgeonError", "__version__", *_LAZY]


class _Package(types.ModuleType):
    """Importing the submodule ``attnsurgeon.export`` (the CLI does) would bind the package's
    ``export`` to that module and hide the function of the same name: keep the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name, ("",))[0] == name:
            return  # the submodule stays in sys.modules['attnsurgeon.export']
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


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
