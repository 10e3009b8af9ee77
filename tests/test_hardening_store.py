"""Issue 20, the storage side: each defect reproduced through the real daemon, real sockets and
real SQLite files (items 4, 6, 7, 8, 10, 11 and the topics query)."""

from __future__ import annotations

import math
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from harness import Daemon, env_with, eventually, push_frames, run_script
from test_sdnotify import NotifyListener

from actors.migrations import SCHEMA_VERSION
from transport.jsonlines import from_json

pytestmark = pytest.mark.e2e


def ev(event_id: str, timestamp: str, topic: str = "t", payload: Any = None) -> dict[str, Any]:
    event: dict[str, Any] = {"topic": topic, "event_id": event_id, "timestamp": timestamp, "source": "s"}
    if payload is not None:
        event["payload"] = payload
    return event


def sql(daemon: Daemon, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(daemon.db_path, isolation_level=None)
    try:
        return conn.execute(statement, params).fetchall()
    finally:
        conn.close()


def refused_at_start(daemon: Daemon) -> str:
    """Start a daemon that must refuse to start; its log."""
    daemon.start(wait=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(60) != 0, daemon.log()
    return daemon.log()


# --- item 8: events before 1970 are ordered ---------------------------------------------------


def order_of(daemon: Daemon, topic: str) -> list[tuple[str, bool]]:
    return [(e["event_id"], e["late"]) for e in daemon.events(topic)]


def test_pre_1970_events_of_a_new_topic_are_ordered_not_late(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(ordering={"window_ms": 1000}).start()
    frame = [ev(f"e{s}", f"1960-01-01T00:00:0{s}Z", "old") for s in (3, 1, 2)]
    push_frames(daemon.ingest, [msgpack.packb(frame)])
    daemon.wait_stats(unique_processed=3)
    assert order_of(daemon, "old") == [("e1", False), ("e2", False), ("e3", False)]
    assert daemon.terminate() == 0
    # After a restart the topic goes on from its stored last instant, not from 1970.
    daemon.start()
    push_frames(daemon.ingest, [msgpack.packb([ev("e4", "1960-01-01T00:00:04Z", "old")])])
    daemon.wait_stats(unique_processed=4)
    push_frames(daemon.ingest, [msgpack.packb([ev("e0", "1960-01-01T00:00:00Z", "old")])])
    daemon.wait_stats(unique_processed=5)
    assert order_of(daemon, "old")[3:] == [("e4", False), ("e0", True)]


# --- item 7: the schema version is read at start ----------------------------------------------


def stopped_daemon_with_a_database(daemon_factory: Callable[..., Daemon]) -> Daemon:
    daemon = daemon_factory().start()
    push_frames(daemon.ingest, [msgpack.packb([ev("a", "2025-10-22T10:00:00Z")])])
    daemon.wait_stats(unique_processed=1)
    assert daemon.terminate() == 0
    return daemon


def test_a_newer_schema_version_is_refused_with_one_clear_line(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = stopped_daemon_with_a_database(daemon_factory)
    sql(daemon, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    log = refused_at_start(daemon)
    assert daemon.proc is not None and daemon.proc.returncode == 2  # restarting could never help
    assert "schema version 99, newer than this eventagg's" in log, log
    assert "Traceback" not in log
    assert sql(daemon, "SELECT value FROM meta WHERE key = 'schema_version'") == [("99",)]


# The current version in Arabic-Indic digits, which int() reads as that version.
@pytest.mark.parametrize("stored", ["banana", str(SCHEMA_VERSION).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))])
def test_an_unknown_schema_version_is_refused(daemon_factory: Callable[..., Daemon], stored: str) -> None:
    daemon = stopped_daemon_with_a_database(daemon_factory)
    sql(daemon, f"UPDATE meta SET value = '{stored}' WHERE key = 'schema_version'")
    assert f"has no eventagg schema version ({stored!r})" in refused_at_start(daemon)


def test_changed_columns_are_refused_instead_of_retried_for_ever(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = stopped_daemon_with_a_database(daemon_factory)
    sql(daemon, "ALTER TABLE events DROP COLUMN late")
    log = refused_at_start(daemon)
    assert "table events lacks column(s) late" in log, log


def test_an_empty_database_file_is_refused_and_a_new_one_is_built_whole(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = stopped_daemon_with_a_database(daemon_factory)
    daemon.db_path.write_bytes(b"")  # truncated by mistake: starting on it would forget every key
    log = refused_at_start(daemon)
    assert "is an empty file (0 bytes)" in log and "Restore it from a backup, or remove it" in log, log
    assert "Traceback" not in log
    assert daemon.db_path.stat().st_size == 0
    # Removed, it is built under another name and moved into place whole; a leftover of a
    # start killed half-way is swept away.
    daemon.db_path.unlink()
    leftover = daemon.db_path.with_name(daemon.db_path.name + ".new")
    leftover.write_bytes(b"half a database")
    daemon.start()
    assert not leftover.exists()
    assert sql(daemon, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]


def test_an_older_schema_is_migrated(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(ordering={"window_ms": 500}).start()
    push_frames(
        daemon.ingest, [msgpack.packb([ev("e1", "1960-01-01T00:00:01Z", "old"), ev("n", "2025-10-22T10:00:00Z")])]
    )
    daemon.wait_stats(unique_processed=2)
    assert daemon.terminate() == 0
    # What version 1 left behind: a pre-1970 topic's last instant stuck at 0.
    sql(daemon, "UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    sql(daemon, "UPDATE topics SET last_ts_ns = 0 WHERE topic = 'old'")
    sql(daemon, "DELETE FROM counters WHERE name IN ('stored', 'expired', 'conflicting_duplicates')")
    sql(daemon, "DROP TABLE deleted_keys")
    sql(daemon, "DROP TABLE topic_retention")
    daemon.start()
    assert "migrating schema 1 -> 2" in daemon.log()
    assert "migrating schema 2 -> 3" in daemon.log()
    assert "migrating schema 3 -> 4" in daemon.log()
    assert ("expired_position",) in sql(daemon, "SELECT name FROM pragma_table_info('topic_retention')")
    assert sql(daemon, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    # Everything version 1 stored is still stored; retention's tables are there.
    assert daemon.stats()["stored"] == 2
    assert sql(daemon, "SELECT count(*) FROM deleted_keys") == [(0,)]
    push_frames(daemon.ingest, [msgpack.packb([ev("e2", "1960-01-01T00:00:02Z", "old")])])
    daemon.wait_stats(unique_processed=3, stored=3)
    assert order_of(daemon, "old") == [("e1", False), ("e2", False)]
    assert order_of(daemon, "t") == [("n", False)]


# --- item 4: pages bounded in bytes; a slow page never delays stats or health ---------------------


def raw_request(daemon: Daemon, query: dict[str, Any], timeout: float = 30.0) -> bytes:
    """One request on a REQ socket; the reply as received (packed)."""
    context = zmq.Context()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.query)
    try:
        sock.send(msgpack.packb(query))
        assert sock.poll(int(timeout * 1000)), f"no reply to {query} within {timeout} s"
        return sock.recv()
    finally:
        sock.close()
        context.term()


def test_an_events_page_stops_at_max_page_bytes_and_clients_page_on(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(query={"max_page_bytes": 300_000}).start()
    frames = [
        msgpack.packb([ev(f"e{i}", f"2025-10-22T10:00:0{i}Z", "fat", {"blob": bytes([i]) * 100_000})]) for i in range(8)
    ]
    frames.append(msgpack.packb([ev("huge", "2025-10-22T10:00:09Z", "fat", {"blob": b"h" * 500_000})]))
    push_frames(daemon.ingest, frames)
    daemon.wait_stats(unique_processed=9)
    packed = raw_request(daemon, {"op": "events", "topic": "fat", "limit": 10_000})
    page = msgpack.unpackb(packed, raw=False)
    assert len(packed) <= 300_000
    assert [e["event_id"] for e in page["events"]] == ["e0", "e1"]
    assert page["events"][1] == {
        "topic": "fat",
        "event_id": "e1",
        "timestamp": "2025-10-22T10:00:01Z",
        "source": "s",
        "payload": {"blob": b"\x01" * 100_000},
        "seq": 2,
        "late": False,
    }
    assert page["next"] == 2
    # An event larger than the budget still makes a page of its own.
    alone = msgpack.unpackb(raw_request(daemon, {"op": "events", "topic": "fat", "after": 8}), raw=False)
    assert [e["event_id"] for e in alone["events"]] == ["huge"] and alone["next"] == 9
    # The library and events.py page on through all of them, per topic and across topics.
    assert [e["event_id"] for e in daemon.events("fat")] == [*(f"e{i}" for i in range(8)), "huge"]
    assert len(daemon.events(None)) == 9
    result = run_script("events.py", "fat", "--endpoint", daemon.query)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 9


def test_stats_and_health_answer_while_the_reader_is_busy(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory().start(env=env_with(EVENTAGG_TEST_HOOKS="1"))
    push_frames(daemon.ingest, [msgpack.packb([ev("a", "2025-10-22T10:00:00Z")])])
    daemon.wait_stats(unique_processed=1)
    frozen = daemon.request({"op": "debug_freeze", "actor": "reader", "seconds": 3})
    assert frozen == {"frozen": "reader", "seconds": 3.0}
    page: list[bytes] = []
    topics: list[bytes] = []
    waiting = threading.Thread(target=lambda: page.append(raw_request(daemon, {"op": "events"})))
    waiting.start()
    listing = threading.Thread(target=lambda: topics.append(raw_request(daemon, {"op": "topics"})))
    listing.start()
    started = time.monotonic()
    assert daemon.stats()["unique_processed"] == 1
    assert daemon.request({"op": "health"}).get("status") == "ok"
    assert time.monotonic() - started < 2.0, "stats and health waited behind a page"
    waiting.join(30)
    listing.join(30)
    assert [e["event_id"] for e in msgpack.unpackb(page[0])["events"]] == ["a"]
    assert [t["topic"] for t in msgpack.unpackb(topics[0])["topics"]] == ["t"]


def test_a_page_of_deeply_listed_payloads_does_not_stall_stats(daemon_factory: Callable[..., Daemon]) -> None:
    # 1 MB payloads of a million empty lists: unpacking and re-packing a page of them took
    # seconds, during which every stats query waited.
    daemon = daemon_factory().start()
    payload = {"a": [[]] * 1_048_000}
    push_frames(
        daemon.ingest, [msgpack.packb([ev(f"e{i}", f"2025-10-22T10:00:0{i}Z", "lists", payload)]) for i in range(6)]
    )
    daemon.wait_stats(unique_processed=6)
    done = threading.Event()
    slowest = 0.0

    def page_through() -> None:
        try:
            raw_request(daemon, {"op": "events", "topic": "lists", "limit": 10_000}, timeout=60)
        finally:
            done.set()

    reading = threading.Thread(target=page_through)
    reading.start()
    while not done.is_set():
        started = time.monotonic()
        daemon.stats()
        slowest = max(slowest, time.monotonic() - started)
    reading.join(60)
    assert slowest < 1.0, f"a stats query waited {slowest:.2f} s behind a page of events"


# --- item 6: one database file (device, inode), one daemon -------------------------------------


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_second_daemon_on_a_link_to_the_same_database_is_refused(
    daemon_factory: Callable[..., Daemon], link: str
) -> None:
    first = daemon_factory("first").start()
    push_frames(first.ingest, [msgpack.packb([ev("a", "2025-10-22T10:00:00Z")])])
    first.wait_stats(unique_processed=1)
    second = daemon_factory("second")
    second.workdir.mkdir(parents=True, exist_ok=True)
    if link == "symlink":
        second.db_path.symlink_to(first.db_path)
    else:
        os.link(first.db_path, second.db_path)
    log = refused_at_start(second)
    assert first.proc is not None and f"pid {first.proc.pid}" in log, log
    assert "in use by another eventagg" in log or "same file (device and inode)" in log, log
    assert not Path(f"{second.db_path}-wal").exists()
    # The first daemon goes on storing and acknowledging.
    push_frames(first.ingest, [msgpack.packb([ev("b", "2025-10-22T10:00:01Z")])])
    first.wait_stats(unique_processed=2)
    assert first.terminate() == 0


# --- item 11: the database deleted or replaced while running ------------------------------------


class AckedClient:
    """A DEALER publishing acknowledged batches."""

    def __init__(self, endpoint: str) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def publish(self, batch: int, events: list[dict[str, Any]], timeout: float) -> dict[str, Any] | None:
        self.sock.send(msgpack.packb({"batch": batch, "events": events}))
        if not self.sock.poll(int(timeout * 1000)):
            return None
        reply: dict[str, Any] = msgpack.unpackb(self.sock.recv())
        return reply

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_database_deleted_or_replaced_while_running_stops_acknowledgements_and_the_daemon(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, how: str
) -> None:
    notify = NotifyListener(str(tmp_path / "notify.sock"))
    daemon = daemon_factory()
    client = AckedClient(daemon.ack)
    try:
        daemon.start(env=env_with(NOTIFY_SOCKET=str(tmp_path / "notify.sock"), EVENTAGG_TEST_HOOKS="1"))
        first = client.publish(1, [ev("a", "2025-10-22T10:00:00Z")], timeout=30)
        assert first is not None and first["new"] == 1
        # The router, frozen, holds the drain up, so health can be asked while the daemon stops.
        daemon.request({"op": "debug_freeze", "actor": "router", "seconds": 4})
        if how == "deleted":
            daemon.db_path.unlink()
        else:
            replacement = daemon.db_path.with_name("other.db")
            replacement.write_bytes(b"")
            replacement.replace(daemon.db_path)
        health = eventually(
            lambda: (lambda reply: reply if f"was {how}" in reply.get("error", "") else None)(
                daemon.request({"op": "health"}, timeout=8)
            ),
            20,
            "health to report the database gone",
        )
        assert "nothing more is acknowledged" in health["error"]
        assert client.publish(2, [ev("b", "2025-10-22T10:00:01Z")], timeout=3) is None
        assert daemon.proc is not None and daemon.proc.wait(60) == 1
        assert f"events.db was {how}" in daemon.log()
        assert any(f"FAILED: database {daemon.db_path} was {how}" in text for text in notify.values("STATUS"))
    finally:
        client.close()
        notify.close()


# --- item 10: events.py prints every storable event as one valid JSON line -----------------------


def test_events_py_prints_every_storable_event_as_one_json_line(daemon_factory: Callable[..., Daemon]) -> None:
    deep: Any = "bottom"
    for _ in range(1_000):
        deep = [deep]
    payloads: list[dict[Any, Any]] = [
        {b"bin-key": 1},
        {"raw": b"\x00\xff\xfe"},
        {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")},
        {"deep": deep},
        {7: "an int key", "$bytes": "a key that looks tagged"},
        {"when": msgpack.Timestamp(1_761_127_200, 5)},
        {"plain": {"a": [1, 2.5, None, True, "é"]}},
    ]
    daemon = daemon_factory().start()
    frame = [ev(f"e{i}", f"2025-10-22T10:00:0{i}Z", f"odd{i}", payload) for i, payload in enumerate(payloads)]
    push_frames(daemon.ingest, [msgpack.packb(frame, use_bin_type=True, datetime=False)])
    daemon.wait_stats(unique_processed=len(payloads))
    result = run_script("events.py", "--endpoint", daemon.query)  # every topic, as an export does
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(payloads), result.stdout[:2000]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # Python's json parser and == recurse; jq and others read it as is
    try:
        by_id = {event["event_id"]: event for event in map(from_json, lines)}
        for i, payload in enumerate(payloads):
            got = by_id[f"e{i}"]["payload"]
            if "nan" in payload:
                assert math.isnan(got["nan"]) and got["inf"] == math.inf and got["-inf"] == -math.inf
            else:
                assert got == payload
    finally:
        sys.setrecursionlimit(limit)
    assert any('"raw":{"$bytes":"AP/+"}' in line for line in lines)


# --- item 12: a fractional-second UTC offset never shifts the instant ---------------------------


def test_an_offset_with_a_fraction_of_a_second_is_rejected_by_the_daemon(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory().start()
    frame = [ev("shifted", "2025-10-22T10:00:00+01:00:00.1234567"), ev("fine", "2025-10-22T10:00:00.123456789+01:00")]
    push_frames(daemon.ingest, [msgpack.packb(frame)])
    daemon.wait_stats(rejected=1, unique_processed=1)
    assert [e["event_id"] for e in daemon.events("t")] == ["fine"]
    assert "fraction of a second in its UTC offset" in daemon.log()


def test_a_version_3_database_gains_the_deleted_position_of_each_topic(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory().start()
    push_frames(daemon.ingest, [msgpack.packb([ev("e1", "2025-10-22T10:00:00Z")])])
    daemon.wait_stats(unique_processed=1)
    assert daemon.terminate() == 0
    # Version 3's topic_retention, with a topic whose oldest events were deleted.
    sql(daemon, "UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    sql(daemon, "DROP TABLE topic_retention")
    sql(
        daemon,
        "CREATE TABLE topic_retention (topic TEXT PRIMARY KEY, expired INTEGER NOT NULL DEFAULT 0,"
        " conflicting_duplicates INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID",
    )
    sql(daemon, "INSERT INTO topic_retention VALUES ('t', 4, 1)")
    daemon.start()
    assert "migrating schema 3 -> 4" in daemon.log()
    assert sql(daemon, "SELECT topic, expired, conflicting_duplicates, expired_position FROM topic_retention") == [
        ("t", 4, 1, 0)
    ]
    assert daemon.stats()["unique_processed"] == 1
