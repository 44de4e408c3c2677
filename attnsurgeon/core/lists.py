"""The one parser of a list typed as text: ``--blocks 'layer3.*, layer4.2'``, a recipe's
``after: a.*,b``, ``insert(..., blocks='a.*')``, ``--models``, ``--target``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["split_list"]


def split_list(value: str | Iterable[Any] | None) -> list[Any] | None:
    """``'a.*, b'`` or ``['a.*', ' b']`` -> ``['a.*', 'b']``.

    Commas separate the items of a string; the whitespace around each item is dropped, and so are
    the empty items (``''`` and ``' , '`` give ``[]``): each caller says what an empty list means (an
    error for ``--blocks``, "no part" for ``--target``). None stays None; items that are not strings
    are kept as they are, for the caller to reject.
    """
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return [v.strip() if isinstance(v, str) else v for v in items if not (isinstance(v, str) and not v.strip())]
