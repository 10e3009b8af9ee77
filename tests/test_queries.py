"""The query protocol's request parsing (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from transport.queries import EventsQuery, HealthQuery, QueryError, StatsQuery, TopicsQuery, parse_query


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        ({"op": "stats"}, StatsQuery()),
        ({"op": "topics"}, TopicsQuery()),
        ({"op": "topics", "after": "b", "limit": 2}, TopicsQuery("b", 2)),
        ({"op": "topics", "after": None}, TopicsQuery("", 1000)),
        ({"op": "topics", "limit": 10**9}, TopicsQuery("", 5000)),
        ({"op": "health"}, HealthQuery()),
        ({"op": "events", "topic": "t"}, EventsQuery("t", 0, 1000)),
        ({"op": "events", "topic": "t", "after": 5, "limit": 20}, EventsQuery("t", 5, 20)),
        ({"op": "events"}, EventsQuery(None, 0, 1000)),
        ({"op": "events", "after": None}, EventsQuery(None, 0, 1000)),
        ({"op": "events", "limit": None}, EventsQuery(None, 0, 1000)),  # nil as absent, as for after
        ({"op": "topics", "limit": None}, TopicsQuery("", 1000)),
        ({"op": "events", "limit": 10**9}, EventsQuery(None, 0, 5000)),
    ],
)
def test_accepted(request_: dict[str, Any], expected: object) -> None:
    assert parse_query(request_, max_limit=5000) == expected


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        ([1], "must be a map"),
        ({}, "needs an 'op'"),
        ({"op": 3}, "needs an 'op'"),
        ({"op": "drop_tables"}, "unknown op"),
        ({"op": "events", "topic": 5}, "'topic' must be a string"),
        ({"op": "events", "after": -1}, "'after'"),
        ({"op": "events", "after": 2**63}, "'after' must be an integer from 0 to 9223372036854775807"),
        ({"op": "events", "after": "3"}, "'after'"),
        ({"op": "events", "limit": 0}, "'limit'"),
        ({"op": "topics", "after": 3}, "'after' must be a topic name"),
        ({"op": "topics", "after": "a\x00b"}, "'after' must be a topic name"),  # PostgreSQL refused it, SQLite not
        ({"op": "topics", "after": "t" * 1025}, "'after' must be a topic name"),
        ({"op": "topics", "limit": True}, "'limit'"),
        ({"op": "topics", "topic": "t"}, r"unknown field\(s\) topic for op 'topics'; its fields are after, limit"),
        ({"op": "events", "limit": True}, "'limit' must be an integer of 1 or more, not true$"),  # msgpack's word
        ({"op": "events", "after": b"3"}, "'after' must be an integer from 0 to 9223372036854775807, not bin$"),
        ([{"op": "stats"}], "a request must be a map with an 'op', not array$"),
        ({"op": "stats", "topic": "t"}, r"^unknown field\(s\) topic for op 'stats'; it takes no field but 'op'$"),
        ({"op": "events", "limt": 5}, r"^unknown field\(s\) limt for op 'events'; its fields are after, limit, topic$"),
        ({"op": "events", "topic": ""}, r"^no event can have this topic \(topic must be 1-255 characters, not 0\)"),
        ({"op": "events", "topic": "a b"}, "must not contain whitespace"),
        ({"op": "events", "topic": "x" * 256}, "not 256"),
    ],
)
def test_refused(request_: Any, reason: str) -> None:
    with pytest.raises(QueryError, match=reason):
        parse_query(request_, max_limit=5000)
