"""What an insertion costs: parameters, MACs/FLOPs, latency and peak memory, base vs modified.

:func:`profile` loads the model once, applies the insertions with :func:`attnsurgeon.apply_plan`
(the same code path as ``insert``), and measures both models in one run, side by side:

* parameters from ``model.parameters()`` (shared tensors once), split per insertion;
* MACs with fvcore plus element-wise handles (``profiling.flops``), FLOPs = 2 × MACs, with a
  per-insertion breakdown whose rows sum exactly to the total delta;
* latency in paired, interleaved rounds (warm-up until stable, CUDA synchronisation, median and IQR),
  and for each Δ latency the median of the per-round ratios with its 95 % interval; throughput in images/s;
* peak tensor memory of one step (inference, or forward+backward with ``mode='train'``).

The package's public names are re-exported here; :mod:`.run` holds :func:`profile`, :mod:`.result`
what it returns.
"""

from __future__ import annotations

from .result import FLOP_CONVENTION, InsertionCost, ModelFigures, ProfileResult
from .run import ProgressFn, profile

__all__ = ["FLOP_CONVENTION", "InsertionCost", "ModelFigures", "ProfileResult", "ProgressFn", "profile"]
