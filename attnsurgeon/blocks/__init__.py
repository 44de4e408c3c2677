"""The attention zoo and its registry.

One small file per block (``se.py``, ``eca.py``, ``cbam.py``, ...); each defines

* ``build(fmap, **options) -> nn.Module``, for the :class:`FeatureMap` at the site (its channels
  and spatial size: a block is built for 1-D, 2-D or 3-D maps alike; at the ``conv`` position also
  the :class:`ConvSpec` of the convolution it replaces), with every option the block
  takes given (the registry fills in the defaults); a site the block cannot fit (too few channels,
  a kernel larger than the map) raises :class:`AttnSurgeonError` saying why;
* ``init_identity(module)``: make the module an exact identity that still learns;
* ``describe(module) -> dict``: the options it was built with, defaults filled in;
* ``GATES`` (optional): where its gates are, ``{name: (submodule path, "channel" | "spatial")}``,
  the submodule whose output is the gate (``{"channel": ("gate", "channel")}`` for SE);
  ``attnsurgeon explain`` reads them with forward hooks and draws them.

Its :class:`BlockInfo` in :data:`REGISTRY` (``registry.py``) says the rest, once: the options it takes and their
defaults (``None`` = the block's own rule; each option's flag, help and rule live in
:mod:`.options`), what it is (``kind``: a ``gate`` added on a tensor's path, or a ``conv`` that
replaces a spatial convolution, hence the positions it allows:
:data:`attnsurgeon.core.positions.KIND_POSITIONS`), its natural position, its paper. Adding a block
is one file plus one entry in ``registry.py``; ``lookup.py`` finds, checks, builds and describes
blocks, ``info.py`` holds the types. Nothing here imports torch, so ``attnsurgeon list attn`` and
``--help`` stay fast; a block's file is imported when it is built.
"""

from .info import BlockInfo, ConvSpec, FeatureMap
from .lookup import block_classes, build_block, check_options, describe_block, get_block
from .options import OPTIONS
from .registry import INITS, REGISTRY

__all__ = [
    "INITS",
    "OPTIONS",
    "REGISTRY",
    "BlockInfo",
    "ConvSpec",
    "FeatureMap",
    "block_classes",
    "build_block",
    "check_options",
    "describe_block",
    "get_block",
]
