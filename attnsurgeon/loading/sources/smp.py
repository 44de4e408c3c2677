"""segmentation_models_pytorch (``smp:Unet:resnet34``, ``smp:FPN``, ``smp:DeepLabV3Plus:efficientnet-b0``):
``ARCH[:ENCODER]`` (the encoder defaults to resnet34, as in smp), encoder weights off unless
``--pretrained``; keyword arguments go to ``smp.create_model`` (``classes=3``).

``smp:./FOLDER`` is a model written by smp's ``save_pretrained`` (``config.json`` and
``model.safetensors``: no pickle), rebuilt by ``smp.from_pretrained`` with its weights.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...core.errors import AttnSurgeonError, did_you_mean

LIBRARY, EXTRA = "segmentation_models_pytorch", "smp"
DEFAULT_ENCODER = "resnet34"


def _archs() -> dict[str, str]:
    """Lower-case name -> smp's class name (``unetplusplus`` -> ``UnetPlusPlus``)."""
    import segmentation_models_pytorch as smp

    return {key: cls.__name__ for key, cls in smp.MODEL_ARCHITECTURES_MAPPING.items()}


def _encoders() -> list[str]:
    import segmentation_models_pytorch as smp

    return list(smp.encoders.get_encoder_names())


def names() -> list[str]:
    """``ARCH`` (on resnet34) and ``ARCH:ENCODER`` for smp's own encoders (``tu-*``: any timm model)."""
    archs = sorted(_archs().values())
    return archs + [f"{a}:{e}" for a in archs for e in _encoders()]


def _split(name: str) -> tuple[str, str]:
    arch, _, encoder = name.partition(":")
    archs = _archs()
    if arch.lower() not in archs:
        raise AttnSurgeonError(
            f"unknown smp architecture '{arch}'."
            + did_you_mean(arch, list(archs.values()))
            + f" smp's are {', '.join(sorted(archs.values()))}."
        )
    encoder = encoder or DEFAULT_ENCODER
    if not encoder.startswith("tu-") and encoder not in _encoders():
        raise AttnSurgeonError(
            f"unknown smp encoder '{encoder}'." + did_you_mean(encoder, _encoders()) + " tu-NAME takes any timm model."
        )
    return arch.lower(), encoder


def is_folder(name: str) -> bool:
    """``./runs/unet``, ``/data/unet``, ``~/unet``: a folder, not ``ARCH[:ENCODER]``."""
    return "/" in name or "\\" in name or name.startswith((".", "~")) or Path(name).expanduser().is_dir()


def check(name: str) -> None:
    if not is_folder(name):
        _split(name)
        return
    import segmentation_models_pytorch as smp

    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise AttnSurgeonError(f"smp model folder '{name}' does not exist")
    if not hasattr(smp, "from_pretrained"):
        raise AttnSurgeonError(
            f"smp:{name}: segmentation_models_pytorch {smp.__version__} cannot read folders "
            "(from_pretrained came in 0.4); pip install -U segmentation-models-pytorch"
        )
    absent = [f for f in ("config.json", "model.safetensors") if not (folder / f).is_file()]
    if absent:
        raise AttnSurgeonError(
            f"'{name}' is not a folder written by smp's save_pretrained: it has no {' and no '.join(absent)}"
        )


def build(name: str, pretrained: bool, kwargs: Mapping[str, Any]) -> Any:
    import segmentation_models_pytorch as smp

    if is_folder(name):
        return _from_folder(name, pretrained, kwargs)

    arch, encoder = _split(name)
    weights = kwargs.get("encoder_weights", "imagenet" if pretrained else None)
    rest = {k: v for k, v in kwargs.items() if k != "encoder_weights"}
    if weights is None:
        return smp.create_model(arch, encoder_name=encoder, encoder_weights=None, **rest)
    from ...core.errors import one_line

    tried = _require_weights(encoder, weights)
    try:  # smp reads the encoder's weights from the Hugging Face cache, else the hub
        return smp.create_model(arch, encoder_name=encoder, encoder_weights=weights, **rest)
    except Exception as exc:
        raise AttnSurgeonError(
            f"could not get the '{weights}' weights of smp encoder {encoder} (tried {tried}): "
            f"{one_line(exc)}. Download them where the network is reachable, or "
            "pass --weights FILE."
        ) from exc


def _from_folder(name: str, pretrained: bool, kwargs: Mapping[str, Any]) -> Any:
    import segmentation_models_pytorch as smp

    from ...core.errors import one_line

    if pretrained or kwargs:
        raise AttnSurgeonError(
            f"smp:{name} carries its own architecture and weights: drop "
            + ("--pretrained" if pretrained else f"{dict(kwargs)}")
        )
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # smp prints "Loading weights from local directory"
            return smp.from_pretrained(str(Path(name).expanduser()))
    except Exception as exc:
        raise AttnSurgeonError(f"smp could not rebuild the model in '{name}': {one_line(exc)}") from exc


def _require_weights(encoder: str, weights: Any) -> str:
    """Where the encoder's weights come from (the Hugging Face cache, else the hub); fails in seconds, not
    after the hub client's retries, where they are not cached and the hub cannot be reached."""
    import segmentation_models_pytorch as smp
    from huggingface_hub import try_to_load_from_cache

    from ..network import hf_cached_file, require_network
    from .hf import _hub_endpoint, hub_offline

    if encoder.startswith("tu-"):  # timm's weights, on the hub under timm's name
        import timm

        cfg = timm.models.get_pretrained_cfg(encoder[3:])
        repo = cfg.hf_hub_id if cfg else None
        cached = bool(repo and cfg and hf_cached_file(repo, cfg.hf_hub_filename) is not None)
    else:
        settings = smp.encoders.encoders[encoder]["pretrained_settings"].get(weights) or {}
        repo = settings.get("repo_id")
        cached = bool(
            repo
            and isinstance(try_to_load_from_cache(repo, "model.safetensors", revision=settings.get("revision")), str)
        )
    if not repo:
        return "the hub"  # smp's (or timm's) own error names the weights the encoder has
    tried = f"the local Hugging Face cache and {_hub_endpoint()}/{repo}"
    if cached:
        return tried
    if hub_offline():
        raise AttnSurgeonError(
            f"the '{weights}' weights of smp encoder {encoder} are not in the local Hugging Face "
            f"cache and HF_HUB_OFFLINE is set; tried {tried}. Download them where the network is "
            "reachable, or pass --weights FILE."
        )
    require_network(_hub_endpoint(), tried)
    return tried


def input_size(model: Any, name: str) -> tuple[int, ...]:
    """A square the decoder can take: 256, or the smallest multiple of the encoder's output stride above it."""
    stride = int(getattr(model.encoder, "output_stride", 32) or 32)
    side = -(-256 // stride) * stride
    return (int(getattr(model.encoder, "_in_channels", 3)), side, side)


is_local = is_folder  # a file or folder of the user's: recorded by its absolute path (sources.__init__)
