"""What the coordinate-attention family shares: 2-D maps only, gates that become ``2·sigmoid``."""

from __future__ import annotations

import torch

from ._common import ScaledSigmoid, check_kernel_fits, require_2d


def check_site(block: str, fmap, kernel_size: int | None = None) -> None:
    require_2d(block, fmap, "it pools rows and columns separately")
    if kernel_size is not None:
        check_kernel_fits(block, int(kernel_size), fmap.size)


@torch.no_grad()
def zero_and_double(module: torch.nn.Module, *names: str) -> None:
    """Zero the named layers (weights and biases): the gate input is then exactly 0, and the gate,
    made ``2·sigmoid``, exactly 1."""
    for name in names:
        for p in module.get_submodule(name).parameters():
            p.zero_()
    module.gate = ScaledSigmoid(2.0)
