"""Build a model from its library: torchvision, timm, or a user's factory (``file.py:factory``,
``package.module:factory``), offline unless published weights are asked for (:mod:`.network`).
The library sources (``yolo:``, ``hf:``, ``smp:``) build in :mod:`attnsurgeon.loading.sources`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from ..core.errors import AttnSurgeonError, did_you_mean, one_line
from .network import hf_cached_file, require_network


def build_torchvision(name: str, pretrained: bool, kwargs: Mapping[str, Any]):
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


def build_timm(name: str, pretrained: bool, kwargs: Mapping[str, Any]):
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
            else cast(str, cfg.url),  # typed str or a pair; no timm model gives a pair
            tried,
        )
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay or None, **kwargs)
    except Exception as exc:
        raise AttnSurgeonError(
            f"could not get timm's pretrained weights for '{name}' (tried {tried}): {one_line(exc)}. "
            "Download them where the network is reachable and pass --weights FILE."
        ) from exc


def build_user(source: str, spec: str, kwargs: Mapping[str, Any]):
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
