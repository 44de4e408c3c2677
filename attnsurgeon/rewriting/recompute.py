"""Selective recomputation: a segment's large tensors rebuilt in backward from the norm's input.

A gate segment ``y = x * s``, ``s = gate(pool(x))``, ``x = act(BN(z))`` keeps, for its backward
pass, ``x`` (for ``∂y/∂s = Σ g·x``) and, where an input-keeping activation sits between, ``BN(z)``.
Everything else it keeps is the size of a gate vector. ``z`` is kept anyway (BN's own backward
reads it), and ``x`` is one fused element-wise pass away from ``z`` and BN's batch statistics:
``BN(z) = z·a + b`` with ``a = weight·invstd`` and ``b = bias - mean·a``.

:class:`SelectivePlan` runs a segment's graph once, as the plain model does — the model's own
modules, a batch norm through the op ``F.batch_norm`` dispatches to in training
(``aten._batch_norm_with_update``, which also returns the batch statistics), so outputs and
running statistics are the plain model's — and records how each large tensor it creates was
made: the norm's output from ``z`` and the statistics, an element-wise op or a view from
recorded tensors and small ones (a gate vector, a spatial map). Under
:func:`torch.autograd.graph.saved_tensors_hooks`, a recorded tensor that an op saves for backward
is replaced by a handle; in backward the first handle unpacked rebuilds it (and what it is made
of), the last one lets it go. Nothing else is recomputed: not the pooling, not the gate, not the
product, not the batch statistics. A gate's product of a norm's output keeps nothing to rebuild at
all: its gate gradient is taken from the norm's input (:mod:`.gate_product`). The ops
a plan knows, and how each is rebuilt, are in :mod:`.rebuilds`.

Leaf blocks (the zoo's modules are leaves of the model's graph) are traced with fx where that
works, so that a block's inner products (CBAM's channel-gated map, read by its spatial gate) are
recorded too; a block that does not trace runs whole, and only its input is rebuilt.

A drop path between the norm and the gate runs once, its per-sample scale drawn on a probe
(:data:`PER_SAMPLE`), and its output is rebuilt as a product. A segment whose first op is a norm
this module does not know (:data:`NORMS`: LayerNorm, GroupNorm…), or that holds a dropout (its mask
is as large as the map), has no plan: it is checkpointed (:mod:`attnsurgeon.rewriting.memory`). A
plan that, while running, sees an op save a large tensor it cannot rebuild (an op it does not know)
hands its segment to the checkpoint from the next call on: the result of that call is still exact,
only its memory is that of the plain model.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx
from torch import nn
from torch.fx import Node
from torch.fx.node import map_aggregate

from ..core.ops import NORM_FUNCTIONS, NORM_MODULES, PASS_FUNCTIONS, PASS_MODULES
from .gate_product import GateProduct, applies, norm_gradient
from .rebuilds import ACTIVATIONS, ELEMENTWISE_FUNCTIONS, ELEMENTWISE_METHODS, affine, norm_of

LARGE = 4  # a tensor whose storage is at least 1/LARGE of the segment input's is large


# --------------------------------------------------------------------------- random ops

PER_SAMPLE = ("DropPath", "StochasticDepth")
"""Random modules that scale each sample by one number (drop path): run on a ones probe of shape
(N, 1, …), they draw the same random numbers and return the scale, which the plan multiplies in
itself — so their output is rebuilt like any product with a small tensor."""
_STOCHASTIC = ("DropBlock2d",)


def _stochastic(m: nn.Module | None, n: Node) -> bool:
    """A random op whose mask is as large as the map (dropout): no plan."""
    if m is not None:
        if type(m).__name__ in PER_SAMPLE:
            return False
        return (isinstance(m, PASS_MODULES) and not isinstance(m, nn.Identity)) or type(m).__name__ in _STOCHASTIC
    return n.op == "call_function" and n.target in PASS_FUNCTIONS


# --------------------------------------------------------------------------- the plan


class _Tracer(torch.fx.Tracer):
    """Opens a block into its ops; keeps torch's modules, norms and modules without children whole."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            super().is_leaf_module(m, qualname)
            or isinstance(m, nn.modules.batchnorm._NormBase)
            or not any(True for _ in m.children())
        )


@dataclass(frozen=True)
class _Ref:
    key: tuple


class _Handle:
    __slots__ = ("run", "key")

    def __init__(self, run: _Run, key: tuple):
        self.run, self.key = run, key


def _key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


class _Run:
    """One forward call's records: how each large tensor was made, and, in backward, the rebuilt
    tensors that handles still wait for."""

    def __init__(self, plan: SelectivePlan, root: torch.Tensor):
        self.plan = plan
        self.root_storage = root.untyped_storage().data_ptr()
        self.shape = (root.shape[:1], root.shape[2:])  # batch and spatial axes: an activation map's
        self.large = root.untyped_storage().nbytes() // LARGE
        self.recipes: dict[tuple, tuple[Callable, tuple, int]] = {}  # key -> (fn, args, version)
        self.pending: dict[tuple, int] = {}
        self.values: dict[tuple, torch.Tensor] = {}
        # a gate's ``s.expand_as(x)`` -> ``s`` (timm's EcaModule multiplies by one): the product broadcasts ``s`` the
        # same, and its gradient then needs no map-sized tensor for the expansion to sum
        self.expanded: dict[tuple, torch.Tensor] = {}
        self.making: tuple[Callable, tuple] | None = None
        self.alive: list[torch.Tensor] | None = []  # recorded tensors, held until the forward call ends so
        # that no storage is freed and reused under a recorded key
        self.device = root.device.type
        self.autocast = (torch.is_autocast_enabled(self.device), torch.get_autocast_dtype(self.device))

    def call(self, fn: Callable, args: tuple) -> Any:
        """``fn(*args)``, recorded if its output is large and each tensor in ``args`` is recorded,
        the segment's input, or small. An op that keeps its own output (ReLU, sigmoid) saves it
        while it runs, before it is recorded: ``making`` says what that output is made of."""
        refs = self._refs(args)
        self.making = None if refs is None else (fn, refs)
        try:
            out = self._gate_product(fn, args, refs)
            out = fn(*args) if out is None else out
        finally:
            self.making = None
        if refs is not None and isinstance(out, torch.Tensor) and not any(a is out for a in args):
            self._add(out, fn, refs)  # (an identity returns what it is made of: nothing to record)
        return out

    def _gate_product(self, fn: Callable, args: tuple, refs: tuple | None) -> torch.Tensor | None:
        """A norm's output times a gate vector, through :class:`GateProduct` where it applies (its backward
        then needs no rebuilt map for the gate's gradient); None otherwise."""
        if refs is None or fn not in (operator.mul, torch.mul) or len(args) != 2:
            return None
        for x, ref, s in ((args[0], refs[0], args[1]), (args[1], refs[1], args[0])):
            recipe = self.recipes.get(ref.key) if isinstance(ref, _Ref) else None
            if recipe is None or recipe[0] is not affine or not isinstance(s, torch.Tensor):
                continue
            s, norm = self.expanded.get(_key(s), s), recipe[1]
            if applies(x, s, norm[0], norm[1]):
                return GateProduct.apply(x, s, lambda g, norm=norm: norm_gradient(g, *norm))
        return None

    def _refs(self, args: tuple) -> tuple | None:
        refs, source = [], False
        for a in args:
            if isinstance(a, torch.Tensor):
                key = _key(a)
                recipe = self.recipes.get(key)
                if recipe is not None and recipe[2] == a._version:
                    refs.append(_Ref(key))
                    source = True
                    continue
                if a.untyped_storage().data_ptr() == self.root_storage:
                    source = True
                elif a.untyped_storage().nbytes() > self.large:
                    return None  # made from a large tensor that is not rebuilt: keep what it keeps
            elif any(isinstance(x, torch.Tensor) for x in torch.utils._pytree.tree_leaves(a)):
                return None
            refs.append(a)
        return tuple(refs) if source else None

    def _add(self, out: torch.Tensor, fn: Callable, refs: tuple) -> None:
        key = _key(out)
        if out.untyped_storage().nbytes() > self.large and key not in self.recipes:
            self.recipes[key] = (fn, refs, out._version)
            assert self.alive is not None  # records are made while the forward call runs, before it drops them
            self.alive.append(out)

    def pack(self, t: torch.Tensor) -> Any:
        key = _key(t)
        if (
            self.making is not None
            and key not in self.recipes
            and t.untyped_storage().nbytes() > self.large
            and t.untyped_storage().data_ptr() != self.root_storage
        ):
            self._add(t, *self.making)  # the running op's output, kept by the op itself
        recipe = self.recipes.get(key)
        if recipe is not None and recipe[2] == t._version:
            self.pending[key] = self.pending.get(key, 0) + 1
            return _Handle(self, key)
        if (
            (t.shape[:1], t.shape[2:]) == self.shape
            and t.untyped_storage().nbytes() > self.large
            and t.untyped_storage().data_ptr() != self.root_storage
        ):  # a map, not a weight or a gate vector
            self.plan.unmatched = f"an op keeps a {tuple(t.shape)} tensor the plan cannot rebuild"
        return t

    def unpack(self, handle: _Handle) -> torch.Tensor:
        value = self.value(handle.key)
        self.pending[handle.key] -= 1
        self.values = {k: v for k, v in self.values.items() if self.pending.get(k, 0) > 0}
        return value

    def value(self, key: tuple) -> torch.Tensor:
        value = self.values.get(key)
        if value is None:
            fn, args, _ = self.recipes[key]
            enabled, dtype = self.autocast
            with torch.no_grad(), torch.autocast(self.device, dtype=dtype, enabled=enabled):
                value = fn(*[self.value(a.key) if isinstance(a, _Ref) else a for a in args])
            self.values[key] = value
        return value


def _unpack(x: Any) -> torch.Tensor:
    return x.run.unpack(x) if isinstance(x, _Handle) else x


class SelectivePlan:
    """How to run a segment (a GraphModule over the model's modules, one tensor in) so that its
    large tensors are rebuilt in backward instead of kept; :meth:`make` says whether one applies."""

    def __init__(self, segment: torch.fx.GraphModule, blocks: dict[str, torch.fx.GraphModule], norm: Node | None):
        self.segment = segment
        self.blocks = blocks  # leaf blocks opened into their ops, by target
        self.norm = None if norm is None else norm.name  # a name: a Node would drag its graph into deepcopy
        self.unmatched: str | None = None  # set when a run met a large tensor it could not rebuild

    @classmethod
    def make(cls, segment: torch.fx.GraphModule) -> SelectivePlan | None:
        """A plan where the segment reads one tensor, starts with a known batch norm of it or with
        no norm at all, and holds no random op; None otherwise."""
        placeholders = segment.graph.find_nodes(op="placeholder")
        if len(placeholders) != 1:
            return None
        ops = [n for n in segment.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
        modules = {n: segment.get_submodule(n.target) for n in ops if n.op == "call_module"}
        first = modules.get(ops[0]) if ops else None
        norm = ops[0] if first is not None and norm_of(first) is not None else None
        if norm is None and (
            not ops
            or isinstance(first, NORM_MODULES)
            or ops[0].op == "call_function"
            and ops[0].target in NORM_FUNCTIONS
        ):
            return None  # a norm this module cannot rebuild
        blocks: dict[str, torch.fx.GraphModule] = {}
        for n in ops:
            m = modules.get(n)
            if _stochastic(m, n):
                return None
            if m is None or n is norm or type(m) in ACTIVATIONS or not any(True for _ in m.children()):
                continue
            try:
                traced = torch.fx.GraphModule(m, _Tracer().trace(m))
            except Exception:  # noqa: BLE001 - a block fx cannot open runs whole
                continue
            if any(
                _stochastic(traced.get_submodule(k.target) if k.op == "call_module" else None, k)
                for k in traced.graph.nodes
            ):
                return None
            blocks[n.target] = traced
        return cls(segment, blocks, norm)

    def __call__(self, z: torch.Tensor) -> Any:
        run = _Run(self, z)
        try:
            with torch.autograd.graph.saved_tensors_hooks(run.pack, _unpack):
                return self._run(self.segment, (z,), run)
        finally:
            run.alive, run.expanded = None, {}

    def _run(self, gm: torch.fx.GraphModule, args: tuple, run: _Run) -> Any:
        env: dict[Node, Any] = {}
        inputs = iter(args)
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(inputs)
                continue
            if n.op == "output":
                return map_aggregate(n.args[0], lambda a: env[a] if isinstance(a, Node) else a)
            a = map_aggregate(n.args, lambda x: env[x] if isinstance(x, Node) else x)
            kw = map_aggregate(n.kwargs, lambda x: env[x] if isinstance(x, Node) else x)
            env[n] = self._node(gm, n, a, kw, run)
        raise AssertionError("graph without output")

    def _node(self, gm: torch.fx.GraphModule, n: Node, a: tuple, kw: dict, run: _Run) -> Any:
        if n.op == "get_attr":
            return torch.fx.graph_module._get_attr(gm, cast(str, n.target))  # an attribute's dotted name
        if n.op == "call_module":
            m = gm.get_submodule(cast(str, n.target))  # a module's dotted name
            if gm is self.segment and n.name == self.norm:
                (z,) = a
                out, mean, invstd = norm_of(m)(m, z)
                run._add(out, affine, (z, mean, invstd, m.weight, m.bias))
                act = getattr(m, "act", None)
                return out if act is None else run.call(ACTIVATIONS[type(act)], (act, out))
            if n.target in self.blocks:
                return self._run(self.blocks[n.target], a, run)
            if type(m).__name__ in PER_SAMPLE and len(a) == 1 and not kw and m.training:
                (x,) = a
                probe = torch.ones((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
                scale = m(probe)
                return x if scale is probe else run.call(operator.mul, (x, scale))
            if type(m) in ACTIVATIONS and not kw:
                return run.call(ACTIVATIONS[type(m)], (m, *a))
            return m(*a, **kw)
        if n.op == "call_function":
            if n.target in ELEMENTWISE_FUNCTIONS and not kw.get("inplace"):
                return run.call(_with_kwargs(n.target, kw), a)
            return cast(Callable, n.target)(*a, **kw)  # a call_function's target is the function
        if n.target in ELEMENTWISE_METHODS:  # call_method
            return run.call(_method(n.target, kw), a)
        out = getattr(a[0], cast(str, n.target))(*a[1:], **kw)  # a call_method's target is the method's name
        if n.target in ("expand", "expand_as"):
            run.expanded[_key(out)] = a[0]
        return out


def _with_kwargs(fn: Callable, kw: dict) -> Callable:
    return (lambda *a: fn(*a, **kw)) if kw else fn


def _method(name: str, kw: dict) -> Callable:
    if name == "mul" and not kw:
        return operator.mul  # the same product, known to the plan as one (a gate's: GateProduct)
    return lambda self, *a: getattr(self, name)(*a, **kw)
