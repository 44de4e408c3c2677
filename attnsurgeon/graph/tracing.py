"""Trace a model with torch.fx into a GraphModule that keeps every parameter and buffer name.

:func:`trace` runs :class:`_Tracer`: timm's leaf modules and autowrapped functions, parameter-free
modules whose ``forward`` reads ``self.training`` kept whole, the containers timm marks not traceable
opened where that works, ``x += y`` kept in place. ``forward``'s optional inputs are traced at their
defaults and dropped from the graph; a failure is explained by module and source line
(:func:`_trace_failure`). A model already rewritten is copied, not traced again. The GraphModule's
inputs and what it holds besides the graph are :mod:`attnsurgeon.graph.graph_module`'s.

Iterating a sequence whose length the shapes fix is traced: the result of ``chunk``/``split``/
``unbind`` (``list(x.chunk(2, 1))``, ``for part in x.split(16, 1)``), a slice of a shape
(``(*x.shape[:-1], -1)``). The tracer knows the model's input size: it runs the graph built so far
on meta tensors (for real where an op has no meta kernel) for a batch of 1 and of 2, and takes the
length when both agree (a length that follows the batch is refused, as fx refuses it):
:meth:`_Tracer.iter`. Conditions on shapes and dtypes (``if q_len > 1``) are settled the same way, on
meta tensors only, for the input size traced at (as the rest of the graph's shapes are). Neither
happens inside a module its library marks not traceable (timm's ``get_notrace_modules``). That is
how YOLO's ``C2f`` and ``C3k2`` trace, and any other model that splits channels this way; fx itself
only handles ``a, b = x.chunk(2, 1)``.
"""

from __future__ import annotations

import inspect as _inspect
import operator
import traceback
from typing import Any, cast

import torch
import torch.fx
from torch import nn
from torch.fx import Node
from torchvision.ops.misc import FrozenBatchNorm2d

from ..core.errors import AttnSurgeonError, one_line
from ..core.module_state import snapshot
from ..core.ops import ATTENTION_CLASS, WEIGHTED_MODULES
from .graph_module import (
    _CARRIED_ATTRS,
    _copy_graph_module,
    _drop_fixed_inputs,
    _fixed_inputs,
    _graph_module,
    _restore_unused_state,
)


class _Tracer(torch.fx.Tracer):
    """fx tracer with timm's leaf modules and autowrapped functions, plus training-aware leaves.

    * A parameter-free module whose ``forward`` reads ``self.training`` (DropPath, StochasticDepth,
      DropBlock, timm's BatchNormAct2d) is kept whole, so the traced graph still honours
      ``model.train()``; tracing through it would bake in the mode it was traced in.
    * timm marks some whole blocks as not traceable (NormFreeBlock, MobileVitBlock). A container
      with weights among them is traced through when that works (``through``), so its residual
      merge can be found; :func:`trace` keeps it whole again if tracing it fails or leaves an
      in-place op the graph cannot see (``kept_whole``).
    """

    def __init__(
        self,
        leaf_types: tuple[type, ...] = (),
        notrace: frozenset = frozenset(),
        kept_whole: set | None = None,
        autowrap_functions: tuple = (),
        input_size: tuple[int, ...] | None = None,
    ):
        # every argument has a default: fx records the tracer's class on the GraphModule and builds it
        # bare to read the generated code back when the model is unpickled (torch.save of the model)
        super().__init__(autowrap_functions=autowrap_functions)
        self.input_size = input_size  # without the batch: the shapes behind :meth:`iter`
        self._lengths: dict[Node, int | None] = {}
        self._decisions: dict[Node, bool | None] = {}
        self._notrace_depth = 0  # inside modules the library marks not traceable: nothing settled from shapes
        self.out_spec: Any = None  # the structure of an output fx would turn into a dict
        self.leaf_types = leaf_types
        self.notrace = notrace
        self.kept_whole = set() if kept_whole is None else kept_whole
        self.through: set[type] = set()
        self.scope_stack: list[tuple[str, str]] = []
        self.failed_in: tuple[str, str] | None = None  # the innermost module being traced when it broke
        self.failed_through: type | None = None  # ... of the classes in ``through``
        self._training_leaf: dict[type, bool] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types):
            return True
        cls = type(m)
        if cls in self.notrace:
            if cls in self.kept_whole or not _opens_up(m) or self._reads_training(m, any_children=True):
                return True
            self.through.add(cls)
            return False
        if isinstance(m, nn.Sequential) or isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            return False
        if super().is_leaf_module(m, qualname):
            return True
        return self._reads_training(m)

    def _reads_training(self, m: nn.Module, any_children: bool = False) -> bool:
        cls = type(m)
        if cls not in self._training_leaf:
            try:
                src = _inspect.getsource(cls.forward)
            except (OSError, TypeError):
                src = ""
            self._training_leaf[cls] = "self.training" in src
        if not self._training_leaf[cls]:
            return False
        return any_children or not any(True for c in m.children() for _ in c.parameters())

    def proxy(self, node: Node) -> torch.fx.Proxy:
        return _InplaceProxy(node, self)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        # fx reads the parameters of the innermost function of a decorated forward but calls the
        # outermost, whose (*args, **kwargs) then get the inner parameters by position (Hugging
        # Face's @can_return_tuple): trace the inner function, as its signature describes it.
        fn, args = super().create_args_for_root(_inspect.unwrap(root_fn), is_module, concrete_args)
        if isinstance(self.graph._codegen, torch.fx.graph._PyTreeCodeGen):
            return fn, args  # fx keeps the output structure itself

        def keep_output_type(*a: Any) -> Any:
            # fx turns an output it does not know (a Hugging Face ModelOutput) into a plain dict:
            # flatten it here and rebuild it in the generated forward (_OutputTreeCodeGen)
            out = fn(*a)
            if isinstance(out, (torch.fx.Proxy, list, tuple)) or type(out) is dict:
                return out
            leaves, spec = torch.utils._pytree.tree_flatten(out)
            if spec.is_leaf():
                return out
            self.out_spec = spec
            return leaves

        return keep_output_type, args

    def iter(self, obj: torch.fx.Proxy):
        """Iterate a sequence whose length the shapes fix (``x.chunk(2, 1)``, ``x.shape[:-1]``)."""
        count = self._length(obj.node)
        if count is None:
            return super().iter(obj)  # fx's own error: a Proxy cannot be iterated
        items = cast(Any, obj)  # fx gives Proxy its operators at runtime, [] among them
        return iter([items[i] for i in range(count)])

    def _length(self, node: Node) -> int | None:
        """The length of ``node``'s value where it is a tuple or list whose length the shapes settle
        (:meth:`_settled`), else None."""
        if node not in self._lengths:
            value = self._settled(node, lambda v: len(v) if isinstance(v, (tuple, list)) else None, real=True)
            self._lengths[node] = value if isinstance(value, int) else None
        return self._lengths[node]

    def _decided(self, node: Node) -> bool | None:
        """A condition on shapes or dtypes (``q_len > 1``, ``x.dtype != w.dtype``) that the shapes
        settle (:meth:`_settled`, on meta tensors only: a condition on the data cannot be computed
        there); None for anything else."""
        if node not in self._decisions:
            value = self._settled(node, lambda v: v if isinstance(v, bool) else None, real=False)
            self._decisions[node] = value if isinstance(value, bool) else None
        return self._decisions[node]

    def _settled(self, node: Node, read: Any, real: bool) -> Any:
        """``read(value of node)`` where it is the same for a batch of 1 and of 2 (it does not follow
        the batch); None otherwise, and inside a module its library marks not traceable (timm's
        MobileViT block: its control flow stays its library's business). The value holds for the
        sample input's other sizes: a condition on the resolution (ViT's ``height != image_size``
        guard) is settled for the input size the model is traced at."""
        if self._notrace_depth:
            return None
        first = read(self._value_of(node, 1, real))
        return first if first is not None and read(self._value_of(node, 2, real)) == first else None

    def _value_of(self, node: Node, batch: int, real: bool = True) -> Any:
        """``node``'s value for a random input of ``batch`` samples of the input size: the graph so
        far, run on meta tensors, else (``real``) for real; ``_NO_VALUE`` where it does not run."""
        if self.input_size is None:
            return _NO_VALUE
        from torch.fx._symbolic_trace import _maybe_revert_all_patches

        from .shapes import _MetaProp, _ShapeProp

        graph = torch.fx.Graph()
        env: dict[Node, Node] = {}
        graph.graph_copy(self.graph, env)
        graph.output(env[node])
        shape = (batch, *self.input_size)
        with _maybe_revert_all_patches(), torch.no_grad():  # run the modules, not trace them into this graph
            gm = torch.fx.GraphModule(self.root, graph)
            runs = ((_MetaProp, lambda: torch.empty(shape, device="meta")), (_ShapeProp, lambda: torch.randn(shape)))
            for prop, x in runs[: 2 if real else 1]:
                try:
                    return prop(gm).run(x())
                except Exception:
                    continue
        return _NO_VALUE

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self.scope_stack.append((qualname, type(m).__name__))
        notrace = type(m) in self.notrace
        self._notrace_depth += notrace
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.scope_stack[-1]
            if self.failed_through is None and type(m) in self.through:
                self.failed_through = type(m)
            raise
        finally:
            self.scope_stack.pop()
            self._notrace_depth -= notrace


_NO_VALUE = object()  # the graph did not run


class _InplaceProxy(torch.fx.Proxy):
    """A Proxy that records ``x += y`` as ``operator.iadd`` (fx's own Proxy falls back to ``x + y``).

    Residual merges are written ``out += shortcut`` in torchvision and timm: keeping them in place
    keeps the rewritten model as fast and as lean as the original (the generated code says
    ``out += shortcut`` again).
    """

    tracer: _Tracer  # the Proxy's tracer (:meth:`_Tracer.proxy` makes every one)

    def __iadd__(self, other):
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})

    def __isub__(self, other):
        return self.tracer.create_proxy("call_function", operator.isub, (self, other), {})

    def __imul__(self, other):
        return self.tracer.create_proxy("call_function", operator.imul, (self, other), {})

    def __len__(self) -> int:  # list(x.chunk(2, 1)) asks first
        count = self.tracer._length(self.node)
        return super().__len__() if count is None else count

    def __bool__(self) -> bool:  # ``if x.shape[2] > 1:``: decided for the sample input's shapes
        value = self.tracer._decided(self.node)
        return super().__bool__() if value is None else value


def _opens_up(m: nn.Module) -> bool:
    """A not-traceable container worth opening: it holds weighted layers and is no attention op."""
    if ATTENTION_CLASS.search(type(m).__name__):
        return False
    return any(isinstance(c, WEIGHTED_MODULES) for name, c in m.named_modules() if name)


def _leaf_types() -> tuple[type, ...]:
    from ..blocks import block_classes

    return (*block_classes(), FrozenBatchNorm2d)  # a norm, kept whole like nn.BatchNorm2d


def _notrace_types() -> frozenset:
    from timm.layers._fx import get_notrace_modules

    return frozenset(get_notrace_modules())


def _autowrap_functions() -> tuple:
    from timm.layers._fx import get_notrace_functions

    return tuple(f for f in get_notrace_functions() if callable(f))


def _unseen_inplace(graph: torch.fx.Graph, classes: set[type]) -> set[type]:
    """Classes in ``classes`` whose traced forward holds an in-place op nothing reads: the graph's
    dataflow would not show its effect (timm's reason for marking NormFreeBlock not traceable)."""
    found: set[type] = set()
    for n in graph.nodes:
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        if (
            n.op in ("call_method", "call_function")
            and isinstance(name, str)
            and name.endswith("_")
            and not name.startswith("_")
            and not n.users
        ):
            for value in (n.meta.get("nn_module_stack") or {}).values():
                cls = value[1] if isinstance(value, tuple) else None
                if cls in classes:
                    found.add(cls)
    return found


def trace(
    model: nn.Module, input_size: tuple[int, ...] | None = None, kwargs: dict[str, Any] | None = None
) -> torch.fx.GraphModule:
    """Trace ``model`` (in eval mode) into a GraphModule that keeps every parameter and buffer name.

    The model is called with one input tensor: the other parameters of its ``forward`` that have
    a default (hiera's ``mask=None``) are traced at that default and dropped from the graph, whose
    ``forward`` takes the one input. ``input_size`` (without the batch; default: what the model
    says it takes, :func:`attnsurgeon.loading.models.default_input_size`) gives the shapes that tell how
    many pieces a ``chunk``/``split``/``unbind`` that is iterated returns. ``kwargs``: constant
    keyword arguments to trace at (those a part's parent calls it with, ``return_dict=True``).

    Raises AttnSurgeonError naming the module and the source line where tracing stopped.
    """
    if isinstance(model, torch.fx.GraphModule):
        return _copy_graph_module(model)
    was_training = model.training
    model.eval()
    notrace = _notrace_types()
    kept_whole: set[type] = set()
    fixed = {**_fixed_inputs(model), **(kwargs or {})}
    if input_size is None:
        from ..loading.models import default_input_size

        input_size = default_input_size(model)
    try:
        while True:
            tracer = _Tracer(_leaf_types(), notrace, kept_whole, _autowrap_functions(), input_size)
            saved = snapshot(model)
            try:
                try:
                    graph = tracer.trace(model, concrete_args=fixed or None)
                finally:
                    constants = _trace_constants(tracer, model)
                    stored = [(name, key) for name, key, value in saved.restore() if _holds_proxy(value)]
                if stored:  # a cache (YOLO's anchors): a graph cannot hold that side effect
                    raise torch.fx.proxy.TraceError(
                        f"its forward stores a traced value on module "
                        f"'{stored[0][0] or '(root)'}' (self.{stored[0][1]})"
                    )
            except Exception as exc:
                if tracer.failed_through is not None and tracer.failed_through not in kept_whole:
                    kept_whole.add(tracer.failed_through)  # its library was right: keep it whole
                    continue
                raise AttnSurgeonError(_trace_failure(model, tracer, exc)) from exc
            hidden = _unseen_inplace(graph, tracer.through) - kept_whole
            if not hidden:
                break
            kept_whole |= hidden
    finally:
        model.train(was_training)
    if isinstance(graph._codegen, torch.fx.graph._PyTreeCodeGen):  # the empty *args/**kwargs made it
        graph._codegen = _OutputTreeCodeGen(graph._codegen.pytree_info.out_spec)
    elif tracer.out_spec is not None:
        graph._codegen = _OutputTreeCodeGen(tracer.out_spec)
    _drop_fixed_inputs(graph)
    gm = _graph_module(model, graph, constants)
    _restore_unused_state(model, gm)
    for attr in _CARRIED_ATTRS:
        if hasattr(model, attr) and not hasattr(gm, attr):
            setattr(gm, attr, getattr(model, attr))
    # what the part was traced at (parts.embed); a plain attribute, which nn.Module's typing does not allow
    gm.__dict__["_attnsurgeon_called_with"] = dict(kwargs or {})
    gm.train(was_training)
    return gm


class _OutputTreeCodeGen(torch.fx.graph._PyTreeCodeGen):
    """fx's pytree code generation for the output only: the forward takes its one input as a plain
    argument and returns the model's own output structure (a Hugging Face ``ModelOutput``)."""

    def __init__(self, out_spec: Any):
        # no input structure (in_spec None): process_inputs below takes the one input as it is
        super().__init__(torch.fx.graph._PyTreeInfo([], None, out_spec))  # type: ignore[arg-type]

    def process_inputs(self, *inputs: Any) -> Any:
        return inputs

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, **kwargs: Any) -> str:
        return torch.fx.graph.CodeGen.gen_fn_def(self, free_vars, maybe_return_annotation, **kwargs)


def _trace_constants(tracer: _Tracer, model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors fx stored on the model as ``_tensor_constantN`` while tracing: values the forward
    computed from shapes (Swin's relative-position and BEiT's tables, EVA's and DINOv3's rotary
    embeddings) that the graph reads by ``get_attr``. They are taken off the model with the rest of
    what tracing wrote (``Snapshot.restore``, :mod:`attnsurgeon.core.module_state`) and handed to the
    GraphModule instead."""
    names = set(tracer.tensor_attrs.values())
    return {k: v for k, v in model.__dict__.items() if k in names and isinstance(v, torch.Tensor)}


def _holds_proxy(value: Any) -> bool:
    """A traced value (or a list of them) that a forward stored on its module: a graph cannot hold that side effect."""
    values = value if isinstance(value, (tuple, list)) else [value]
    return any(isinstance(v, torch.fx.Proxy) for v in values)


def _trace_failure(model: nn.Module, tracer: _Tracer, exc: Exception) -> str:
    where = ""
    if tracer.failed_in:
        qual, cls = tracer.failed_in
        where = f" in module '{qual or '(root)'}' ({cls})"
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename and f.filename != __file__
    ]  # the user's line, not the tracer's
    line = ""
    if frames:
        f = frames[-1]
        line = f" at {f.filename.rsplit('/', 1)[-1]}:{f.lineno}" + (f" `{f.line.strip()}`" if f.line else "")
    msg = one_line(exc, with_type=False)
    return (
        f"cannot trace {type(model).__name__} with torch.fx: tracing stopped{where}{line}: {msg}. "
        "Data-dependent control flow cannot be traced; wrap that code in a module and register "
        "it with timm.layers.register_notrace_module, or make the model traceable."
    )
