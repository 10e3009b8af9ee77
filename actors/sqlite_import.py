"""Copying a SQLite daemon's database into an empty PostgreSQL database (``eventagg migrate --from-sqlite``).

A daemon moved from SQLite to PostgreSQL must keep knowing every key it stored, or a re-send of
one would be stored again. So everything that makes up what the SQLite daemon promised is
copied, as it is: the events with their seqs, commit positions (SQLite's rowids, which named
consumers' positions and retention's notices count in), timestamps and late flags; each topic's
counters and retention figures; the records retention keeps of deleted keys; named consumers'
positions; and the daemon's counters, which become those of the node the config names, so that
its stats go on from where the SQLite daemon's stopped.

The SQLite file is opened as its daemon opens it (its lock taken, so it must be stopped; checked
and migrated to this version), and read in one transaction. The PostgreSQL side is written in one
transaction too, holding the node's lock (no daemon of that name may run) and a lock on the
tables that keeps other daemons' writes out until it commits; it refuses a database that holds
anything already. So the copy is whole or not at all, and can be run again after a failure.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actors.postgres import NODE_COUNTERS, event_bytes, key_bytes
from actors.store import DatabaseLock, StorageError, connect_writer, read_counters

if TYPE_CHECKING:
    import psycopg

# The events of a SQLite database, in commit order; a row with an empty topic only marks the
# last commit position once retention deleted the events after it.
_EVENTS = (
    "SELECT topic, event_id, seq, rowid, timestamp, ts_ns, source, payload, received_at, late"
    " FROM events WHERE topic <> '' ORDER BY rowid"
)
_TOPICS = (
    "SELECT t.topic, t.last_seq, t.last_ts_ns, t.received, t.duplicate_dropped, t.late,"
    " coalesce(r.expired, 0), coalesce(r.conflicting_duplicates, 0), coalesce(r.expired_position, 0)"
    " FROM topics AS t LEFT JOIN topic_retention AS r USING (topic)"
)
_LOST_TOPICS = "SELECT count(*) FROM topic_retention WHERE topic NOT IN (SELECT topic FROM topics)"
# PostgreSQL's text cannot hold a NUL character, which SQLite's can.
_NUL_KEYS = (
    "SELECT 'events', topic, event_id FROM events WHERE instr(event_id, char(0)) OR instr(source, char(0))"
    " UNION ALL SELECT 'deleted_keys', topic, event_id FROM deleted_keys WHERE instr(event_id, char(0))"
    " LIMIT 1"
)
_PG_TABLES = "events, topics, nodes, positions, deleted_keys, consumers, consumer_claims"


class CopyRefused(StorageError):
    """The copy cannot be made as things are; the message says what to do."""


@dataclass
class Copied:
    """What one copy carried over."""

    events: int = 0
    topics: int = 0
    deleted_keys: int = 0
    consumers: int = 0
    head: int = 0  # the last commit position
    seconds: float = 0.0
    # Arrival times and kept keys' commit times that lay ahead of the server's clock, set to its now.
    future_arrivals: int = 0
    future_keys: int = 0


def check_source(sqlite_path: Path) -> None:
    """Refuse (:class:`CopyRefused`) a path where no SQLite database file is."""
    if not sqlite_path.is_file():
        raise CopyRefused(f"no SQLite database at {sqlite_path}: name the file its [storage] path names")


def copy_sqlite(sqlite_path: Path, pg: psycopg.Connection[Any], node: str) -> Copied:
    """Copy the database at ``sqlite_path`` into the (migrated, empty) PostgreSQL database of
    ``pg``, an autocommit connection, its counters becoming node ``node``'s.

    Raises :class:`CopyRefused` when the copy cannot be made as things are (the message says
    what to do) and :class:`StorageError` or a psycopg error when it failed; nothing is written
    then.
    """
    check_source(sqlite_path)
    lock = DatabaseLock(sqlite_path)
    try:
        lock.acquire()
    except StorageError as exc:
        raise CopyRefused(f"{exc}; stop that daemon first: its database must not change while it is copied") from None
    try:
        source = connect_writer(sqlite_path)  # checked, and migrated to this version as a daemon would
        try:
            source.execute("BEGIN")  # one snapshot for every table read
            return _copy(source, sqlite_path, pg, node)
        finally:
            source.close()
    finally:
        lock.release()


def _copy(source: sqlite3.Connection, sqlite_path: Path, pg: psycopg.Connection[Any], node: str) -> Copied:
    began = time.monotonic()
    nul = source.execute(_NUL_KEYS).fetchone()
    if nul is not None:
        table, topic, event_id = nul
        raise CopyRefused(
            f"{sqlite_path}'s {table} holds an event id or source with a NUL character (topic {topic!r},"
            f" event_id {event_id!r}), which PostgreSQL's text cannot store; such a database cannot move"
        )
    lost = source.execute(_LOST_TOPICS).fetchone()[0]
    if lost:
        raise CopyRefused(f"{sqlite_path} holds retention figures of {lost} topic(s) it has no row for: damaged?")
    counters = read_counters(source)
    (head,) = source.execute("SELECT coalesce(max(rowid), 0) FROM events").fetchone()
    copied = Copied(head=int(head))
    stored_bytes = 0
    with pg.transaction():
        locked = pg.execute("SELECT pg_try_advisory_xact_lock(hashtext('eventagg node ' || %s))", (node,)).fetchone()
        if not (locked and locked[0]):
            raise CopyRefused(f"a daemon with node name {node!r} is connected to this database; stop the daemons first")
        pg.execute(f"LOCK TABLE {_PG_TABLES} IN EXCLUSIVE MODE")
        _check_empty(pg)
        # The SQLite daemon stamped arrival times with its host's clock; the daemons sweep them
        # against the server's. One ahead of the server's now would hold that event past max_age
        # by as much, and with it every event after it (expiry goes in commit order and stops at
        # the first too young): a host clock years ahead would stop max_age for the cluster. So a
        # time in the server's future becomes its now (a clock behind cannot be told from age).
        server_now = _server_now(pg)
        pg.execute("DELETE FROM topics")  # rows a daemon made for topics it never stored: nothing in them
        with pg.cursor().copy(
            "COPY events (topic, event_id, seq, position, timestamp, ts_ns, source, payload, received_at, late)"
            " FROM STDIN"
        ) as copy:
            for topic, event_id, seq, rowid, timestamp, ts_ns, source_name, payload, received_at, late in _rows(
                source, _EVENTS
            ):
                if received_at > server_now:
                    received_at = server_now
                    copied.future_arrivals += 1
                copy.write_row(
                    (topic, event_id, seq, rowid, timestamp, ts_ns, source_name, payload, received_at, bool(late))
                )
                stored_bytes += event_bytes(topic, event_id, timestamp, source_name, payload)
                copied.events += 1
        with pg.cursor().copy(
            "COPY topics (topic, last_seq, last_ts_ns, received, duplicate_dropped, late, expired,"
            " conflicting_duplicates, expired_position) FROM STDIN"
        ) as copy:
            for row in _rows(source, _TOPICS):
                copy.write_row(row)
                copied.topics += 1
        with pg.cursor().copy("COPY deleted_keys (topic, event_id, seq, fingerprint, committed_at) FROM STDIN") as copy:
            for topic, event_id, seq, fingerprint, committed_at in _rows(
                source, "SELECT topic, event_id, seq, fingerprint, committed_at FROM deleted_keys"
            ):
                if committed_at > int(server_now) + 1:  # a key's commit time is its arrival's second + 1
                    committed_at = int(server_now) + 1
                    copied.future_keys += 1
                copy.write_row((topic, event_id, seq, fingerprint, committed_at))
                stored_bytes += key_bytes(topic, event_id)
                copied.deleted_keys += 1
        consumers = source.execute("SELECT name, topic, position, updated_at FROM consumers").fetchall()
        if consumers:
            pg.cursor().executemany(
                "INSERT INTO consumers (name, topic, position, updated_at) VALUES (%s, %s, %s, %s)", consumers
            )
        copied.consumers = len(consumers)
        names = NODE_COUNTERS
        pg.execute(
            f"INSERT INTO nodes (node, {', '.join(names)}, stored_bytes)"
            f" VALUES (%s, {', '.join(['%s'] * len(names))}, %s)"
            f" ON CONFLICT (node) DO UPDATE SET {', '.join(f'{name} = excluded.{name}' for name in names)},"
            " stored_bytes = excluded.stored_bytes",
            (node, *(counters[name] for name in names), stored_bytes),
        )
        pg.execute("UPDATE positions SET last = %s WHERE id = 1", (copied.head,))
    copied.seconds = time.monotonic() - began
    return copied


def _server_now(pg: psycopg.Connection[Any]) -> float:
    """The time on the PostgreSQL server's clock, in Unix seconds."""
    row = pg.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
    assert row is not None
    return float(row[0])


def _check_empty(pg: psycopg.Connection[Any]) -> None:
    """Refuse a PostgreSQL database that holds events, kept keys, consumers or counts already."""
    row = pg.execute(
        "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM deleted_keys),"
        " (SELECT count(*) FROM consumers), (SELECT last FROM positions WHERE id = 1),"
        " (SELECT count(*) FROM topics WHERE last_seq <> 0 OR received <> 0 OR expired <> 0),"
        " (SELECT coalesce(sum(received + rejected), 0) FROM nodes)"
    ).fetchone()
    events, keys, consumers, head, topics, received = (int(value or 0) for value in row or (0,) * 6)
    if events or keys or consumers or head or topics or received:
        raise CopyRefused(
            f"the PostgreSQL database is not empty ({events} events, {keys} deleted keys, {consumers} consumers,"
            f" commit position {head}, {received} events received): a SQLite database is copied only into one"
            " that holds nothing yet, since their keys, seqs and positions would collide; give a new database"
        )


def _rows(source: sqlite3.Connection, sql: str) -> Iterator[tuple[Any, ...]]:
    """The rows of ``sql``, fetched a few thousand at a time."""
    cursor = source.execute(sql)
    while rows := cursor.fetchmany(4096):
        yield from rows
