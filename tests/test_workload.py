"""The synthetic stream generator: exact duplicate counts, re-sends only of earlier events, determinism."""

from __future__ import annotations

import uuid

import pytest

from transport.schema import validate_event
from transport.workload import distinct_count, plan


@pytest.mark.parametrize(("n", "fraction"), [(5000, 0.2), (1000, 0.0), (7, 0.5), (1, 0.9)])
def test_exact_counts(n: int, fraction: float) -> None:
    stream = plan(n, fraction, topics=3, seed=1)
    keys = [(e["topic"], e["event_id"]) for e in stream]
    assert len(stream) == n
    assert len(set(keys)) == distinct_count(n, fraction)
    if n > 1:
        assert n - len(set(keys)) == round(n * fraction)


def test_resends_repeat_earlier_events_only() -> None:
    seen: set[str] = set()
    for event in plan(2000, 0.3, seed=4):
        if event["event_id"] not in seen:
            assert event["event_id"] == f"e{len(seen)}"  # distinct events come in order
            seen.add(event["event_id"])


def test_same_seed_same_stream_and_every_event_is_valid() -> None:
    first = plan(500, 0.2, seed=9, id_prefix="run1-")
    assert first == plan(500, 0.2, seed=9, id_prefix="run1-")
    assert first != plan(500, 0.2, seed=10, id_prefix="run1-")
    for event in first:
        validate_event(event)


def test_uuid_ids_are_distinct_repeatable_and_valid() -> None:
    stream = plan(3000, 0.2, seed=3, id_prefix="p1-", ids="uuid")
    assert stream == plan(3000, 0.2, seed=3, id_prefix="p1-", ids="uuid")
    ids = {event["event_id"] for event in stream}
    assert len(ids) == distinct_count(3000, 0.2)
    assert all(uuid.UUID(event_id).version == 4 for event_id in ids)
    other = {event["event_id"] for event in plan(3000, 0.2, seed=3, id_prefix="p2-", ids="uuid")}
    assert not ids & other  # another publisher's prefix, other ids
    for event in stream[:100]:
        validate_event(event)


def test_random_topic_order_is_repeatable_spread_and_changes_only_the_topics() -> None:
    cycle = plan(4000, 0.2, topics=1000, seed=5)
    scattered = plan(4000, 0.2, topics=1000, seed=5, topic_order="random")
    assert scattered == plan(4000, 0.2, topics=1000, seed=5, topic_order="random")
    assert [{**e, "topic": ""} for e in scattered] == [{**e, "topic": ""} for e in cycle]
    assert [e["topic"] for e in plan(3, topics=1000)] == ["topic-0", "topic-1", "topic-2"]
    numbers = [int(e["topic"].removeprefix("topic-")) for e in scattered]
    assert all(0 <= number < 1000 for number in numbers)
    assert len(set(numbers)) > 900  # 3 200 draws from 1 000 topics leave few out
    neighbours = sum(abs(a - b) <= 1 for a, b in zip(numbers, numbers[1:], strict=False))
    assert neighbours < 100  # in turn, every pair of neighbours would be
    with pytest.raises(ValueError, match="topic_order"):
        plan(10, topic_order="sorted")
