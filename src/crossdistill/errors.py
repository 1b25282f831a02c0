"""User-facing errors.

Anything the user can fix (a wrong name, a missing path, a bad value) raises
:class:`CrossDistillError`. The CLI prints its message alone, without a
traceback, unless ``--debug`` is given.
"""

from __future__ import annotations

import difflib
import reprlib
from typing import Any, Iterable, Iterator

SHOWN_CHARS = 200
"""The most characters of a user's value that a message repeats."""


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


def shorten(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, without first building the repr of a huge value."""
    short = reprlib.Repr()
    short.maxlevel = 3
    short.maxdict = short.maxlist = short.maxtuple = short.maxset = short.maxfrozenset = short.maxdeque = 8
    short.maxstring = short.maxother = short.maxlong = limit
    try:
        text = short.repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        text = f"<a {type(value).__name__} too long to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(text: object) -> str:
    """``text`` with its line breaks (and the indentation after them) collapsed to single spaces."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def exception_chain(err: BaseException) -> Iterator[BaseException]:
    """``err``, then the exception it was raised from or while handling, and so on (a cycle ends it).

    Libraries wrap the error that matters: torch's writer raises ``RuntimeError: ... unexpected pos`` while the
    OSError of a full disk is handled, Optuna's StorageInternalError is raised from SQLAlchemy's."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        yield current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
