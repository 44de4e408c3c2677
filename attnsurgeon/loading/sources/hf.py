"""Hugging Face transformers (``hf:microsoft/resnet-50``, ``hf:convnext``, ``hf:./my-model``): a hub id is
built from its config in the local cache (the class its config names), else from the hub; a model type
(``resnet``, ``convnext``, ``vit``) from that type's default config; a local folder (a name starting
with ``.``, ``/`` or ``~``) from its ``config.json`` (as ``save_pretrained`` writes it). Keyword
arguments set config fields (``num_labels=10``, ``num_hidden_layers=2``). ``--pretrained`` loads a hub
id's weights (local cache first), or a folder's own.

The model is the library's own class (``ResNetForImageClassification``): it takes
``pixel_values`` and ``labels`` and returns its ``ModelOutput`` with the loss, rewritten or not.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ...core.errors import AttnSurgeonError, did_you_mean

LIBRARY, EXTRA = "transformers", "hf"


def _types() -> dict[str, Sequence[str]]:
    """Model type -> its image-classification class name, or names (the vision models a type name builds)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return dict(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)


def _cached_ids() -> list[str]:
    """Hub models whose config is in the local Hugging Face cache."""
    try:
        from huggingface_hub import constants, scan_cache_dir

        # the cache the loading reads (constants.HF_HUB_CACHE, read now: scan_cache_dir's default is bound at import)
        return sorted(r.repo_id for r in scan_cache_dir(constants.HF_HUB_CACHE).repos if r.repo_type == "model")
    except Exception:  # no cache folder yet
        return []


def names() -> list[str]:
    return sorted(_types()) + _cached_ids()


def is_folder(name: str) -> bool:
    """``hf:./my-model``, ``hf:/data/resnet``, ``hf:~/m``: a local folder, never a hub id."""
    return name.startswith((".", "/", "~"))


def _folder(name: str) -> str:
    """The folder's path, checked: it holds the ``config.json`` the model is built from."""
    path = os.path.expanduser(name)
    if not os.path.isdir(path):
        raise AttnSurgeonError(
            f"hf:{name}: no such folder (a local model is a folder with its config.json, as save_pretrained writes it)"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise AttnSurgeonError(
            f"hf:{name}: the folder has no config.json, which the model is built from "
            "(save_pretrained writes it; so does downloading the model's hub folder)"
        )
    return path


def check(name: str) -> None:
    if is_folder(name):
        _folder(name)
    elif "/" not in name and name not in _types():
        raise AttnSurgeonError(
            f"unknown Hugging Face model type '{name}' (not an image classifier of transformers)."
            + did_you_mean(name, list(_types()))
            + " A hub id (hf:microsoft/resnet-50) names a model of any type."
        )


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: the hub client reads its cache only (smp's encoder weights come from the hub, too)."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


OFFLINE_WAYS = (
    "Offline, name a model type (hf:resnet, random weights), a local folder holding the model's "
    "config.json (hf:./resnet-50, as save_pretrained writes it), or a hub id in the local cache "
    "(`attnsurgeon list models 'hf:*'` lists them)"
)


def _from_hub(name: str, what: str, load: Any) -> Any:
    """``load(local_files_only=...)``: the local cache first, then the hub where it can be reached."""
    from ...core.errors import one_line
    from ..network import require_network

    tried = f"the local Hugging Face cache and {_hub_endpoint()}/{name}"
    try:
        return load(local_files_only=True)
    except OSError:
        pass  # not cached
    # the config is what every build needs: --weights FILE gives weights, not the architecture
    remedy = (
        f"{OFFLINE_WAYS}; --weights FILE does not replace it."
        if what == "config"
        else "Download them where the network is reachable and pass --weights FILE."
    )
    missing = f"the {what} of hf:{name} {'is' if what == 'config' else 'are'}"
    if hub_offline():
        raise AttnSurgeonError(
            f"{missing} not in the local Hugging Face cache and HF_HUB_OFFLINE is set; tried {tried}. {remedy}"
        )
    require_network(_hub_endpoint(), tried, missing=missing, remedy=remedy)
    try:
        return load(local_files_only=False)
    except Exception as exc:
        raise AttnSurgeonError(f"could not get the {what} of hf:{name} (tried {tried}): {one_line(exc)}") from exc


def _model_class(config: Any) -> Any:
    """The class the config names (``architectures``), else its type's image classifier, else the bare model."""
    import transformers
    from transformers import AutoModel, AutoModelForImageClassification

    for arch in getattr(config, "architectures", None) or []:
        if hasattr(transformers, arch):
            return getattr(transformers, arch)
    try:
        return AutoModelForImageClassification._model_mapping[type(config)]
    except KeyError:
        return AutoModel._model_mapping[type(config)]


def build(name: str, pretrained: bool, kwargs: Mapping[str, Any]) -> Any:
    from transformers import AutoConfig

    if is_folder(name):
        path = _folder(name)
        config = AutoConfig.from_pretrained(path, **kwargs)
        cls = _model_class(config)
        if not pretrained:
            return cls(config)
        if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path)):
            raise AttnSurgeonError(
                f"hf:{name} --pretrained: the folder has a config.json but no weights "
                "(model.safetensors); leave --pretrained out for random weights"
            )
        return cls.from_pretrained(path, config=config, local_files_only=True)
    if "/" not in name:
        if pretrained:
            raise AttnSurgeonError(
                f"hf:{name} is a model type with random weights; --pretrained needs a hub id (hf:microsoft/resnet-50)"
            )
        config = AutoConfig.for_model(name, **kwargs)
        return _model_class(config)(config)
    config = _from_hub(name, "config", lambda **kw: AutoConfig.from_pretrained(name, **kw, **kwargs))
    cls = _model_class(config)
    if not pretrained:
        return cls(config)
    return _from_hub(name, "weights", lambda **kw: cls.from_pretrained(name, config=config, **kw))


def input_size(model: Any, name: str) -> tuple[int, ...]:
    """``(num_channels, image_size, image_size)`` from the config (224 where it names no size)."""
    config = model.config
    side = getattr(config, "image_size", None) or 224
    h, w = (side, side) if isinstance(side, int) else tuple(side)[:2]
    return (int(getattr(config, "num_channels", 3) or 3), int(h), int(w))


is_local = is_folder  # a file or folder of the user's: recorded by its absolute path (sources.__init__)
