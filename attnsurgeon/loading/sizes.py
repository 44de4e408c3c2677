"""The input size a model takes: from its library's weights (torchvision's transforms, timm's
``pretrained_cfg``), from what the model says, or from its first convolution; a detector's from its
transform's resize.
"""

from __future__ import annotations

from typing import Any

# torchvision's video models are trained and evaluated on clips of 16 frames (references/video_classification)
VIDEO_FRAMES = 16


def torchvision_input_size(name: str) -> tuple[int, ...]:
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


def detector_input_size(model: Any, default: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """A detector resizes every image to its transform's ``min_size``: that is its working size
    (3×320×320 where the model says nothing; its weights' transforms have no crop size)."""
    from .samples import IMAGES, input_kind

    if input_kind(model)[0] != IMAGES:
        return default
    transform = getattr(model, "transform", None)
    side = getattr(transform, "min_size", None) or getattr(transform, "size", None)
    side = side[0] if isinstance(side, (list, tuple)) else side
    return (3, int(side), int(side)) if isinstance(side, int) else (3, 320, 320)
