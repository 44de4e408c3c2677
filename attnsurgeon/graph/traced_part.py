"""A rewritten part of a model as a :class:`torch.fx.GraphModule` subclass, :class:`TracedPart`.

:func:`attnsurgeon.graph.parts.embed` puts one in place of each traced submodule of an eager model
(a YOLO layer, a Hugging Face encoder). A plain GraphModule is not enough there: the parent reads the
submodule's plain attributes (ultralytics' ``f``/``i``), calls it with the optional arguments it
passes the original (``return_dict=True``), and copies and pickles the model (ultralytics' EMA and
checkpoints), which rebuild a GraphModule from its graph or code keeping only what the graph uses.
The behaviour lives here, in the class, as torchvision's ``DualGraphModule`` keeps its own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, cast

import torch.fx

__all__ = ["TracedPart"]

_TOLERATES = "_attnsurgeon_tolerates"  # the instance attribute, kept under this name in pickles


class TracedPart(torch.fx.GraphModule):
    """A GraphModule that stands in for one submodule of an eager model.

    Through ``copy.deepcopy`` and pickling it keeps its class name (``C2f``, the original's), every
    attribute it holds (not only those its graph uses) and, once :meth:`tolerate` is called, the
    forward that accepts the optional arguments the parent passes the original.
    """

    def tolerate(self, owner: str, names: list[str], defaults: dict[str, Any]) -> None:
        """Be called as the parent calls ``owner``: the arguments ``names`` after the first may be given
        as None or at their ``defaults`` (the values the part was traced at); anything else is refused,
        since the graph would ignore it."""
        self.__dict__[_TOLERATES] = (owner, list(names), dict(defaults))
        self.recompile()

    def recompile(self) -> Any:
        """The graph's code as the forward (:meth:`torch.fx.GraphModule.recompile`), made tolerant."""
        code = super().recompile()
        tolerates = self.__dict__.get(_TOLERATES)
        if tolerates is not None:  # recompile sets the forward on this instance's own class
            type(self).forward = _tolerant(type(self).forward, *tolerates)
        return code

    def __deepcopy__(self, memo: dict) -> TracedPart:
        # a TracedPart (GraphModule's deepcopy builds type(self)) with only what the graph uses
        new = cast(TracedPart, super().__deepcopy__(memo))
        type(new).__name__ = type(self).__name__
        for key, value in self.__dict__.items():  # what unpickling keeps, too (torch.fx's reduce_graph_module)
            if key not in new.__dict__:
                new.__dict__[key] = copy.deepcopy(value, memo)
        new.recompile()
        return new

    def __reduce__(self) -> tuple:
        rebuild, args = super().__reduce__()  # GraphModule's: the code, rebuilt as a plain GraphModule
        return _unpickle, (rebuild, args, type(self).__name__, self.graph._codegen)


def _tolerant(
    graph_forward: Callable[..., Any], owner: str, names: list[str], defaults: dict[str, Any]
) -> Callable[..., Any]:
    def forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        given = {**dict(zip(names[1:], args, strict=False)), **kwargs}  # fewer arguments than names
        odd = [k for k, v in given.items() if not (v is None or (k in defaults and v == defaults[k]))]
        odd += [f"{len(args) - len(names) + 1} more positional argument(s)"] if len(args) >= len(names) else []
        if odd:
            raise TypeError(f"{owner} was rewritten for a call with one input; it cannot take {', '.join(odd)}")
        return graph_forward(self, x)

    return forward


def _unpickle(rebuild: Callable[..., Any], args: tuple, class_name: str, codegen: Any) -> TracedPart:
    from torch.utils._pytree import tree_leaves

    plain = rebuild(*args)  # fx traces the pickled code again: a ModelOutput it returns comes back a dict
    part = TracedPart(plain, plain.graph, class_name=class_name)
    for key, value in plain.__dict__.items():
        if key not in part.__dict__:
            part.__dict__[key] = value
    part.train(plain.training)
    if isinstance(codegen, torch.fx.graph._PyTreeCodeGen):  # the part's own output structure again
        output = next(n for n in part.graph.nodes if n.op == "output")
        output.args = (tree_leaves(output.args[0]),)
        part.graph._codegen = codegen
    part.recompile()
    return part
