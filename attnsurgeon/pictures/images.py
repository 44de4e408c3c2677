"""The images ``explain`` reads: the files and folders named, and each model's own preprocessing."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..core.errors import AttnSurgeonError

__all__ = ["IMAGE_EXTENSIONS", "collect_images", "preprocessing", "load_images"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def collect_images(images: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named, and the images in folders named (sorted); each checked to be a readable image."""
    from PIL import Image

    files: list[Path] = []
    for item in images:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            if not found:
                raise AttnSurgeonError(f"folder '{p}' holds no image ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif not p.exists():
            raise AttnSurgeonError(f"image '{p}' does not exist")
        else:
            files.append(p)
    if not files:
        raise AttnSurgeonError("no image given: pass --image FILE (repeat it, or give a folder)")
    for f in files:
        try:
            with Image.open(f) as im:
                im.verify()
        except (
            Exception
        ) as exc:  # PIL's errors, and whatever a plugin patched into Image.open raises (ultralytics' HEIF)
            raise AttnSurgeonError(
                f"cannot read image '{f}': it is not an image file PIL can open ({type(exc).__name__})"
            ) from None
    return files


def preprocessing(loaded: Any, size: tuple[int, ...]) -> tuple[Callable, Any, Any, str]:
    """The model's own preprocessing for ``size`` (C, H, W): timm's data config, torchvision's weights
    transforms, else a plain resize to [0, 1]. Returns (transform PIL -> tensor, mean, std, description)."""
    from torchvision import transforms as T

    model = loaded.model
    h, w = int(size[-2]), int(size[-1])
    if getattr(model, "pretrained_cfg", None) is not None and loaded.source == "timm":
        from timm.data import create_transform, resolve_data_config

        cfg = resolve_data_config({"input_size": (3, h, w)}, model=model)
        transform = create_transform(**cfg)
        return transform, cfg["mean"], cfg["std"], f"timm data config: {_config_text(cfg)}"
    if loaded.source == "torchvision":
        import torchvision

        try:
            own = torchvision.models.get_model_weights(loaded.name).DEFAULT.transforms()
        except Exception:  # noqa: BLE001  (models without published weights)
            own = None
        if own is not None and hasattr(own, "crop_size"):
            crop = own.crop_size[0]
            resize = round(own.resize_size[0] * h / crop)
            transform = T.Compose(
                [
                    T.Resize(resize, interpolation=own.interpolation, antialias=True),
                    T.CenterCrop((h, w)),
                    T.ToTensor(),
                    T.Normalize(own.mean, own.std),
                ]
            )
            return (
                transform,
                tuple(own.mean),
                tuple(own.std),
                (
                    f"torchvision weights transforms: resize {resize} ({own.interpolation.value}), "
                    f"center crop {h}×{w}, mean {list(own.mean)}, std {list(own.std)}"
                ),
            )
    transform = T.Compose([T.Resize((h, w), antialias=True), T.ToTensor()])
    return (
        transform,
        (0.0, 0.0, 0.0),
        (1.0, 1.0, 1.0),
        (f"resize to {h}×{w}, scaled to [0, 1], not normalised (the model declares no preprocessing)"),
    )


def _config_text(cfg: dict) -> str:
    crop = cfg.get("crop_pct")
    return (
        f"input {tuple(cfg['input_size'])}, {cfg.get('interpolation')} interpolation, crop_pct {crop}, "
        f"crop_mode {cfg.get('crop_mode', 'center')}, mean {list(map(float, cfg['mean']))}, "
        f"std {list(map(float, cfg['std']))}"
    )


def load_images(files: list[Path], transform: Callable, mean: Any, std: Any) -> tuple[Any, list[Any]]:
    """(batch tensor, the un-normalised pixels each image became, (H, W, 3) in [0, 1])."""
    import torch
    from PIL import Image

    tensors = []
    for f in files:
        with Image.open(f) as im:
            tensors.append(transform(im.convert("RGB")))
    x = torch.stack(tensors)
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    pixels = (x * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return x, list(pixels)
