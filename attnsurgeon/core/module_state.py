"""What running a model leaves on its modules, and the model as it was before.

Some forwards keep what they computed from their input on the module: YOLO's ``Detect`` head
stores ``anchors``, ``strides`` and the ``shape`` they were made for, and recomputes them only when
the shape changes. A model that has run is then not the model that was built: torch.export meets
the cached shape and guards on it (``Could not guard on data-dependent expression``), and tracing
sees a value a graph cannot hold. :func:`snapshot` records every submodule's attributes;
:meth:`Snapshot.changes` says what was written since, :meth:`Snapshot.restore` takes it away and
:meth:`Snapshot.as_taken` does so for a while only (an export), then puts back what was there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["Snapshot", "snapshot"]

SETTINGS = frozenset({"training"})
"""Attributes that are the caller's settings, not what a forward left: never restored (a model put in
eval mode after its snapshot is exported in eval mode)."""


@dataclass(frozen=True)
class Snapshot:
    """Every submodule's attributes (its ``__dict__``, copied shallowly) at one moment."""

    modules: list[tuple[str, Any, dict[str, Any]]]

    def changes(self) -> list[tuple[str, str, Any]]:
        """``(module name, attribute, value now)`` for each attribute written or added since."""
        changed = []
        for name, module, before in self.modules:
            now = module.__dict__
            changed += [(name, key, now[key]) for key in _changed(now, before)]
        return changed

    def restore(self) -> list[tuple[str, str, Any]]:
        """The attributes as they were: what was added is removed, what was rebound is bound back,
        what was deleted comes back. Returns what :meth:`changes` said before restoring."""
        changed = []
        for name, module, before in self.modules:
            now = module.__dict__
            for key in _changed(now, before):
                changed.append((name, key, now[key]))
                if key in before:
                    now[key] = before[key]
                else:
                    del now[key]
            for key in before.keys() - now.keys() - SETTINGS:  # deleted since
                now[key] = before[key]
        return changed

    @contextmanager
    def as_taken(self) -> Iterator[None]:
        """Within: the modules as they were when the snapshot was taken; after: as they were on
        entry (what the code within wrote is gone too)."""
        current = Snapshot([_record(name, module) for name, module, _ in self.modules])
        self.restore()
        try:
            yield
        finally:
            current.restore()


def snapshot(*models: Any) -> Snapshot:
    """The attributes of every submodule of ``models`` (``None`` skipped) now; a submodule shared
    by several models is recorded once."""
    seen: set[int] = set()
    modules = []
    for model in models:
        for name, module in model.named_modules() if model is not None else ():
            if id(module) not in seen:
                seen.add(id(module))
                modules.append(_record(name, module))
    return Snapshot(modules)


def _record(name: str, module: Any) -> tuple[str, Any, dict[str, Any]]:
    return name, module, dict(module.__dict__)


def _changed(now: dict[str, Any], before: dict[str, Any]) -> list[str]:
    return [k for k in now if k not in SETTINGS and (k not in before or now[k] is not before[k])]
