"""Where a feature map keeps its channels, for tensors of any rank (torch-free).

A :class:`Layout` is the one record of a tensor's arrangement that the anatomy, the blocks and the
surgery share: its rank (batch included) and the axis that holds channels. Everything else follows
from those two numbers: the spatial axes, the name people read (``NCL``, ``NCHW``, ``NCDHW`` and
their channels-last twins ``NLC``, ``NHWC``, ``NDHWC``), and the permutations that bring the
channels to axis 1 and back, which is how a block written for channels-first maps is called on a
channels-last one (ConvNeXt's NHWC stages, ViT tokens).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core.errors import AttnSurgeonError

# spatial axis letters by the number of spatial dimensions (PyTorch's Conv1d/2d/3d naming)
_SPATIAL = {1: "L", 2: "HW", 3: "DHW"}


@dataclass(frozen=True)
class Layout:
    ndim: int  # rank of the tensor, batch included
    caxis: int  # the axis that holds channels (1 = channels first, ndim - 1 = channels last)

    @staticmethod
    def of(ndim: int, caxis: int | None) -> Layout | None:
        """The layout of a tensor of rank ``ndim`` with channels at ``caxis``; None where no block can
        go (no spatial axis, more than three, or channels neither first nor last)."""
        if caxis is None or not 3 <= ndim <= 5:
            return None
        caxis %= ndim
        return Layout(ndim, caxis) if caxis in (1, ndim - 1) else None

    @staticmethod
    def parse(name: str) -> Layout:
        """``Layout.parse('NHWC')`` -> Layout(4, 3)."""
        for ndim in (3, 4, 5):
            for caxis in (1, ndim - 1):
                if Layout(ndim, caxis).name == name:
                    return Layout(ndim, caxis)
        raise ValueError(f"unknown layout '{name}'")

    @property
    def dims(self) -> int:
        """Number of spatial dimensions: 1 (sequences, audio), 2 (images), 3 (video, volumes)."""
        return self.ndim - 2

    @property
    def channels_last(self) -> bool:
        return self.caxis != 1

    @property
    def spatial_axes(self) -> tuple[int, ...]:
        return tuple(a for a in range(1, self.ndim) if a != self.caxis)

    @property
    def name(self) -> str:
        spatial = _SPATIAL[self.dims]
        return "N" + (spatial + "C" if self.channels_last else "C" + spatial)

    def __str__(self) -> str:
        return self.name

    def channels(self, shape: tuple[int, ...]) -> int:
        return int(shape[self.caxis])

    def size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The spatial size of a tensor of this layout (``(T, H, W)``, ``(H, W)`` or ``(L,)``)."""
        return tuple(int(shape[a]) for a in self.spatial_axes)

    def to_channels_first(self) -> tuple[int, ...] | None:
        """The permutation that moves channels to axis 1 (None where they are there already)."""
        return (0, self.caxis, *self.spatial_axes) if self.channels_last else None

    def from_channels_first(self) -> tuple[int, ...] | None:
        """Its inverse: back from channels-first to this layout."""
        perm = self.to_channels_first()
        if perm is None:
            return None
        inverse = [0] * self.ndim
        for i, axis in enumerate(perm):
            inverse[axis] = i
        return tuple(inverse)


def channels_last_format(ndim: int) -> str:
    """The name of torch's channels-last memory format for an input of rank ``ndim``."""
    formats = {4: "channels_last", 5: "channels_last_3d"}
    if ndim not in formats:
        raise AttnSurgeonError(f"--channels-last needs a 2-D or 3-D input (rank 4 or 5); this one has rank {ndim}")
    return formats[ndim]


# --------------------------------------------------------------------------- input sizes

_SIZE_HELP = (
    "S (the image side), H,W, C,H,W, T,H,W or C,T,H,W for video, C,L for 1-D signals "
    "(e.g. 224, 160x128, 3,16,112,112 or 1,16000)"
)


def parse_size(value: Any, what: str = "input size") -> list[int]:
    """``224`` / ``"160x128"`` / ``"3,16,112,112"`` / a sequence -> a list of 1 to 4 positive ints."""
    if isinstance(value, str):
        if not re.fullmatch(r"\s*\d+(\s*[,x×]\s*\d+){0,3}\s*", value):
            raise AttnSurgeonError(f"{what} '{value}': expected {_SIZE_HELP}")
        value = [int(p) for p in re.split(r"\s*[,x×]\s*", value.strip())]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    try:
        values = [int(v) for v in value]
    except (TypeError, ValueError):
        raise AttnSurgeonError(f"{what} {value!r}: expected {_SIZE_HELP}") from None
    if not 1 <= len(values) <= 4 or any(v <= 0 for v in values):
        raise AttnSurgeonError(f"{what} {values}: expected {_SIZE_HELP}, with positive numbers")
    return values


def resolve_input_size(value: Any, default: Sequence[int] | None) -> tuple[int, ...]:
    """The sample input's ``(C, *spatial)`` from what the user gave and the model's default.

    One number sets the image side (H and W; L for a 1-D model), keeping channels and frames; fewer
    numbers than the default has replace its trailing extents (``160,128`` -> ``(3, 160, 128)``;
    ``16,112,112`` for a video model keeps C); as many or more give the whole size, any rank.
    ``default`` None means the model does not say what it takes: then the whole size is needed.
    """
    if value is None or value == "":
        if default is None:
            raise AttnSurgeonError(f"the model does not say what input it takes: give --input-size ({_SIZE_HELP})")
        return tuple(int(v) for v in default)
    values = parse_size(value)
    if default is None:
        if len(values) < 2:
            raise AttnSurgeonError(
                f"input size {values}: the model does not say what input it takes, so give its "
                f"channels too ({_SIZE_HELP})"
            )
        return tuple(values)
    default = [int(v) for v in default]
    if len(values) == 1:
        side = min(2, len(default) - 1)
        return tuple(default[: len(default) - side] + values * side)
    if len(values) < len(default):
        return tuple(default[: len(default) - len(values)] + values)
    return tuple(values)
