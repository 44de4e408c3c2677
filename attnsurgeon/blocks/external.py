"""Any block: the user's own attention module, or timm's, ultralytics' or any library's, by reference.

A reference names a class (or a factory that returns an ``nn.Module``) in one of four forms:

* ``path/to/file.py:ClassName``: a Python file, relative to the working folder (or to the recipe
  that names it). The file is imported, that is *run*, as code the user chose to run; nothing is
  ever unpickled;
* ``package.module:ClassName``: ``ultralytics.nn.modules.conv:CBAM``, ``timm.layers:EcaModule``;
* ``timm:NAME``: a name of timm's attention factory (``timm.layers.get_attn``: ``timm:eca``,
  ``timm:cbam``, ``timm:gc``, ...);
* in Python, the class or callable itself (``attn=MyGate``).

:func:`resolve_block` turns a reference into a :class:`~attnsurgeon.blocks.BlockInfo` once (a
``gate`` at the ``standard`` position whose options are the constructor's parameters), and
:func:`attnsurgeon.blocks.get_block`, the one lookup of a block name, hands it on like a zoo entry.
Its ``impl()`` is an :class:`External`, which has what a zoo block's file has: ``build``,
``init_identity``, ``describe``, ``CLASSES``.

``build`` gives the site's channel count to the constructor's channel parameter (found by name,
:data:`CHANNEL_NAMES`, else the first positional parameter without a default; a class that takes
none is built without), and then checks the module on a tiny sample of the site's shape: a tensor
out, of the input's shape. Anything else is refused in one line. The reference as text (its forms,
its spelling, the object it names) lives in :mod:`attnsurgeon.blocks.references`. This module
imports no torch.
"""

from __future__ import annotations

import functools
import inspect
import sys
import weakref
from typing import Any

from ..core.errors import AttnSurgeonError, one_line
from .references import (
    FORM_HELP,
    FORMS,
    TIMM_NAMES,
    absolute,
    anchor_reference,
    display_name,
    import_target,
    is_reference,
    object_name,
    stamp,
)

__all__ = [
    "CHANNEL_NAMES",
    "FORMS",
    "FORM_HELP",
    "IDENTITY_METHODS",
    "TIMM_NAMES",
    "External",
    "anchor_reference",
    "display_name",
    "is_reference",
    "resolve_block",
    "resolved_classes",
]

CHANNEL_NAMES = (
    "channels",
    "channel",
    "in_channels",
    "num_channels",
    "c1",
    "dim",
    "inp",
    "planes",
    "in_planes",
    "inplanes",
    "chs",
    "in_chs",
    "in_dim",
    "in_ch",
    "in_channel",
    "channel_in",
    "n_channels",
    "input_channels",
    "gate_channels",
    "num_feat",
    "n_feat",
    "c",
    "ch",
    "C",
)
IDENTITY_METHODS = ("init_identity", "zero_init_last")  # a block's own way to start as an identity, tried in order

_RESOLVED: dict[str, Any] = {}  # reference (as given, and canonical) -> BlockInfo


def resolve_block(ref: Any) -> Any:
    """The :class:`~attnsurgeon.blocks.BlockInfo` of a reference (see the module docstring), once
    per process: a file is imported once, a class inspected once."""
    key = absolute(ref) if isinstance(ref, str) else object_name(ref)  # gate.py means another file elsewhere
    if key in _RESOLVED and _RESOLVED[key].external.current():
        return _RESOLVED[key]
    if isinstance(ref, str):
        target, name = import_target(ref)
    else:
        if not callable(ref):
            raise AttnSurgeonError(
                f"attn: expected a block name, a reference ({', '.join(FORMS)}) or a class, got {ref!r}"
            )
        target, name = ref, key
    info = _info(name, target)
    _RESOLVED[key] = _RESOLVED[name] = info
    return info


# --------------------------------------------------------------------------- what it takes


def _info(name: str, target: Any) -> Any:
    from .info import BlockInfo

    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        signature = None
    params = [p for p in signature.parameters.values()] if signature is not None else []
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    channel = next((p for n in CHANNEL_NAMES for p in named if p.name == n), None)
    if channel is None:
        channel = next((p for p in named if p.default is p.empty and p.kind != p.KEYWORD_ONLY), None)
    options = {p.name: (None if p.default is p.empty else p.default) for p in named if p is not channel}
    required = tuple(p.name for p in named if p is not channel and p.default is p.empty)
    label = _label(target)
    impl = External(
        name,
        label,
        target,
        channel.name if channel else None,
        channel is not None and channel.kind == channel.POSITIONAL_ONLY,
        required,
        any(p.kind == p.VAR_KEYWORD for p in params) or signature is None,
    )
    doc = (inspect.getdoc(target) or "").strip().splitlines()
    return BlockInfo(
        name,
        "",
        doc[0] if doc else f"{label}: a block given by reference",
        name,
        options,
        leaf=_snake(label),
        label=label,
        external=impl,
    )


def _label(target: Any) -> str:
    inner = target.func if isinstance(target, functools.partial) else target
    return getattr(inner, "__name__", type(inner).__name__)


def _snake(label: str) -> str:
    """A module-name leaf from a class name: CBAM -> cbam, EcaModule -> eca_module."""
    out = []
    for i, ch in enumerate(label):
        if ch.isupper() and i and (label[i - 1].islower() or (i + 1 < len(label) and label[i + 1].islower())):
            out.append("_")
        out.append(ch.lower() if ch.isalnum() else "_")
    return "".join(out).strip("_") or "block"


# --------------------------------------------------------------------------- building and checking


class External:
    """A block given by reference, with the interface of a zoo block's file."""

    GATES: dict = {}  # explain finds the sigmoid-like submodules by hooks

    def __init__(
        self,
        name: str,
        label: str,
        target: Any,
        channel: str | None,
        positional: bool,
        required: tuple[str, ...],
        any_keyword: bool,
    ):
        self.name, self.label, self.target = name, label, target
        self.channel, self.positional, self.required, self.any_keyword = channel, positional, required, any_keyword
        module = sys.modules.get(getattr(target, "__module__", "") or "")
        self.file = getattr(module, "__file__", None) if getattr(module, "__stamp__", None) else None  # a block file
        self.stamp = stamp(self.file)
        self.classes: set[type] = set()
        self.own_identity: weakref.WeakSet = weakref.WeakSet()
        self._checked: dict[str, str | None] = {}
        self._fmaps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> the map it was built for

    def current(self) -> bool:
        """False once its block file changed or went: resolve it again (and say so if gone)."""
        return self.file is None or stamp(self.file) == self.stamp

    @property
    def CLASSES(self) -> tuple[type, ...]:  # noqa: N802 - the zoo files' name
        return tuple(self.classes)

    def takes(self) -> str:
        """The constructor's parameters, for error messages: ``channels (the site's), reduction=8``."""
        try:
            params = list(inspect.signature(self.target).parameters.values())
        except (TypeError, ValueError):
            return "unknown parameters"
        names = [
            f"{p.name} (the site's channels)"
            if p.name == self.channel
            else p.name
            if p.default is p.empty
            else f"{p.name}={p.default!r}"
            for p in params
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        return ", ".join(names) or "no parameters"

    def check_options(self, options: dict[str, Any], known: dict[str, Any]) -> None:
        bad = [k for k in options if k not in known or k == self.channel]
        if bad and not self.any_keyword:
            raise AttnSurgeonError(
                f"{self.label} takes no option {', '.join(map(repr, bad))} (its constructor takes: {self.takes()})"
            )

    def build(self, fmap: Any, **options: Any) -> Any:
        from torch import nn

        given = {k: v for k, v in options.items() if v is not None}
        missing = [n for n in self.required if n not in given]
        if missing:
            raise AttnSurgeonError(
                f"{self.label} needs {', '.join(missing)} (no default): give --option "
                f"{missing[0]}=VALUE (options: in a recipe)"
            )
        args = (fmap.channels,) if self.channel and self.positional else ()
        if self.channel and not self.positional:
            given[self.channel] = fmap.channels
        try:
            module = self.target(*args, **given)
        except TypeError as exc:
            raise AttnSurgeonError(
                f"{self.label} rejects the options {given}: {one_line(exc)} (its constructor takes: {self.takes()})"
            ) from None
        except Exception as exc:
            raise AttnSurgeonError(
                f"{self.label} cannot be built for {fmap.channels} channels with {given}: {one_line(exc)}"
            ) from None
        if not isinstance(module, nn.Module):
            raise AttnSurgeonError(f"{self.label} gave a {type(module).__name__}, not a torch.nn.Module")
        self.classes.add(type(module))
        self._fmaps[module] = fmap
        key = repr((fmap.channels, tuple(fmap.size), sorted(given.items())))
        if key not in self._checked:
            self._checked[key] = self._problem(module, fmap)
        if self._checked[key]:
            raise AttnSurgeonError(self._checked[key])
        return module

    def _sample(self, fmap: Any) -> Any:
        import torch

        size = tuple(s or 8 for s in fmap.size)
        return torch.randn(1, fmap.channels, *size, generator=torch.Generator().manual_seed(0))

    def _problem(self, module: Any, fmap: Any) -> str | None:
        """What is wrong with ``module`` on a sample of the site's shape, or None."""
        import torch

        x = self._sample(fmap)
        axes = {1: "N, C, L", 2: "N, C, H, W", 3: "N, C, D, H, W"}.get(fmap.dims, "N, C, ...")
        shape = f"({axes}) = {tuple(x.shape)}"
        training = module.training
        try:
            with torch.no_grad():
                out = module.eval()(x)
        except Exception as exc:
            return f"{self.label} fails on a {fmap.dims}-D map {shape}: {one_line(exc)}"
        finally:
            module.train(training)
        if isinstance(out, (tuple, list)):
            return (
                f"{self.label} returns a {type(out).__name__} of {len(out)} for a {shape} map; a block must return "
                "one tensor shaped like its input"
            )
        if not isinstance(out, torch.Tensor):
            return f"{self.label} returns a {type(out).__name__} for a {shape} map; a block must return one tensor"
        if tuple(out.shape) != tuple(x.shape):
            return (
                f"{self.label} changes the shape: {tuple(x.shape)} in, {tuple(out.shape)} out; a block must return "
                "a tensor shaped like its input"
            )
        return None

    def init_identity(self, module: Any) -> Any:
        """The block's own identity init where it has one (:data:`IDENTITY_METHODS`) and a check on a
        sample shows it exact; else ``x + α·(f(x) − x)`` with a learnable α = 0."""
        import copy

        import torch

        from ._alpha import AlphaGate

        for method in IDENTITY_METHODS:
            if callable(getattr(module, method, None)):
                trial = copy.deepcopy(module)
                try:
                    with torch.no_grad():
                        getattr(trial, method)()
                        x = self._sample(self._fmaps[module])
                        exact = torch.equal(trial.eval()(x), x)
                except Exception:
                    exact = False
                trial.train(module.training)
                if exact:
                    self.own_identity.add(trial)
                    return trial
        return AlphaGate(module)

    def describe(self, module: Any) -> dict:
        return {"identity": "own"} if module in self.own_identity else {}


def resolved_classes() -> tuple[type, ...]:
    """The module classes every block resolved so far has built (kept whole when a model is traced)."""
    out: list[type] = []
    for impl in {id(info.external): info.external for info in _RESOLVED.values()}.values():
        out.extend(impl.classes)
    return tuple(dict.fromkeys(out))
