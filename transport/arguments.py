"""Checks of the client libraries' arguments, so a bad one is a clear error at the call.

A wrong value would otherwise surface late and far away: a NaN timeout compares false with
every time, so a wait on one never ends; a float batch size or a string ``acked`` is taken as
something else; 2**64 credits fail inside msgpack at the first send. Each check raises
:class:`ValueError` (:class:`TypeError` for a wrong type) naming the argument and what it takes.
"""

from __future__ import annotations

import math
from typing import Any

MAX_COUNT = 2**31 - 1
"""The largest count (batch size, window, credit, ...) taken: beyond any real use, within what
msgpack and ZeroMQ carry."""


def seconds(name: str, value: Any, *, none: bool = False, zero: bool = True) -> Any:
    """``value`` if it is a number of seconds this argument takes, else an error naming ``name``.

    ``none``: None is taken (no limit, where math.inf is not); ``zero``: 0 is taken. Negative,
    infinite and NaN numbers never are.
    """
    if value is None:
        if none:
            return None
        raise TypeError(f"{name} must be a number of seconds, not None")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        least = "0 or more" if zero else "more than 0"
        unlimited = " (None for no limit)" if none else ""
        raise ValueError(f"{name} must be {least} seconds, and finite{unlimited}, not {value}")
    return value


def count(name: str, value: Any, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
    """``value`` if it is a whole number from ``minimum`` to ``maximum``, else an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number, not {type(value).__name__} ({value!r})")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be from {minimum} to {maximum}, not {value}")
    return value


def flag(name: str, value: Any) -> bool:
    """``value`` if it is True or False, else an error naming ``name`` (a string 'no' is true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {type(value).__name__} ({value!r})")
    return value


def text(name: str, value: Any) -> str:
    """``value`` if it is a string, else an error naming ``name``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {type(value).__name__} ({value!r})")
    return value
