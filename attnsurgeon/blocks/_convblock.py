"""What the conv blocks (sk, splat) share: the checks of the convolution they replace, and why
their ``--init identity`` is refused."""

from __future__ import annotations

from ..core.errors import AttnSurgeonError


def square(block: str, conv, what: str) -> int:
    values = set(getattr(conv, what))
    if len(values) != 1:
        raise AttnSurgeonError(
            f"{block}: the {conv.describe()} has a non-square {what} {getattr(conv, what)}; {block} builds square ones"
        )
    return values.pop()


def check_conv(block: str, conv) -> None:
    """A 2-D conv with zero padding computed from its kernel (timm's modules build exactly that)."""
    if conv is None:
        raise AttnSurgeonError(f"{block} replaces a convolution and is built only at position 'conv'")
    if conv.dims != 2:
        raise AttnSurgeonError(
            f"{block}: timm's module is 2-D and the {conv.describe()} is {conv.dims}-D; it cannot take its place"
        )
    if conv.padding == "dynamic" or conv.padding_mode != "zeros":
        what = (
            "TF-style 'same' padding computed per input"
            if conv.padding == "dynamic"
            else f"{conv.padding_mode} padding"
        )
        raise AttnSurgeonError(
            f"{block}: the {conv.describe()} uses {what}; {block} pads with zeros and would change the block's outputs"
        )


def refuse_identity(block: str, layout: str) -> None:
    """No exact identity exists for a conv block built from timm's module, so none is pretended."""
    raise AttnSurgeonError(
        f"{block}: --init identity is impossible: {layout}, so its output is never negative, while the convolution "
        "it replaces gives negative values (conv(-x) = -conv(x)); no choice of its weights reproduces the conv. "
        "Use --init default (the new paths are trained from timm's initialisation)"
    )
