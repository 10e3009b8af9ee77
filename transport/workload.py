"""Synthetic event streams for load generation, benchmarks and tests: deterministic by seed.

``plan(n, duplicates, ...)`` returns exactly ``n`` events of which ``round(n × duplicates)`` are
re-sends of events that came earlier in the stream, and the rest are distinct; the same
arguments always give the same events.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import uuid
from typing import Any

BASE_TIME = dt.datetime(2025, 10, 22, 10, 0, 0, tzinfo=dt.UTC)


IDS = ("counter", "uuid")
TOPIC_ORDERS = ("cycle", "random")


def event_id(index: int, id_prefix: str, ids: str = "counter") -> str:
    """The id of the ``index``-th distinct event: ``id_prefix`` and the counter, or (``ids="uuid"``)
    a random-looking UUID derived from them, as publishers that use UUIDs send."""
    if ids == "uuid":
        digest = hashlib.blake2b(f"{id_prefix}{index}".encode(), digest_size=16).digest()
        return str(uuid.UUID(bytes=digest, version=4))
    return f"{id_prefix}{index}"


def topic_name(index: int, topics: int, topic_order: str = "cycle") -> str:
    """The topic of the ``index``-th distinct event: the topics in turn (``cycle``), or one drawn
    from ``index`` by a hash (``random``: the same for every process, neighbours far apart)."""
    if topic_order == "random":
        number = int.from_bytes(hashlib.blake2b(f"topic:{index}".encode(), digest_size=8).digest(), "big") % topics
    else:
        number = index % topics
    return f"topic-{number}"


def make_event(
    index: int,
    topics: int,
    id_prefix: str,
    payload_bytes: int = 0,
    start_ms: int = 0,
    ids: str = "counter",
    topic_order: str = "cycle",
) -> dict[str, Any]:
    """The ``index``-th distinct event of a stream, stamped ``start_ms + index`` ms after BASE_TIME."""
    stamp = BASE_TIME + dt.timedelta(milliseconds=start_ms + index)
    payload: dict[str, Any] = {"n": index, "level": "info", "message": f"event {index}"}
    if payload_bytes:
        payload["pad"] = "x" * payload_bytes
    return {
        "topic": topic_name(index, topics, topic_order),
        "event_id": event_id(index, id_prefix, ids),
        "timestamp": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "source": "publish.py",
        "payload": payload,
    }


def plan(
    n: int,
    duplicates: float = 0.0,
    topics: int = 10,
    seed: int = 0,
    id_prefix: str = "e",
    payload_bytes: int = 0,
    start_ms: int = 0,
    ids: str = "counter",
    topic_order: str = "cycle",
) -> list[dict[str, Any]]:
    """``n`` events, ``round(n * duplicates)`` of them re-sends of earlier ones, shuffled in by ``seed``.

    Distinct event ``i`` is stamped ``start_ms + i`` milliseconds after BASE_TIME; its topic is
    the ``i % topics``-th (``topic_order="cycle"``) or drawn by a hash of ``i`` (``"random"``).
    """
    if topic_order not in TOPIC_ORDERS:
        raise ValueError(f"topic_order must be one of {', '.join(TOPIC_ORDERS)}, not {topic_order!r}")
    if not 0.0 <= duplicates < 1.0:
        raise ValueError(f"duplicates must be a fraction from 0 up to (not including) 1, not {duplicates}")
    if n < 0 or topics < 1:
        raise ValueError("n must be 0 or more and topics 1 or more")
    dup_count = round(n * duplicates)
    if n and dup_count >= n:
        dup_count = n - 1
    rng = random.Random(seed)
    # The first event is always distinct, so every re-send has an earlier event to repeat.
    dup_slots = set(rng.sample(range(1, n), dup_count)) if dup_count else set()
    stream: list[dict[str, Any]] = []
    distinct: list[dict[str, Any]] = []
    for position in range(n):
        if position in dup_slots:
            stream.append(distinct[rng.randrange(len(distinct))])
        else:
            event = make_event(len(distinct), topics, id_prefix, payload_bytes, start_ms, ids, topic_order)
            distinct.append(event)
            stream.append(event)
    return stream


def distinct_count(n: int, duplicates: float) -> int:
    """How many distinct events ``plan(n, duplicates)`` holds."""
    dup_count = round(n * duplicates)
    if n and dup_count >= n:
        dup_count = n - 1
    return n - dup_count
