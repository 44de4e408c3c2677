"""Global Context block, add fusion (timm's ``create_attn('gca')``: ``GlobalContext(fuse_add=True,
fuse_scale=False)``): the transformed context vector is added to every position, as in the GCNet
paper's main model (Cao et al., ICCVW 2019 - https://arxiv.org/abs/1904.11492). See :mod:`.gc`.

timm zero-initialises the MLP's last weight for the add fusion; its bias still adds a constant,
so identity init zeroes it too.
"""

from __future__ import annotations

import torch

from .gc import CLASSES, build_fused, describe, init_identity  # noqa: F401  (the block protocol)

FUSE = {"fuse_add": True, "fuse_scale": False}


def build(fmap, *, reduction: float) -> torch.nn.Module:
    return build_fused("gca", fmap, reduction, FUSE)
