"""Several daemons on one PostgreSQL: exactly once and gapless across all, through kills and outages.

Runs against a real throwaway PostgreSQL cluster (tests/pg_cluster.py), started once for the
module; each test has a database of its own. Skipped, saying why, where PostgreSQL's binaries
or psycopg are missing.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from harness import SCRIPTS, Daemon, eventually, free_port
from pg_cluster import PgCluster, made_at_version, missing_reason
from test_daemon import check_topic_pages

from actors.postgres import MIGRATIONS, SCHEMA_VERSION
from transport.affinity import rendezvous_order
from transport.publisher import Publisher
from transport.subscriber import Subscriber
from transport.workload import plan

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or ""),
]


def pg_daemon(factory: Callable[..., Daemon], name: str, dsn: str, **sections: dict[str, Any]) -> Daemon:
    overrides: dict[str, dict[str, Any]] = {"storage": {"backend": "postgresql", "dsn": dsn, "node": name}}
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    return factory(name, **overrides)


def query(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of one statement, on a connection of its own."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def assert_stored_once_gapless(dsn: str, expected_keys: set[tuple[str, str]]) -> None:
    """Every expected key stored exactly once, nothing else, and each topic's seqs exactly 1..n."""
    rows = query(dsn, "SELECT topic, event_id, seq, position FROM events")
    keys = [(topic, event_id) for topic, event_id, _, _ in rows]
    assert len(keys) == len(set(keys)) == len(expected_keys)
    assert set(keys) == expected_keys
    seqs: dict[str, list[int]] = defaultdict(list)
    for topic, _, seq, _ in rows:
        seqs[topic].append(seq)
    for topic, numbers in seqs.items():
        assert sorted(numbers) == list(range(1, len(numbers) + 1)), f"{topic}: seqs not gapless from 1"
    positions = sorted(position for *_, position in rows)
    assert positions == list(range(1, len(rows) + 1)), "commit positions not gapless"


def start_publish(endpoints: list[str], *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, str(SCRIPTS / "publish.py"), "--acked", "--json"]
    for endpoint in endpoints:
        command += ["--endpoint", endpoint]
    return subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 240) -> dict[str, Any]:
    import json

    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"publish.py failed ({proc.returncode}):\n{out}\n{err}"
    summary: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return summary


def committed(daemon: Daemon) -> int:
    """Events this daemon has committed (new or duplicate)."""
    stats = daemon.stats()
    return int(stats["unique_processed"] + stats["duplicate_dropped"])


def cluster_answers(daemon: Daemon) -> dict[str, Any]:
    stats = daemon.stats()
    return {
        "cluster": stats["cluster"],
        "topics": daemon.request({"op": "topics"})["topics"],
        "events": [(e["topic"], e["event_id"], e["seq"]) for e in daemon.events()],
        "topic-3": daemon.events("topic-3"),
    }


def test_three_daemons_store_each_event_once_with_gapless_seqs_while_one_is_killed(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    """The same 15 000 events (20 % re-sends) through all three daemons at once; one is SIGKILLed."""
    daemons = [pg_daemon(daemon_factory, f"node{i}", database) for i in range(3)]
    for daemon in daemons:
        daemon.start()
    stream = ["--events", "15000", "--duplicates", "0.2", "--topics", "20", "--seed", "7", "--batch", "100"]
    publishers = [start_publish([d.ack], *stream, "--ack-timeout", "2", "--deadline", "180") for d in daemons]
    victim = daemons[1]
    eventually(lambda: victim.stats()["received"] >= 2000, 120, "daemon 1 committed part of the stream")
    victim.kill()
    victim.start()  # same ports, same node name: its publisher's Lazy Pirate resends reach it
    summaries = [finish(proc) for proc in publishers]
    for summary in summaries:
        assert summary["acked_new"] + summary["acked_duplicate"] == 15000
        assert summary["unacked"] == 0
    unique = {(e["topic"], e["event_id"]) for e in plan(15000, 0.2, 20, 7, "e")}
    assert len(unique) == 12000
    # No acknowledged event is new twice; the killed daemon may have committed some whose acks it
    # never sent (re-sent, they come back as duplicates), so the new ones are at most 12 000.
    assert sum(s["acked_new"] for s in summaries) <= 12000
    for daemon in daemons:
        daemon.wait_idle()
    assert_stored_once_gapless(database, unique)
    cluster = daemons[0].stats()["cluster"]
    assert cluster["unique_processed"] == 12000
    assert cluster["topic_count"] == 20
    assert cluster["received"] == cluster["unique_processed"] + cluster["duplicate_dropped"]
    assert cluster["received"] >= 45000
    assert cluster["received"] == sum(d.stats()["received"] for d in daemons)
    (per_topic,) = query(database, "SELECT sum(received), sum(duplicate_dropped), sum(last_seq) FROM topics")
    assert tuple(per_topic) == (cluster["received"], cluster["duplicate_dropped"], 12000)
    answers = [cluster_answers(daemon) for daemon in daemons]
    assert answers[0] == answers[1] == answers[2]
    assert len(answers[0]["events"]) == 12000


def test_postgresql_outage_under_acked_load_loses_nothing_and_stores_nothing_twice(
    daemon_factory: Callable[..., Daemon], database: str, pg: PgCluster
) -> None:
    """PostgreSQL stopped for several seconds under acknowledged load, then started again."""
    daemons = [pg_daemon(daemon_factory, f"node{i}", database, ingest={"max_in_flight": 2000}) for i in range(2)]
    for daemon in daemons:
        daemon.start()
    # 6 s at 800/s: the outage (from ~0.5 s to ~5 s) comes while both publishers still send.
    stream = ["--events", "5000", "--duplicates", "0.2", "--topics", "10", "--seed", "3", "--rate", "800"]
    publishers = [start_publish([d.ack], *stream, "--ack-timeout", "2", "--deadline", "120") for d in daemons]
    eventually(lambda: all(committed(d) > 300 for d in daemons), 60, "both daemons committing")
    pg.stop()
    try:
        for daemon in daemons:
            health = eventually(
                lambda d=daemon: (
                    (reply := d.request({"op": "health"}))  # type: ignore[misc]
                    and "PostgreSQL" in reply.get("error", "")
                    and reply
                ),
                30,
                "health names the storage outage",
            )
            assert "unavailable" in health["error"] or "cannot connect" in health["error"], health
        frozen = [committed(d) for d in daemons]
        time.sleep(4)  # the outage lasts: nothing may be acknowledged, memory stays bounded
        held = []
        for daemon, before in zip(daemons, frozen):
            assert daemon.proc is not None and daemon.proc.poll() is None, "a daemon died during the outage"
            assert committed(daemon) == before
            stats = daemon.stats()
            assert stats["in_flight"] <= 2000 + 100  # the bound, plus at most the batch that crossed it
            held.append(stats["in_flight"])
    finally:
        pg.start()
    summaries = [finish(proc) for proc in publishers]
    for summary in summaries:
        assert summary["acked_new"] + summary["acked_duplicate"] == 5000
    for daemon, in_flight in zip(daemons, held):
        daemon.wait_idle()
        eventually(lambda d=daemon: "error" not in d.request({"op": "health"}), 30, "health ok again")  # type: ignore[misc]
        # The log counts every event held through the outage, not only the group retried first.
        recovered = re.findall(r"takes writes again; the (\d+) events held meanwhile are committed", daemon.log())
        assert recovered and int(recovered[0]) >= in_flight > 100, (recovered, in_flight)
    unique = {(e["topic"], e["event_id"]) for e in plan(5000, 0.2, 10, 3, "e")}
    assert_stored_once_gapless(database, unique)
    cluster = daemons[0].stats()["cluster"]
    assert cluster["unique_processed"] == len(unique)
    assert cluster["received"] == cluster["unique_processed"] + cluster["duplicate_dropped"]
    assert "WAITING FOR STORAGE" not in daemons[0].log()  # (no systemd here; the status line is unit-tested)
    assert "retrying" in daemons[0].log()


def test_topic_affine_routing_keeps_each_topic_on_one_daemon(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    daemons = [pg_daemon(daemon_factory, f"node{i}", database) for i in range(3)]
    for daemon in daemons:
        daemon.start()
    endpoints = [d.ack for d in daemons]
    events = plan(3000, 0.0, 30, 11, "a")
    with Publisher(endpoints=endpoints, ack_timeout=2.0, deadline=60.0) as publisher:
        publisher.publish_many(events)
        publisher.flush(60)
        assert publisher.totals.acked_new == 3000
    expected = defaultdict(int)
    for event in events:
        expected[rendezvous_order(event["topic"], endpoints)[0]] += 1
    assert len(expected) == 3, "30 topics should spread over all three daemons"
    for daemon in daemons:
        daemon.wait_idle()
        assert daemon.stats()["received"] == expected[daemon.ack]
    # Within one daemon a topic's seqs follow its events' timestamps (one reorder window).
    for topic in ("topic-0", "topic-1"):
        stored = daemons[0].events(topic)
        assert [e["seq"] for e in stored] == list(range(1, 101))
        assert [e["timestamp"] for e in stored] == sorted(e["timestamp"] for e in stored)


def test_a_silent_daemon_loses_its_topics_only_while_it_does_not_acknowledge(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    daemons = [pg_daemon(daemon_factory, f"node{i}", database) for i in range(2)]
    for daemon in daemons:
        daemon.start()
    endpoints = [d.ack for d in daemons]
    topic = next(f"t{i}" for i in range(100) if rendezvous_order(f"t{i}", endpoints)[0] == daemons[0].ack)

    def event(n: int) -> dict[str, Any]:
        return {"topic": topic, "event_id": f"x{n}", "timestamp": f"2025-10-22T10:00:{n:02d}Z", "source": "test"}

    with Publisher(endpoints=endpoints, ack_timeout=1.0, deadline=60.0, batch_size=1) as publisher:
        assert publisher.route(topic) == daemons[0].ack
        publisher.publish(event(0))
        publisher.flush(60)  # daemon 0 answered: its connection is up
        assert daemons[0].proc is not None
        os.kill(daemons[0].proc.pid, signal.SIGSTOP)  # connected, answering nothing
        try:
            publisher.publish(event(1))  # sent to daemon 0, which does not answer
            eventually(lambda: publisher.poll() == 0 or publisher.route(topic) == daemons[1].ack, 30, "fail-over")
            publisher.publish(event(2))  # daemon 0 silent: goes to daemon 1
            # Committed, not only received: daemon 0, resumed, could otherwise commit event 1 first.
            eventually(lambda: daemons[1].stats()["unique_processed"] >= 1, 30, "daemon 1 committed event 2")
        finally:
            os.kill(daemons[0].proc.pid, signal.SIGCONT)
        publisher.flush(60)  # event 1 stayed with daemon 0 (it may have it), which answers again
        assert publisher.route(topic) == daemons[0].ack
        publisher.publish(event(3))
        publisher.flush(60)
    daemons[0].wait_idle()
    # Events 0, 1 and 3 (event 1 may have come twice: first sent before the stop, then resent).
    assert daemons[0].stats()["unique_processed"] == 3
    assert daemons[1].stats()["received"] == 1  # event 2
    assert [e["event_id"] for e in daemons[1].events(topic)] == ["x0", "x2", "x1", "x3"]  # commit order


def test_migrations_run_once_when_daemons_start_together(daemon_factory: Callable[..., Daemon], database: str) -> None:
    daemons = [pg_daemon(daemon_factory, f"node{i}", database) for i in range(3)]
    for daemon in daemons:
        daemon.start(wait=False)
    for daemon in daemons:
        daemon.wait_ready(60)
    # Each step ran once, all by the one daemon that took the migration lock first.
    steps = query(database, "SELECT version, applied_by FROM eventagg_schema ORDER BY version")
    assert [version for version, _node in steps] == list(range(1, SCHEMA_VERSION + 1))
    assert len({node for _version, node in steps}) == 1
    for version in range(1, SCHEMA_VERSION + 1):
        assert sum(f"schema migrated to version {version}\n" in d.log() for d in daemons) == 1
    assert sorted(node for (node,) in query(database, "SELECT node FROM nodes")) == ["node0", "node1", "node2"]


def _startup_failure(daemon: Daemon, status: int = 1) -> str:
    daemon.start(wait=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(60) == status
    output = daemon.log()
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "CRITICAL" in line or "ERROR" in line]
    assert len(lines) == 1, output
    return lines[0]


def serves_a_publisher_and_a_named_consumer(daemon: Daemon) -> None:
    """Twenty events acknowledged as new, and a named consumer (which claims its name) reads one."""
    with Publisher(daemon.ack, ack_timeout=2.0, deadline=30.0) as publisher:
        publisher.publish_many(plan(20, 0.0, 2, 8, "r"))
        publisher.flush(30)
        assert publisher.totals.acked_new == 20
    with Subscriber(daemon.subscribe, name="reader", after=0) as reader:
        assert reader.next_event(10) is not None


def test_bad_dsn_unreachable_server_and_newer_schema_each_give_one_clear_line(
    daemon_factory: Callable[..., Daemon], database: str, pg: PgCluster, tmp_path: Path
) -> None:
    from harness import free_port

    # A dsn that cannot work exits 2, as a refused config does (no restart loop under systemd).
    line = _startup_failure(pg_daemon(daemon_factory, "bad", "host=127.0.0.1 port"), status=2)
    assert "[storage] dsn is not a valid libpq connection string" in line
    for number, port in enumerate(("99999", "5432²", "٥٤٣٢")):  # str.isdigit takes the last two, libpq not
        line = _startup_failure(pg_daemon(daemon_factory, f"port{number}", f"host=127.0.0.1 port={port}"), status=2)
        assert "[storage] dsn names a port that is no port number" in line and port not in line
    # libpq refuses it only when it connects: before, that exited 1, a systemd restart loop.
    line = _startup_failure(pg_daemon(daemon_factory, "ports", "host=127.0.0.1,127.0.0.2 port=5432,5433,5434"), 2)
    assert "[storage] dsn names 3 ports for 2 host(s)" in line, line
    # Hosts libpq takes from PGHOST (or a service file) are its to count: not refused here.
    from actors.pg_session import connect
    from actors.store import StorageError, StorageRefused

    os.environ["PGHOST"] = "127.0.0.1,127.0.0.1"
    try:
        with pytest.raises(StorageError) as failed:
            connect(f"port={free_port()},{free_port()} dbname=x connect_timeout=2", "n", "test")
        assert not isinstance(failed.value, StorageRefused), failed.value
    finally:
        del os.environ["PGHOST"]
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    line = _startup_failure(pg_daemon(daemon_factory, "away", unreachable))
    assert "cannot connect to PostgreSQL 127.0.0.1:" in line and "[storage] dsn" in line
    assert "Connection refused; Is the server running" in line, line  # libpq's two lines kept apart
    query(
        database, "CREATE TABLE eventagg_schema (version integer PRIMARY KEY, applied_at timestamptz, applied_by text)"
    )
    query(database, "INSERT INTO eventagg_schema VALUES (99, now(), 'future')")
    # Exit 2, as for a refused config: under systemd, restarting it could never help.
    line = _startup_failure(pg_daemon(daemon_factory, "old", database), status=2)
    assert "schema is version 99, made by a newer eventagg" in line


def test_pre_1970_events_of_a_new_topic_are_ordered_not_late(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    """As on SQLite: a new topic starts below every instant, not at 1970 (which made every
    pre-1970 event late), and a restart goes on from its stored last instant."""
    import msgpack
    from harness import push_frames

    def ev(event_id: str, second: int) -> dict[str, Any]:
        return {"topic": "old", "event_id": event_id, "timestamp": f"1960-01-01T00:00:0{second}Z", "source": "s"}

    def order() -> list[tuple[str, bool]]:
        return [(event["event_id"], event["late"]) for event in daemon.events("old")]

    daemon = pg_daemon(daemon_factory, "old", database, ordering={"window_ms": 1000}).start()
    push_frames(daemon.ingest, [msgpack.packb([ev("e3", 3), ev("e1", 1), ev("e2", 2)])])
    daemon.wait_stats(unique_processed=3)
    assert order() == [("e1", False), ("e2", False), ("e3", False)]
    assert daemon.terminate() == 0
    daemon.start()
    push_frames(daemon.ingest, [msgpack.packb([ev("e4", 4)])])
    daemon.wait_stats(unique_processed=4)
    push_frames(daemon.ingest, [msgpack.packb([ev("e0", 0)])])
    daemon.wait_stats(unique_processed=5)
    assert order()[3:] == [("e4", False), ("e0", True)]
    assert query(database, "SELECT late FROM topics WHERE topic = 'old'") == [(1,)]


# The migration to this version reads every stored topic's events (its last instant).
LAST_INSTANT_VERSION = 7


def test_a_topic_stuck_at_1970_by_an_older_schema_gets_its_real_last_instant(database: str) -> None:
    from actors.pg_session import connect
    from actors.postgres import migrate
    from actors.store import NO_TIMESTAMP

    with made_at_version(database, LAST_INSTANT_VERSION - 1) as conn:
        conn.execute("INSERT INTO topics (topic, last_seq) VALUES ('old', 2), ('new', 0), ('now', 1)")
        conn.execute("UPDATE topics SET last_ts_ns = 5 WHERE topic = 'now'")
        conn.execute(
            "INSERT INTO events (topic, event_id, seq, position, timestamp, ts_ns, source, payload, received_at)"
            " VALUES ('old', 'a', 1, 1, '', -300, 's', '', 0), ('old', 'b', 2, 2, '', -100, 's', '', 0),"
            " ('now', 'c', 1, 3, '', 5, 's', '', 0)"
        )
    writer = connect(database, "writer", "test")
    try:
        assert migrate(writer, "writer") == SCHEMA_VERSION
    finally:
        writer.close()
    assert sorted(query(database, "SELECT topic, last_ts_ns FROM topics")) == [
        ("new", NO_TIMESTAMP),
        ("now", 5),
        ("old", -100),
    ]


def test_a_migration_longer_than_a_start_allows_names_eventagg_migrate_which_has_time(
    database: str, tmp_path: Path
) -> None:
    """A migration the daemon's statement timeout cancelled (a large database) was tried again,
    and cancelled again, at every start: nothing said how to get past it."""
    import psycopg

    from actors.pg_session import connect
    from actors.postgres import migrate
    from actors.store import StorageError

    with made_at_version(database, LAST_INSTANT_VERSION - 1) as conn:
        # Its next migration reads each stored topic's events: 200 000 topics make it slow.
        conn.execute("INSERT INTO topics (topic, last_seq) SELECT 't' || n, 1 FROM generate_series(1, 200000) AS n")
    conn = connect(database, "starting", "test")
    try:
        with pytest.raises(StorageError, match=r"took over 0.01 s .* Run `eventagg migrate --config PATH` once"):
            migrate(conn, "starting", budget_s=0.01)
        # A session holding a table the migration alters: it waits 2 s, not its whole budget,
        # since the daemons' writes queue behind it meanwhile, and names the session.
        with psycopg.connect(database, application_name="a long report") as holder:
            holder.execute("LOCK TABLE topics IN SHARE MODE")
            started = time.monotonic()
            with pytest.raises(
                StorageError, match=r"waited over 2 s for a table lock .*\(a long report, idle in transaction"
            ):
                migrate(conn, "starting")
            assert time.monotonic() - started < 5
    finally:
        conn.close()
    assert query(database, "SELECT max(version) FROM eventagg_schema") == [(LAST_INSTANT_VERSION - 1,)]
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\nbackend = "postgresql"\ndsn = "{database}"\nnode = "ops"\n')

    def run_migrate(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "actors.cli", "migrate", "--config", str(config), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    short = run_migrate("--timeout", "0.01")
    assert short.returncode == 1 and "took over 0.01 s" in short.stderr and "with --timeout" in short.stderr, short
    huge = run_migrate("--timeout", "1e7")
    assert huge.returncode == 2 and "to 2147483" in huge.stderr, huge
    tiny = run_migrate("--timeout", "0.0004")  # 0 ms, which PostgreSQL reads as no timeout
    assert tiny.returncode == 2 and "from 0.001 to" in tiny.stderr, tiny
    migrated = run_migrate()
    assert migrated.returncode == 0, migrated.stderr
    assert re.fullmatch(
        rf"migrated the schema from version {LAST_INSTANT_VERSION - 1} to {SCHEMA_VERSION} in \S+ s\n",
        migrated.stdout,
    )
    assert query(database, "SELECT applied_by FROM eventagg_schema WHERE version = %s", (SCHEMA_VERSION,)) == [
        ("ops (eventagg migrate)",)
    ]
    again = run_migrate()
    assert again.returncode == 0 and "already; nothing to do" in again.stdout, again


def test_a_schema_lock_held_too_long_is_named_instead_of_an_actor_that_did_not_start(database: str) -> None:
    import psycopg

    from actors.pg_session import connect
    from actors.postgres import MIGRATION_LOCK, migrate
    from actors.store import StorageError

    with psycopg.connect(database, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        conn = connect(database, "waiting", "test")
        try:
            started = time.monotonic()
            with pytest.raises(StorageError, match=r"another session has held eventagg's schema lock for 1 s"):
                migrate(conn, "waiting", lock_wait_s=1.0)
            assert 1.0 <= time.monotonic() - started < 3
            holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
            assert migrate(conn, "waiting", lock_wait_s=1.0) == SCHEMA_VERSION  # then it goes on
        finally:
            conn.close()


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://eventagg:S3CRET-PW@[2001:db8::1]x/eventagg",  # libpq quotes the whole URI
        "postgresql://u:S3CRET-PW@[::1/x",
        "postgresql://u@[::1/x?password=S3CRET-PW",
        "host=[::1 password='S3CRET-PW' port",
    ],
)
def test_a_dsn_libpq_cannot_parse_is_refused_without_showing_its_password(dsn: str) -> None:
    from actors.pg_session import connect
    from actors.store import StorageError

    with pytest.raises(StorageError, match=r"dsn is not a valid libpq connection string") as refused:
        connect(dsn, "node", "test")
    assert "S3CRET" not in str(refused.value), refused.value


@pytest.mark.parametrize(
    ("dsn", "piece"),
    [
        ("postgresql://eventagg:Tr0ub4dor/3@db.invalid/eventagg", "Tr0ub4dor"),  # its first piece is the port
        ("postgresql://u:topse@cretpart@127.0.0.1:1/db", "cretpart"),  # its second piece is in the host
    ],
)
def test_a_uri_password_with_an_unencoded_slash_or_at_is_not_shown(dsn: str, piece: str) -> None:
    """libpq cuts such a password at the "/" or the first "@", and takes a piece for the port
    or the host: the log and `eventagg migrate` printed it as where the daemon could not connect."""
    from actors.pg_session import connect, describe_dsn
    from actors.store import StorageError

    assert piece not in describe_dsn(dsn)
    with pytest.raises(StorageError, match="cannot connect to PostgreSQL|names a port that is no port") as refused:
        connect(dsn, "node", "test")
    assert piece not in str(refused.value), refused.value


def test_lookups_bring_back_the_content_of_what_they_find(database: str) -> None:
    """As with SQLite: a key found in ``events`` comes back with its stored (timestamp, source,
    payload hex), the hex None past CONTENT_BACK_BYTES; the ordering actor settles an exact
    re-send with it."""
    from actors.postgres import PostgresStore
    from actors.store import CONTENT_BACK_BYTES, TopicDelta

    big = b"\xab" * (CONTENT_BACK_BYTES + 1)
    group = [
        ("t", "small", 0, "2025-10-22T10:00:00Z", 1, "src", b"\x81\xa1n\x01", 0.0, 0),
        ("t", "odd", 0, "2025-10-22T10:00:00.5Z", 2, 'a"b\\é', b"", 0.0, 0),
        ("t", "big", 0, "2025-10-22T10:00:02Z", 3, "src", big, 0.0, 0),
    ]
    store = PostgresStore(database, "writer")
    store.open()
    try:
        assert store.write(group, {"t": TopicDelta(received=3)}, {"received": 3}).totals["unique_processed"] == 3
        existing, contents = store.lookup([("t", "small"), ("t", "odd"), ("t", "big"), ("t", "absent")])
    finally:
        store.close()
    assert existing == {("t", "small"), ("t", "odd"), ("t", "big")}
    assert contents == {
        ("t", "small"): ("2025-10-22T10:00:00Z", "src", "81a16e01"),
        ("t", "odd"): ("2025-10-22T10:00:00.5Z", 'a"b\\é', ""),
        ("t", "big"): ("2025-10-22T10:00:02Z", "src", None),
    }


def test_a_commit_whose_answer_was_lost_is_resolved_by_the_retry(database: str) -> None:
    """The writer's own resolution of an unknown COMMIT outcome, against the real database.

    Losing exactly the COMMIT's answer cannot be arranged from outside, so the writer is put
    in the state such a loss leaves (the outcome kept, the connection gone) after a COMMIT
    that did (then did not) take effect, and the retry of the same group must tell which.
    """
    from actors.postgres import PostgresStore
    from actors.store import TopicDelta

    def rows(*ids: str) -> list[Any]:
        return [
            ("t", event_id, 0, "2025-10-22T10:00:00Z", n, "test", b"\x80", 0.0, 0) for n, event_id in enumerate(ids)
        ]

    def close(store: PostgresStore) -> None:
        # The server ends a closed session (and frees its node lock, which the next write's
        # session takes without waiting) a moment later: on a loaded machine, later than that.
        store.close()
        eventually(
            lambda: (
                not query(database, "SELECT 1 FROM pg_stat_activity WHERE application_name = 'eventagg writer writer'")
                or None
            ),
            10,
            "the closed session ended",
        )

    store = PostgresStore(database, "writer")
    store.open()
    group = rows("a", "b")
    outcome = store.write(group, {"t": TopicDelta(received=2)}, {"received": 2})
    assert outcome.totals["unique_processed"] == 2
    # The COMMIT took effect but its answer was lost: the retry must not count the group again.
    store._unknown, store._last_txn = (1, outcome), 0
    close(store)
    again = store.write(group, {"t": TopicDelta(received=2)}, {"received": 2})
    assert again is outcome
    # The COMMIT did not take effect: the retry writes the group (here, a new one).
    store._unknown = (2, outcome)
    close(store)
    third = store.write(rows("b", "c"), {"t": TopicDelta(received=2)}, {"received": 2})
    assert third.duplicates == [0] and third.totals["unique_processed"] == 1
    store.close()
    assert query(database, "SELECT event_id, seq FROM events ORDER BY seq") == [("a", 1), ("b", 2), ("c", 3)]
    assert query(database, "SELECT received, unique_processed, duplicate_dropped, last_txn FROM nodes") == [
        (4, 3, 1, 2)
    ]


def test_systemd_hears_of_the_outage_and_the_watchdog_keeps_being_fed(
    daemon_factory: Callable[..., Daemon], database: str, pg: PgCluster, tmp_path: Path
) -> None:
    from harness import env_with
    from test_sdnotify import NotifyListener, max_gap

    listener = NotifyListener(str(tmp_path / "notify.sock"))
    try:
        daemon = pg_daemon(daemon_factory, "node0", database)
        daemon.start(env=env_with(NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="3000000"))
        listener.wait_for("READY=1", 30)
        publisher = start_publish(
            [daemon.ack],
            "--events",
            "800",  # 2.7 s at 300/s: what is not yet acknowledged when the outage begins waits through it
            "--topics",
            "5",
            "--rate",
            "300",
            "--ack-timeout",
            "2",
            "--deadline",
            "120",
        )
        eventually(lambda: committed(daemon) > 200, 60, "events committed before the outage")
        pg.stop()
        stopped_at = time.monotonic()
        try:
            eventually(
                lambda: any("WAITING FOR STORAGE" in value for value in listener.values("STATUS")),
                30,
                "a STATUS= line saying the daemon waits for its storage",
            )
            # An outage of 6 s: > WatchdogSec, and long enough that the writer's retry pauses
            # (0.1 s doubling: 0.1 .. 3.2 s) reach one longer than WatchdogSec while it lasts.
            time.sleep(max(0.0, stopped_at + 6 - time.monotonic()))
        finally:
            pg.start()
        assert daemon.proc is not None and daemon.proc.poll() is None
        during = [at for at in listener.times("WATCHDOG=1") if at >= stopped_at]
        # WatchdogSec=3: a gap of 3 s would get the service killed; checks come every 1.5 s.
        assert len(during) >= 3 and max_gap([stopped_at, *during]) < 3.0, "watchdog pings stopped in the outage"
        assert finish(publisher)["unacked"] == 0
        eventually(lambda: "WAITING FOR STORAGE" not in listener.values("STATUS")[-1], 30, "STATUS back to normal")
    finally:
        listener.close()


@pytest.mark.timeout(180)
def test_a_lock_held_on_the_events_table_does_not_starve_the_watchdog(
    daemon_factory: Callable[..., Daemon], database: str, tmp_path: Path
) -> None:
    """Another session holds an ACCESS EXCLUSIVE lock (as VACUUM FULL or ALTER TABLE would) for
    longer than WatchdogSec: the daemon's statements give up and retry, so it keeps answering."""
    import psycopg
    from harness import env_with
    from test_sdnotify import NotifyListener, max_gap

    listener = NotifyListener(str(tmp_path / "notify.sock"))
    try:
        daemon = pg_daemon(daemon_factory, "node0", database)
        daemon.start(env=env_with(NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="3000000"))
        listener.wait_for("READY=1", 30)
        # 3.5 s of events at 200/s: still being sent when the lock is taken, their acks then held
        # back behind it, and the rest sent once it is released.
        stream = ["--events", "700", "--topics", "5", "--rate", "200", "--ack-timeout", "2", "--deadline", "120"]
        publisher = start_publish([daemon.ack], *stream)
        eventually(lambda: committed(daemon) > 100, 60, "events committed before the lock")
        with psycopg.connect(database) as locker:
            locker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            locked_at = time.monotonic()
            time.sleep(4.5)  # > WatchdogSec=3
            locker.rollback()
        during = [at for at in listener.times("WATCHDOG=1") if locked_at <= at <= locked_at + 4.5]
        # Checks come every 1.5 s; a gap of 3 s would get the service killed.
        assert max_gap([locked_at, *during, locked_at + 4.5]) < 3.0, "watchdog pings stopped behind the lock"
        assert finish(publisher)["unacked"] == 0
        assert daemon.proc is not None and daemon.proc.poll() is None
    finally:
        listener.close()


def test_a_version_1_database_is_migrated_and_its_node_keeps_its_counters(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    import psycopg

    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE eventagg_schema (version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now(), applied_by text NOT NULL)"
        )
        conn.execute(MIGRATIONS[0])
        conn.execute("INSERT INTO eventagg_schema (version, applied_by) VALUES (1, 'old')")
        conn.execute("INSERT INTO nodes (node, received, unique_processed) VALUES ('node0', 7, 5)")
    daemon = pg_daemon(daemon_factory, "node0", database)
    daemon.start()
    stats = daemon.stats()
    assert (stats["received"], stats["unique_processed"], stats["stored"]) == (7, 5, 5)
    assert (stats["expired"], stats["conflicting_duplicates"]) == (0, 0)
    versions = [version for (version,) in query(database, "SELECT version FROM eventagg_schema ORDER BY version")]
    assert versions == list(range(1, SCHEMA_VERSION + 1))


def test_pages_stop_at_max_page_bytes_and_name_the_first_stored_event(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    daemon = pg_daemon(daemon_factory, "node0", database, query={"max_page_bytes": 250_000})
    daemon.start()
    assert daemon.request({"op": "events", "topic": "fat"})["first"] == 1  # nothing stored yet
    with Publisher(endpoints=[daemon.ack], deadline=60.0, batch_size=5) as publisher:
        for n in range(5):
            publisher.publish(
                {
                    "topic": "fat",
                    "event_id": f"e{n}",
                    "timestamp": f"2025-10-22T10:00:0{n}Z",
                    "source": "test",
                    "payload": {"blob": b"x" * 100_000},
                }
            )
        publisher.flush(60)
    for query_ in ({"op": "events", "topic": "fat"}, {"op": "events"}):
        pages: list[list[str]] = []
        after = 0
        while True:
            reply = daemon.request({**query_, "after": after, "limit": 100})
            assert reply["first"] == 1
            if not reply["events"]:
                break
            pages.append([event["event_id"] for event in reply["events"]])
            after = reply["next"]
        # Two payloads of ~100 kB fit in 250 kB, a third does not.
        assert pages == [["e0", "e1"], ["e2", "e3"], ["e4"]]
    tiny = pg_daemon(daemon_factory, "node1", database, query={"max_page_bytes": 1})
    tiny.start()
    reply = tiny.request({"op": "events", "topic": "fat", "limit": 100})
    assert [event["event_id"] for event in reply["events"]] == ["e0"]  # a page always holds one event


@pytest.mark.timeout(180)
def test_a_topic_first_seen_while_the_connection_is_stale_is_stored_once_postgresql_is_back(
    daemon_factory: Callable[..., Daemon], database: str, pg: PgCluster
) -> None:
    """After a PostgreSQL restart the writer's connection is dead: the lookup of a new topic
    fails, and its events must wait for the write (which reconnects), not stop the daemon."""
    daemon = pg_daemon(daemon_factory, "node0", database).start()
    with Publisher(daemon.ack, ack_timeout=2.0, deadline=60.0) as publisher:
        publisher.publish_many(plan(100, 0.0, 1, 5, "before"))
        publisher.flush(60)
    pg.stop()
    pg.start()
    events = [dict(event, topic="after-restart") for event in plan(50, 0.0, 1, 6, "after")]
    with Publisher(daemon.ack, ack_timeout=2.0, deadline=60.0) as publisher:
        publisher.publish_many(events)
        publisher.flush(60)
        assert publisher.totals.acked_new == 50
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert "error" not in daemon.request({"op": "health"})
    rows = query(database, "SELECT seq FROM events WHERE topic = 'after-restart' ORDER BY seq")
    assert [seq for (seq,) in rows] == list(range(1, 51))
    assert "Unhandled exception" not in daemon.log()


@pytest.mark.timeout(120)
def test_a_role_without_create_runs_a_daemon_on_a_database_its_owner_migrated(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    owner = pg_daemon(daemon_factory, "owner", database).start()
    assert owner.terminate() == 0
    for statement in (
        "DROP ROLE IF EXISTS eventagg_runtime",
        "CREATE ROLE eventagg_runtime LOGIN",
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
        "GRANT USAGE ON SCHEMA public TO eventagg_runtime",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO eventagg_runtime",
    ):
        query(database, statement)
    runtime_dsn = database.replace("postgresql://postgres@", "postgresql://eventagg_runtime@")
    # The tables' privileges leave out the sequence that named consumers' claims are numbered
    # from: the start is refused, naming the GRANT, rather than every named subscriber being
    # refused later (tests/test_postgres_grants.py has the rest of what a start checks).
    line = _startup_failure(pg_daemon(daemon_factory, "short", runtime_dsn), status=2)
    assert "GRANT USAGE ON SEQUENCE public.consumer_claim_numbers TO eventagg_runtime" in line, line
    query(database, "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO eventagg_runtime")  # as docs/postgresql.md says
    daemon = pg_daemon(daemon_factory, "runtime", runtime_dsn).start()
    assert "consumer_claim_numbers" not in daemon.log()
    serves_a_publisher_and_a_named_consumer(daemon)


def test_a_page_of_every_topic_gives_each_event_its_commit_position(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    daemon = pg_daemon(daemon_factory, "node0", database).start()
    with Publisher(endpoints=[daemon.ack], deadline=60.0) as publisher:
        publisher.publish_many(plan(20, 0.0, 2, 9, "p"))
        publisher.flush(60)
    page = daemon.request({"op": "events", "after": 5, "limit": 3})
    assert [event["position"] for event in page["events"]] == [6, 7, 8] and page["next"] == 8
    assert all("position" not in e for e in daemon.request({"op": "events", "topic": "topic-0"})["events"])


def test_the_topics_listing_pages_by_name(daemon_factory: Callable[..., Daemon], database: str) -> None:
    check_topic_pages(pg_daemon(daemon_factory, "node0", database, query={"max_limit": 4}).start())


@pytest.mark.timeout(120)
def test_an_event_with_a_nul_in_its_id_or_source_is_refused_and_the_daemon_keeps_writing(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    """PostgreSQL's text columns cannot hold NUL: such an event is refused at ingest with its
    reason, instead of a group its writer retries for ever."""
    from test_retention import Acked, event

    daemon = pg_daemon(daemon_factory, "node0", database).start()
    publisher = Acked(daemon.ack)
    try:
        reply = publisher.send([event(1, event_id="id\x00nul"), event(2, source="src\x00"), event(3)])
        assert reply["new"] == 1, reply
        assert [index for index, _ in reply["rejected"]] == [0, 1]
        assert all("NUL" in reason and "PostgreSQL" in reason for _, reason in reply["rejected"])
        assert publisher.send([event(n) for n in range(4, 14)])["new"] == 10
    finally:
        publisher.close()
    assert daemon.wait_idle()["rejected"] == 2


def test_a_refusal_is_counted_in_rejected_by_the_time_it_is_answered(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    from test_raw_protocol import assert_refusals_counted_when_answered

    assert_refusals_counted_when_answered(pg_daemon(daemon_factory, "node0", database).start())


def test_a_hung_server_leaves_stats_and_health_answering_and_the_daemon_writing_once_it_wakes(
    daemon_factory: Callable[..., Daemon], database: str, pg: PgCluster
) -> None:
    """A server that stops answering (SIGSTOP: sockets open, keepalives acknowledged by the
    kernel) is not an outage libpq notices: stats and health must still answer, saying so."""
    from test_retention import Acked, event

    daemon = pg_daemon(daemon_factory, "node0", database).start()
    publisher = Acked(daemon.ack)
    try:
        assert publisher.send([event(n) for n in range(10)])["new"] == 10
        assert "cluster" in daemon.stats()
        with pg.frozen():
            started = time.monotonic()
            stats = daemon.request({"op": "stats"}, timeout=10)
            health = daemon.request({"op": "health"}, timeout=10)
            waited = time.monotonic() - started
            assert stats["unique_processed"] == 10, stats
            assert "did not answer" in stats["cluster_error"], stats
            assert "did not answer" in health["error"] or "cannot connect" in health["error"], health
            assert waited < 10, waited
        assert publisher.send([event(n) for n in range(10, 20)])["new"] == 10
        eventually(lambda: "cluster" in daemon.stats() or None, timeout=30, what="the cluster counters again")
    finally:
        publisher.close()


def test_a_stats_that_must_connect_while_the_server_hangs_waits_no_longer_than_its_bound(
    daemon_factory: Callable[..., Daemon], database: str, pg: PgCluster
) -> None:
    """A reader whose connection a server restart ended connects again at the next stats: while
    the server hangs, that took connect_timeout (3 s) to say so, past a client's 2 s patience."""
    daemon = pg_daemon(daemon_factory, "node0", database).start()
    assert "cluster" in daemon.stats()
    pg.stop()
    pg.start()
    with pg.frozen():
        started = time.monotonic()
        stats = daemon.request({"op": "stats"}, timeout=10)
        waited = time.monotonic() - started
        assert "cluster_error" in stats, stats
        assert waited < 1.5, f"stats took {waited:.2f} s"
    eventually(lambda: "cluster" in daemon.stats() or None, timeout=30, what="the cluster counters once it wakes")


def daemon_with_one_event(factory: Callable[..., Daemon], database: str) -> Daemon:
    """Daemon "b", started, with one acknowledged event stored (its topic's row exists)."""
    from test_retention import Acked, event

    daemon = pg_daemon(factory, "b", database).start()
    publisher = Acked(daemon.ack)
    try:
        assert publisher.send([event(0)])["new"] == 1
    finally:
        publisher.close()
    return daemon


@contextlib.contextmanager
def batch_sent(daemon: Daemon) -> Iterator[None]:
    """One acknowledged batch sent to ``daemon``, its answer left waiting while the block runs."""
    import zmq
    from test_retention import event

    context: zmq.Context[Any] = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(daemon.ack)
    try:
        dealer.send(msgpack.packb({"batch": 1, "events": [event(1)]}))
        yield
    finally:
        dealer.close(linger=0)
        context.term()


def test_a_daemon_killed_while_its_writer_waits_on_a_lock_restarts_under_its_name(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    """The killed daemon's session, waiting on a row lock, reads nothing from its socket, so the
    server did not see it closed until the statement timed out (30 s): the restarted daemon found
    its node lock held and was refused, told to rename a node no other daemon used."""
    import psycopg

    daemon = daemon_with_one_event(daemon_factory, database)
    (topic,) = query(database, "SELECT topic FROM topics")[0]
    with psycopg.connect(database) as holder:  # a transaction of its own, holding the topic's row
        holder.execute("SELECT 1 FROM topics WHERE topic = %s FOR UPDATE", (topic,))
        with batch_sent(daemon):
            eventually(
                lambda: (
                    query(
                        database,
                        "SELECT 1 FROM pg_stat_activity"
                        " WHERE application_name = 'eventagg b writer' AND wait_event_type = 'Lock'",
                    )
                    or None
                ),
                20,
                "the writer waiting on the row lock",
            )
            daemon.kill()
            started = time.monotonic()
            daemon.start(timeout=30)
            took = time.monotonic() - started
        holder.rollback()
    assert "uses node name" not in daemon.log()
    assert took < 15, f"the restart took {took:.1f} s"


def test_health_names_the_session_whose_lock_the_writer_waits_for(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    """A daemon paused in a commit holds the positions row every commit takes: the others' health
    said only that their writer did not answer, not who held them up."""
    import psycopg

    daemon = daemon_with_one_event(daemon_factory, database)
    assert daemon.request({"op": "health"})["status"] == "ok"
    # As a paused daemon's writer would: a transaction of its own, holding the positions row.
    with psycopg.connect(database, application_name="eventagg paused writer") as holder:
        holder.execute("SELECT 1 FROM positions FOR UPDATE")
        (holder_pid,) = holder.execute("SELECT pg_backend_pid()").fetchone()  # type: ignore[misc]
        with batch_sent(daemon):
            started = time.monotonic()
            health = eventually(
                lambda: (
                    reply
                    if "lock" in (reply := daemon.request({"op": "health"}, timeout=10)).get("error", "")
                    else None
                ),
                20,
                "health naming the lock",
            )
            took = time.monotonic() - started
        holder.rollback()
    assert (
        f"waits for a lock held by session {holder_pid} (eventagg paused writer, idle in transaction" in health["error"]
    ), health
    assert took < 10, took
    eventually(
        lambda: daemon.request({"op": "health"}).get("status") == "ok" or None, 20, "health ok once the lock is gone"
    )


def test_health_stays_ok_while_two_daemons_take_turns_at_the_commit_lock(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    """Every commit takes the positions row, so under load each writer waits for the other's lock
    many times a second: health named those ordinary waits as a stuck daemon (2 polls in 46)."""
    import threading

    from test_gateway import event as http_event

    a = pg_daemon(daemon_factory, "a", database).start()
    b = pg_daemon(daemon_factory, "b", database).start()
    stop = threading.Event()

    def pump(daemon: Daemon, topic: str) -> None:
        with Publisher(daemon.ack, acked=True) as publisher:
            n = 0
            while not stop.is_set():
                publisher.publish(http_event(topic=topic, event_id=f"{topic}{n}"))
                n += 1
                # A few hundred events a second each still commit many times a second (what the
                # test is about), without starving a loaded machine until a ping takes 2 s.
                time.sleep(0.002)

    pumps = [threading.Thread(target=pump, args=(d, t)) for d, t in ((a, "ta"), (b, "tb"))]
    for thread in pumps:
        thread.start()
    errors = []
    try:
        eventually(
            lambda: (a.stats()["unique_processed"] > 100 and b.stats()["unique_processed"] > 100) or None,
            30,
            "both committing",
        )
        for _ in range(80):
            reply = a.request({"op": "health"})
            if "error" in reply:
                errors.append(reply["error"])
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in pumps:
            thread.join(30)
    assert not errors, errors[:2]


def test_the_server_side_keepalives_are_set_unless_configured(database: str) -> None:
    """After a partition the server must end the writer's old session (and free its node lock)
    within seconds: its side of the keepalives is set, unless the server or database sets it."""
    from actors.pg_session import connect

    query(database, f"ALTER DATABASE {database.rsplit('/', 1)[1]} SET tcp_keepalives_count = 7")
    conn = connect(database, "node0", "writer")
    try:
        shown = {
            name: conn.execute(f"SHOW {name}").fetchone()[0]
            for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "tcp_user_timeout")
        }
    finally:
        conn.close()
    assert shown == {
        "tcp_keepalives_idle": "5",
        "tcp_keepalives_interval": "2",
        "tcp_keepalives_count": "7",
        "tcp_user_timeout": "10000",
    }, shown


def test_an_idle_writer_holds_its_node_lock_again_soon_after_a_server_restart(
    daemon_factory: Callable[..., Daemon], database: str, pg: PgCluster
) -> None:
    """Else a second daemon started with the same node name meanwhile would take it, and the
    two would mix their counters."""
    pg_daemon(daemon_factory, "node0", database).start()

    def writer_locks() -> int:
        ((count,),) = query(
            database,
            "SELECT count(*) FROM pg_locks AS l JOIN pg_stat_activity AS a USING (pid)"
            " WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = 'eventagg node0 writer'",
        )
        return int(count)

    assert writer_locks() == 1
    pg.stop()
    pg.start()
    assert writer_locks() == 0
    eventually(lambda: writer_locks() == 1 or None, timeout=20, what="the idle writer's node lock, held again")


def test_the_gateway_gives_this_daemons_metrics_beside_the_clusters_and_names_a_storage_outage(
    daemon_factory: Callable[..., Daemon], database: str, pg: PgCluster
) -> None:
    """/metrics of a gateway in front of one daemon: its own figures as eventagg_*, the whole
    cluster's as eventagg_cluster_*; with the server down, /publish says the storage is down
    (not "overloaded") and the events it held are stored once the server is back."""
    from test_gateway import Gateway, scrape
    from test_gateway import event as http_event
    from test_retention import Acked, event

    port = free_port()
    http = {"bind": f"127.0.0.1:{port}", "request_timeout_ms": 3000}
    front = pg_daemon(daemon_factory, "front", database, http=http).start()
    other = pg_daemon(daemon_factory, "other", database).start()
    gateway = Gateway(front, f"http://127.0.0.1:{port}").start()
    publisher = Acked(other.ack)
    try:
        sent = gateway.publish({"events": [http_event(topic="via-http", event_id=f"h-{n}") for n in range(4)]})
        assert sent.status_code == 200, sent.text
        assert publisher.send([event(n, topic="direct") for n in range(6)])["new"] == 6
        assert publisher.send([event(n, topic="direct") for n in range(2)])["duplicate"] == 2
        front.wait_idle()
        other.wait_idle()
        samples = scrape(gateway)
        cluster = front.stats()["cluster"]
        own = {name: samples[name][0] for name in ("eventagg_unique_processed_total", "eventagg_topics")}
        assert own == {"eventagg_unique_processed_total": 4, "eventagg_topics": 1}, samples
        assert "this daemon" in samples["eventagg_unique_processed_total"][1]
        assert samples["eventagg_cluster_up"][0] == 1
        expected = {
            "eventagg_cluster_received_total": 12,
            "eventagg_cluster_unique_processed_total": 10,
            "eventagg_cluster_duplicate_dropped_total": 2,
            "eventagg_cluster_stored": 10,
            "eventagg_cluster_topics": 2,
        }
        assert {name: samples[name][0] for name in expected} == expected, samples
        for key in ("received", "unique_processed", "duplicate_dropped", "rejected", "late", "expired"):
            assert samples[f"eventagg_cluster_{key}_total"][0] == cluster[key], key
        stats = gateway.client.get("/stats").json()  # the original service's total: every topic there is
        assert (stats["total_topics"], stats["topic_count"]) == (2, 1), stats

        pg.stop()
        try:
            held = gateway.publish(http_event(topic="via-http", event_id="during-the-outage"))
            assert held.status_code == 503, held.text
            said = held.json()["error"]
            assert said.startswith("the daemon cannot store events now: ") and "PostgreSQL" in said, said
            assert "overloaded" not in said and "publishing them again is safe" in said, said
            samples = scrape(gateway)
            assert samples["eventagg_up"][0] == 1 and samples["eventagg_cluster_up"][0] == 0, samples
            stats = gateway.client.get("/stats").json()  # not this daemon's share passed off as the total
            assert stats["total_topics"] is None and "cluster_error" in stats, stats
            assert [name for name in samples if name.startswith("eventagg_cluster_")] == ["eventagg_cluster_up"]
        finally:
            pg.start()
        front.wait_stats(unique_processed=5, in_flight=0)
        assert "storage_error" not in front.stats()

        with pg.frozen():  # hung, not down: no commit has failed yet when the request's time is up
            held = gateway.publish(http_event(topic="via-http", event_id="while-frozen"))
            assert held.status_code == 503, held.text
            said = held.json()["error"]
            assert said.startswith("the daemon cannot store events now: storage PostgreSQL"), said
            frozen_samples = scrape(gateway)
            assert frozen_samples.get("eventagg_cluster_up", (None,))[0] == 0, frozen_samples
        front.wait_stats(unique_processed=6, in_flight=0)
    finally:
        publisher.close()
        gateway.stop()
