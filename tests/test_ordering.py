"""Per-topic event-time ordering through the real daemon: the reorder window, late events, restarts."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from harness import Daemon, push_frames, stored_rows

from transport.schema import parse_timestamp

pytestmark = pytest.mark.e2e  # every test here starts processes

HERE = Path(__file__).resolve().parent


def ev(event_id: str, timestamp: str, topic: str = "t") -> dict[str, Any]:
    return {"topic": topic, "event_id": event_id, "timestamp": timestamp, "source": "s"}


def instants(events: list[dict[str, Any]]) -> list[int]:
    return [parse_timestamp(e["timestamp"])[1] for e in events]


def test_four_jittered_publishers_come_out_in_timestamp_order(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(ordering={"window_ms": 1000}).start()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "jitter_publisher.py"),
                daemon.ingest,
                "sensor",
                str(k),
                "4",
                "400",
                "20",
                str(k),
            ]
        )
        for k in range(4)
    ]
    for proc in procs:
        assert proc.wait(60) == 0
    daemon.wait_stats(unique_processed=400, buffered=0)
    stored = daemon.events("sensor")
    assert [e["seq"] for e in stored] == list(range(1, 401))
    assert instants(stored) == sorted(instants(stored))
    assert not any(e["late"] for e in stored)
    assert daemon.stats()["late"] == 0


def test_an_event_older_than_the_window_is_stored_flagged_and_counted(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(ordering={"window_ms": 100}).start()
    push_frames(daemon.ingest, [msgpack.packb(ev("new", "2025-10-22T10:00:10Z"))])
    daemon.wait_stats(unique_processed=1)
    push_frames(daemon.ingest, [msgpack.packb(ev("old", "2025-10-22T10:00:00Z"))])
    stats = daemon.wait_stats(unique_processed=2, late=1)
    assert stats["rejected"] == 0
    stored = daemon.events("t")
    assert [(e["event_id"], e["seq"], e["late"]) for e in stored] == [("new", 1, False), ("old", 2, True)]
    (topic,) = daemon.request({"op": "topics"})["topics"]
    assert topic["late"] == 1


def test_equal_instants_keep_arrival_order_and_offsets_order_by_instant(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(ordering={"window_ms": 300}).start()
    batch = [
        ev("a", "2025-10-22T10:00:01.001000Z"),
        ev("b", "2025-10-22T17:00:01+07:00"),  # 10:00:01Z: before a, though it sorts after as text
        ev("c", "2025-10-22T10:00:00.5Z"),
        ev("d", "2025-10-22T10:00:02Z"),
        ev("e", "2025-10-22T10:00:02.000Z"),  # the same instant as d: arrival order
        ev("f", "2025-10-22T10:00:02.000000900Z"),
        ev("g", "2025-10-22T10:00:02.000000100Z"),  # 800 ns before f: nanoseconds count
    ]
    push_frames(daemon.ingest, [msgpack.packb(batch[:3]), msgpack.packb(batch[3:])])
    daemon.wait_stats(unique_processed=7, buffered=0)
    assert [e["event_id"] for e in daemon.events("t")] == ["c", "b", "a", "d", "e", "g", "f"]
    assert daemon.stats()["late"] == 0


def test_duplicates_of_waiting_events_are_dropped_and_the_ack_comes_after_commit(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory(ordering={"window_ms": 500}).start()
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(daemon.ack)
    try:
        event = ev("x", "2025-10-22T10:00:00Z")
        dealer.send(msgpack.packb({"batch": 1, "events": [event]}))
        dealer.send(msgpack.packb({"batch": 2, "events": [event, event]}))  # arrives while x waits
        replies = {}
        for _ in range(2):
            assert dealer.poll(10_000), "no acknowledgement"
            reply = msgpack.unpackb(dealer.recv())
            replies[reply["batch"]] = reply
            # An ack means committed: the event is in the database when it arrives.
            assert stored_rows(daemon.db_path) == [("t", "x", 1)]
        assert (replies[1]["new"], replies[1]["duplicate"]) == (1, 0)
        assert (replies[2]["new"], replies[2]["duplicate"]) == (0, 2)
    finally:
        dealer.close(linger=0)
        context.term()
    daemon.wait_stats(received=3, unique_processed=1, duplicate_dropped=2)


def test_sigterm_flushes_buffers_and_a_restart_continues_seqs_and_lateness(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory(ordering={"window_ms": 5000}).start()
    first = [ev(f"a{i}", f"2025-10-22T10:00:{i % 60:02d}.{i // 60:03d}Z") for i in range(600)]
    push_frames(daemon.ingest, [msgpack.packb(first)])
    stats = daemon.wait_stats(buffered=600)  # all waiting in the window
    assert stats["unique_processed"] == 0
    assert daemon.terminate() == 0  # ... and flushed, in order, on the way out
    rows = stored_rows(daemon.db_path)
    assert [seq for _, _, seq in rows] == list(range(1, 601))

    daemon.start()
    push_frames(
        daemon.ingest,
        [
            msgpack.packb(
                [ev(f"b{i}", f"2025-10-22T10:01:{i:02d}Z") for i in range(50)] + [ev("too-old", "2025-10-22T09:00:00Z")]
            )
        ],
    )
    stats = daemon.wait_stats(unique_processed=651, buffered=0, timeout=30)
    stored = daemon.events("t")
    assert [e["seq"] for e in stored] == list(range(1, 652))
    on_time = [e for e in stored if not e["late"]]
    assert instants(on_time) == sorted(instants(on_time))
    assert [e["event_id"] for e in stored if e["late"]] == ["too-old"] and stats["late"] == 1


def test_the_reorder_bound_releases_early(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(ordering={"window_ms": 60000, "max_buffered": 100, "actors": 1}).start()
    push_frames(daemon.ingest, [msgpack.packb([ev(str(i), "2025-10-22T10:00:00Z") for i in range(250)])])
    stats = daemon.wait_stats(buffered=100, unique_processed=150, timeout=30)
    assert stats["in_flight"] == 100
    started = time.monotonic()
    assert daemon.terminate() == 0 and time.monotonic() - started < 30
    assert len(stored_rows(daemon.db_path)) == 250


def test_forgotten_topics_come_back_with_their_seqs_and_lateness(daemon_factory: Callable[..., Daemon]) -> None:
    # 4 ordering actors keeping 2 topics each: 40 topics force them to forget and reload often.
    daemon = daemon_factory(ordering={"actors": 4, "window_ms": 20, "max_topics": 8}, log={"level": "DEBUG"}).start()
    topics = [f"many-{k}" for k in range(40)]
    rounds = 3
    for r in range(rounds):
        # Each round: 2 events per topic, one second apart, so each actor sweeps once a round.
        frame = [ev(f"{t}-{r}-{i}", f"2025-10-22T10:00:{10 * r + 2 * i:02d}Z", t) for t in topics for i in range(2)]
        push_frames(daemon.ingest, [msgpack.packb(frame)])
        daemon.wait_stats(unique_processed=len(topics) * 2 * (r + 1), buffered=0)
        time.sleep(1.2)
    # Then a steady stream, so that sweeps also meet topics whose last write is not committed yet.
    base = len(topics) * 2 * rounds
    for f in range(150):
        frame = [ev(f"{t}-s{f}", f"2025-10-22T10:01:00.{f:03d}Z", t) for t in topics]
        push_frames(daemon.ingest, [msgpack.packb(frame)])
        time.sleep(0.02)
    daemon.wait_stats(unique_processed=base + 150 * len(topics), buffered=0)
    rounds_events = 2 * rounds + 150
    # An event older than what a forgotten topic had stored must still be flagged late.
    push_frames(daemon.ingest, [msgpack.packb(ev("old", "2025-10-22T09:00:00Z", topics[0]))])
    stats = daemon.wait_stats(unique_processed=len(topics) * rounds_events + 1, late=1)
    assert "forgot" in daemon.log(), "no topic was ever forgotten: the test did not test forgetting"
    assert "failed" not in daemon.log(), daemon.log()
    for topic in topics:
        stored = daemon.events(topic)
        expected = rounds_events + (1 if topic == topics[0] else 0)
        assert [e["seq"] for e in stored] == list(range(1, expected + 1)), topic
        on_time = [e for e in stored if not e["late"]]
        assert len(on_time) == rounds_events and instants(on_time) == sorted(instants(on_time)), topic
    assert stats["unique_processed"] == len(stored_rows(daemon.db_path))
