"""The schema migration mechanism: steps run in order, each committed with its version; unknown
versions are refused before anything is written."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pg_cluster import made_at_version

from actors import migrations
from actors.migrations import Step
from actors.store import NO_TIMESTAMP, StorageError, connect_writer


def version(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
    finally:
        conn.close()


def test_a_new_database_gets_the_current_version_and_runs_no_step(tmp_path: Path) -> None:
    connect_writer(tmp_path / "db").close()
    assert version(tmp_path / "db") == str(migrations.SCHEMA_VERSION)


def test_an_added_step_migrates_an_older_database_and_a_failing_step_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "db"
    connect_writer(path).close()
    # How another feature adds a table: one more step, the version follows.
    added = migrations.SCHEMA_VERSION + 1
    steps = [*migrations.STEPS, Step(added, "a table for a new feature", "CREATE TABLE extra (a INTEGER);")]
    monkeypatch.setattr(migrations, "STEPS", steps)
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", added)
    connect_writer(path).close()
    assert version(path) == str(added)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM extra").fetchone() == (0,)
    conn.close()
    # The table exists already, so this step fails.
    broken = [*steps, Step(added + 1, "broken", "CREATE TABLE extra (a INTEGER);")]
    monkeypatch.setattr(migrations, "STEPS", broken)
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", added + 1)
    with pytest.raises(StorageError, match=f"migrating schema {added} -> {added + 1} failed"):
        connect_writer(path)
    assert version(path) == str(added)


# store._SCHEMA as retention left it (52fb6b9, schema version 1, to 373c10c^, version 3): topic_retention
# without expired_position.
OLD_SCHEMA = """
CREATE TABLE events (
    topic TEXT NOT NULL, event_id TEXT NOT NULL, seq INTEGER NOT NULL, timestamp TEXT NOT NULL,
    ts_ns INTEGER NOT NULL, source TEXT NOT NULL, payload BLOB NOT NULL, received_at REAL NOT NULL,
    late INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (topic, event_id)
);
CREATE UNIQUE INDEX events_by_topic_seq ON events (topic, seq);
CREATE TABLE topics (
    topic TEXT PRIMARY KEY, last_seq INTEGER NOT NULL DEFAULT 0, last_ts_ns INTEGER NOT NULL DEFAULT 0,
    received INTEGER NOT NULL DEFAULT 0, duplicate_dropped INTEGER NOT NULL DEFAULT 0,
    late INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE consumers (name TEXT PRIMARY KEY, topic TEXT, position INTEGER NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE deleted_keys (
    topic TEXT NOT NULL, event_id TEXT NOT NULL, seq INTEGER NOT NULL, fingerprint BLOB NOT NULL,
    committed_at INTEGER NOT NULL, PRIMARY KEY (topic, event_id)
) WITHOUT ROWID;
CREATE INDEX deleted_keys_by_age ON deleted_keys (committed_at);
CREATE TABLE topic_retention (
    topic TEXT PRIMARY KEY, expired INTEGER NOT NULL DEFAULT 0,
    conflicting_duplicates INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
"""


@contextlib.contextmanager
def made_by_an_older_release(path: Path, schema_version: int) -> Iterator[sqlite3.Connection]:
    """A database at ``path`` with :data:`OLD_SCHEMA` at ``schema_version``, for the block to fill;
    committed and closed when it ends."""
    conn = sqlite3.connect(path)
    try:
        conn.executescript(OLD_SCHEMA)
        conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(schema_version),))
        yield conn
        conn.commit()
    finally:
        conn.close()


def migrated_rows(path: Path, query: str) -> dict[Any, Any]:
    """Open ``path`` as the daemon does (which migrates it), then ``query``'s rows as a dict."""
    connect_writer(path).close()
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute(query))
    finally:
        conn.close()


def store_a_with_its_first_ten_deleted(conn: sqlite3.Connection) -> None:
    """Topic z at positions 1-10, none deleted; topic a's seqs 1-10 (positions 11-20) deleted and
    11-20 kept (21-30); topic gone's 3 events all deleted."""
    row = "INSERT INTO events (rowid, topic, event_id, seq, timestamp, ts_ns, source, payload, received_at)"
    row += " VALUES (?, ?, ?, ?, '', 0, '', x'', 0)"
    conn.executemany(row, [(n, "z", f"z{n}", n) for n in range(1, 11)])
    conn.executemany(row, [(n + 10, "a", f"a{n}", n) for n in range(11, 21)])
    conn.execute("INSERT INTO topic_retention (topic, expired) VALUES ('a', 10), ('gone', 3), ('z', 0)")


def test_topics_retention_deleted_from_before_step_4_get_a_last_deleted_position(tmp_path: Path) -> None:
    """Left at 0, a follower of some topics after position 5 was sent topic a from seq 11 on
    without being told that its seqs 1-10 (positions 11-20) were deleted."""
    path = tmp_path / "db"
    with made_by_an_older_release(path, 3) as conn:
        store_a_with_its_first_ten_deleted(conn)
    positions = migrated_rows(path, "SELECT topic, expired_position FROM topic_retention")
    assert version(path) == str(migrations.SCHEMA_VERSION)
    # a: below its first stored event; gone (nothing stored): at most the head; z: nothing deleted.
    assert positions == {"a": 20, "gone": 30, "z": 0}


def test_topics_step_4_of_an_older_release_left_at_0_get_a_last_deleted_position(tmp_path: Path) -> None:
    """Step 4 as 373c10c released it (until 773e063) only added expired_position, so a database it
    took from version 3 to 4 kept 0 for the topics retention had deleted from; and once at 4 it
    never ran step 4 again. Step 5 gives them the bound; one a sweep has set since is kept."""
    path = tmp_path / "db"
    with made_by_an_older_release(path, 4) as conn:
        conn.execute("ALTER TABLE topic_retention ADD COLUMN expired_position INTEGER NOT NULL DEFAULT 0")
        store_a_with_its_first_ten_deleted(conn)
        conn.execute("INSERT INTO topic_retention (topic, expired, expired_position) VALUES ('swept', 2, 8)")
    positions = migrated_rows(path, "SELECT topic, expired_position FROM topic_retention")
    assert version(path) == str(migrations.SCHEMA_VERSION)
    assert positions == {"a": 20, "gone": 30, "z": 0, "swept": 8}


def test_a_pre_1970_topic_whose_events_retention_deleted_before_step_2_is_not_late_for_ever(
    tmp_path: Path,
) -> None:
    """Versions 1 started every topic at 0, so pre-1970 events were all late; step 2 gives such a
    topic its real last instant, and one with no event left (retention deleted them) the start of
    a new topic, not 0: its next pre-1970 event is late only if it is late."""
    path = tmp_path / "db"
    with made_by_an_older_release(path, 1) as conn:
        conn.execute(
            "INSERT INTO topics (topic, last_seq, last_ts_ns) VALUES ('kept', 1, 0), ('gone', 3, 0), ('now', 1, 5)"
        )
        conn.execute(
            "INSERT INTO events (topic, event_id, seq, timestamp, ts_ns, source, payload, received_at)"
            " VALUES ('kept', 'a', 1, '', -300, '', x'', 0), ('now', 'b', 1, '', 5, '', x'', 0)"
        )
        conn.execute("INSERT INTO topic_retention (topic, expired) VALUES ('gone', 3)")
    last = migrated_rows(path, "SELECT topic, last_ts_ns FROM topics")
    assert last == {"kept": -300, "gone": NO_TIMESTAMP, "now": 5}


def test_postgresql_a_pre_1970_topic_whose_events_retention_deleted_before_migration_7_is_not_late_for_ever(
    database: str,
) -> None:
    import psycopg

    from actors.pg_session import connect
    from actors.postgres import SCHEMA_VERSION, migrate

    with made_at_version(database, 6) as conn:
        conn.execute("INSERT INTO topics (topic, last_seq, last_ts_ns, expired) VALUES ('gone', 3, 0, 3)")
    writer = connect(database, "writer", "test")
    try:
        assert migrate(writer, "writer") == SCHEMA_VERSION
    finally:
        writer.close()
    with psycopg.connect(database, autocommit=True) as conn:
        assert conn.execute("SELECT last_ts_ns FROM topics").fetchall() == [(NO_TIMESTAMP,)]


# Step 2 as 0d2424c released it (until f01048b) kept 0 for a topic with no event stored; releases
# before f01048b had steps up to 4, so a database it migrated may be at any of versions 2 to 4.
@pytest.mark.parametrize("left_at", [2, 3, 4])
def test_pre_1970_topics_step_2_of_an_older_release_left_at_0_are_no_longer_late_for_ever(
    tmp_path: Path, left_at: int
) -> None:
    """Retention had deleted every event of gone and sent, made of pre-1970 events from 0, where
    version 1 started a topic; an older step 2 kept 0, and every pre-1970 event they were sent
    since was late (sent's two are stored, late). Step 5 starts gone below every instant and sent
    at its last such event; a topic at an event at 1970 exactly (epoch) or after it is kept."""
    path = tmp_path / "db"
    with made_by_an_older_release(path, left_at) as conn:
        if left_at >= 4:
            conn.execute("ALTER TABLE topic_retention ADD COLUMN expired_position INTEGER NOT NULL DEFAULT 0")
        conn.execute(
            "INSERT INTO topics (topic, last_seq, last_ts_ns)"
            " VALUES ('gone', 2, 0), ('sent', 4, 0), ('epoch', 1, 0), ('now', 1, 5)"
        )
        conn.execute(
            "INSERT INTO events (topic, event_id, seq, timestamp, ts_ns, source, payload, received_at, late)"
            " VALUES ('sent', 'c', 3, '', -300, '', x'', 0, 1), ('sent', 'd', 4, '', -200, '', x'', 0, 1),"
            " ('epoch', 'e', 1, '', 0, '', x'', 0, 0), ('now', 'f', 1, '', 5, '', x'', 0, 0)"
        )
        conn.execute("INSERT INTO topic_retention (topic, expired) VALUES ('gone', 2), ('sent', 2)")
    last = migrated_rows(path, "SELECT topic, last_ts_ns FROM topics")
    assert last == {"gone": NO_TIMESTAMP, "sent": -200, "epoch": 0, "now": 5}


def pg_store_a_with_its_first_ten_deleted(conn: Any) -> None:
    """:func:`store_a_with_its_first_ten_deleted` on PostgreSQL."""
    conn.execute("UPDATE positions SET last = 30")
    conn.execute("INSERT INTO topics (topic, last_seq, expired) VALUES ('z', 10, 0), ('a', 20, 10), ('gone', 3, 3)")
    insert = (
        "INSERT INTO events (topic, event_id, seq, position, timestamp, ts_ns, source, payload, received_at)"
        " VALUES (%s, %s, %s, %s, '', 0, '', '', 0)"
    )
    with conn.cursor() as cursor:
        cursor.executemany(insert, [("z", f"z{n}", n, n) for n in range(1, 11)])
        cursor.executemany(insert, [("a", f"a{n}", n, n + 10) for n in range(11, 21)])


EXPIRED_POSITIONS = "SELECT topic, expired_position FROM topics"


def pg_migrated_rows(database: str, query: str) -> dict[Any, Any]:
    """Migrate ``database`` as a starting daemon does, then ``query``'s rows as a dict."""
    import psycopg

    from actors.pg_session import connect
    from actors.postgres import SCHEMA_VERSION, migrate

    writer = connect(database, "writer", "test")
    try:
        assert migrate(writer, "writer") == SCHEMA_VERSION
    finally:
        writer.close()
    with psycopg.connect(database, autocommit=True) as conn:
        return dict(conn.execute(query).fetchall())


def test_postgresql_topics_retention_deleted_from_before_migration_6_get_a_last_deleted_position(
    database: str,
) -> None:
    with made_at_version(database, 5) as conn:
        pg_store_a_with_its_first_ten_deleted(conn)
    assert pg_migrated_rows(database, EXPIRED_POSITIONS) == {"a": 20, "gone": 30, "z": 0}


# Migration 6 as 373c10c released it (until 773e063) only added expired_position; releases before
# 773e063 added migrations 7 and 8, so a database it migrated may be at any of versions 6 to 8.
@pytest.mark.parametrize("left_at", [6, 7, 8])
def test_postgresql_topics_migration_6_of_an_older_release_left_at_0_get_a_last_deleted_position(
    database: str, left_at: int
) -> None:
    with made_at_version(database, left_at) as conn:
        pg_store_a_with_its_first_ten_deleted(conn)  # after migration 6: expired_position 0, its default
        conn.execute("INSERT INTO topics (topic, last_seq, expired, expired_position) VALUES ('swept', 2, 2, 8)")
    assert pg_migrated_rows(database, EXPIRED_POSITIONS) == {"a": 20, "gone": 30, "z": 0, "swept": 8}


# Migration 7 as efec7ae released it (until f01048b) kept 0 for a topic with events but none
# stored; releases before f01048b added migration 8 too.
@pytest.mark.parametrize("left_at", [7, 8])
def test_postgresql_pre_1970_topics_migration_7_of_an_older_release_left_at_0_are_no_longer_late_for_ever(
    database: str, left_at: int
) -> None:
    """As on SQLite, by migration 9."""
    with made_at_version(database, left_at) as conn:
        conn.execute(
            "INSERT INTO topics (topic, last_seq, last_ts_ns, expired)"
            " VALUES ('gone', 2, 0, 2), ('sent', 4, 0, 2), ('epoch', 1, 0, 0), ('now', 1, 5, 0)"
        )
        conn.execute(
            "INSERT INTO events (topic, event_id, seq, position, timestamp, ts_ns, source, payload, received_at, late)"
            " VALUES ('sent', 'c', 3, 3, '', -300, '', '', 0, true), ('sent', 'd', 4, 4, '', -200, '', '', 0, true),"
            " ('epoch', 'e', 1, 5, '', 0, '', '', 0, false), ('now', 'f', 1, 6, '', 5, '', '', 0, false)"
        )
    last = pg_migrated_rows(database, "SELECT topic, last_ts_ns FROM topics")
    assert last == {"gone": NO_TIMESTAMP, "sent": -200, "epoch": 0, "now": 5}
