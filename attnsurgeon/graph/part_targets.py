"""Which submodules of a model to trace when the whole does not, and the input each is called with.

:func:`record_inputs` runs the whole model once on its sample input with a forward hook on every
module, so each part is traced and its shapes propagated at the real feature sizes;
:func:`find_targets` looks breadth first for the submodules that trace and hold blocks. A target
the user names (``--target``) is checked here too, with a hint at the ones that would work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.errors import AttnSurgeonError, did_you_mean, one_line


class RecordedInputs(dict):
    """``{name: shape}`` (see :func:`record_inputs`), with ``kwargs``: ``{name: {key: value}}``, the
    constant keyword arguments (None, a bool, a number, a string) the module was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.kwargs: dict[str, dict[str, Any]] = {}


_CONSTANT = (type(None), bool, int, float, str)


def record_inputs(model: Any, size: tuple[int, ...]) -> RecordedInputs:
    """Run ``model`` once (eval, batch 1) and record each submodule's first input.

    Returns ``{name: shape}`` where the module was called with one tensor (and constant keyword
    arguments, kept in ``.kwargs``: a part is traced at them), ``{name: None}`` where it was called
    with something else (a list, several tensors), nothing where it was not called.
    """
    import torch

    from ..loading.samples import sample_args

    seen = RecordedInputs()
    handles = []

    def hook(name: str):
        def pre(module: Any, args: tuple, kwargs: dict) -> None:
            if name in seen:
                return
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            only = len(args) == 1 and len(tensors) == 1 and all(isinstance(v, _CONSTANT) for v in kwargs.values())
            seen[name] = tuple(tensors[0].shape) if only else None
            if only and kwargs:
                seen.kwargs[name] = dict(kwargs)

        return pre

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(hook(name), with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(
                *sample_args(
                    model,
                    size,
                    1,
                    generator=torch.Generator().manual_seed(0),
                    device=next((p.device for p in model.parameters()), None),
                )
            )
    except Exception as exc:
        raise AttnSurgeonError(
            f"the model does not run on its sample input ({_describe_input(model, size)}): "
            f"{one_line(exc, with_type=False)} "
            "(set --input-size to what the model expects)"
        ) from exc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen


def _describe_input(model: Any, size: tuple[int, ...]) -> str:
    from ..loading.samples import IMAGES, input_kind

    kind, count = input_kind(model)
    shape = "×".join(map(str, size))
    if kind == IMAGES:
        return f"a list of one {shape} image"
    return f"{count} tensor{'s' if count > 1 else ''} of shape (1, {', '.join(map(str, size))})"


@dataclass
class Found:
    targets: list[str]  # the submodules that trace and hold blocks (largest first found, see find_targets)
    inputs: dict[str, Any]


def find_targets(
    model: Any, size: tuple[int, ...], inputs: dict[str, Any] | None = None, exhaustive: bool = False
) -> Found:
    """Breadth first from the model's children: the submodules at the first depth where some trace
    (called with one tensor) and hold blocks. ``exhaustive`` goes on to every depth (for error
    messages); either way a hit's own children are not tried: the largest part wins."""
    inputs = record_inputs(model, size) if inputs is None else inputs
    level = [name for name, _ in model.named_children()]
    every: list[str] = []
    while level:
        hits: list[str] = []
        nxt: list[str] = []
        for name in level:
            if _traces_with_blocks(model, name, inputs):
                hits.append(name)  # the largest: its own children are not tried
                continue
            nxt += [f"{name}.{child}" for child, _ in model.get_submodule(name).named_children()]
        every += hits
        if hits and not exhaustive:
            break
        level = nxt
    return Found(every, inputs)


def _traces_with_blocks(model: Any, name: str, inputs: dict[str, Any]) -> bool:
    from .anatomy import analyse
    from .tracing import trace

    shape = inputs.get(name)
    if not shape or len(shape) < 2:
        return False
    try:
        analyse(trace(model.get_submodule(name), tuple(shape[1:]), _kwargs(inputs, name)), tuple(shape[1:]))
        return True
    except AttnSurgeonError:
        return False


def _check_target(model: Any, target: str, inputs: dict[str, Any], size: tuple[int, ...]) -> None:
    from .anatomy import analyse

    names = [n for n, _ in model.named_modules() if n]
    if target not in names:
        raise AttnSurgeonError(
            f"--target '{target}': {type(model).__name__} has no submodule of that name."
            + did_you_mean(target, names)
            + _traceable_hint(model, size, inputs)
        )
    shape = inputs.get(target)
    if target not in inputs:
        raise AttnSurgeonError(
            f"--target '{target}' is not called when the model runs on its sample input."
            + _traceable_hint(model, size, inputs)
        )
    if shape is None:
        raise AttnSurgeonError(
            f"--target '{target}' is called with something other than one tensor (a list, "
            "several arguments), which the tracer cannot be given." + _traceable_hint(model, size, inputs)
        )
    from .tracing import trace

    try:
        gm = trace(model.get_submodule(target), tuple(shape[1:]), _kwargs(inputs, target))
    except AttnSurgeonError as exc:
        raise AttnSurgeonError(
            f"--target '{target}' does not trace: {exc}" + _traceable_hint(model, size, inputs)
        ) from exc
    try:
        analyse(gm, tuple(shape[1:]))
    except AttnSurgeonError as exc:
        raise AttnSurgeonError(
            f"--target '{target}' traces but offers no place for a block: {exc}." + _traceable_hint(model, size, inputs)
        ) from exc


def _traceable_hint(model: Any, size: tuple[int, ...], inputs: dict[str, Any]) -> str:
    from .tracing import trace

    found = find_targets(model, size, inputs, exhaustive=True).targets
    try:
        trace(model, tuple(size))
        whole = " The whole model traces too (leave --target out)."
    except AttnSurgeonError:
        whole = ""
    if not found:
        return " No submodule of the model traces and holds blocks." + whole
    return f" Submodules that trace and hold blocks: {', '.join(found[:8])}{' …' if len(found) > 8 else ''}." + whole


def _kwargs(inputs: Any, name: str) -> dict[str, Any]:
    return getattr(inputs, "kwargs", {}).get(name, {})
