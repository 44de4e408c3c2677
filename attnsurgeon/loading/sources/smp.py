"""segmentation_models_pytorch (``smp:Unet:resnet34``, ``smp:FPN``, ``smp:DeepLabV3Plus:efficientnet-b0``):
``ARCH[:ENCODER]`` (the encoder defaults to resnet34, as in smp), encoder weights off unless
``--pretrained``; keyword arguments go to ``smp.create_model`` (``classes=3``).
"""

from __future__ import annotations

from typing import Any, Mapping

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
        raise AttnSurgeonError(f"unknown smp architecture '{arch}'." + did_you_mean(arch, list(archs.values()))
                               + f" smp's are {', '.join(sorted(archs.values()))}.")
    encoder = encoder or DEFAULT_ENCODER
    if not encoder.startswith("tu-") and encoder not in _encoders():
        raise AttnSurgeonError(f"unknown smp encoder '{encoder}'." + did_you_mean(encoder, _encoders())
                               + " tu-NAME takes any timm model.")
    return arch.lower(), encoder


def check(name: str) -> None:
    _split(name)


def build(name: str, pretrained: bool, kwargs: Mapping[str, Any]) -> Any:
    import segmentation_models_pytorch as smp

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
        raise AttnSurgeonError(f"could not get the '{weights}' weights of smp encoder {encoder} (tried {tried}): "
                               f"{one_line(exc)}. Download them where the network is reachable, or "
                               "pass --weights FILE.") from exc


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
        cached = bool(repo) and hf_cached_file(repo, cfg.hf_hub_filename) is not None
    else:
        settings = smp.encoders.encoders[encoder]["pretrained_settings"].get(weights) or {}
        repo = settings.get("repo_id")
        cached = bool(repo) and isinstance(try_to_load_from_cache(repo, "model.safetensors",
                                                                  revision=settings.get("revision")), str)
    if not repo:
        return "the hub"  # smp's (or timm's) own error names the weights the encoder has
    tried = f"the local Hugging Face cache and {_hub_endpoint()}/{repo}"
    if cached:
        return tried
    if hub_offline():
        raise AttnSurgeonError(f"the '{weights}' weights of smp encoder {encoder} are not in the local Hugging Face "
                               f"cache and HF_HUB_OFFLINE is set; tried {tried}. Download them where the network is "
                               "reachable, or pass --weights FILE.")
    require_network(_hub_endpoint(), tried)
    return tried


def input_size(model: Any, name: str) -> tuple[int, ...]:
    """A square the decoder can take: 256, or the smallest multiple of the encoder's output stride above it."""
    stride = int(getattr(model.encoder, "output_stride", 32) or 32)
    side = -(-256 // stride) * stride
    return (int(getattr(model.encoder, "_in_channels", 3)), side, side)
