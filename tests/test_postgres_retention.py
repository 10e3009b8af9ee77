"""Retention on PostgreSQL: two daemons share one database; one sweeps at a time, deleted keys
keep rejecting replays until the dedup horizon, seqs never go back, conflicting re-sends are
flagged, and the cluster's counters add up.

Runs against a real throwaway PostgreSQL cluster (tests/pg_cluster.py), started once for the
module; each test has a database of its own. Skipped where PostgreSQL or psycopg is missing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import pytest
from harness import Daemon, eventually
from pg_cluster import missing_reason
from test_postgres import query
from test_retention import _INT_AND_BOOL_KEYS, _ONE_KEY, Acked, _frame_with_payload, _resends, event, invariants
from test_subscribe import RawConsumer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or ""),
]

QUICK = {"sweep_interval": "1s"}


def two_daemons(factory: Callable[..., Daemon], dsn: str, **retention: Any) -> tuple[Daemon, Daemon]:
    """Two daemons on one database, with these [retention] settings (and a quick sweep)."""
    daemons = []
    for name in ("node-a", "node-b"):
        daemon = factory(
            name,
            storage={"backend": "postgresql", "dsn": dsn, "node": name},
            retention={**QUICK, **retention},
            ordering={"window_ms": 0},
        )
        daemons.append(daemon.start())
    return daemons[0], daemons[1]


def count(dsn: str, table: str) -> int:
    return int(query(dsn, f"SELECT count(*) FROM {table}")[0][0])


def wait_cluster(daemon: Daemon, timeout: float = 60.0, **expected: int) -> dict[str, Any]:
    """The cluster's summed counters once they show ``expected``."""
    seen: dict[str, Any] = {}

    def reached() -> bool:
        seen.update(daemon.stats()["cluster"])
        return all(seen.get(name) == value for name, value in expected.items())

    eventually(reached, timeout, f"cluster counters {expected}")
    return seen


def topic_row(daemon: Daemon, topic: str) -> dict[str, Any]:
    rows = {row["topic"]: row for row in daemon.request({"op": "topics"})["topics"]}
    return rows[topic]


@pytest.mark.timeout(240)
def test_two_daemons_expire_by_age_and_replays_of_expired_events_stay_duplicates(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    a, b = two_daemons(daemon_factory, database, max_age="2s")
    events = [event(n, topic=f"t{n % 5}") for n in range(4_000)]
    to_a, to_b = Acked(a.ack), Acked(b.ack)
    try:
        # Each daemon stores half; both sweep the one database, one at a time.
        assert to_a.send_all(events[:2_000]) == (2_000, 0, [])
        assert to_b.send_all(events[2_000:]) == (2_000, 0, [])
        cluster = wait_cluster(a, stored=0, expired=4_000, unique_processed=4_000)
        assert count(database, "events") == 0
        assert count(database, "deleted_keys") == 4_000
        for daemon in (a, b):
            stats = daemon.wait_idle()
            invariants(stats)  # per node: stored == unique_processed - expired, whoever swept
        assert a.stats()["expired"] + b.stats()["expired"] == 4_000

        row = topic_row(b, "t0")
        assert (row["count"], row["first_seq"], row["last_seq"], row["expired"]) == (0, 801, 800, 800)
        reply = b.request({"op": "events", "topic": "t0", "after": 0, "limit": 10})
        assert reply["events"] == [] and reply["first"] == 801

        # A replay of every expired event, through either daemon: all duplicates, none conflicting.
        assert to_b.send_all(events[:2_000]) == (0, 2_000, [])
        assert to_a.send_all(events[2_000:]) == (0, 2_000, [])
        cluster = wait_cluster(a, duplicate_dropped=4_000)
        assert cluster["unique_processed"] == 4_000 and cluster["conflicting_duplicates"] == 0
        assert cluster["received"] == cluster["unique_processed"] + cluster["duplicate_dropped"]

        # Seqs continue after expiry.
        assert to_a.send([event(90_000 + n, topic="t0") for n in range(3)])["new"] == 3
        assert [e["seq"] for e in a.events("t0")] == [801, 802, 803]
    finally:
        to_a.close()
        to_b.close()


@pytest.mark.timeout(240)
def test_two_daemons_keep_each_topics_newest_max_events_per_topic(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    a, b = two_daemons(daemon_factory, database, max_events_per_topic=100)
    events = [event(n, topic=f"k{n % 3}") for n in range(750)]
    to_a, to_b = Acked(a.ack), Acked(b.ack)
    try:
        assert to_a.send_all(events[:400], size=200)[0] == 400
        assert to_b.send_all(events[400:], size=175)[0] == 350
        cluster = wait_cluster(a, stored=300, expired=450)
        assert cluster["unique_processed"] == 750
        for topic in ("k0", "k1", "k2"):
            stored = b.events(topic)
            assert [e["seq"] for e in stored] == list(range(151, 251))
            assert [e["event_id"] for e in stored] == [e["event_id"] for e in events if e["topic"] == topic][-100:]
            row = topic_row(a, topic)
            assert (row["count"], row["first_seq"], row["last_seq"]) == (100, 151, 250)
        assert count(database, "deleted_keys") == 450
        # An expired one replayed is a duplicate.
        assert to_b.send([events[0]])["duplicate"] == 1
    finally:
        to_a.close()
        to_b.close()


@pytest.mark.timeout(180)
def test_after_the_dedup_horizon_a_replay_is_new_with_the_next_seq(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    a, b = two_daemons(daemon_factory, database, max_age="1s", dedup_horizon="3s")
    events = [event(n, topic="h") for n in range(5)]
    to_a = Acked(a.ack)
    to_b = Acked(b.ack)
    try:
        assert to_a.send(events)["new"] == 5
        wait_cluster(a, expired=5)
        eventually(lambda: count(database, "deleted_keys") == 0, 60, "deleted keys forgotten after the horizon")
        reply = to_b.send(events)
        assert (reply["new"], reply["duplicate"]) == (5, 0)
        assert [e["seq"] for e in query_events(database, "h")] in ([6, 7, 8, 9, 10], [])
        assert topic_row(a, "h")["last_seq"] == 10
        wait_cluster(a, expired=10, stored=0, unique_processed=10)
    finally:
        to_a.close()
        to_b.close()


def query_events(dsn: str, topic: str) -> list[dict[str, Any]]:
    return [{"seq": seq} for (seq,) in query(dsn, f"SELECT seq FROM events WHERE topic = '{topic}' ORDER BY seq")]


@pytest.mark.timeout(180)
def test_conflicting_re_sends_are_flagged_before_and_after_expiry_and_counted_across_the_cluster(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    a, b = two_daemons(daemon_factory, database, max_age="6s")
    to_a, to_b = Acked(a.ack), Acked(b.ack)
    try:
        assert to_a.send([event(n) for n in range(7)])["new"] == 7
        reply = to_b.send(_resends())  # through the other daemon: the original is another's row
        assert (reply["new"], reply["duplicate"], reply["conflicting"]) == (0, 7, [3, 4, 5, 6])
        # A copy inside one batch is compared with its original in the same transaction.
        reply = to_a.send([{"bad": 1}, event(50), event(50, source="else")])
        assert (reply["new"], reply["duplicate"], reply["conflicting"]) == (1, 1, [2])
        assert to_a.send_raw(_frame_with_payload(102, 70, _ONE_KEY))["new"] == 1
        assert to_b.send_raw(_frame_with_payload(103, 70, _INT_AND_BOOL_KEYS))["conflicting"] == [0]
        wait_cluster(a, conflicting_duplicates=6)
        assert topic_row(a, "t")["conflicting_duplicates"] == 6
        assert "conflicting duplicate: topic 't' event_id 'e-3'" in b.log()
        stored = {e["event_id"]: e for e in a.events("t")}
        assert stored["e-3"]["payload"] == {"n": 3, "text": "x" * 20}  # the first stored version wins

        wait_cluster(a, timeout=60, stored=0)
        # After expiry only the kept fingerprints are left: the verdicts are the same.
        reply = to_a.send(_resends())
        assert (reply["new"], reply["duplicate"], reply["conflicting"]) == (0, 7, [3, 4, 5, 6])
        assert to_b.send_raw(_frame_with_payload(104, 70, _INT_AND_BOOL_KEYS))["conflicting"] == [0]
        cluster = wait_cluster(b, conflicting_duplicates=11)
        assert cluster["stored"] == cluster["unique_processed"] - cluster["expired"]
        assert topic_row(b, "t")["conflicting_duplicates"] == 11
        assert a.stats()["conflicting_duplicates"] + b.stats()["conflicting_duplicates"] == 11
    finally:
        to_a.close()
        to_b.close()


def test_write_time_settlement_finds_kept_keys_and_their_conflicts(database: str) -> None:
    """Rows the ordering actors believed new (the hint came before the sweep) are settled under
    the topic locks: a kept key is a duplicate, compared with its fingerprint; seqs go on."""
    from actors.postgres import PostgresStore
    from actors.store import TopicDelta

    def rows(*pairs: tuple[str, str]) -> list[Any]:
        return [
            ("t", event_id, 0, "2025-10-22T10:00:00Z", 1_000 + n, source, b"\x81\xa1n\x01", 0.0, 0)
            for n, (event_id, source) in enumerate(pairs)
        ]

    store = PostgresStore(database, "writer")
    store.open()
    try:
        first = rows(("a", "s"), ("b", "s"), ("c", "s"))
        assert store.write(first, {"t": TopicDelta(received=3)}, {"received": 3}).totals["unique_processed"] == 3
        assert store.try_sweep_lock()
        assert store.expire_oldest(received_before=1.0, max_rows=10) == 3
        store.sweep_unlock()
        assert count(database, "events") == 0 and count(database, "deleted_keys") == 3
        # a: same content; b: another source (conflicting); d: new.
        outcome = store.write(
            rows(("a", "s"), ("b", "other"), ("d", "s")), {"t": TopicDelta(received=3)}, {"received": 3}
        )
        assert outcome.duplicates == [0, 1] and outcome.conflicting == [1]
        assert outcome.totals["unique_processed"] == 1 and outcome.totals["conflicting_duplicates"] == 1
        assert query(database, "SELECT event_id, seq FROM events") == [("d", 4)]
        # After the horizon the keys are forgotten: a replay is new, with the next seq.
        assert store.forget_keys(committed_before=10.0, max_rows=10) == 3
        outcome = store.write(rows(("a", "s")), {"t": TopicDelta(received=1)}, {"received": 1})
        assert outcome.duplicates == [] and outcome.totals["unique_processed"] == 1
        assert query(database, "SELECT event_id, seq FROM events ORDER BY seq") == [("d", 4), ("a", 5)]
        assert query(database, "SELECT stored, expired, conflicting_duplicates FROM nodes") == [(2, 3, 1)]
        assert query(database, "SELECT expired, conflicting_duplicates FROM topics") == [(3, 1)]
    finally:
        store.close()


@pytest.mark.timeout(120)
def test_no_daemon_sweeps_while_another_holds_the_sweep_lock(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    import psycopg

    from actors.postgres import SWEEP_LOCK

    with psycopg.connect(database, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (SWEEP_LOCK,))
        a, b = two_daemons(daemon_factory, database, max_age="1s")
        to_a = Acked(a.ack)
        try:
            assert to_a.send([event(n) for n in range(50)])["new"] == 50
            time.sleep(4)  # several sweep intervals past max_age
            assert count(database, "events") == 50
            holder.execute("SELECT pg_advisory_unlock(%s)", (SWEEP_LOCK,))
            wait_cluster(a, expired=50, stored=0)
        finally:
            to_a.close()


@pytest.mark.timeout(180)
def test_a_subscriber_on_another_daemon_is_told_what_expired_then_gets_what_is_stored(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    a, b = two_daemons(daemon_factory, database, max_events_per_topic=100)
    to_a = Acked(a.ack)
    try:
        assert to_a.send_all([event(n, topic="s") for n in range(250)], size=125)[0] == 250
        wait_cluster(b, stored=100, expired=150)
    finally:
        to_a.close()
    ((first_position,),) = query(database, "SELECT min(position) FROM events")
    consumer = RawConsumer(b.subscribe)
    try:
        consumer.send({"op": "subscribe", "topic": "s", "after": 10, "credit": 200})
        assert consumer.receive()["op"] == "subscribed"
        assert consumer.receive() == {"op": "expired", "after": 10, "first": 151}
        assert [e["seq"] for e in consumer.receive()["events"]] == list(range(151, 251))
        consumer.send({"op": "subscribe", "after": 0, "credit": 200})
        assert consumer.receive()["op"] == "subscribed"
        assert consumer.receive() == {"op": "expired", "after": 0, "first": first_position}
        replayed = consumer.receive()["events"]
        assert [e["seq"] for e in replayed] == list(range(151, 251))
        assert replayed[0]["position"] == first_position
    finally:
        consumer.close()


@pytest.mark.timeout(180)
def test_two_daemons_keep_the_database_within_max_bytes_deleting_the_oldest_first(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    budget = 120_000  # about 280 of these 600 events, with the 320-odd keys the rest leave
    a, b = two_daemons(daemon_factory, database, max_bytes="120KB")
    events = [event(n, topic=f"b{n % 3}") for n in range(600)]
    to_a, to_b = Acked(a.ack), Acked(b.ack)
    try:
        assert to_a.send_all(events[:300], size=100)[0] == 300
        assert to_b.send_all(events[300:], size=100)[0] == 300

        def within_budget() -> bool:
            return int(query(database, "SELECT sum(stored_bytes) FROM nodes")[0][0]) <= budget

        eventually(within_budget, 60, f"the counted bytes within {budget}")
        cluster = a.stats()["cluster"]
        assert cluster["unique_processed"] == 600
        assert 0 < cluster["stored"] < 600
        assert cluster["stored"] + cluster["expired"] == 600
        assert count(database, "events") == cluster["stored"]
        assert count(database, "deleted_keys") == cluster["expired"]
        # Each chunk is at most the share over the budget: the sweep stops about where it fits.
        assert cluster["stored"] > 240
        # The oldest went first: what is left is the end of commit order, gapless.
        positions = [int(p) for (p,) in query(database, "SELECT position FROM events ORDER BY position")]
        assert positions == list(range(601 - len(positions), 601))
        for topic in ("b0", "b1", "b2"):
            row = topic_row(b, topic)
            assert [e["seq"] for e in b.events(topic)] == list(range(row["first_seq"], row["last_seq"] + 1))
        # A deleted event replayed is still a duplicate, through either daemon.
        assert to_b.send([events[0]])["duplicate"] == 1
        assert to_a.send([events[300]])["duplicate"] == 1
    finally:
        to_a.close()
        to_b.close()


@pytest.mark.e2e
def test_a_size_budget_no_deletion_can_meet_is_named(daemon_factory: Callable[..., Daemon], database: str) -> None:
    a, b = two_daemons(daemon_factory, database, max_bytes="100")
    to_a = Acked(a.ack)
    try:
        assert to_a.send_all([event(n) for n in range(20)])[0] == 20
    finally:
        to_a.close()
    eventually(lambda: a.stats()["cluster"]["stored"] == 0, 30, "the budget to delete every event")
    words = "[retention] max_bytes '100' cannot be met: with no event left stored the database still holds"
    eventually(lambda: words in a.log() + b.log(), 15, "the sweeping daemon's warning")


@pytest.mark.timeout(240)
def test_followers_on_another_daemon_are_never_sent_what_the_cluster_deleted(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    a, b = two_daemons(daemon_factory, database, max_age="2s")
    live = RawConsumer(b.subscribe)  # fills daemon B's shared window of recent events
    to_a = Acked(a.ack)
    try:
        live.send({"op": "subscribe", "after": 0, "credit": 1000})
        assert live.receive()["op"] == "subscribed"
        assert to_a.send_all([event(n, topic=f"t{n % 2}") for n in range(100)])[0] == 100
        got = 0
        while got < 100:
            got += len(live.receive()["events"])
        wait_cluster(b, stored=0, expired=100)
    finally:
        to_a.close()
        live.close()
    ((head,),) = query(database, "SELECT last FROM positions")
    for request in ({}, {"topic": "t0"}):
        late = RawConsumer(b.subscribe)
        try:
            late.send({"op": "subscribe", "after": 0, "credit": 1000, **request})
            assert late.receive()["op"] == "subscribed"
            first = 51 if request else head + 1
            assert late.receive() == {"op": "expired", "after": 0, "first": first}, request
            assert late.quiet(0.5) == [], request
        finally:
            late.close()


def test_a_filtered_follower_is_told_of_a_hole_in_a_topic_it_was_never_sent(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    from test_subscribe_retention import assert_told_of_holes_in_topics_never_sent

    daemon, _ = two_daemons(daemon_factory, database, max_events_per_topic=5)
    assert_told_of_holes_in_topics_never_sent(daemon, lambda: wait_cluster(daemon, stored=7, expired=20))


def test_a_filtered_follower_is_told_of_a_hole_its_cursor_passed_before_another_topics_notice(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    from test_subscribe_retention import assert_told_of_a_hole_passed_before_another_notice

    daemon, _ = two_daemons(daemon_factory, database, max_events_per_topic=2)
    assert_told_of_a_hole_passed_before_another_notice(daemon, lambda: wait_cluster(daemon, stored=7, expired=2))


def test_a_filtered_follower_told_of_a_hole_at_the_start_is_not_told_it_again(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    from test_subscribe_retention import assert_one_notice_for_a_hole_at_the_start

    daemon, _ = two_daemons(daemon_factory, database, max_events_per_topic=2)
    assert_one_notice_for_a_hole_at_the_start(daemon, lambda: wait_cluster(daemon, stored=2, expired=2))


def test_an_expiry_chunk_deletes_at_most_its_bytes_of_payload_as_on_sqlite(database: str) -> None:
    import msgpack

    from actors.postgres import PostgresStore
    from actors.store import EXPIRE_CHUNK_BYTES, TopicDelta

    payload = msgpack.packb({"blob": b"x" * 100_000})
    rows = [("t", f"e{n}", 0, "2025-10-22T10:00:00Z", n, "s", payload, 0.0, 0) for n in range(8)]
    store = PostgresStore(database, "writer")
    store.open()
    try:
        assert store.write(rows, {"t": TopicDelta(received=8)}, {"received": 8}).totals["unique_processed"] == 8
        assert store.try_sweep_lock()
        fit = EXPIRE_CHUNK_BYTES // len(payload)
        assert store.expire_oldest(received_before=1.0, max_rows=500) == fit
        assert store.expire_topic_oldest("t", 500) == fit
        store.sweep_unlock()
        assert query(database, "SELECT seq FROM events ORDER BY seq") == [(seq,) for seq in range(2 * fit + 1, 9)]
    finally:
        store.close()


def test_a_sweep_whose_session_was_lost_stops_rather_than_overlapping_another_daemons(database: str) -> None:
    """The sweep lock is a session lock: once the writer's session is lost (a server restart,
    a terminated backend) and a commit has made a new one, the sweep under way no longer holds
    it, and another daemon's sweep may start. The first must then stop: going on, both trim a
    topic by the excess each counted, and it keeps fewer than max_events_per_topic."""
    from actors.postgres import PostgresStore
    from actors.store import StorageError, TopicDelta

    def rows(start: int, n: int) -> list[Any]:
        return [("t", f"e{i}", 0, "2025-10-22T10:00:00Z", i, "s", b"\x80", 0.0, 0) for i in range(start, start + n)]

    a, b = PostgresStore(database, "node-a"), PostgresStore(database, "node-b")
    a.open()
    b.open()
    try:
        assert a.write(rows(0, 150), {"t": TopicDelta(received=150)}, {"received": 150}).totals["stored"] == 150
        assert a.try_sweep_lock()
        assert a.topics_over(100) == [("t", 50)]
        # A's session ends between two chunks; its next commit fails, the retry makes a new one.
        writer = "SELECT pid FROM pg_stat_activity WHERE application_name = 'eventagg node-a writer'"
        (pid,) = query(database, writer)[0]
        query(database, "SELECT pg_terminate_backend(%s)", (pid,))
        with contextlib.suppress(Exception):
            a.write(rows(150, 1), {"t": TopicDelta(received=1)}, {"received": 1})
        eventually(lambda: not query(database, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)), 10, "gone")
        a.write(rows(150, 1), {"t": TopicDelta(received=1)}, {"received": 1})
        # B's sweep finds the lock free and trims the topic to 100.
        assert b.try_sweep_lock()
        assert b.topics_over(100) == [("t", 51)]
        assert b.expire_topic_oldest("t", 51) == 51
        b.sweep_unlock()
        # A's sweep goes on with the excess it counted before: it must not delete anything.
        with contextlib.suppress(StorageError):
            a.expire_topic_oldest("t", 50)
        a.sweep_unlock()
        assert count(database, "events") == 100
        assert query(database, "SELECT min(seq), max(seq) FROM events") == [(52, 151)]
    finally:
        a.close()
        b.close()


def clock_env(tmp_path: Any, offset_s: float) -> dict[str, str]:
    """The environment of a daemon whose host clock is ``offset_s`` off (time.time only)."""
    import os

    folder = tmp_path / f"clock{offset_s:+g}"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        f"import time\n_real = time.time\ntime.time = lambda: _real() + {offset_s!r}\n"
    )
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{folder}:{path}" if path else str(folder)}


@pytest.mark.timeout(120)
def test_a_daemon_whose_clock_is_behind_does_not_shorten_the_dedup_horizon_of_its_events(
    daemon_factory: Callable[..., Daemon], database: str, tmp_path: Any
) -> None:
    """Daemons on several hosts have several clocks. The key of an event one of them stored must
    keep rejecting replays for ``dedup_horizon`` after its commit, whichever daemon sweeps:
    not be forgotten (and the replay stored a second time) because that host's clock is an hour
    behind the sweeper's."""
    retention = {"sweep_interval": "1s", "max_age": "10min", "dedup_horizon": "10min"}
    behind = pg_daemon_with(daemon_factory, "node-a", database, retention)
    behind.start(env=clock_env(tmp_path, -3600.0))
    sweeper = pg_daemon_with(daemon_factory, "node-b", database, retention).start()
    to_behind, to_sweeper = Acked(behind.ack), Acked(sweeper.ack)
    try:
        events = [event(n, topic="skew") for n in range(20)]
        assert to_behind.send(events)["new"] == 20
        time.sleep(4)  # several sweeps, seconds after the commit: nothing is 10 minutes old
        reply = to_sweeper.send(events)
        assert (reply["new"], reply["duplicate"]) == (0, 20), reply
        assert count(database, "events") == 20
    finally:
        to_behind.close()
        to_sweeper.close()


def pg_daemon_with(factory: Callable[..., Daemon], name: str, dsn: str, retention: dict[str, Any]) -> Daemon:
    return factory(
        name,
        storage={"backend": "postgresql", "dsn": dsn, "node": name},
        retention=retention,
        ordering={"window_ms": 0},
    )
