"""JSON that PostgreSQL's ``jsonb`` stores: stricter than what Python's ``json`` writes.

Python writes NaN and ±Infinity, the NUL character and lone surrogates; PostgreSQL refuses
each of them, and would fail the whole transaction at commit. Every value beanflow stores as
JSON (a task's kwargs, its result) goes through ``jsonb_text`` first, which names the key path
of what is wrong.
"""

from __future__ import annotations

import json
import math
from typing import Any


class Unreadable:
    """A stored JSON value that Python's ``json`` cannot read back (nested deeper than its
    recursion limit): a row written in SQL may hold one. Read as this, it fails only the
    task it belongs to, instead of every read of the rows around it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"<unreadable JSON: {self.reason}>"


def parse_json(text: str) -> Any:
    """``json.loads`` for text a user gives: ValueError, never RecursionError, for what it
    cannot read."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json(text: str) -> Any:
    """``json.loads``, but a value nested too deeply for it reads as ``Unreadable``."""
    try:
        return json.loads(text)
    except RecursionError:
        return Unreadable("nested too deeply")


def jsonb_text(value: Any, name: str) -> str:
    """The JSON text of ``value``; raises ValueError naming the path under ``name`` (such as
    ``kwargs['items'][2]``) of the first thing PostgreSQL's jsonb cannot store."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as error:
        _find(value, name)
        raise ValueError(f"{name}: {error}") from None
    # The fast path found no NaN and no unserialisable type. NUL and surrogates show up as
    # escapes in the text (json.dumps escapes every non-ASCII character); only then is the
    # value walked to tell a lone surrogate from a pair, and to name the path.
    if "\\u0000" in text or "\\ud" in text:
        _find(value, name)
    return text


def _find(value: Any, name: str) -> None:
    """Raise ValueError naming what in ``value`` PostgreSQL's jsonb cannot store."""
    try:
        _check(value, name)
    except RecursionError:
        raise ValueError(f"{name}: nested too deeply (or it contains itself)") from None


def _check(value: Any, path: str) -> None:
    if isinstance(value, str):
        _check_text(value, path)
    elif isinstance(value, bool) or value is None or isinstance(value, int):
        return
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(
                f"{path}: {value!r} is not a JSON number (PostgreSQL has no NaN or Infinity)"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise ValueError(f"{path}: the key {key!r} is not text")
            if isinstance(key, str):
                _check_text(key, f"{path} key {key!r}")
            _check(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check(item, f"{path}[{index}]")
    else:
        raise ValueError(f"{path}: a {type(value).__name__} is not JSON")


def _check_text(text: str, path: str) -> None:
    if "\x00" in text:
        raise ValueError(f"{path}: the NUL character (\\x00) cannot be stored in PostgreSQL")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{path}: a lone surrogate ({text[:20]!r}…) is not Unicode text") from None


def storable_text(text: str, limit: int) -> str:
    """``text`` as PostgreSQL's ``text`` stores it: NUL and lone surrogates replaced, and
    past ``limit`` characters cut, saying how much was cut."""
    text = text.replace("\x00", "\\x00").encode("utf-8", "replace").decode("utf-8")
    if len(text) > limit:
        cut = len(text) - limit
        text = f"{text[:limit]}… ({cut:,} more characters not stored)"
    return text
