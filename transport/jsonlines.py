"""Stored events as JSON Lines: every value msgpack can hold, as one valid JSON line, losslessly
where JSON has no type of its own for it.

JSON has no bytes, no map keys other than strings, no NaN or Infinity, and Python's ``json``
recurses (about 1 000 levels deep at most). The mapping, which :func:`from_json` reverses:

==========================================  ==============================================
msgpack value                               JSON
==========================================  ==============================================
nil, bool, int, str, array                  null, true/false, number, string, array
finite float                                number (``repr``: the same double back)
NaN, +Infinity, -Infinity                   ``{"$float": "NaN"}`` / ``"Infinity"`` / ``"-Infinity"``
bin                                         ``{"$bytes": "<base64>"}``
map with only string keys, none with ``$``  object
any other map (bin, int, ... or ``$`` key)  ``{"$map": [[key, value], ...]}``, keys mapped too
                                            (a map keyed by both ``1`` and ``true`` too: a
                                            :class:`transport.replies.MapPairs`)
msgpack Timestamp (ext -1)                  ``{"$timestamp": [seconds, nanoseconds]}``
other ext types                             ``{"$ext": [code, "<base64>"]}``
==========================================  ==============================================

A plain object never has a key beginning with ``$``, so the tagged forms are unambiguous. Any
depth of nesting works: the encoder keeps its own stack instead of recursing.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import msgpack

from transport.replies import MapPairs, map_from_pairs

__all__ = ["from_json", "to_json_line"]


class _Text(str):
    """JSON text to emit as it is (as opposed to a str value still to be encoded)."""


_OPEN_LIST, _CLOSE_LIST, _COMMA, _COLON = _Text("["), _Text("]"), _Text(","), _Text(":")
_OPEN_OBJECT, _CLOSE_OBJECT = _Text("{"), _Text("}")
_OPEN_TAGGED_MAP, _CLOSE_TAGGED_MAP = _Text('{"$map":['), _Text("]}")
_NON_FINITE = {"nan": '{"$float":"NaN"}', "inf": '{"$float":"Infinity"}', "-inf": '{"$float":"-Infinity"}'}


def _b64(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(data).decode("ascii")


def _plain_object(value: dict[Any, Any]) -> bool:
    return all(type(key) is str and not key.startswith("$") for key in value)


def to_json_line(value: Any) -> str:
    """``value`` (e.g. a stored event as a client receives it) as one line of JSON, mapped as above."""
    parts: list[str] = []
    emit = parts.append
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is _Text:
            emit(item)
        elif item is None:
            emit("null")
        elif kind is bool:
            emit("true" if item else "false")
        elif kind is str:
            emit(json.dumps(item, ensure_ascii=False))
        elif isinstance(item, int):
            emit(str(int(item)))
        elif isinstance(item, float):
            emit(repr(float(item)) if math.isfinite(item) else _NON_FINITE[repr(float(item))])
        elif isinstance(item, (bytes, bytearray, memoryview)):
            emit(f'{{"$bytes":"{_b64(item)}"}}')
        elif isinstance(item, msgpack.Timestamp):
            emit(f'{{"$timestamp":[{item.seconds},{item.nanoseconds}]}}')
        elif isinstance(item, msgpack.ExtType):
            emit(f'{{"$ext":[{item.code},"{_b64(item.data)}"]}}')
        elif isinstance(item, (list, tuple)):
            stack.append(_CLOSE_LIST)
            for index in range(len(item) - 1, -1, -1):
                stack.append(item[index])
                if index:
                    stack.append(_COMMA)
            stack.append(_OPEN_LIST)
        elif isinstance(item, (dict, MapPairs)):
            pairs = list(item.items())
            if type(item) is dict and _plain_object(item):
                stack.append(_CLOSE_OBJECT)
                for index in range(len(pairs) - 1, -1, -1):
                    key, member = pairs[index]
                    stack.append(member)
                    stack.append(_Text(json.dumps(key, ensure_ascii=False) + ":"))
                    if index:
                        stack.append(_COMMA)
                stack.append(_OPEN_OBJECT)
            else:
                stack.append(_CLOSE_TAGGED_MAP)
                for index in range(len(pairs) - 1, -1, -1):
                    key, member = pairs[index]
                    stack.extend((_CLOSE_LIST, member, _COMMA, key, _OPEN_LIST))
                    if index:
                        stack.append(_COMMA)
                stack.append(_OPEN_TAGGED_MAP)
        else:  # nothing msgpack decodes to; kept readable rather than failing the whole export
            emit(json.dumps({"$repr": repr(item)}, ensure_ascii=False))
    return "".join(parts)


def from_json(text: str) -> Any:
    """The value a :func:`to_json_line` line stands for (the inverse mapping).

    Python's ``json`` parser recurses, so a line nested deeper than about 900 levels raises
    RecursionError here; :func:`to_json_line` itself has no such limit.
    """
    return json.loads(text, object_hook=_untag)


def _untag(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        ((tag, value),) = obj.items()
        if tag == "$bytes":
            return base64.b64decode(value)
        if tag == "$float":
            return float(value.lower().replace("infinity", "inf"))
        if tag == "$map":
            return map_from_pairs([(_hashable(key), member) for key, member in value])
        if tag == "$timestamp":
            return msgpack.Timestamp(value[0], value[1])
        if tag == "$ext":
            return msgpack.ExtType(value[0], base64.b64decode(value[1]))
    return obj


def _hashable(key: Any) -> Any:
    return tuple(_hashable(part) for part in key) if isinstance(key, list) else key
