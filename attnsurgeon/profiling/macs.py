"""What the MAC counts of whole models and of each insertion are: the one place either is computed
(``profile``'s table and the insertion map's ``--plot-metric macs`` both read it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.errors import AttnSurgeonError, one_line

__all__ = ["CountedParts", "count_model_macs", "insertion_macs", "count_insertion_macs"]


@dataclass
class CountedParts:
    """Where fvcore cannot run a whole model: the parts it counts instead, and the warning that says so.
    Empty until :func:`count_model_macs` falls back; one per pair of models, so that the second model is
    counted the same way as the first."""

    warning: str | None = None
    targets: list[str] = field(default_factory=list)


def count_model_macs(
    model: Any, args: tuple, size: tuple[int, ...], targets: list[str] | None, counted: CountedParts
) -> Any:
    """fvcore on the whole model; where it cannot run it, on the traced parts. After a fallback,
    ``counted`` holds the warning and the parts, and the next model is counted the same way."""
    import torch

    from . import flops

    if counted.warning is None:
        try:
            return flops.count_macs(model, args)
        except Exception as exc:  # noqa: BLE001  (fvcore's JIT tracer fails in many ways)
            reason = one_line(exc, with_type=False)
            from ..graph.parts import find_targets, record_inputs

            targets = targets or find_targets(model, size).targets
            if not targets:
                raise AttnSurgeonError(f"fvcore cannot count the MACs of {type(model).__name__}: {reason}") from exc
            counted.warning = (
                f"MACs count {', '.join(targets)} only: fvcore cannot run the whole {type(model).__name__} ({reason})"
            )
            counted.targets = list(targets)
    from ..graph.parts import record_inputs

    targets = counted.targets
    inputs = record_inputs(model, size)
    parts = [flops.count_macs(model.get_submodule(t), torch.randn(inputs[t])) for t in targets]
    by_module = {f"{t}.{k}" if k else t: v for t, p in zip(targets, parts, strict=True) for k, v in p.by_module.items()}
    by_operator: dict[str, int] = {}
    uncounted: dict[str, int] = {}
    for p in parts:
        for k, v in p.by_operator.items():
            by_operator[k] = by_operator.get(k, 0) + v
        for k, v in p.uncounted.items():
            uncounted[k] = uncounted.get(k, 0) + v
    return flops.FlopCount(
        sum(p.macs for p in parts), by_operator, by_module, uncounted, sum(p.fvcore_default_macs for p in parts)
    )


def insertion_macs(report: Any, base: Any, modified: Any) -> dict[str, int]:
    """MACs per inserted module from the two models' counts (:func:`count_model_macs`): the new
    module's; for a replacement (``--replace``, or a conv block such as ``sk``/``splat`` that takes
    the place of a conv) less the old module's, and less what the calls it took along (the conv's
    BN and activation) counted in the base model beyond the modified one."""
    out = {}
    for ins in report.insertions:
        macs = modified.by_module.get(ins.module, 0) if ins.attn != "none" else 0
        if ins.replaced:  # the new module sits under the old one's name: the row is the swap
            macs -= base.by_module.get(ins.module, 0)
            for m in ins.took_along:  # ... and the calls of the modules it took along (a conv's BN and ReLU)
                macs -= base.by_module.get(m, 0) - modified.by_module.get(m, 0)
        out[ins.module] = macs
    return out


def count_insertion_macs(base: Any, modified: Any, report: Any) -> dict[str, int]:
    """MACs per inserted module of ``modified`` (from :func:`attnsurgeon.insert`) against ``base``,
    counted on one sample of the report's input size, as ``profile`` counts them."""
    import torch

    from ..loading.samples import sample_args

    one = sample_args(base, tuple(report.input_size), 1, generator=torch.Generator().manual_seed(0))
    counted = CountedParts()
    mod = count_model_macs(modified, one, tuple(report.input_size), report.target, counted)
    return insertion_macs(report, count_model_macs(base, one, tuple(report.input_size), report.target, counted), mod)
