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

    try:  # smp reads the encoder's weights from the Hugging Face cache, else the hub
        return smp.create_model(arch, encoder_name=encoder, encoder_weights=weights, **rest)
    except Exception as exc:
        raise AttnSurgeonError(f"could not get the '{weights}' weights of smp encoder {encoder} (tried the local cache "
                               f"and the hub): {one_line(exc)}. Download them where the network is reachable, or "
                               "pass --weights FILE.") from exc


def input_size(model: Any, name: str) -> tuple[int, ...]:
    """A square the decoder can take: 256, or the smallest multiple of the encoder's output stride above it."""
    stride = int(getattr(model.encoder, "output_stride", 32) or 32)
    side = -(-256 // stride) * stride
    return (int(getattr(model.encoder, "_in_channels", 3)), side, side)
