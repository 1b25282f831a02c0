"""User-facing errors.

Anything the user can fix (a wrong name, a missing path, a bad value) raises
:class:`CrossDistillError`. The CLI prints its message alone, without a
traceback, unless ``--debug`` is given.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class CrossDistillError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""


class ConfigError(CrossDistillError, ValueError):
    """A configuration key, type or value is wrong."""


def suggest(name: str, choices: Iterable[str], n: int = 5) -> str:
    """Return ' Did you mean: a, b?' for close matches of ``name`` in ``choices`` (or '')."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.6)
    if not close:
        lowered = name.lower()
        close = [c for c in choices if lowered and lowered in c.lower()][:n]
    return f" Did you mean: {', '.join(close)}?" if close else ""
