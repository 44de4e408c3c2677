"""A model saved by attnsurgeon: a ``.safetensors`` file that holds every weight, base and inserted,
and in its metadata the recipe that rebuilds the architecture (model name, insertions, input size,
package versions). Reading one rebuilds the base model by name and applies the recipe, so this
module sits above loading and rewriting; everything that accepts "a model name or a saved file"
(``load_model``, ``profile SAVED``, ``inspect SAVED``, sweeps) opens models through here.

No pickle is ever read: safetensors holds tensors and strings only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import AttnSurgeonError
from ..loading import models
from ..loading.models import LoadedModel, as_loaded, is_saved
from ..loading.names import parse_model_spec
from ..loading.weights import check_state_dict

if TYPE_CHECKING:
    from ..planning.recipes import Recipe

RECIPE_KEY = "attnsurgeon.recipe"
VERSIONS_KEY = "attnsurgeon.versions"
FORMAT_KEY = "attnsurgeon.format"
FORMAT_VERSION = "1"


def load_model(
    spec: Any,
    *,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    weights_key: str | None = None,
    **model_kwargs: Any,
) -> LoadedModel:
    """A model by name (:func:`attnsurgeon.loading.models.build_model`) or a saved modified model
    (rebuilt from its recipe, with its base model beside it in ``.base``).

    Example:
        >>> load_model("se18.safetensors").base  # the base model, with the saved base weights
    """
    if is_saved(spec):
        return _load_saved(spec, pretrained or weights is not None or weights_key is not None or bool(model_kwargs))
    return models.build_model(spec, pretrained=pretrained, weights=weights, weights_key=weights_key, **model_kwargs)


def open_model(model_or_spec: Any, **load_kwargs: Any) -> LoadedModel:
    """:func:`~attnsurgeon.loading.models.as_loaded`, and a saved file opened as :func:`load_model` does."""
    if is_saved(model_or_spec):
        return load_model(model_or_spec, **load_kwargs)
    return as_loaded(model_or_spec, **load_kwargs)


def _load_saved(path: Any, given: bool) -> LoadedModel:
    """A saved modified model, rebuilt from its recipe, with its base model beside it; ``given``: the
    caller asked for weights or builder arguments, which a saved model has of its own."""
    if given:
        raise AttnSurgeonError(
            f"'{path}' carries its own weights and recipe; drop --pretrained/--weights/--weights-key/--model-arg"
        )
    base, modified = load_base(path)
    report = modified.attnsurgeon_report
    source, name = (
        parse_model_spec(report.model) if not report.model.startswith("object:") else ("object", report.model[7:])
    )
    return LoadedModel(
        modified,
        name,
        source,
        tuple(report.input_size),
        str(path),
        dict(report.model_kwargs),
        saved=str(path),
        base=base,
    )


def recipe_of(model: Any) -> Recipe:
    """The recipe that rebuilds a model made by attnsurgeon."""
    from ..planning.recipes import Recipe

    report = getattr(model, "attnsurgeon_report", None)
    if report is None:
        raise AttnSurgeonError("this model carries no attnsurgeon recipe (it was not made by attnsurgeon.insert/load)")
    return Recipe(
        report.model,
        list(report.plan),
        list(report.input_size),
        model_kwargs=dict(report.model_kwargs),
        target=getattr(report, "target", None),
        memory_efficient=getattr(report, "memory_efficient", None) is not None,
        weights=report.weights,
        weights_key=getattr(report, "weights_key", None),
    )


def versions() -> dict[str, str]:
    import timm
    import torch
    import torchvision

    from ..core.version import __version__

    return {
        "attnsurgeon": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
    }


def read_saved(path: str | os.PathLike) -> tuple[Recipe, dict[str, Any], dict[str, str]]:
    """The recipe, the tensors and the versions of a saved model; a missing recipe is an error."""
    from safetensors import SafetensorError, safe_open

    from ..planning.recipes import parse_recipe

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
        raise AttnSurgeonError(
            f"'{path}' has no attnsurgeon recipe in its metadata: it holds weights only. "
            "Load them into a model with --weights instead"
        )
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
    from ..rewriting.apply import apply_plan

    recipe, tensors, _ = read_saved(path)
    if base is not None:
        loaded = as_loaded(base)
        loaded.name, loaded.source = recipe.model, "object"
    elif recipe.model.startswith("object:"):
        raise AttnSurgeonError(
            f"'{path}' was made from a model object ({recipe.model[7:]}); "
            "rebuild it with attnsurgeon.load(path, base=that_model)"
        )
    else:  # the builder's arguments shape the model; its weights, wherever they came from, are in the file
        loaded = models.build_model(recipe.model, **recipe.model_kwargs)
        loaded.weights, loaded.weights_key = recipe.weights, recipe.weights_key  # so that a re-saved recipe keeps them
    if recipe.insertions or recipe.memory_efficient:
        model, _ = apply_plan(
            loaded,
            recipe.insertions,
            input_size=recipe.input_size,
            target=recipe.target,
            memory_efficient=recipe.memory_efficient,
        )
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
