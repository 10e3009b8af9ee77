"""Retention: events age out on schedule, their keys keep rejecting replays until the dedup
horizon, seqs never go back, readers learn what expired, and re-sends with other content are
flagged as conflicting duplicates. Real daemons, real sockets, real SQLite files, short durations.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from harness import Daemon, eventually, run_script, write_config

from transport.config import ConfigError, parse_config, parse_duration, parse_size

REPLY_TIMEOUT_MS = 60_000
QUICK = {"sweep_interval": "1s"}


def event(n: int, topic: str = "t", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "topic": topic,
        "event_id": f"e-{n}",
        "timestamp": f"2025-10-22T10:{n // 60 % 60:02d}:{n % 60:02d}Z",
        "source": "retention-test",
        "payload": {"n": n, "text": "x" * 20},
    }
    base.update(fields)
    return base


class Acked:
    """An acknowledged-mode publisher over a raw DEALER socket: one batch at a time, its reply back."""

    def __init__(self, endpoint: str) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.batch = 0

    def send_raw(self, frame: bytes) -> dict[str, Any]:
        self.sock.send(frame)
        assert self.sock.poll(REPLY_TIMEOUT_MS, zmq.POLLIN), "no ack within 60 s"
        reply: dict[str, Any] = msgpack.unpackb(self.sock.recv())
        return reply

    def send(self, events: list[Any]) -> dict[str, Any]:
        self.batch += 1
        return self.send_raw(msgpack.packb({"batch": self.batch, "events": events}))

    def send_all(self, events: list[dict[str, Any]], size: int = 1000) -> tuple[int, int, list[int]]:
        """Send in batches; (new, duplicate, conflicting indexes over all events)."""
        new = duplicate = 0
        conflicting: list[int] = []
        for start in range(0, len(events), size):
            reply = self.send(events[start : start + size])
            assert not reply["rejected"], reply
            new += reply["new"]
            duplicate += reply["duplicate"]
            conflicting.extend(start + index for index in reply.get("conflicting", []))
        return new, duplicate, conflicting

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


def retention_daemon(factory: Callable[..., Daemon], name: str = "daemon", actors: int = 4, **retention: Any) -> Daemon:
    return factory(name, retention={**QUICK, **retention}, ordering={"window_ms": 0, "actors": actors}).start()


def invariants(stats: dict[str, Any]) -> None:
    assert stats["received"] == stats["unique_processed"] + stats["duplicate_dropped"], stats
    assert stats["stored"] == stats["unique_processed"] - stats["expired"], stats


def stored_count(db: Path) -> int:
    """Rows of real events in the file (the commit-position mark has topic '')."""
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM events WHERE topic <> ''").fetchone()[0])
    finally:
        conn.close()


def kept_keys(db: Path) -> int:
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM deleted_keys").fetchone()[0])
    finally:
        conn.close()


def topic_row(daemon: Daemon, topic: str) -> dict[str, Any]:
    rows = {row["topic"]: row for row in daemon.request({"op": "topics"})["topics"]}
    return rows[topic]


# --- Configuration ---------------------------------------------------------------------------


def test_durations_and_sizes_read_as_systemd_and_disk_tools_write_them() -> None:
    assert parse_duration("250ms") == 0.25
    assert parse_duration("3s") == parse_duration("3") == 3
    assert parse_duration("15min") == 900
    assert parse_duration("12h") == 43_200
    assert parse_duration("30d") == 30 * 86_400
    assert parse_duration("1w") == 7 * 86_400
    assert parse_duration("1h 30min") == 5_400
    assert parse_size("500MB") == 500_000_000
    assert parse_size("50GB") == 50_000_000_000
    assert parse_size("2GiB") == 2 * 1024**3
    retention = parse_config({"retention": {"max_age": "30d", "dedup_horizon": "forever"}}).retention
    assert retention.max_age_s == 30 * 86_400 and retention.dedup_horizon_s is None
    assert parse_config({}).retention.enabled is False


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"max_age": "3 parsecs"}, "[retention] max_age"),
        ({"max_age": "soon"}, "[retention] max_age"),
        ({"max_bytes": "lots"}, "[retention] max_bytes"),
        ({"sweep_interval": "0s"}, "[retention] sweep_interval"),
        ({"dedup_horizon": "never"}, "[retention] dedup_horizon"),
        ({"max_age": "1h", "dedup_horizon": "10min"}, "[retention] dedup_horizon"),
        ({"max_events_per_topic": -1}, "[retention] max_events_per_topic"),
        ({"max_age": 0}, "[retention] max_age"),  # a bare integer is seconds, and zero is refused
    ],
)
def test_bad_retention_values_are_refused_naming_the_key(values: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse_config({"retention": values})


@pytest.mark.e2e
def test_a_horizon_shorter_than_max_age_stops_the_start(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", {"retention": {"max_age": "1h", "dedup_horizon": "1min"}})
    result = run_script("aggregatord.py", "--config", str(config), timeout=60)
    assert result.returncode != 0
    assert "[retention] dedup_horizon" in result.stderr + result.stdout


# --- Expiry, dedup memory and readers -----------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_expired_events_go_on_schedule_and_their_replays_stay_duplicates(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = retention_daemon(daemon_factory, max_age="2s")
    topics = [f"t{k}" for k in range(5)]
    events = [event(n, topic=topics[n % 5]) for n in range(10_000)]
    publisher = Acked(daemon.ack)
    try:
        started = time.monotonic()
        assert publisher.send_all(events) == (10_000, 0, [])
        stats = daemon.wait_stats(unique_processed=10_000)
        last_position = daemon.request({"op": "events", "after": 0, "limit": 1})["first"]
        assert last_position >= 1

        stats = daemon.wait_stats(timeout=60, stored=0, expired=10_000)
        gone = time.monotonic()
        # Nothing goes before max_age: the first event arrived after `started`.
        assert gone - started >= 2.0
        invariants(stats)
        assert stored_count(daemon.db_path) == 0
        assert daemon.events() == []

        # Readers see what was lost: `first` is one past the last seq (or position) assigned.
        reply = daemon.request({"op": "events", "topic": "t0", "after": 0, "limit": 10})
        assert reply["events"] == [] and reply["first"] == 2_001
        reply = daemon.request({"op": "events", "after": 0, "limit": 10})
        assert reply["events"] == [] and reply["first"] == 10_001
        everything_first = reply["first"]
        row = topic_row(daemon, "t0")
        assert row["first_seq"] == 2_001 and row["count"] == 0 and row["last_seq"] == 2_000
        assert row["expired"] == 2_000

        # A replay of all 10 000 expired events: 10 000 duplicates, none new, none conflicting.
        assert publisher.send_all(events) == (0, 10_000, [])
        stats = daemon.wait_idle()
        assert stats["unique_processed"] == 10_000 and stats["duplicate_dropped"] == 10_000
        assert stats["conflicting_duplicates"] == 0
        invariants(stats)

        # Seqs continue after expiry, and so do commit positions.
        assert publisher.send([event(20_000 + n, topic="t0") for n in range(3)])["new"] == 3
        stored = daemon.events("t0")
        assert [e["seq"] for e in stored] == [2_001, 2_002, 2_003]
        reply = daemon.request({"op": "events", "after": 0, "limit": 10})
        assert reply["first"] == everything_first and len(reply["events"]) == 3
        # A reader that had read up to seq 1 000 learns that 1 001..2 000 expired unread.
        reply = daemon.request({"op": "events", "topic": "t0", "after": 1_000, "limit": 10})
        assert reply["first"] == 2_001 > 1_000 + 1
    finally:
        publisher.close()


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_max_events_per_topic_keeps_exactly_each_topics_newest(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = retention_daemon(daemon_factory, max_events_per_topic=100)
    events = [event(n, topic=f"k{n % 3}") for n in range(750)]
    publisher = Acked(daemon.ack)
    try:
        assert publisher.send_all(events, size=250)[0] == 750
        stats = daemon.wait_stats(timeout=60, stored=300, expired=450)
        invariants(stats)
        for topic in ("k0", "k1", "k2"):
            stored = daemon.events(topic)
            assert [e["seq"] for e in stored] == list(range(151, 251))
            newest = [e["event_id"] for e in events if e["topic"] == topic][-100:]
            assert [e["event_id"] for e in stored] == newest
            row = topic_row(daemon, topic)
            assert (row["count"], row["first_seq"], row["last_seq"]) == (100, 151, 250)
            reply = daemon.request({"op": "events", "topic": topic, "after": 0, "limit": 1})
            assert reply["first"] == 151
    finally:
        publisher.close()


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_a_sweep_that_failed_trims_its_topics_at_the_next_one(daemon_factory: Callable[..., Daemon]) -> None:
    """The topics written since the last sweep are trimmed by the next sweep that works, even
    with no new event of theirs (they were dropped with the failed sweep, until a restart)."""
    daemon = retention_daemon(daemon_factory, max_events_per_topic=10, sweep_interval="250ms")
    conn = sqlite3.connect(daemon.db_path, timeout=10)
    try:
        # Every delete fails while `blocked` holds a row: the next sweep fails as a full disk would fail it.
        conn.executescript(
            "CREATE TABLE blocked (x); INSERT INTO blocked VALUES (1);"
            "CREATE TRIGGER no_expiry BEFORE DELETE ON events WHEN EXISTS (SELECT 1 FROM blocked)"
            " BEGIN SELECT RAISE(ABORT, 'expiry blocked by the test'); END;"
        )
        publisher = Acked(daemon.ack)
        try:
            assert publisher.send_all([event(n, topic="a") for n in range(30)])[0] == 30
        finally:
            publisher.close()
        eventually(lambda: "expiry blocked by the test" in daemon.log(), 30, "a failed sweep", detail=daemon.log)
        conn.executescript("DROP TRIGGER no_expiry; DROP TABLE blocked;")
    finally:
        conn.close()
    eventually(lambda: topic_row(daemon, "a")["count"] == 10, 15, "topic a trimmed to 10", detail=daemon.log)
    assert [e["seq"] for e in daemon.events("a")] == list(range(21, 31))
    invariants(daemon.wait_stats(stored=10, expired=20))


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_a_replay_after_the_dedup_horizon_is_stored_again_with_a_new_seq(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = retention_daemon(daemon_factory, max_age="1s", dedup_horizon="3s")
    events = [event(n, topic="h") for n in range(5)]
    publisher = Acked(daemon.ack)
    try:
        assert publisher.send(events)["new"] == 5
        daemon.wait_stats(timeout=60, expired=5)
        # Within the horizon the deleted keys still reject a replay.
        if kept_keys(daemon.db_path) == 5:
            reply = publisher.send(events)
            assert reply["new"] + reply["duplicate"] == 5
        eventually(lambda: kept_keys(daemon.db_path) == 0, 60, "deleted keys forgotten after the horizon")
        reply = publisher.send(events)
        assert (reply["new"], reply["duplicate"]) == (5, 0)
        stored = daemon.events("h")
        assert [e["seq"] for e in stored][-5:] == list(range(6, 11)) or [e["seq"] for e in stored] == []
        assert topic_row(daemon, "h")["last_seq"] == 10
    finally:
        publisher.close()


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_a_horizon_alone_forgets_the_keys_an_earlier_configuration_kept(daemon_factory: Callable[..., Daemon]) -> None:
    deleting = retention_daemon(daemon_factory, "deleting", max_age="1s")
    publisher = Acked(deleting.ack)
    try:
        assert publisher.send([event(n, topic="h") for n in range(5)])["new"] == 5
        deleting.wait_stats(timeout=60, expired=5)
    finally:
        publisher.close()
    assert deleting.terminate() == 0 and kept_keys(deleting.db_path) == 5
    # Events are no longer deleted; the keys kept so far still expire.
    forgetting = daemon_factory(
        "forgetting", storage={"path": str(deleting.db_path)}, retention={**QUICK, "dedup_horizon": "1s"}
    )
    forgetting.start()
    eventually(lambda: kept_keys(deleting.db_path) == 0, 30, "the kept keys forgotten after the horizon")


# --- Conflicting duplicates ---------------------------------------------------------------------


def _int64(value: int) -> bytes:
    return b"\xd3" + value.to_bytes(8, "big", signed=True)


def _frame_with_payload(batch: int, n: int, payload: bytes) -> bytes:
    """An ack batch of one event(n) whose payload is ``payload``, msgpack as it is written."""
    fields = event(n)
    body = b"".join(
        msgpack.packb(key) + msgpack.packb(fields[key]) for key in ("topic", "event_id", "timestamp", "source")
    )
    event_bytes = b"\x85" + body + msgpack.packb("payload") + payload
    return b"\x82" + msgpack.packb("batch") + msgpack.packb(batch) + msgpack.packb("events") + b"\x91" + event_bytes


def _frame_with_wide_int(batch: int, n: int) -> bytes:
    """An ack batch of one event(n) whose payload's n is packed as an int64 (9 bytes, not 1)."""
    text = event(n)["payload"]["text"]
    return _frame_with_payload(
        batch, n, b"\x82" + msgpack.packb("n") + _int64(n) + msgpack.packb("text") + msgpack.packb(text)
    )


# {1: "b"}, and {1: "a", true: "b"}: two keys in msgpack (and in Go, Java or JavaScript), one in Python.
_ONE_KEY = b"\x81\x01\xa1b"
_INT_AND_BOOL_KEYS = b"\x82\x01\xa1a\xc3\xa1b"


def _resends() -> list[dict[str, Any]]:
    """Re-sends of event(0..6): three equal in content, four not (at indexes 3, 4, 5 and 6)."""
    reordered = event(1)
    reordered["payload"] = {"text": "x" * 20, "n": 1}  # same map, other key order
    other_form = event(2, timestamp="2025-10-22T12:00:02+02:00")  # same instant, written otherwise
    changed_payload = event(3, payload={"n": 3, "text": "changed"})
    changed_source = event(4, source="someone-else")
    changed_instant = event(5, timestamp="2025-10-22T10:00:06Z")
    float_not_int = event(6, payload={"n": 6.0, "text": "x" * 20})
    return [event(0), reordered, other_form, changed_payload, changed_source, changed_instant, float_not_int]


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_conflicting_duplicates_are_flagged_before_and_after_the_original_expired(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = retention_daemon(daemon_factory, max_age="6s")
    publisher = Acked(daemon.ack)
    try:
        assert publisher.send([event(n) for n in range(7)])["new"] == 7
        assert publisher.send_raw(_frame_with_wide_int(100, 0))["duplicate"] == 1
        # Keys Python takes for one (1 and true) are two: a re-send with both is another content.
        assert publisher.send_raw(_frame_with_payload(102, 70, _ONE_KEY))["new"] == 1
        assert publisher.send_raw(_frame_with_payload(103, 70, _INT_AND_BOOL_KEYS))["conflicting"] == [0]
        reply = publisher.send(_resends())
        assert (reply["new"], reply["duplicate"], reply["conflicting"]) == (0, 7, [3, 4, 5, 6])
        # A copy inside one batch is compared with its original in the same commit; rejected
        # events before it do not shift the index it is named by.
        reply = publisher.send([{"bad": 1}, event(50), event(50, source="else")])
        assert (reply["new"], reply["duplicate"], reply["conflicting"]) == (1, 1, [2])
        stats = daemon.wait_stats(conflicting_duplicates=6)
        assert topic_row(daemon, "t")["conflicting_duplicates"] == 6
        assert "conflicting duplicate: topic 't' event_id 'e-3'" in daemon.log()
        stored = {e["event_id"]: e for e in daemon.events("t")}
        assert stored["e-3"]["payload"] == {"n": 3, "text": "x" * 20}  # the first stored version wins

        daemon.wait_stats(timeout=60, stored=0)
        # After expiry only fingerprints are left: the verdicts are the same.
        assert publisher.send_raw(_frame_with_wide_int(101, 0)).get("conflicting", []) == []
        reply = publisher.send(_resends())
        assert (reply["new"], reply["duplicate"], reply["conflicting"]) == (0, 7, [3, 4, 5, 6])
        assert publisher.send_raw(_frame_with_payload(104, 70, _INT_AND_BOOL_KEYS))["conflicting"] == [0]
        stats = daemon.wait_stats(conflicting_duplicates=11)
        invariants(stats)
        assert topic_row(daemon, "t")["conflicting_duplicates"] == 11
    finally:
        publisher.close()


# --- Durability and space -------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_retention_counters_survive_a_restart_and_kill_9(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = retention_daemon(daemon_factory, max_age="1s")
    publisher = Acked(daemon.ack)
    try:
        assert publisher.send([event(n) for n in range(300)])["new"] == 300
        assert publisher.send([event(1, source="changed")])["conflicting"] == [0]
        before = daemon.wait_stats(timeout=60, stored=0, expired=300, conflicting_duplicates=1)
    finally:
        publisher.close()
    wanted = {key: before[key] for key in ("stored", "expired", "conflicting_duplicates", "unique_processed")}
    assert daemon.terminate() == 0
    daemon.start()
    assert {key: daemon.stats()[key] for key in wanted} == wanted
    publisher = Acked(daemon.ack)
    try:
        assert publisher.send([event(1000 + n) for n in range(50)] + [event(2, source="changed")])["conflicting"] == [
            50
        ]
    finally:
        publisher.close()
    after = daemon.wait_stats(timeout=60, stored=0, expired=350, conflicting_duplicates=2)
    daemon.kill()
    daemon.start()
    stats = daemon.stats()
    for key in ("stored", "expired", "conflicting_duplicates", "unique_processed", "duplicate_dropped"):
        assert stats[key] == after[key], key
    invariants(stats)
    assert topic_row(daemon, "t")["first_seq"] == 351


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_six_cycles_of_inflow_and_expiry_leave_the_database_no_bigger_than_after_the_second(
    daemon_factory: Callable[..., Daemon],
) -> None:
    # One ordering actor: rows then arrive in the same order every cycle, so the B-trees split
    # alike and the file's high-water mark is the same from cycle to cycle.
    daemon = retention_daemon(daemon_factory, actors=1, max_age="500ms", dedup_horizon="500ms", sweep_interval="250ms")
    wal = daemon.db_path.with_name(daemon.db_path.name + "-wal")
    publisher = Acked(daemon.ack)
    sizes: list[tuple[int, int]] = []
    try:
        for cycle in range(6):
            events = [event(cycle * 100_000 + n, topic=f"c{n % 20}") for n in range(4000)]
            assert publisher.send_all(events)[0] == 4000
            daemon.wait_stats(timeout=60, stored=0, expired=4000 * (cycle + 1))
            eventually(lambda: kept_keys(daemon.db_path) == 0, 60, "deleted keys forgotten")
            sizes.append((daemon.db_path.stat().st_size, wal.stat().st_size if wal.exists() else 0))
    finally:
        publisher.close()
    assert sizes[-1][0] <= sizes[1][0], sizes
    assert all(wal_size <= 64 * 1024 * 1024 for _db, wal_size in sizes), sizes
    print("database and WAL bytes after each cycle:", sizes)


def used_bytes(db: Path) -> int:
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages * conn.execute("PRAGMA page_size").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_max_bytes_deletes_the_oldest_events_until_the_database_fits(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = retention_daemon(daemon_factory, max_bytes="400KB", dedup_horizon="1s")
    events = [event(n, topic=f"b{n % 4}") for n in range(6000)]
    publisher = Acked(daemon.ack)
    try:
        assert publisher.send_all(events)[0] == 6000
    finally:
        publisher.close()
    eventually(lambda: used_bytes(daemon.db_path) <= 400_000, 60, "the database's pages in use within max_bytes")
    stats = daemon.wait_idle()
    invariants(stats)
    assert 0 < stats["stored"] < 6000 and stats["expired"] == 6000 - stats["stored"]
    for topic in ("b0", "b1", "b2", "b3"):
        row = topic_row(daemon, topic)
        seqs = [e["seq"] for e in daemon.events(topic)]
        # The oldest went first: what is left of each topic is its newest events, without gaps.
        assert seqs == list(range(row["first_seq"], 1501)), topic


@pytest.mark.e2e
def test_a_size_budget_no_deletion_can_meet_is_named_once(daemon_factory: Callable[..., Daemon]) -> None:
    # 1 KB is less than the tables take with no event at all: every event goes at the next
    # sweep, which the daemon did in silence. It says so once (not at every sweep).
    daemon = retention_daemon(daemon_factory, max_bytes="1KB")
    publisher = Acked(daemon.ack)
    try:
        assert publisher.send_all([event(n) for n in range(50)])[0] == 50
    finally:
        publisher.close()
    eventually(lambda: daemon.stats()["expired"] == 50, 30, "all 50 events deleted by the budget")
    words = "[retention] max_bytes '1KB' cannot be met: with no event left stored the database still holds"
    eventually(lambda: words in daemon.log(), 15, "the warning that the budget cannot be met")
    time.sleep(2.5)  # two more sweeps
    assert daemon.log().count("cannot be met") == 1


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_an_unmet_size_budget_is_named_once_across_later_arrivals(daemon_factory: Callable[..., Daemon]) -> None:
    # Events arriving one at a time, each deleted by a later sweep, never meet a 1 KB budget:
    # the warning is said once, not again after each arrival.
    daemon = retention_daemon(daemon_factory, max_bytes="1KB", max_age="1s")
    for n in range(3):
        publisher = Acked(daemon.ack)
        try:
            assert publisher.send_all([event(n)])[0] == 1
        finally:
            publisher.close()
        eventually(lambda n=n: daemon.stats()["expired"] == n + 1, 30, f"event {n} deleted")
        time.sleep(2.5)  # past max_age, two more sweeps
    assert daemon.log().count("cannot be met") == 1
