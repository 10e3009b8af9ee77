"""Decoding what the daemon sends a client: its replies and subscription messages, stored payloads included.

A stored payload is the msgpack a publisher sent, and msgpack maps may hold keys that Python
takes for one key: ``1``, ``1.0`` and ``true`` (and ``0``, ``0.0``, ``false``) are equal and hash
alike, so a dict keeps only the last of them. A Go or JavaScript publisher can send
``{1: "a", true: "b"}``, the daemon stores it as sent, and a reader that made it a dict would
hand back ``{1: "b"}``. :func:`unpack_reply` decodes such a map, at any depth, as a
:class:`MapPairs` instead; every other map is a dict, as ``msgpack.unpackb`` makes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgpack

__all__ = ["MapPairs", "map_from_pairs", "unpack_reply"]


class MapPairs:
    """A msgpack map whose keys a dict cannot all hold: its ``(key, value)`` pairs, in the order sent.

    ``items()`` gives them as a dict's would. It is not a dict, so code that expects one fails
    loudly rather than silently reading one value for two keys.
    """

    __slots__ = ("pairs",)

    def __init__(self, pairs: Iterable[tuple[Any, Any]]) -> None:
        self.pairs: list[tuple[Any, Any]] = [(key, value) for key, value in pairs]

    def items(self) -> list[tuple[Any, Any]]:
        """The pairs, in the order they were sent."""
        return list(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MapPairs):
            return NotImplemented
        # Compared with the keys' types, as they differ exactly where Python's equality merges them.
        return [(type(k), k, v) for k, v in self.pairs] == [(type(k), k, v) for k, v in other.pairs]

    __hash__ = None  # type: ignore[assignment]  # mutable, as a dict is

    def __repr__(self) -> str:
        return f"MapPairs({self.pairs!r})"


def map_from_pairs(pairs: Iterable[tuple[Any, Any]]) -> dict[Any, Any] | MapPairs:
    """A decoded map: a dict, or a :class:`MapPairs` when a dict would merge two different keys.

    A key written twice (``{"a": 1, "a": 2}``) is one key given twice, not two: it reads as its
    last value, as the daemon reads an event map's fields and most msgpack readers do.
    """
    if type(pairs) is not list:  # older msgpack's pure-Python unpacker (PyPy, no wheel) hands a generator
        pairs = list(pairs)
    mapping = dict(pairs)
    if len(mapping) == len(pairs) or len({(type(key), key) for key, _ in pairs}) == len(mapping):
        return mapping
    return MapPairs(pairs)


def unpack_reply(data: bytes) -> Any:
    """One msgpack object the daemon sent, maps whose keys Python takes for one kept as :class:`MapPairs`.

    Maps keyed only by strings (and bytes) cannot hold such keys, and nearly every map is one: those
    are decoded by msgpack alone, which refuses any other key (``strict_map_key``), and only then is
    the whole object decoded again, every map through :func:`map_from_pairs` (half the time an
    event, which a reader of every event pays).
    """
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except ValueError:  # a key of another kind (or bytes that are no msgpack, refused again below)
        return msgpack.unpackb(data, raw=False, strict_map_key=False, object_pairs_hook=map_from_pairs)
