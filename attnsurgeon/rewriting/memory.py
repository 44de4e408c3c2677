"""Memory-efficient attention: gates recomputed in the backward pass instead of kept for it.

A channel gate ``y = x * g(x)`` keeps ``x`` for its backward pass, a tensor as large as the
feature map; in a ResNet bottleneck ``x`` is the output of ``bn3``, which nothing else keeps, so
SE adds one feature map per block to a training step's memory (+21.7 % on ResNet-50). The norm
before the gate already keeps *its* input: recomputing the norm and the gate from that input in
the backward pass costs one element-wise pass and no memory.

:func:`make_memory_efficient` finds, for each attention region of a traced model (an inserted
block, or a gate the model has: :func:`attnsurgeon.graph.anatomy.attention_regions`), its **segment**:
the region plus the ops before it up to the last one that keeps its own input anyway — walking
back over dropout/drop-path and activations and norms, and stopping after the first norm or
input-keeping activation (a ReLU or sigmoid keeps its *output*, which the segment then reads:
it stays outside). The segment's nodes are replaced by one call of a :class:`Recompute` module
that runs them directly, except in training with gradients on: then, where the segment starts
with a batch norm (or with no norm) and holds no dropout, selectively — once, with the large
tensors backward needs rebuilt from the norm's input and statistics when it needs them
(:mod:`attnsurgeon.rewriting.recompute`, ``Segment.method == "selective"``) — and otherwise under
:func:`torch.utils.checkpoint.checkpoint` (non-reentrant, RNG state preserved; ``"checkpoint"``);
under ``torch.compile`` always dynamo's checkpoint. The segment calls the model's own modules, so
no parameter moves or is renamed; ``Recompute`` owns no tensor, and ``state_dict()`` is the plain
model's. A norm in a checkpointed segment is recomputed without updating its running statistics a
second time.

:func:`plain` gives the model back with every segment inlined again (what exports write).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import Node
from torch.utils.checkpoint import checkpoint

from ..core.errors import AttnSurgeonError
from ..core.ops import (
    ACT_FUNCTIONS,
    ACT_METHODS,
    NORM_MODULES,
    PASS_FUNCTIONS,
    PASS_MODULES,
    called_module,
    is_activation_module,
)
from .recompute import SelectivePlan

SUFFIX = "_recompute"  # Recompute modules hang beside the attention module: layer1.0.se_recompute


@dataclass
class Segment:
    """One recomputed part of the graph, as reported."""

    module: str  # the attention module (``layer1.0.se``)
    recompute: str  # the Recompute module that runs it (``layer1.0.se_recompute``)
    start: str | None  # the earliest op recomputed before the attention (``layer1.0.bn3``); None: the attention only
    ops: int  # nodes of the graph the segment holds
    # "selective": the norm's output rebuilt (attnsurgeon.rewriting.recompute); "checkpoint": all re-run
    method: str = "checkpoint"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Recompute(nn.Module):
    """Runs a segment of its model's graph; in training with gradients on, with its large tensors
    rebuilt in backward (a :class:`~attnsurgeon.rewriting.recompute.SelectivePlan`) or under checkpoint.

    ``segment`` is a GraphModule over the model's own modules, held without registering it (its
    modules are registered where they were, under their own names), so this module owns no
    parameter or buffer."""

    # plain attributes, set past nn.Module's registration (declared for the type checker only)
    segment: torch.fx.GraphModule
    norms: tuple[nn.Module, ...]
    plan: SelectivePlan | None

    def __init__(self, segment: torch.fx.GraphModule, norms: Iterable[nn.Module]):
        super().__init__()
        object.__setattr__(self, "segment", segment)
        object.__setattr__(self, "norms", tuple(norms))
        object.__setattr__(self, "plan", SelectivePlan.make(segment))

    @property
    def method(self) -> str:
        return "selective" if self.plan is not None and self.plan.unmatched is None else "checkpoint"

    def forward(self, *args: Any) -> Any:
        if not _checkpointing(self):
            return self.segment.forward(*args)  # .forward: traced through onto the model's own modules
        if torch.compiler.is_compiling():  # dynamo's checkpoint op: AOT autograd recomputes, mutations applied once
            return checkpoint(self.segment.forward, *args, use_reentrant=False, preserve_rng_state=True)
        if self.plan is not None and self.method == "selective":  # (a selective method has a plan)
            return self.plan(*args)
        calls = [0]

        def run(*inputs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1:
                return self.segment.forward(*inputs)
            with _frozen_statistics(self.norms):  # the recomputation in backward: statistics already updated
                return self.segment.forward(*inputs)

        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)

    def extra_repr(self) -> str:
        ops = len(self.segment.graph.nodes) - len(self.segment.graph.find_nodes(op="placeholder")) - 1
        return f"{ops} ops, {self.method}"


def _checkpointing(module: nn.Module) -> bool:
    """Checkpoint only in training with gradients on, and never while a tracer or exporter runs."""
    if not (module.training and torch.is_grad_enabled()):
        return False
    if torch.fx._symbolic_trace.is_fx_symbolic_tracing() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    return not torch.compiler.is_exporting()


_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def _frozen_statistics(norms: tuple[nn.Module, ...]):
    """Batch norms run as in the forward pass (batch statistics, the same tensors saved for
    backward) but update throwaway copies of their running statistics and ``num_batches_tracked``:
    the real ones were updated once, by the forward pass."""
    kept: list[tuple[nn.Module, str, torch.Tensor]] = []
    for m in norms:
        if m.training and getattr(m, "track_running_stats", False):
            for key in _STATISTICS:
                value = getattr(m, key, None)
                if isinstance(value, torch.Tensor):
                    kept.append((m, key, value))
                    setattr(m, key, value.clone())
    try:
        yield
    finally:
        for m, key, value in kept:
            setattr(m, key, value)


# --------------------------------------------------------------------------- finding segments

_KEEPS_OUTPUT_MODULES = (nn.ReLU, nn.Sigmoid, nn.Tanh)
_KEEPS_OUTPUT_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh}
_KEEPS_OUTPUT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
_STATELESS_NORM_FUNCTIONS = {F.layer_norm, F.group_norm}  # F.batch_norm may update statistics: never recomputed


def _kind(gm: torch.fx.GraphModule, n: Node) -> str | None:
    """How ``n`` takes part in a segment: 'input' (keeps its input for backward: norms, most
    activations), 'output' (keeps its output: relu, sigmoid, tanh), 'pass' (dropout, drop path,
    identity) or None (not element-wise: the segment starts after it)."""
    if n.op == "call_module":
        m = called_module(gm, n)
        if m is None:
            return None
        if isinstance(m, NORM_MODULES):
            return "input"
        if isinstance(m, _KEEPS_OUTPUT_MODULES):
            return "output"
        if is_activation_module(m):
            return "input"
        if isinstance(m, PASS_MODULES) or type(m).__name__ in ("DropPath", "StochasticDepth"):
            return "pass"
        return None
    if n.op == "call_function":
        if n.target in _KEEPS_OUTPUT_FUNCTIONS:
            return "output"
        if n.target in ACT_FUNCTIONS or n.target in _STATELESS_NORM_FUNCTIONS:
            return "input"
        return "pass" if n.target in PASS_FUNCTIONS else None
    if n.op == "call_method":
        if n.target in _KEEPS_OUTPUT_METHODS:
            return "output"
        return "input" if n.target in ACT_METHODS else None
    return None


def _in_place(gm: torch.fx.GraphModule, n: Node) -> bool:
    if n.op == "call_module":
        return bool(getattr(called_module(gm, n), "inplace", False))
    if n.op == "call_function":
        return bool(n.kwargs.get("inplace")) or getattr(n.target, "__name__", "").endswith("_")
    return n.op == "call_method" and str(n.target).endswith("_")


def _tensor_inputs(n: Node) -> list[Node]:
    return [a for a in n.all_input_nodes if a.op != "get_attr"]


def segment_nodes(gm: torch.fx.GraphModule, region: set[Node]) -> tuple[list[Node], Node, Node | None] | None:
    """The nodes to recompute for an attention region (one tensor in, one out), the node the
    segment reads and the earliest op before the region it holds (None: none); None where the
    region does not read one tensor and return one."""
    from ..graph.attention import region_io

    inputs, outputs = region_io(region)
    if len(inputs) != 1 or len(outputs) != 1:
        return None
    nodes = set(region)
    chain: list[Node] = []  # ops before the region, nearest first
    x = inputs[0]
    while True:
        kind = _kind(gm, x)
        if kind is None or kind == "output" or len(_tensor_inputs(x)) != 1 or any(u not in nodes for u in x.users):
            break
        nodes.add(x)
        chain.append(x)
        x = _tensor_inputs(x)[0]
        if kind == "input" and not _in_place(gm, chain[-1]):
            break
    # an op that writes into the segment's input would leave the recomputation a different input
    while chain and _in_place(gm, chain[-1]):
        nodes.discard(chain.pop())
        x = chain[-1] if chain else inputs[0]
    if not chain and any(_in_place(gm, u) for u in x.users if u in nodes):
        return None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(nodes, key=order.__getitem__), x, (chain[-1] if chain else None)


# --------------------------------------------------------------------------- rewriting


def recompute_gates(
    gm: torch.fx.GraphModule, names: list[str] | None = None, notes: list[str] | None = None
) -> list[Segment]:
    """Put each attention region of ``gm`` (the modules named by ``names``: inserted blocks; by
    default every gate the anatomy finds) with the ops before it into a :class:`Recompute` call.
    ``gm`` needs the shapes of :func:`attnsurgeon.graph.anatomy.analyse`; its graph is rewritten and
    recompiled in place. Regions that cannot be recomputed are described in ``notes``; nothing
    to recompute at all is an error."""
    from ..graph.attention import attention_modules, attention_region, attention_regions

    notes = notes if notes is not None else []
    if names is None:
        found = attention_regions(gm)
        regions = [r for r in found if r.gate]
        if not regions:
            what = (
                f"its {len(found)} attention module(s) ({', '.join(r.name for r in found[:3])}) are not "
                f"channel/spatial gates ({found[0].why})"
                if found
                else "it has no attention modules of its own"
            )
            raise AttnSurgeonError(
                f"the model has no attention gate to recompute in the backward pass: {what}; "
                "insert some with `attnsurgeon insert MODEL --attn se --memory-efficient`"
            )
        notes += [f"{r.name} ({r.type}) is not recomputed: {r.why}" for r in found if not r.gate]
    else:
        if not names:
            raise AttnSurgeonError(
                "--memory-efficient: the plan inserts no block to recompute (it only removes "
                "attention); drop --memory-efficient, or use `attnsurgeon optimize` on a model with gates"
            )
        types = dict(attention_modules(gm))
        regions = [
            attention_region(gm, name, types.get(name) or type(gm.get_submodule(name)).__name__) for name in names
        ]
    done: list[Segment] = []
    for region in regions:
        found_nodes = segment_nodes(gm, set(region.nodes)) if region.nodes else None
        if found_nodes is None:
            notes.append(f"{region.name} ({region.type}) is not recomputed: it does not read one tensor and return one")
            continue
        done.append(_rewrite(gm, region.name, *found_nodes))
    if not done:
        raise AttnSurgeonError(
            f"--memory-efficient: none of the {len(regions)} attention modules reads one tensor and "
            "returns one, so none can be recomputed"
        )
    gm.graph.lint()
    gm.recompile()
    return done


def _rewrite(gm: torch.fx.GraphModule, name: str, nodes: list[Node], source: Node, first: Node | None) -> Segment:
    graph = gm.graph
    inside = set(nodes)
    (out,) = [n for n in nodes if any(u not in inside for u in n.users)]
    externals: dict[Node, None] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "get_attr":
                externals[a] = None
    sub = torch.fx.Graph()
    env: dict[Node, Node] = {e: sub.placeholder(e.name) for e in externals}
    for n in nodes:
        for a in n.all_input_nodes:
            if a.op == "get_attr" and a not in env:
                env[a] = sub.get_attr(cast(str, a.target))  # an attribute's dotted name
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(env[out])
    segment = torch.fx.GraphModule(gm, sub, class_name="Segment")
    called = [
        m for n in nodes if (m := called_module(gm, n)) is not None
    ]  # a leaf block (timm's CBAM) holds its own norms
    norms = list(
        {id(x): x for m in called for x in m.modules() if isinstance(x, nn.modules.batchnorm._NormBase)}.values()
    )
    target = _free_name(gm, name + SUFFIX)
    recompute = Recompute(segment, norms)
    gm.add_submodule(target, recompute)
    with graph.inserting_after(out):
        call = graph.call_module(target, tuple(externals))
    call.meta = {k: v for k, v in out.meta.items() if k in ("tensor_meta", "shape", "nn_module_stack")}
    out.replace_all_uses_with(call)
    start = None if first is None else str(first.target) if first.op == "call_module" else first.name
    for n in reversed(nodes):
        graph.erase_node(n)
    return Segment(name, target, start, len(nodes), recompute.method)


def _free_name(gm: torch.fx.GraphModule, name: str) -> str:
    k, candidate = 1, name
    while True:
        try:
            gm.get_submodule(candidate)
        except AttributeError:
            return candidate
        k += 1
        candidate = f"{name}{k}"


def recompute_modules(model: nn.Module) -> list[str]:
    """Names of the :class:`Recompute` modules in ``model``."""
    return [name for name, m in model.named_modules() if isinstance(m, Recompute)]


def plain(model: nn.Module) -> nn.Module:
    """``model`` with every :class:`Recompute` call inlined again: the plain graph, on the same
    modules and parameters (a new GraphModule where one held segments; ``model`` is unchanged)."""
    if not recompute_modules(model):
        return model
    if isinstance(model, torch.fx.GraphModule):
        return _inlined(model)
    import copy

    out = copy.copy(model)  # a shallow copy whose GraphModule parts are replaced by inlined ones
    out._modules = dict(model._modules)
    for name, child in model._modules.items():
        if child is not None and recompute_modules(child):
            out._modules[name] = plain(child)
    return out


def _keep_order(new: nn.Module, old: nn.Module) -> None:
    """Children in ``old``'s order: GraphModule copies them in the graph's order, and the order of
    ``state_dict()`` (what exports list) follows it."""
    rank = {name: i for i, name in enumerate(old._modules)}
    new._modules = dict(sorted(new._modules.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    for name, child in new._modules.items():
        original = old._modules.get(name)
        if child is not None and original is not None and child is not original:
            _keep_order(child, original)


def _inlined(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    env: dict[Node, Any] = {}
    for n in gm.graph.nodes:
        m = called_module(gm, n)
        if isinstance(m, Recompute):
            inner = m.segment.graph
            # the segment has one placeholder per argument of its call (_rewrite)
            values = dict(zip(inner.find_nodes(op="placeholder"), [env[a] for a in n.args], strict=True))
            env[n] = graph.graph_copy(inner, values)
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    out = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    _keep_order(out, gm)
    for key in ("attnsurgeon_report",):
        if hasattr(gm, key):
            setattr(out, key, getattr(gm, key))
    out.train(gm.training)
    return out
