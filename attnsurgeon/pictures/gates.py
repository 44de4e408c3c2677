"""Reading what attention gates do, for ``attnsurgeon explain``: which submodule of each attention
module is its gate (a block declares it in its file's ``GATES``; for the model's own attention the
last sigmoid-like module inside it), the gate values read with forward hooks, and per gate its
statistics (mean, std, min, max, the fractions near 0 and near 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LOW, HIGH = 0.05, 0.95  # a gate value below LOW is 'near 0', above HIGH 'near 1'


@dataclass
class Gate:
    """One gate to read: the attention module, the gate's name in it, the submodule that outputs it."""

    module: str  # the attention module (``layer3.0.cbam``, ``blocks.1.0.se``)
    name: str  # ``channel`` / ``spatial`` / the block's own name for it
    path: str  # the submodule whose output is the gate (``layer3.0.cbam.channel.gate``)
    kind: str | None  # "channel" | "spatial" | None (from the output's shape)
    origin: str  # "inserted" | "existing"
    type: str  # class of the attention module


def _gate_entry(g: Gate, t: Any) -> dict[str, Any]:
    return {"module": g.module, "gate": g.name, "kind": g.kind, "shape": list(t.shape), **gate_stats(t)}


def gate_stats(t: Any) -> dict[str, float]:
    """mean, std (population), min, max, and the fractions near 0 and near 1 of a gate tensor."""
    v = t.detach().double().flatten()
    return {
        "mean": float(v.mean()),
        "std": float(v.std(unbiased=False)) if v.numel() > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "near_0": float((v < LOW).double().mean()),
        "near_1": float((v > HIGH).double().mean()),
    }


def _sigmoid_like(module: Any) -> bool:
    return "sigmoid" in type(module).__name__.lower()


def _declared(module: Any) -> dict[str, tuple[str, str]] | None:
    """The ``GATES`` a zoo block declares for this module's class, if any."""
    from ..blocks import REGISTRY

    for info in REGISTRY.values():
        impl = info.impl()
        if isinstance(module, tuple(getattr(impl, "CLASSES", ()))) and getattr(impl, "GATES", None):
            return dict(impl.GATES)
    return None


def gates_of(module: Any) -> dict[str, tuple[str, str | None]]:
    """Where a module's gates are: its block's ``GATES``, else its sigmoid-like submodules
    (``gate``, ``scale_activation``), named by their path; kind None (read from the shape)."""
    declared = _declared(module)
    if declared:
        return {k: (p, kind) for k, (p, kind) in declared.items()}
    found: dict[str, tuple[str, str | None]] = {
        n: (n, None) for n, m in module.named_modules() if n and _sigmoid_like(m)
    }
    return found


def find_gates(gm: Any, insertions: list[Any], base_gm: Any, notes: list[str]) -> list[Gate]:
    """The gates of every inserted module and of the model's own attention modules, in forward order."""
    from ..graph.attention import attention_regions

    gates: list[Gate] = []
    inserted = {i.module for i in insertions if i.attn != "none"}
    for ins in insertions:
        if ins.attn == "none":
            continue
        module = gm.get_submodule(ins.module)
        found = gates_of(module)
        if not found:
            notes.append(
                f"{ins.module} ({type(module).__name__}) declares no gate and has no sigmoid-like submodule: not read"
            )
        for name, (path, kind) in found.items():
            gates.append(Gate(ins.module, name, f"{ins.module}.{path}", kind, "inserted", type(module).__name__))
    if base_gm is not None:
        for region in attention_regions(base_gm):
            if not region.gate or region.name in inserted:
                continue
            leaf = len(region.nodes) == 1 and next(iter(region.nodes)).op == "call_module"
            if leaf:
                module = gm.get_submodule(region.name)
                found = {k: (f"{region.name}.{p}", kind) for k, (p, kind) in gates_of(module).items()}
            else:  # traced through: the sigmoid-like modules its graph calls, the last one the gate
                calls = [n.target for n in region.nodes if n.op == "call_module" and _sigmoid_like(_get(gm, n.target))]
                order = {n: i for i, n in enumerate(base_gm.graph.nodes)}
                calls = [
                    n.target
                    for n in sorted(
                        (n for n in region.nodes if n.op == "call_module" and n.target in calls), key=order.__getitem__
                    )
                ]
                found = {"gate": (calls[-1], None)} if calls else {}
            if not found:
                notes.append(
                    f"the gate of {region.name} ({region.type}) is computed by a function, not a module: not read"
                )
            for name, (path, kind) in found.items():
                gates.append(Gate(region.name, name, path, kind, "existing", region.type))
    return gates


def _get(gm: Any, path: str) -> Any:
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None


def read_gates(model: Any, gates: list[Gate], x: Any) -> dict[tuple[str, str], Any]:
    """One forward pass of ``model`` on ``x``; each gate's output, captured by a forward hook on its
    submodule ((N, ...) tensors; the last call where a submodule runs twice)."""
    import torch

    values: dict[tuple[str, str], Any] = {}
    handles = []
    for g in gates:
        sub = _get(model, g.path)
        if sub is None:
            continue

        def hook(_m: Any, _i: Any, out: Any, key: tuple[str, str] = (g.module, g.name)) -> None:
            values.pop(key, None)  # the last call counts; the dict keeps the order of the calls
            values[key] = out.detach().float().cpu()

        handles.append(sub.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    for g in gates:
        t = values.get((g.module, g.name))
        if t is not None and g.kind is None:
            g.kind = _kind(t)
    order = {key: i for i, key in enumerate(values)}
    gates.sort(key=lambda g: order.get((g.module, g.name), len(order)))  # forward order
    return values


def _kind(t: Any) -> str:
    spatial = t.shape[2:]
    if all(s == 1 for s in spatial):
        return "channel"
    if t.dim() >= 3 and t.shape[1] == 1:
        return "spatial"
    return "channel"  # (N, C, T, 1, 1): one gate per channel and frame
