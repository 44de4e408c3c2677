"""Reading a traced graph node by node: :class:`_Graph` (users, forward order, weighted ops on a
path), the node predicates the finders share (an add, an activation, a chain op, a spatial kernel,
a stochastic leaf) and the module scopes torch.fx records on each node (which module's forward a
node runs in).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from ..core.ops import (
    ACT_FUNCTIONS,
    ACT_METHODS,
    ADD_FUNCTIONS,
    ADD_METHODS,
    ATTENTION_CLASS,
    CONV_MODULES,
    NORM_FUNCTIONS,
    NORM_MODULES,
    PASS_FUNCTIONS,
    PASS_MODULES,
    WEIGHTED_FUNCTIONS,
    WEIGHTED_MODULES,
    called_module,
    is_activation_module,
)
from .shapes import shape_of


class _Graph:
    """Index helpers over a graph: topological order, ancestors, branches."""

    def __init__(self, gm: torch.fx.GraphModule):
        from ..blocks import block_classes

        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.conv_blocks = block_classes("conv")  # SK, split attention: convolutions, whatever their names say

    def latest_common_ancestor(self, a: Node, b: Node) -> Node | None:
        """The common ancestor (or a/b itself) latest in topological order."""
        marks: dict[Node, int] = {a: 1}
        marks[b] = marks.get(b, 0) | 2
        heap = [(-self.index[n], id(n), n) for n in marks]
        heapq.heapify(heap)
        seen: set[Node] = set()
        while heap:
            _, _, n = heapq.heappop(heap)
            if n in seen:
                continue
            seen.add(n)
            if marks[n] == 3:
                return n
            for p in n.all_input_nodes:
                before = marks.get(p, 0)
                marks[p] = before | marks[n]
                if p not in seen:
                    heapq.heappush(heap, (-self.index[p], id(p), p))
        return None

    def branch(self, fork: Node, end: Node) -> set[Node]:
        """Nodes on paths from ``fork`` (exclusive) to ``end`` (inclusive)."""
        if end is fork:
            return set()
        lo = self.index[fork]
        back: set[Node] = set()
        stack = [end]
        while stack:
            n = stack.pop()
            if n in back or self.index[n] <= lo:
                continue
            back.add(n)
            stack.extend(n.all_input_nodes)
        on_path = {fork}
        for n in sorted(back, key=self.index.__getitem__):
            if any(p in on_path for p in n.all_input_nodes):
                on_path.add(n)
        on_path.discard(fork)
        return on_path

    def is_weighted(self, n: Node) -> bool:
        m = called_module(self.gm, n)
        if m is not None:
            if isinstance(m, self.conv_blocks):
                return True  # a conv block in a conv's place (ours, timm's skresnet/resnest) does the conv's work
            if ATTENTION_CLASS.search(type(m).__name__) and not isinstance(m, nn.MultiheadAttention):
                return False  # attention gates (ours or the model's) are not the branch's own work
            return isinstance(m, WEIGHTED_MODULES) or (
                any(True for _ in m.parameters()) and not _is_chain_op(self.gm, n)
            )
        if n.op == "call_function" and n.target in WEIGHTED_FUNCTIONS:
            return True
        # a function fed a weight matrix does the branch's work (torchvision's shifted_window_attention)
        return n.op in ("call_function", "call_method") and any(
            a.op == "get_attr" and len(shape_of(a) or ()) >= 2 for a in n.all_input_nodes
        )

    def weight(self, nodes: Iterable[Node]) -> int:
        return sum(1 for n in nodes if self.is_weighted(n))


def _is_add(n: Node) -> bool:
    return (n.op == "call_function" and n.target in ADD_FUNCTIONS) or (
        n.op == "call_method" and n.target in ADD_METHODS
    )


def _is_chain_op(gm: torch.fx.GraphModule, n: Node) -> bool:
    """Norms, activations and pass-through ops that close a conv unit."""
    m = called_module(gm, n)
    if m is not None:
        return isinstance(m, NORM_MODULES + PASS_MODULES) or is_activation_module(m) or _is_stochastic_leaf(m)
    if n.op == "call_function":
        return n.target in ACT_FUNCTIONS | NORM_FUNCTIONS | PASS_FUNCTIONS
    if n.op == "call_method":
        return n.target in ACT_METHODS - {"sigmoid"}
    return False


def _is_activation(gm: torch.fx.GraphModule, n: Node) -> bool:
    m = called_module(gm, n)
    if m is not None:
        return is_activation_module(m) or (
            isinstance(m, NORM_MODULES)
            and type(m).__name__.endswith("Act2d")
            and not isinstance(getattr(m, "act", None), nn.Identity)
        )
    if n.op == "call_function":
        return n.target in ACT_FUNCTIONS
    return n.op == "call_method" and n.target in (ACT_METHODS - {"sigmoid"})


def _is_stochastic_leaf(m: nn.Module) -> bool:
    return not any(True for _ in m.parameters()) and type(m).__name__ in (
        "DropPath",
        "StochasticDepth",
        "DropBlock2d",
        "DropBlockFast2d",
    )


def _spatial_kernel(gm: torch.fx.GraphModule, n: Node) -> bool:
    m = called_module(gm, n)
    if m is not None and isinstance(m, CONV_MODULES):
        return any(k > 1 for k in m.kernel_size)
    if n.op == "call_function" and n.target in (F.conv1d, F.conv2d, F.conv3d):
        w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        ws = shape_of(w)
        return bool(ws and any(k > 1 for k in ws[2:]))
    return False


def _scope(n: Node) -> list[tuple[str, str]]:
    """(qualified name, class name) of the modules whose forward holds ``n``, outermost first."""
    stack = n.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        qual, cls = value if isinstance(value, tuple) else (value, None)
        out.append((qual, cls.__name__ if isinstance(cls, type) else str(cls)))
    return out


def _scope_upto(n: Node, module: str) -> dict:
    """``n``'s nn_module_stack cut after ``module`` (all of it where ``module`` is not in it)."""
    out: dict = {}
    for key, value in (n.meta.get("nn_module_stack") or {}).items():
        qual = value[0] if isinstance(value, tuple) else value
        if module and not (module == qual or module.startswith(qual + ".")):
            break
        out[key] = value
        if qual == module:
            break
    return out if module else {}


def _innermost_container(n: Node) -> tuple[str, str]:
    """The innermost non-leaf module whose forward holds ``n`` (``("", root)`` at the top)."""
    scope = _scope(n)
    if n.op == "call_module" and scope and scope[-1][0] == n.target:
        scope = scope[:-1]  # a leaf module's own entry
    return scope[-1] if scope else ("", "")
