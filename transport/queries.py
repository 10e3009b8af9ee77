"""The query protocol: request maps parsed into typed queries, with a clear error for anything else.

Requests and replies are msgpack maps on a REQ/REP socket. Pure: no sockets, no database.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from transport.schema import InvalidEvent, check_topic, quoted_names, quoted_op, type_name, wire_repr

DEFAULT_LIMIT = 1000
MAX_FREEZE_S = 600.0
MAX_CURSOR = 2**63 - 1  # seqs and commit positions are SQLite INTEGERs
MAX_TOPIC_AFTER = 1024  # a topics page's cursor is a name, and names are at most 255 characters
TEST_HOOKS_ENV = "EVENTAGG_TEST_HOOKS"


def debug_hooks_enabled() -> bool:
    """Whether the daemon runs with ``$EVENTAGG_TEST_HOOKS=1``, which unlocks the ``debug_*`` ops."""
    return os.environ.get(TEST_HOOKS_ENV) == "1"


class QueryError(ValueError):
    """A request the daemon cannot answer; the message goes back as ``{"error": ...}``."""


@dataclass(frozen=True, slots=True)
class StatsQuery:
    """``{"op": "stats"}``: the global counters."""


@dataclass(frozen=True, slots=True)
class EventsQuery:
    """``{"op": "events", "topic": T, "after": S, "limit": L}``: a page of stored events."""

    topic: str | None
    after: int
    limit: int


@dataclass(frozen=True, slots=True)
class TopicsQuery:
    """``{"op": "topics"}``: every topic with its counts, by name. With ``after`` or ``limit`` a
    page of them: up to ``limit`` topics named after ``after`` ("" before every name)."""

    after: str | None = None
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class ConsumersQuery:
    """``{"op": "consumers"}``: every named subscription consumer with its acknowledged position and lag."""


@dataclass(frozen=True, slots=True)
class HealthQuery:
    """``{"op": "health"}``: are the actors alive and the database writable."""


@dataclass(frozen=True, slots=True)
class DebugFreezeQuery:
    """``{"op": "debug_freeze", "actor": NAME, "seconds": S}``: test hook, make one actor unresponsive.

    Accepted only when the daemon runs with ``$EVENTAGG_TEST_HOOKS=1``; otherwise the op is unknown.
    """

    actor: str
    seconds: float


Query = StatsQuery | EventsQuery | TopicsQuery | HealthQuery | ConsumersQuery | DebugFreezeQuery

_SIMPLE: dict[str, Query] = {
    "stats": StatsQuery(),
    "health": HealthQuery(),
    "consumers": ConsumersQuery(),
}

# The fields each op takes besides "op". Any other is refused rather than ignored: a misspelt
# "limt" or a "topic" sent to stats would otherwise be answered as if it were not there.
_FIELDS: dict[str, frozenset[str]] = {op: frozenset() for op in _SIMPLE} | {
    "events": frozenset({"topic", "after", "limit"}),
    "topics": frozenset({"after", "limit"}),
    "debug_freeze": frozenset({"actor", "seconds"}),
}


def parse_query(request: Any, max_limit: int, *, test_hooks: bool | None = None) -> Query:
    """Check a decoded request map; ``limit`` is capped at ``max_limit`` (``[query] max_limit``).

    ``test_hooks`` (default: :func:`debug_hooks_enabled`) admits the ``debug_freeze`` op.
    """
    if not isinstance(request, dict):
        raise QueryError(f"a request must be a map with an 'op', not {type_name(request)}")
    op = request.get("op")
    if not isinstance(op, str):
        raise QueryError("a request needs an 'op' string: stats, events, topics, health or consumers")
    hooks = debug_hooks_enabled() if test_hooks is None else test_hooks
    if op not in _FIELDS or (op == "debug_freeze" and not hooks):
        raise QueryError(f"unknown op {quoted_op(op)}; known ops: stats, events, topics, health, consumers")
    _check_fields(op, request)
    simple = _SIMPLE.get(op)
    if simple is not None:
        return simple
    if op == "debug_freeze":
        return _parse_freeze(request)
    if op == "topics":
        return _parse_topics(request, max_limit)
    topic = request.get("topic")
    if topic is not None:
        if not isinstance(topic, str):
            raise QueryError(f"'topic' must be a string, not {type_name(topic)}")
        check_query_topic(topic)
    after = request.get("after", 0)
    if after is None:
        after = 0
    if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after <= MAX_CURSOR:
        raise QueryError(f"'after' must be an integer from 0 to {MAX_CURSOR}, not {wire_repr(after)}")
    return EventsQuery(topic, after, _limit(request, max_limit))


def _limit(request: dict[Any, Any], max_limit: int) -> int:
    limit = request.get("limit")
    if limit is None:  # absent, or nil as many encoders send an unset field (as for 'after')
        limit = DEFAULT_LIMIT
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise QueryError(f"'limit' must be an integer of 1 or more, not {wire_repr(limit)}")
    return min(limit, max_limit)


def _parse_topics(request: dict[Any, Any], max_limit: int) -> TopicsQuery:
    if "after" not in request and "limit" not in request:
        return TopicsQuery()
    after = request.get("after", "")
    if after is None:
        after = ""
    if not isinstance(after, str) or len(after) > MAX_TOPIC_AFTER or "\x00" in after:  # no topic holds a NUL
        raise QueryError(
            f"'after' must be a topic name (the 'next' of the page before; \"\" for the first page), not {after!r:.80}"
        )
    return TopicsQuery(after, _limit(request, max_limit))


def check_query_topic(topic: str) -> None:
    """Refuse a topic no event can have (empty, too long, with whitespace): reading it could only answer nothing."""
    try:
        check_topic(topic)
    except InvalidEvent as exc:
        raise QueryError(f"no event can have this topic ({exc}); leave the topic out to read every topic") from None


def _check_fields(op: str, request: dict[Any, Any]) -> None:
    takes = _FIELDS[op]
    unknown = sorted(str(key) for key in request if key != "op" and key not in takes)
    if unknown:
        what = f"its fields are {', '.join(sorted(takes))}" if takes else "it takes no field but 'op'"
        raise QueryError(f"unknown field(s) {quoted_names(unknown)} for op {op!r}; {what}")


def _parse_freeze(request: dict[Any, Any]) -> DebugFreezeQuery:
    actor = request.get("actor")
    if not isinstance(actor, str) or not actor:
        raise QueryError("'actor' must name an actor: dedup, ordering-N, router or stats")
    seconds = request.get("seconds")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 < seconds <= MAX_FREEZE_S:
        raise QueryError(f"'seconds' must be a number above 0 and at most {MAX_FREEZE_S:.0f}, not {wire_repr(seconds)}")
    return DebugFreezeQuery(actor, float(seconds))
