"""What a model takes and what it gives: sample inputs and flattened outputs.

A classifier takes one batch tensor and returns one tensor, but not every network does:

* a segmentation model returns a dict (``{'out': ..., 'aux': ...}``);
* a torchvision detector takes a *list* of images (``forward(images: List[Tensor], targets=None)``)
  and returns a list of dicts (boxes, scores, labels, masks, keypoints);
* an optical-flow model takes two frames (``forward(image1, image2)``) and returns a list of flows.

:func:`sample_args` builds the positional arguments a model's ``forward`` asks for, from its
signature (a ``List[...]`` annotation, or torchvision's ``forward(images, targets=None)``, means
a list of images; otherwise one batch tensor per required argument), and :func:`flatten_outputs`
turns any nest of dicts, lists and tuples into the list of its tensors, so that checks, losses and
comparisons handle every model one way.
"""

from __future__ import annotations

import inspect
from typing import Any

TENSOR, IMAGES = "tensor", "images"


def input_kind(model: Any) -> tuple[str, int]:
    """``("images", 1)`` for a forward taking a list of images, else ``("tensor", n)``: n batch tensors."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return TENSOR, 1
    positional = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional and (
        _is_list_annotation(positional[0].annotation)
        or (positional[0].name == "images" and "targets" in sig.parameters)
    ):
        return IMAGES, 1  # torchvision's detectors: forward(images: List[Tensor], targets=None), unannotated in some
    required = [p for p in positional if p.default is p.empty]
    return TENSOR, max(1, len(required))


def _is_list_annotation(annotation: Any) -> bool:
    if annotation is inspect.Parameter.empty:
        return False
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return text.replace("typing.", "").lower().startswith("list[")


def takes_targets(model: Any) -> bool:
    """A forward with a ``targets`` argument (torchvision's detectors): training needs labelled targets."""
    try:
        return "targets" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def sample_args(
    model: Any,
    size: tuple[int, ...],
    batch: int = 1,
    *,
    generator: Any = None,
    device: Any = None,
    memory_format: Any = None,
) -> tuple:
    """Random positional arguments for ``model``: ``batch`` samples of ``size`` (C, H, W, ...)."""
    import torch

    kind, count = input_kind(model)

    def randn(*shape: int) -> Any:
        t = torch.randn(*shape, generator=generator)
        t = t.to(device) if device is not None else t
        if memory_format is not None and t.dim() in (4, 5):  # channels_last / channels_last_3d
            t = t.contiguous(memory_format=memory_format)
        return t

    if kind == IMAGES:
        return ([randn(*size) for _ in range(batch)],)
    return tuple(randn(batch, *size) for _ in range(count))


def flatten_outputs(value: Any) -> list:
    """Every tensor in a nest of dicts, lists and tuples, in order (dicts by insertion order)."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in flatten_outputs(item)]
    return []


def batch_of(args: tuple) -> int:
    """The batch size of arguments made by :func:`sample_args`."""
    first = args[0]
    return len(first) if isinstance(first, list) else int(first.shape[0])


def max_abs_diff(outputs: Any, references: Any) -> float:
    """The largest absolute difference between two outputs of the same structure (inf if they differ)."""
    a, b = flatten_outputs(outputs), flatten_outputs(references)
    # zip is strict: the lengths are equal once the first test fails
    if len(a) != len(b) or any(tuple(x.shape) != tuple(y.shape) for x, y in zip(a, b, strict=True)):
        return float("inf")
    return max(
        (float((x.detach().float() - y.detach().float()).abs().max()) for x, y in zip(a, b, strict=True) if x.numel()),
        default=0.0,
    )


def output_scale(outputs: Any) -> float:
    return max((float(t.detach().float().abs().max()) for t in flatten_outputs(outputs) if t.numel()), default=0.0)
