"""Databases as older releases left them, opened by today's daemon: what their users saw wrong is
gone. Real daemons, real sockets, real SQLite and PostgreSQL, retention really sweeping; the
database is then put back in the state the older release left it in, and a daemon of today
started on it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon
from pg_cluster import missing_reason
from test_postgres import query
from test_postgres_retention import topic_row, wait_cluster
from test_retention import QUICK, Acked, event
from test_sqlite_import import run_migrate
from test_subscribe_retention import follow, subscribed

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

needs_postgresql = pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")

# SQLite step 4 and PostgreSQL migration 6 as 373c10c released them (until 773e063) added
# expired_position at 0 and filled in nothing; so did SQLite step 2 and PostgreSQL migration 7 as
# 0d2424c and efec7ae released them (until f01048b) for a topic stuck at 1970 with no event
# stored. The versions a database they migrated is at.
SQLITE_LEFT_AT = 4
POSTGRESQL_LEFT_AT = 8  # releases before 773e063 added migrations 7 and 8 too

RETENTION = {**QUICK, "max_events_per_topic": 10}


def store_a_with_its_first_ten_deleted(daemon: Daemon, deleted: Callable[[], Any]) -> None:
    """Commit order z0-z9 (1-10), a0-a19 (11-30); a limit of 10 events a topic deletes a0-a9
    (11-20), and ``deleted`` waits for that. The daemon is stopped."""
    publisher = Acked(daemon.ack)
    try:
        publisher.send([event(n, topic="z") for n in range(10)])
        publisher.send([event(n, topic="a") for n in range(20)])
        deleted()
    finally:
        publisher.close()
    assert daemon.terminate() == 0


def as_the_older_sqlite_release_left_it(path: Path) -> None:
    """The older release's version, and each topic's last deleted position 0 (unknown), as its
    step 4 left every topic retention had deleted from before it. The steps since change rows
    only, no table's shape."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("UPDATE topic_retention SET expired_position = 0")
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SQLITE_LEFT_AT),))
        conn.commit()
    finally:
        conn.close()


def assert_a_filtered_follower_is_told_of_a_s_deletions(daemon: Daemon) -> None:
    """Left at 0, a follower of topic a from position 5 was sent a10-a19 (21-30) with no notice
    that a0-a9, after where it started, were deleted: a consumer replaying from 5 took seq 11 for
    a's first event."""
    consumer = subscribed(daemon, topics=["a"], after=5, credit=100)
    try:
        got = [m if m["op"] == "expired" else [e["position"] for e in m["events"]] for m in follow(consumer, 30)]
    finally:
        consumer.close()
    assert got == [{"op": "expired", "after": 5, "first": 21}, list(range(21, 31))]


def pg_daemon(daemon_factory: Callable[..., Daemon], database: str) -> Daemon:
    return daemon_factory(
        "node-a",
        storage={"backend": "postgresql", "dsn": database, "node": "node-a"},
        retention=RETENTION,
        ordering={"window_ms": 0},
    )


def test_a_filtered_follower_is_told_of_deletions_a_sqlite_database_migrated_by_an_older_release_left_unknown(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory(retention=RETENTION, ordering={"window_ms": 0}).start()
    store_a_with_its_first_ten_deleted(daemon, lambda: daemon.wait_stats(timeout=60, stored=20, expired=10))
    as_the_older_sqlite_release_left_it(daemon.db_path)
    assert_a_filtered_follower_is_told_of_a_s_deletions(daemon.start())


@needs_postgresql
def test_a_filtered_follower_is_told_of_deletions_a_postgresql_database_migrated_by_an_older_release_left_unknown(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    daemon = pg_daemon(daemon_factory, database).start()
    store_a_with_its_first_ten_deleted(daemon, lambda: wait_cluster(daemon, stored=20, expired=10))
    # As migration 6 left it; the migrations since change rows only, no table's shape.
    query(database, "UPDATE topics SET expired_position = 0")
    query(database, "DELETE FROM eventagg_schema WHERE version > %s", (POSTGRESQL_LEFT_AT,))
    assert_a_filtered_follower_is_told_of_a_s_deletions(daemon.start())


@needs_postgresql
def test_a_sqlite_database_an_older_release_left_unknown_copied_into_postgresql_tells_a_filtered_follower(
    daemon_factory: Callable[..., Daemon], database: str, tmp_path: Path
) -> None:
    """`eventagg migrate --from-sqlite` copies each topic's last deleted position as the file has
    it, once migrated: a file step 4 of an older release left at 0 gave 0 on PostgreSQL too."""
    old = daemon_factory("sqlite", retention=RETENTION, ordering={"window_ms": 0}).start()
    store_a_with_its_first_ten_deleted(old, lambda: old.wait_stats(timeout=60, stored=20, expired=10))
    as_the_older_sqlite_release_left_it(old.db_path)
    config = tmp_path / "pg.toml"
    config.write_text(f'[storage]\nbackend = "postgresql"\ndsn = "{database}"\nnode = "node-a"\n')
    copied = run_migrate(config, "--from-sqlite", str(old.db_path))
    assert copied.returncode == 0, copied
    assert_a_filtered_follower_is_told_of_a_s_deletions(pg_daemon(daemon_factory, database).start())


# --- A pre-1970 topic retention emptied, left at 1970 by an older step 2 / migration 7 ----------

EMPTYING = {**QUICK, "max_age": "1s"}


def before_1970(n: int, topic: str) -> dict[str, Any]:
    """Event e-n of ``topic``, n seconds into 1960."""
    return event(n, topic=topic, timestamp=f"1960-01-01T00:00:{n:02d}Z")


def send(daemon: Daemon, events: list[dict[str, Any]]) -> None:
    """``events`` sent acknowledged, so committed."""
    publisher = Acked(daemon.ack)
    try:
        reply = publisher.send(events)
    finally:
        publisher.close()
    assert reply["new"] == len(events), reply


def empty_gone_and_sent(daemon: Daemon, deleted: Callable[[], Any]) -> None:
    """Topics gone and sent made of e-1 and e-2, which retention deletes (``deleted`` waits for
    that); the daemon is stopped."""
    send(daemon, [before_1970(n, topic) for topic in ("gone", "sent") for n in (1, 2)])
    deleted()
    assert daemon.terminate() == 0


def sent_e3_late_as_the_older_release_did(daemon: Daemon) -> None:
    """Topic sent is sent e-3 on the database the older release migrated: with its last instant
    at 0, e-3 is late (a daemon of today does that alike on a database at today's version, which
    runs no migration). The daemon is stopped."""
    send(daemon.start(), [before_1970(3, "sent")])
    assert lateness(daemon, "sent") == ([("e-3", True)], 1)
    assert daemon.terminate() == 0


def lateness(daemon: Daemon, topic: str) -> tuple[list[tuple[str, bool]], int]:
    """``topic``'s stored events (id, late flag) and its late counter, as `eventagg events` and
    `eventagg topics` show them."""
    return [(e["event_id"], e["late"]) for e in daemon.events(topic)], topic_row(daemon, topic)["late"]


def assert_pre_1970_events_are_late_only_when_late(daemon: Daemon) -> None:
    """Topics gone and sent are sent e-4, after every event they were sent: it is not late. Left
    at 0, each topic's every pre-1970 event was late, for ever."""
    send(daemon, [before_1970(4, "gone"), before_1970(4, "sent")])
    assert lateness(daemon, "gone") == ([("e-4", False)], 0)
    assert lateness(daemon, "sent") == ([("e-3", True), ("e-4", False)], 1)


def test_a_pre_1970_topic_retention_emptied_is_not_late_for_ever_on_a_sqlite_database_an_older_release_left_at_0(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """The older release wrote topics gone and sent from 0 (where it started every topic) and
    retention deleted their events; a later one's step 2 kept 0, as they had no event left."""
    emptying = daemon_factory("emptying", retention=EMPTYING, ordering={"window_ms": 0}).start()
    empty_gone_and_sent(emptying, lambda: emptying.wait_stats(timeout=60, stored=0, expired=4))
    path = emptying.db_path

    def sql(statement: str, *params: Any) -> None:
        conn = sqlite3.connect(path)
        try:
            conn.execute(statement, params)
            conn.commit()
        finally:
            conn.close()

    sql("UPDATE topics SET last_ts_ns = 0")
    today = daemon_factory("today", storage={"path": str(path)}, ordering={"window_ms": 0})
    sent_e3_late_as_the_older_release_did(today)
    sql("UPDATE meta SET value = ? WHERE key = 'schema_version'", str(SQLITE_LEFT_AT))
    today.start()
    assert f"migrating schema {SQLITE_LEFT_AT} -> {SQLITE_LEFT_AT + 1}" in today.log()
    assert_pre_1970_events_are_late_only_when_late(today)


@needs_postgresql
def test_a_pre_1970_topic_retention_emptied_is_not_late_for_ever_on_a_postgresql_database_an_older_release_left_at_0(
    daemon_factory: Callable[..., Daemon], database: str
) -> None:
    """As on SQLite, with migration 7 of the later release."""

    def node_a(workdir: str, **sections: dict[str, Any]) -> Daemon:
        storage = {"backend": "postgresql", "dsn": database, "node": "node-a"}
        return daemon_factory(workdir, storage=storage, ordering={"window_ms": 0}, **sections)

    emptying = node_a("emptying", retention=EMPTYING).start()
    empty_gone_and_sent(emptying, lambda: wait_cluster(emptying, stored=0, expired=4))
    query(database, "UPDATE topics SET last_ts_ns = 0")
    today = node_a("today")
    sent_e3_late_as_the_older_release_did(today)
    query(database, "DELETE FROM eventagg_schema WHERE version > %s", (POSTGRESQL_LEFT_AT,))
    assert_pre_1970_events_are_late_only_when_late(today.start())
