"""The query protocol: request maps parsed into typed queries, with a clear error for anything else.

Requests and replies are msgpack maps on a REQ/REP socket. Pure: no sockets, no database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transport.schema import type_name

DEFAULT_LIMIT = 1000


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
    """``{"op": "topics"}``: every topic with its counts."""


@dataclass(frozen=True, slots=True)
class HealthQuery:
    """``{"op": "health"}``: are the actors alive and the database writable."""


Query = StatsQuery | EventsQuery | TopicsQuery | HealthQuery

_SIMPLE = {"stats": StatsQuery(), "topics": TopicsQuery(), "health": HealthQuery()}


def parse_query(request: Any, max_limit: int) -> Query:
    """Check a decoded request map; ``limit`` is capped at ``max_limit`` (``[query] max_limit``)."""
    if not isinstance(request, dict):
        raise QueryError(f"a request must be a map with an 'op', not {type_name(request)}")
    op = request.get("op")
    if not isinstance(op, str):
        raise QueryError("a request needs an 'op' string: stats, events, topics or health")
    simple = _SIMPLE.get(op)
    if simple is not None:
        return simple
    if op != "events":
        raise QueryError(f"unknown op {op!r}; known ops: stats, events, topics, health")
    topic = request.get("topic")
    if topic is not None and not isinstance(topic, str):
        raise QueryError(f"'topic' must be a string, not {type_name(topic)}")
    after = request.get("after", 0)
    if after is None:
        after = 0
    if not isinstance(after, int) or isinstance(after, bool) or after < 0:
        raise QueryError(f"'after' must be an integer of 0 or more, not {after!r}")
    limit = request.get("limit", DEFAULT_LIMIT)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise QueryError(f"'limit' must be an integer of 1 or more, not {limit!r}")
    return EventsQuery(topic, after, min(limit, max_limit))
