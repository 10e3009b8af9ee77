"""Schema versions: what a database's ``meta.schema_version`` says, checked at start, and the steps
that bring an older database up to date.

How it works. A new database is made by ``store._SCHEMA`` (always the latest shape) and stamped
with :data:`SCHEMA_VERSION`; it runs no step. An existing one is read first: a version this
daemon does not know (newer, or not a number, or no version at all beside an ``events`` table)
is refused with one line saying what to do, before anything is written; an older one runs
every step above its version, in order, each in its own transaction together with the new
version number, so a crash mid-way leaves the database at the last step that finished.

Adding a step (e.g. a new table): add the table to ``store._SCHEMA`` (``IF NOT EXISTS``) so new
databases have it, and append ``Step(<last version + 1>, "<what it does>", "<SQL>")`` to
:data:`STEPS` that turns a database of the version before into the new shape (here, the same
``CREATE TABLE IF NOT EXISTS``). :data:`SCHEMA_VERSION` follows from the last step.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transport.schema import MIN_TS_NS

log = logging.getLogger(__name__)


class SchemaError(Exception):
    """The database's schema is one this daemon cannot use; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Step:
    """Turns a database of version ``version - 1`` into ``version``: SQL (run as a script) or a function."""

    version: int
    what: str
    apply: str | Callable[[sqlite3.Connection], None]


UNSTICK_TOPICS_AT_1970 = (
    "UPDATE topics SET last_ts_ns = coalesce("
    f"(SELECT max(ts_ns) FROM events WHERE events.topic = topics.topic), {MIN_TS_NS})"
    " WHERE last_ts_ns = 0"
)
"""Gives each topic stuck at last_ts_ns 0 the last timestamp it should have: releases before
0d2424c (SQLite) and efec7ae (PostgreSQL) started every topic at 0, so a topic made of pre-1970
events stayed there. SQLite steps 2 and 5 run it, and PostgreSQL migrations 7 and 9.

A topic's last_ts_ns is the largest timestamp among its events that were not late, and a late
one is below it: so max(ts_ns) of all its events. Only a topic whose every event is at or
before 1970 can be stuck at 0, so only those are looked at. One with no event stored (retention
deleted them) starts again below every instant, as a new topic does: left at 0, every pre-1970
event it is sent would be late for ever. What it leaves at 0 has an event at 0, so running it
again changes nothing.
"""

STEPS: list[Step] = [
    # Version 1 is the first shape with a version: nothing to do to reach it.
    Step(
        2,
        "topics made of pre-1970 events get their real last timestamp (it was stuck at 0)",
        UNSTICK_TOPICS_AT_1970,
    ),
    Step(
        3,
        "retention and subscriptions: the deleted_keys, topic_retention and consumers tables (made by the"
        " schema script); the stored counter starts at everything stored so far",
        "INSERT OR IGNORE INTO counters (name, value)"
        " SELECT 'stored', coalesce((SELECT value FROM counters WHERE name = 'unique_processed'), 0)",
    ),
    Step(
        4,
        "subscriptions: each topic's last deleted commit position (topic_retention.expired_position), so a"
        " follower of some topics is told of what retention deleted of them",
        lambda conn: _add_expired_positions(conn),
    ),
    Step(
        5,
        "subscriptions: topics retention deleted from before version 4 get a bound on their last deleted"
        " commit position, where step 4 of an older release left it at 0; pre-1970 topics whose events"
        " retention deleted before version 2 start below every instant, where step 2 of an older release"
        " left them at 0",
        lambda conn: _mend_older_releases(conn),
    ),
]


def _add_expired_positions(conn: sqlite3.Connection) -> None:
    """Step 4: add ``topic_retention.expired_position`` and fill it for topics retention has
    already deleted events of. Left at 0, a follower of some topics that started before those
    deletions would be sent the topic's stored events without being told of the ones before them.

    The deleted events' positions are gone with them, but retention deletes a topic's lowest seqs
    and a topic's seqs are committed in order: its last deleted event lies below its first stored
    one, or (none stored) at most the head. That bound may tell a follower of a hole that lies
    before where it started, never miss one after.
    """
    _add_column(conn, "topic_retention", "expired_position INTEGER NOT NULL DEFAULT 0")
    _bound_expired_positions(conn)


def _bound_expired_positions(conn: sqlite3.Connection) -> None:
    """Give each topic retention deleted events of and whose last deleted position is unknown (0)
    the bound step 4 describes; a known one (a sweep since set it) is left as it is, so running
    this again changes nothing.

    Step 5 runs it again: step 4 as 373c10c released it, until 773e063 gave it this UPDATE, only
    added the column, so a database it migrated from version 3 kept 0 for every topic retention
    had deleted from, and stayed so once at version 4 (step 4 never runs twice).
    """
    columns = {row[1] for row in conn.execute("PRAGMA table_info(topic_retention)")}
    if "expired_position" not in columns:
        return  # no table yet: the schema script makes it, and no topic has expired
    conn.execute(
        "UPDATE topic_retention SET expired_position = coalesce("
        "(SELECT rowid - 1 FROM events WHERE events.topic = topic_retention.topic ORDER BY seq LIMIT 1),"
        " (SELECT max(rowid) FROM events), 0)"
        " WHERE expired > 0 AND expired_position = 0"
    )


def _mend_older_releases(conn: sqlite3.Connection) -> None:
    """Step 5: steps 4 and 2 again, where an older release ran them before they were mended and
    left 0. Each touches only what is still 0, so what a sweep or a write has set since is kept,
    and every database ends the same whatever version it came from.

    Step 4: see :func:`_bound_expired_positions`. Step 2 as 0d2424c released it, until f01048b,
    kept 0 for a topic with no event stored: a database it took from version 1 (written by a
    release with retention, from 52fb6b9, whose topics started at 0) kept 0 for each topic made
    of pre-1970 events that retention had emptied, and stayed so at versions 2 to 4 (step 2
    never runs twice); every pre-1970 event sent to it since was late. Those are stored, late,
    and the largest of their timestamps is where the topic would be had it started below every
    instant.
    """
    _bound_expired_positions(conn)
    conn.execute(UNSTICK_TOPICS_AT_1970)


def _add_column(conn: sqlite3.Connection, table: str, column: str) -> None:
    """Add ``column`` (its definition) to ``table`` if the table exists without it (a missing
    table is made whole by the schema script after the steps)."""
    columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    if columns and column.split()[0] not in columns:
        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")


SCHEMA_VERSION = STEPS[-1].version
"""The version this daemon writes, and the newest it can open."""

FIRST_VERSION = 1


def _stored_version(conn: sqlite3.Connection) -> str | None:
    """The stored version; None for a database with no tables at all (a new one)."""
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return None
    if "meta" not in tables:
        return ""
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return "" if row is None else str(row[0])


def prepare(conn: sqlite3.Connection, path: Path, create: str) -> None:
    """Create a new database with the ``create`` script, or check and migrate an existing one.

    Raises :class:`SchemaError` for a version this daemon does not know; ``conn`` is in
    autocommit mode (isolation_level None).
    """
    stored = _stored_version(conn)
    if stored is None:
        conn.executescript(create)
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        return
    if not (stored.isascii() and stored.isdecimal()):  # int() would read other scripts' digits too
        raise SchemaError(
            f"database {path} has no eventagg schema version ({stored or 'none'!r}): it was not made by "
            "eventagg or is damaged; give the daemon another [storage] path"
        )
    version = int(stored)
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"database {path} has schema version {version}, newer than this eventagg's {SCHEMA_VERSION}: "
            "run the newer eventagg that wrote it (a downgrade cannot read it)"
        )
    if version < FIRST_VERSION:
        raise SchemaError(
            f"database {path} has unknown schema version {version}; give the daemon another [storage] path"
        )
    for step in STEPS:
        if step.version <= version:
            continue
        log.info("database %s: migrating schema %d -> %d: %s", path, step.version - 1, step.version, step.what)
        try:
            conn.execute("BEGIN IMMEDIATE")
            if isinstance(step.apply, str):
                for statement in _statements(step.apply):
                    conn.execute(statement)
            else:
                step.apply(conn)
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(step.version),))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise SchemaError(
                f"database {path}: migrating schema {step.version - 1} -> {step.version} failed ({exc}); "
                "nothing of that step was written"
            ) from exc
    conn.executescript(create)  # IF NOT EXISTS throughout: adds nothing a step has made
    _check_columns(conn, path, create)


def _check_columns(conn: sqlite3.Connection, path: Path, create: str) -> None:
    """Refuse a database whose tables lack a column the latest shape has (its writes would all fail)."""
    shape = sqlite3.connect(":memory:")
    try:
        shape.executescript(create)
        tables = [name for (name,) in shape.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            wanted = [row[1] for row in shape.execute(f"PRAGMA table_info({table})")]
            found = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            missing = [column for column in wanted if column not in found]
            if missing:
                raise SchemaError(
                    f"database {path}: table {table} lacks column(s) {', '.join(missing)} although its schema "
                    f"version says {SCHEMA_VERSION}; it was changed by hand or is damaged: restore it from a backup"
                )
    finally:
        shape.close()


def _statements(script: str) -> list[str]:
    """A step's SQL split into complete statements (executescript would commit the transaction)."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending)
            pending = ""
    if pending.strip():
        statements.append(pending)
    return statements
