"""The one exception type users see.

Anything the user can fix (a wrong name, a bad file, an option out of range) is raised as
:class:`AttnSurgeonError` with a message that says what was wrong and what to do. The CLI prints
that message alone; any other exception is a bug and is reported as one.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AttnSurgeonError(Exception):
    """A problem with the user's input or environment, explained in the message."""


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` choices closest to ``word`` (case-insensitive), best first."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=0.6)
    return [lowered[h] for h in hits]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` Did you mean: a, b?`` or an empty string."""
    hits = closest(word, choices)
    return f" Did you mean: {', '.join(hits)}?" if hits else ""


def few(items: list[str], n: int = 5) -> str:
    """The first ``n`` names, and how many more: ``a, b, c (+4 more)``."""
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def one_line(exc: BaseException, *, with_type: bool = True) -> str:
    """An exception as one line: its type and the first line of its message. ``with_type=False``:
    the first line alone (where the sentence around it already says what failed), or the type's name
    where the message is empty. Colour codes are dropped (torch's exporters colour their messages)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    if not with_type:
        return text[0] if text else type(exc).__name__
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
