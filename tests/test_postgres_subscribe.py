"""Live subscribe and replay on PostgreSQL: a subscriber on one daemon follows what any daemon commits.

Two daemons share one database of a throwaway PostgreSQL server (tests/pg_cluster.py). Events
are published (acknowledged) to daemon A; subscribers on daemon B must get every one once, in
commit-position order, whether live or replayed; named consumers' positions are shared too.
Skipped, saying why, where PostgreSQL's binaries or psycopg are missing.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from harness import SCRIPTS, Daemon, eventually, publish
from pg_cluster import PgCluster, missing_reason
from test_postgres import pg_daemon, query
from test_subscribe import RawConsumer

from transport.publisher import Publisher
from transport.subscriber import Subscriber, SubscriberError

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or ""),
]

# Quick heartbeats, so a closed consumer is dropped within a test's patience.
FAST = {"subscribe": {"heartbeat_ms": 200, "timeout_ms": 2000}}


def two_daemons(factory: Callable[..., Daemon], dsn: str, hooks_on_a: bool = False) -> tuple[Daemon, Daemon]:
    """nodeA and nodeB on ``dsn``; ``hooks_on_a``: A takes the debug_* queries (to freeze its writer)."""
    a = pg_daemon(factory, "nodeA", dsn, **FAST)
    b = pg_daemon(factory, "nodeB", dsn, **FAST)
    return a.start(env={**os.environ, "EVENTAGG_TEST_HOOKS": "1"} if hooks_on_a else None), b.start()


def follow_and_ack(consumer: RawConsumer, name: str, events: int, position: int) -> None:
    """Subscribe ``consumer`` under ``name`` with ``events`` credits, take them, ack ``position``."""
    consumer.send({"op": "subscribe", "name": name, "credit": events})
    assert consumer.receive()["op"] == "subscribed"
    assert len(consumer.events(events)) == events
    consumer.send({"op": "ack", "position": position})
    assert consumer.receive() == {"op": "acked", "position": position}


def take(subscriber: Subscriber, count: int, timeout: float = 60) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count} events within {timeout} s"
        event = subscriber.next_event(1.0)
        if event is not None:
            got.append(event)
    return got


def keys(events: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    return [(event["topic"], event["event_id"], event["position"]) for event in events]


def test_a_subscriber_on_one_daemon_gets_every_event_committed_by_another_once_in_order(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    a, b = two_daemons(daemon_factory, database)
    with Subscriber(b.subscribe, after=0, credit=200) as live:
        assert live.next_event(0.5) is None  # subscribed, nothing stored yet
        publish(a.ack, "--acked", "--events", "2000", "--topics", "5")
        got = take(live, 2000)
        assert [event["position"] for event in got] == list(range(1, 2001))
        assert len({(event["topic"], event["event_id"]) for event in got}) == 2000
        # Both daemons commit at once: B's own commits wake it, A's are found by polling.
        procs = [
            subprocess.Popen(
                [sys.executable, str(SCRIPTS / "publish.py"), "--endpoint", daemon.ack, "--acked"]
                + ["--events", "500", "--topics", "5", "--id-prefix", prefix],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for daemon, prefix in ((a, "ea"), (b, "eb"))
        ]
        more = take(live, 1000)
        for proc in procs:
            assert proc.wait(120) == 0
        assert live.next_event(0.5) is None  # nothing repeated
    assert [event["position"] for event in more] == list(range(2001, 3001))
    live_keys = keys(got + more)
    # Replayed from the beginning, on either daemon: the same events in the same order.
    for daemon in (b, a):
        with Subscriber(daemon.subscribe, after=0, credit=500) as replay:
            assert keys(take(replay, 3000)) == live_keys
            assert replay.next_event(0.3) is None
    # One topic (cursor = seq) and a topic filter (cursor = position) on B.
    topic_1 = [event for event in got + more if event["topic"] == "topic-1"]
    with Subscriber(b.subscribe, "topic-1", after=0) as one:
        assert [event["seq"] for event in take(one, len(topic_1))] == list(range(1, len(topic_1) + 1))
    with Subscriber(b.subscribe, topics=["topic-1"], after=0) as filtered:
        assert keys(take(filtered, len(topic_1))) == keys(topic_1)


def test_a_named_consumer_resumes_on_any_daemon_and_after_a_restart(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    a, b = two_daemons(daemon_factory, database)
    publish(a.ack, "--acked", "--events", "1000", "--topics", "3")
    with Subscriber(b.subscribe, name="billing", credit=50) as first:
        got = take(first, 300)
    assert [event["position"] for event in got] == list(range(1, 301))
    expected = {"name": "billing", "topic": None, "position": 300, "lag": 700}
    for daemon in (a, b):  # stored in PostgreSQL: every daemon lists it
        (consumer,) = daemon.request({"op": "consumers"})["consumers"]
        assert consumer == {**expected, "updated_at": pytest.approx(time.time(), abs=60)}
    with Subscriber(a.subscribe, name="billing") as second:  # no after: where it acknowledged, on A
        got = take(second, 300)
    assert [event["position"] for event in got] == list(range(301, 601))
    assert b.terminate() == 0
    b.start()
    with Subscriber(b.subscribe, name="billing") as third:
        got = take(third, 400)
        assert third.next_event(0.5) is None
    assert [event["position"] for event in got] == list(range(601, 1001))
    assert a.request({"op": "consumers"})["consumers"][0]["lag"] == 0
    with Subscriber(b.subscribe, "topic-2", name="audit") as audit:
        assert [event["seq"] for event in take(audit, 10)] == list(range(1, 11))
    with Subscriber(a.subscribe, "topic-2", name="audit") as audit:
        assert audit.next_event(10)["seq"] == 11  # type: ignore[index]
    audit_row = [c for c in b.request({"op": "consumers"})["consumers"] if c["name"] == "audit"]
    assert audit_row[0]["topic"] == "topic-2" and audit_row[0]["position"] == 11  # taken, so acknowledged on close
    # A name keeps its form across daemons: refused with what to do.
    with pytest.raises(SubscriberError, match="follows topic 'topic-2'"):
        with Subscriber(b.subscribe, name="audit", timeout=2.0) as wrong:
            wrong.next_event(5)
    # Forgotten through one daemon, it is gone for every daemon, and the name is free again.
    forgot = subprocess.run(
        [sys.executable, str(SCRIPTS / "consumers.py"), "--endpoint", a.query, "--forget", "audit"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert forgot.returncode == 0 and "forgot named consumer 'audit'" in forgot.stdout, forgot
    assert [c["name"] for c in b.request({"op": "consumers"})["consumers"]] == ["billing"]
    with Subscriber(b.subscribe, name="audit") as renamed:  # every topic now, from the start
        assert renamed.next_event(10)["position"] == 1  # type: ignore[index]


def test_a_named_consumer_taken_on_another_daemon_ends_the_first_follower(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    a, b = two_daemons(daemon_factory, database)
    publish(a.ack, "--acked", "--events", "100", "--topics", "3")
    first = RawConsumer(a.subscribe)
    second = RawConsumer(b.subscribe)
    try:
        follow_and_ack(first, "billing", 10, 10)
        time.sleep(1.5)  # A's LISTEN connection, made once it has a subscriber, is up by now
        # The same name on B: A's follower is ended and told so, as one daemon does it.
        second.send({"op": "subscribe", "name": "billing", "credit": 0})
        assert second.receive()["op"] == "subscribed"
        ended = first.receive()
        assert ended["code"] == "replaced" and "'nodeB'" in ended["error"], ended
        first.send({"op": "ack", "position": 10})
        assert first.receive()["code"] == "not_subscribed"
        assert second.quiet(0.5) == []  # B's own follower stays
        # Forgotten through A while B's follower follows: B's follower is ended too.
        forgot = subprocess.run(
            [sys.executable, str(SCRIPTS / "consumers.py"), "--endpoint", a.query, "--forget", "billing"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert forgot.returncode == 0, forgot.stderr
        ended = second.receive()
        assert ended["code"] == "replaced" and "'nodeA'" in ended["error"], ended
        assert b.request({"op": "consumers"})["consumers"] == []
    finally:
        first.close()
        second.close()


def test_a_forget_through_another_daemon_is_not_undone_by_an_ack_stored_after_it(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    """An ack A's writer had queued when B took the name and forgot it wrote the row back: the
    forget was undone. A stores a position only under the name's current claim now."""
    a, b = two_daemons(daemon_factory, database, hooks_on_a=True)
    publish(a.ack, "--acked", "--events", "20", "--topics", "2")
    first = RawConsumer(a.subscribe)
    second = RawConsumer(b.subscribe)
    try:
        follow_and_ack(first, "billing", 10, 5)
        # A's writer busy (a long commit, say) while its follower acknowledges 10.
        assert "error" not in a.request({"op": "debug_freeze", "actor": "dedup", "seconds": 3})
        first.send({"op": "ack", "position": 10})
        time.sleep(0.5)  # handed to A's writer, which waits
        second.send({"op": "subscribe", "name": "billing", "credit": 0})
        assert second.receive()["after"] == 5
        second.send({"op": "unsubscribe", "forget": True})
        assert second.receive() == {"op": "unsubscribed", "forgotten": "billing"}
        ended = first.receive()
        assert ended["code"] == "replaced" and "'nodeB'" in ended["error"], ended
        time.sleep(4)  # A's writer ran the queued ack
        assert b.request({"op": "consumers"})["consumers"] == []
        assert a.request({"op": "consumers"})["consumers"] == []
    finally:
        first.close()
        second.close()


def test_a_forget_queued_on_one_daemon_leaves_the_position_of_the_daemon_that_took_the_name(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    """The other way round: A's follower asks to forget while B takes the name and acknowledges;
    the forget, run after, deleted B's position. Now it is refused, and says why."""
    a, b = two_daemons(daemon_factory, database, hooks_on_a=True)
    publish(a.ack, "--acked", "--events", "20", "--topics", "2")
    first = RawConsumer(a.subscribe)
    second = RawConsumer(b.subscribe)
    try:
        first.send({"op": "subscribe", "name": "billing", "credit": 0})
        assert first.receive()["op"] == "subscribed"
        assert "error" not in a.request({"op": "debug_freeze", "actor": "dedup", "seconds": 3})
        first.send({"op": "unsubscribe", "forget": True})
        time.sleep(0.5)  # handed to A's writer, which waits
        follow_and_ack(second, "billing", 10, 10)
        refused = first.receive(timeout=10)
        assert refused["code"] == "ack_failed" and "keeps its position" in refused["error"], refused
        (stored,) = a.request({"op": "consumers"})["consumers"]
        assert (stored["name"], stored["position"]) == ("billing", 10)
    finally:
        first.close()
        second.close()


def test_an_ack_followed_at_once_by_a_new_subscribe_under_the_name_is_stored(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    """The subscribe claimed the name again before the writer stored the ack, which was then
    refused under its older claim: nothing stored, and nothing said. As on SQLite, it is now
    stored under the new claim and confirmed to the new subscription."""
    daemon = pg_daemon(daemon_factory, "node0", database, **FAST).start()
    publish(daemon.ack, "--acked", "--events", "20", "--topics", "1")
    consumer = RawConsumer(daemon.subscribe)
    try:
        consumer.send({"op": "subscribe", "name": "billing", "credit": 10})
        assert consumer.receive()["op"] == "subscribed"
        assert len(consumer.events(10)) == 10
        consumer.send({"op": "ack", "position": 7})
        consumer.send({"op": "subscribe", "name": "billing", "credit": 0})
        told = consumer.quiet(2.0)
        assert {"op": "acked", "position": 7} in told, told
        (stored,) = daemon.request({"op": "consumers"})["consumers"]
        assert stored["position"] == 7
    finally:
        consumer.close()


def test_two_daemons_taking_one_name_at_once_keep_exactly_one_follower(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    """Each daemon ended its follower on hearing the other's claim, whichever came first: taken on
    two daemons at once, a name kept no follower (19 times in 20)."""
    a, b = two_daemons(daemon_factory, database)
    warm = RawConsumer(a.subscribe), RawConsumer(b.subscribe)  # so both daemons LISTEN already
    for consumer in warm:
        consumer.send({"op": "subscribe", "after": 0, "credit": 0})
        assert consumer.receive()["op"] == "subscribed"
    time.sleep(1.5)
    kept = []
    for n in range(6):
        pair = [RawConsumer(a.subscribe), RawConsumer(b.subscribe)]
        try:
            for consumer in pair:
                consumer.send({"op": "subscribe", "name": f"n{n}", "after": 0, "credit": 0})
            ended = [any(m.get("code") == "replaced" for m in consumer.quiet(1.5)) for consumer in pair]
            kept.append(ended.count(False))
        finally:
            for consumer in pair:
                consumer.close()
    for consumer in warm:
        consumer.close()
    assert kept == [1] * 6, kept


def test_a_stray_notice_on_the_consumers_channel_is_ignored(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    """Any session may NOTIFY: a payload that was not [node, name] stopped the subscription server."""
    a = pg_daemon(daemon_factory, "nodeA", database, **FAST).start()
    follower = RawConsumer(a.subscribe)
    try:
        follower.send({"op": "subscribe", "name": "billing", "credit": 10})
        assert follower.receive()["op"] == "subscribed"
        time.sleep(1.5)  # its LISTEN connection is up
        for payload in ("not json", '["only-one"]', "[1, 2]", '{"node": "x"}'):
            query(database, "SELECT pg_notify('eventagg_consumers', %s)", (payload,))
        publish(a.ack, "--acked", "--events", "5", "--topics", "1")
        assert len(follower.events(5)) == 5  # still followed, not ended
        assert a.request({"op": "health"}).get("status") == "ok"
        assert "that is not [node, name, claim number] was ignored" in a.log()
    finally:
        follower.close()


def test_delivery_latency_across_daemons(daemon_factory: Callable[..., Daemon], database: str) -> None:
    """Publish one event at a time to A, acknowledged; time until a subscriber on B has it."""
    a, b = two_daemons(daemon_factory, database)
    acks: list[float] = []
    delays: list[float] = []
    with (
        Subscriber(b.subscribe, after=0) as follower,
        Publisher(endpoints=[a.ack], deadline=30.0, batch_size=1, linger=0) as publisher,
    ):
        assert follower.next_event(0.5) is None
        for n in range(40):
            started = time.monotonic()
            publisher.publish(
                {
                    "topic": "t",
                    "event_id": f"e{n}",
                    "timestamp": "2025-10-22T10:00:00Z",
                    "source": "s",
                    "payload": {"n": n},
                }
            )
            publisher.flush(30)
            acks.append(time.monotonic() - started)
            event = follower.next_event(10)
            assert event is not None and event["event_id"] == f"e{n}"
            delays.append(time.monotonic() - started)
            time.sleep(0.037 * (n % 5))  # unaligned with the head polls
    after_ack = [delay - ack for delay, ack in zip(delays, acks)]
    for name, figures in (("acknowledged by A", acks), ("delivered on B", delays)):
        figures.sort()
        print(
            f"\npublish to {name}: median {statistics.median(figures) * 1000:.0f} ms,"
            f" min {figures[0] * 1000:.0f} ms, max {figures[-1] * 1000:.0f} ms"
        )
    # B hears A's commits (LISTEN/NOTIFY): waiting for its once-a-second head poll instead would
    # put the median near half a second after the ack.
    listening = query(
        database,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
        ("eventagg nodeB commit notices",),
    )
    assert listening == [(1,)]
    assert statistics.median(after_ack) < 0.25


def test_subscribers_stay_connected_through_a_postgresql_outage_and_miss_nothing(
    daemon_factory: Callable[..., Daemon], database: str, pg: PgCluster
) -> None:
    """PostgreSQL stopped while a subscriber follows on B: heartbeats go on, then delivery resumes."""
    a, b = two_daemons(daemon_factory, database)
    publish(a.ack, "--acked", "--events", "200", "--topics", "3")
    with Subscriber(b.subscribe, after=0, heartbeat=0.2, timeout=1.5) as follower:
        got = take(follower, 200)
        pg.stop()
        try:
            assert follower.next_event(4) is None  # 4 s: well past the consumer's 1.5 s timeout
        finally:
            pg.start()
        publish(a.ack, "--acked", "--events", "200", "--topics", "3", "--id-prefix", "after")
        got += take(follower, 200)
        assert follower.next_event(0.5) is None
        assert follower.reconnects == 0  # the daemon kept answering while its database was away
    assert [event["position"] for event in got] == list(range(1, 401))
    assert "reading the head position failed" in b.log() or "retrying" in b.log()


@pytest.mark.timeout(120)
def test_subscribers_with_default_patience_stay_connected_while_postgresql_hangs(
    daemon_factory: Callable[..., Daemon], database: str, pg: PgCluster
) -> None:
    """A hung server (stopped, sockets open) never answers: each read gives up after its answer
    timeout, and the thread's heartbeats go on in between, so a consumer with the Subscriber's
    default 5 s of patience stays subscribed."""
    a, b = two_daemons(daemon_factory, database)
    publish(a.ack, "--acked", "--events", "100", "--topics", "3")
    with Subscriber(b.subscribe, after=0) as follower:
        got = take(follower, 100)
        with pg.frozen():
            assert follower.next_event(9) is None  # past the 7.5 s a read once held the thread
        publish(a.ack, "--acked", "--events", "100", "--topics", "3", "--id-prefix", "after")
        got += take(follower, 100)
        assert follower.reconnects == 0, b.log()
    assert [event["position"] for event in got] == list(range(1, 201))


@pytest.mark.timeout(120)
def test_a_named_consumer_rides_out_a_postgresql_restart_and_its_position_is_stored_after(
    daemon_factory: Callable[..., Daemon], database: str, pg: PgCluster
) -> None:
    daemon = pg_daemon(daemon_factory, "nodeA", database, **FAST).start()
    publish(daemon.ack, "--acked", "--events", "50", "--topics", "1")
    with Subscriber(daemon.subscribe, name="steady", credit=100, ack_interval=0.1) as subscriber:
        first = take(subscriber, 10)
        pg.stop()
        try:
            more = take(subscriber, 10)  # already sent: taken and acknowledged while the database is away
            time.sleep(2)
        finally:
            pg.start()
        rest = take(subscriber, 30)
    assert [e["position"] for e in first + more + rest] == list(range(1, 51))
    assert query(database, "SELECT position FROM consumers WHERE name = 'steady'") == [(50,)]


@pytest.mark.timeout(120)
def test_a_name_taken_on_another_daemon_resumes_after_every_position_acknowledged_before(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    """A consumer restarted on daemon B while its old connection on A still acknowledges: an
    ack A confirmed (``acked``) is either refused or the position B's follower starts after,
    never sent again. B read the stored position before it claimed the name, so an ack A
    stored in between was confirmed to the old connection, and its events sent again to the new.
    (Another session's share lock on the claim row widens that window for the test; the
    daemons' own statements open it as well.)"""
    import psycopg

    a, b = two_daemons(daemon_factory, database)
    publish(a.ack, "--acked", "--events", "100", "--topics", "3")
    old, new = RawConsumer(a.subscribe), RawConsumer(b.subscribe)
    try:
        follow_and_ack(old, "billing", 20, 10)
        with psycopg.connect(database) as holder:
            holder.execute("SELECT * FROM consumer_claims WHERE name = 'billing' FOR SHARE")
            new.send({"op": "subscribe", "name": "billing", "credit": 100})
            time.sleep(0.5)  # B has read the stored position (10) and waits to claim the name
            old.send({"op": "ack", "position": 20})
            assert old.receive() == {"op": "acked", "position": 20}
            holder.rollback()
        subscribed = new.receive()
        assert subscribed["op"] == "subscribed", subscribed
        first = new.events(1)[0]["position"]
        assert (subscribed["after"], first) == (20, 21), "events acknowledged through A are sent again"
    finally:
        old.close()
        new.close()


@pytest.mark.timeout(120)
def test_a_named_consumer_acknowledging_through_an_outage_fills_the_log_with_a_few_lines_not_one_an_ack(
    daemon_factory: Callable[..., Daemon], database: str, pg: PgCluster
) -> None:
    """Each ack the writer could not store was an ERROR line: one every ``ack_interval`` for as
    long as the database was away (thousands in a long outage)."""
    daemon = pg_daemon(daemon_factory, "nodeA", database, **FAST).start()
    publish(daemon.ack, "--acked", "--events", "50", "--topics", "1")
    with Subscriber(daemon.subscribe, name="chatty", credit=100, ack_interval=0.05) as subscriber:
        got = take(subscriber, 10)
        pg.stop()
        try:
            for _ in range(40):  # taken over 2 s, acknowledged (and refused) as they go
                got += take(subscriber, 1)
                time.sleep(0.05)
        finally:
            pg.start()
    assert [e["position"] for e in got] == list(range(1, 51))
    eventually(
        lambda: query(database, "SELECT position FROM consumers WHERE name = 'chatty'") == [(50,)],
        10,
        "the position stored once the database is back",
    )
    failed = [line for line in daemon.log().splitlines() if "storing consumer positions" in line]
    assert 1 <= len(failed) <= 3, "\n".join(failed)
