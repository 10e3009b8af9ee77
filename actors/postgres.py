"""PostgreSQL storage: one database shared by several daemons, each event stored once, seqs gapless.

Theory of operation. Every daemon has one writer (:class:`PostgresStore`, owned by its
:class:`PostgresDedupActor`) and one reader (:class:`PostgresReader`, owned by its
:class:`PostgresStatsActor`). The ordering actors work as with SQLite: they ask which events are
new and number them from the topic state they hold. With several daemons both answers are only
provisional (another daemon may store the same key, or number the same topic, in between), so
the writer settles them again inside the write transaction, where they become authoritative:

1. the topics' counter rows are created if missing (autocommit, ``ON CONFLICT DO NOTHING``),
2. ``BEGIN ISOLATION LEVEL READ COMMITTED``; the counter rows of every topic in the group are
   locked in sorted topic order (``SELECT ... ORDER BY topic FOR NO KEY UPDATE``), so two
   writers touching the same topics queue instead of deadlocking,
3. with the locks held (each statement sees every commit made before its lock was granted),
   the keys already stored are looked up: those rows are re-classified as duplicates,
4. the rest are numbered from the locked ``last_seq`` in the order the ordering actor gave them,
   given commit positions from the one ``positions`` row (locked last, so the all-topics cursor
   is gapless commit order), inserted, and the topic and node counters updated,
5. COMMIT (``synchronous_commit`` at least ``on``).

Deadlocks (40P01), serialization failures and lost connections roll the group back; the dedup
actor keeps it and retries with backoff, acknowledging nothing meanwhile. A COMMIT whose
outcome is unknown (the connection died during it) is resolved by the retry: every
transaction also stamps its serial into this node's counter row, so on reconnecting the writer
reads that row and knows whether the lost COMMIT took effect; if it did, its already computed
outcome stands, else the group is written afresh (and any key another daemon stored meanwhile
is a duplicate).

Retention ([retention]) is swept by one daemon at a time (a session advisory
lock), between its group commits, in short transactions that lock the chunk's topic rows in
sorted order like a write, delete the rows and keep their keys in ``deleted_keys``. Step 3
above looks keys up in both tables in one statement, so a replay of a deleted key is a
duplicate until the dedup horizon, and a re-send's content is compared with the stored row or
the kept fingerprint in the same transaction.

The schema is created and migrated at start under an advisory lock, with a version row; a
database made by a newer version is refused.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import operator
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from actors.dedup import EXPIRE_CHUNK, STORAGE_RETRY, DedupActor
from actors.event_sources import Claim
from actors.fingerprint import fingerprint
from actors.messages import AckTicket, ClassifyResult, Ping, PositionsSaved, SaveConsumerPositions, Tick, WriteBatch
from actors.migrations import UNSTICK_TOPICS_AT_1970
from actors.pg_grants import PrivilegeMissing, cannot_create, cannot_migrate, denied, refuse_if_lacking
from actors.pg_session import (
    CONNECT_TIMEOUT_S,
    connect,
    describe_dsn,
    load_psycopg,
    no_answer_error,
    one_line,
    running_statement_timeout_ms,
    set_statement_timeout,
)
from actors.reader import PackedReply, pack_events_page
from actors.stats import StatsActor
from actors.store import (
    CONTENT_BACK_BYTES,
    COUNTER_NAMES,
    EXPIRE_CHUNK_BYTES,
    NO_TIMESTAMP,
    Content,
    EventReader,
    Row,
    StorageError,
    StorageRefused,
    StoredContents,
    TopicDelta,
    TopicState,
)
from transport.config import RetentionConfig
from transport.logs import RateLimitedLog
from transport.queries import EventsQuery, Query
from transport.schema import Event

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# pg_advisory_lock key for schema creation and migration: "eventagg" in ASCII, as a bigint.
MIGRATION_LOCK = 0x6576656E74616767
# How long a starting daemon waits for another's migration: less than the daemon's start-up
# timeout (30 s), so the reason is what it reports.
MIGRATION_LOCK_WAIT_S = 20.0
MIGRATION_LOCK_POLL_S = 0.2
# pg_try_advisory_lock key held by the one daemon whose sweep runs (see PostgresStore.try_sweep_lock).
SWEEP_LOCK = MIGRATION_LOCK + 1
# How long a starting daemon's migrations may take: its actors must start within 30 s, waiting
# for another daemon's migration included; `eventagg migrate` gives a large database more.
MIGRATION_BUDGET_S = 10.0
MIGRATION_LOCK_TIMEOUT_MS = 2_000  # the longest a migration waits for a table lock
# The subscription thread serves every consumer: one slow read must not stall it for long. A
# server that hangs holds a read for ANSWER_MARGIN times this (3 s), then the connection is
# dropped and not made again for RECONNECT_PAUSE_S: so the thread's heartbeats never stop for
# longer than the connect timeout (3 s), within a consumer's default 5 s of patience.
SUBSCRIBE_STATEMENT_TIMEOUT_MS = 2_000
# How often the subscription thread reads the head for other daemons' commits: a safety net
# while their NOTIFYs reach it, often while its LISTEN connection is being made again.
SUBSCRIBE_POLL_S = 1.0
SUBSCRIBE_POLL_UNHEARD_S = 0.1
COMMITS_CHANNEL = "eventagg_commits"  # every write transaction that stores events NOTIFYs it
# A daemon that takes a named consumer NOTIFYs this with ``[node, name, claim number]`` (JSON): a
# daemon serving a follower under that name ends it, unless its own claim is the later one.
CONSUMERS_CHANNEL = "eventagg_consumers"
RECONNECT_PAUSE_S = 1.0  # after a failed connect, reads fail at once for this long
NODE_LOCK_WAIT_S = 15.0
SESSION_CHECK_S = 5.0  # how often an idle writer makes sure its session (and node lock) lives
# How often the writer reads the server's clock again (and on each new session): the daemons'
# hosts have clocks of their own, and retention compares times written by one with another's.
CLOCK_CHECK_S = 60.0
# How long health waits for a ping, and stats for the cluster's counters: both are answered from
# memory or a tiny table at once, and the stats actor serves every query while it waits. Stats
# waits less: the gateway's probe (at most 1 s) reads a stats reply to tell a storage outage.
PROBE_ANSWER_S = 2.0
CLUSTER_ANSWER_S = 0.5
LIVENESS_WAIT_S = 3.0  # the actors' pings take at most 2 s (Daemon.liveness)
# After the server failed to answer or to connect, for this long a probe does not wait to connect.
TROUBLED_S = 30.0

# What a stored event and a kept key take beyond their text and bytes: tuple header, fixed
# columns and index entries, measured on freshly loaded tables (scripts/bench_postgres_retention.py
# --bytes). The varying parts count once per copy: the topic is in the row and two indexes.
EVENT_ROW_BYTES = 200
KEY_ROW_BYTES = 120

# Each migration takes the schema from the version before it to its own index + 1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        topic       text             NOT NULL,
        event_id    text             NOT NULL,
        seq         bigint           NOT NULL,
        position    bigint           NOT NULL,
        timestamp   text             NOT NULL,
        ts_ns       bigint           NOT NULL,
        source      text             NOT NULL,
        payload     bytea            NOT NULL,
        received_at double precision NOT NULL,
        late        boolean          NOT NULL DEFAULT false,
        PRIMARY KEY (topic, event_id)
    );
    CREATE UNIQUE INDEX events_by_topic_seq ON events (topic, seq);
    CREATE UNIQUE INDEX events_by_position ON events (position);
    CREATE TABLE topics (
        topic             text PRIMARY KEY,
        last_seq          bigint NOT NULL DEFAULT 0,
        last_ts_ns        bigint NOT NULL DEFAULT 0,
        received          bigint NOT NULL DEFAULT 0,
        duplicate_dropped bigint NOT NULL DEFAULT 0,
        late              bigint NOT NULL DEFAULT 0
    );
    CREATE TABLE nodes (
        node              text PRIMARY KEY,
        received          bigint NOT NULL DEFAULT 0,
        unique_processed  bigint NOT NULL DEFAULT 0,
        duplicate_dropped bigint NOT NULL DEFAULT 0,
        rejected          bigint NOT NULL DEFAULT 0,
        late              bigint NOT NULL DEFAULT 0,
        topic_count       bigint NOT NULL DEFAULT 0,
        last_txn          bigint NOT NULL DEFAULT 0
    );
    CREATE TABLE positions (
        id   integer PRIMARY KEY CHECK (id = 1),
        last bigint  NOT NULL
    );
    INSERT INTO positions (id, last) VALUES (1, 0);
    """,
    # The counters retention brought: what is stored now, what expired, re-sends that differed.
    """
    ALTER TABLE nodes
        ADD COLUMN stored                 bigint NOT NULL DEFAULT 0,
        ADD COLUMN expired                bigint NOT NULL DEFAULT 0,
        ADD COLUMN conflicting_duplicates bigint NOT NULL DEFAULT 0;
    UPDATE nodes SET stored = unique_processed;
    """,
    # Retention: the record each deleted event's key leaves behind, and the per-topic counters.
    """
    CREATE TABLE deleted_keys (
        topic        text   NOT NULL,
        event_id     text   NOT NULL,
        seq          bigint NOT NULL,
        fingerprint  bytea  NOT NULL,
        committed_at bigint NOT NULL,
        PRIMARY KEY (topic, event_id)
    );
    CREATE INDEX deleted_keys_by_age ON deleted_keys (committed_at);
    ALTER TABLE topics
        ADD COLUMN expired                bigint NOT NULL DEFAULT 0,
        ADD COLUMN conflicting_duplicates bigint NOT NULL DEFAULT 0;
    """,
    # Named subscription consumers' acknowledged positions, shared by every daemon.
    """
    CREATE TABLE consumers (
        name       text             PRIMARY KEY,
        topic      text,
        position   bigint           NOT NULL,
        updated_at double precision NOT NULL
    );
    """,
    # The bytes [retention] max_bytes budgets, kept by each writer and sweep (see stored_bytes()).
    f"""
    ALTER TABLE nodes ADD COLUMN stored_bytes bigint NOT NULL DEFAULT 0;
    UPDATE nodes SET stored_bytes =
        (SELECT coalesce(sum({EVENT_ROW_BYTES} + 3 * octet_length(topic) + 2 * octet_length(event_id)
                             + octet_length(timestamp) + octet_length(source) + octet_length(payload)), 0)
         FROM events)
        + (SELECT coalesce(sum({KEY_ROW_BYTES} + 2 * (octet_length(topic) + octet_length(event_id))), 0)
           FROM deleted_keys)
    WHERE node = (SELECT min(node) FROM nodes);
    """,
    # Each topic's last deleted commit position: a follower of some topics is told of what
    # retention deleted of them (see PostgresEventSource.expired_marks). A topic retention has
    # already deleted from gets a bound on it (left at 0 such a follower was never told): a topic's
    # lowest seqs are deleted and its seqs committed in order, so its last deleted event lies below
    # its first stored one, or (none stored) at most the last position given out.
    """
    ALTER TABLE topics ADD COLUMN expired_position bigint NOT NULL DEFAULT 0;
    UPDATE topics SET expired_position = coalesce(
        (SELECT position - 1 FROM events WHERE events.topic = topics.topic ORDER BY seq LIMIT 1),
        (SELECT last FROM positions WHERE id = 1), 0)
    WHERE expired > 0;
    """,
    # A new topic's last timestamp is below every instant, not 0: with 0 every pre-1970 event
    # was late. A topic stuck at 0 gets its real last timestamp, max(ts_ns) of its events (a
    # late one is below the last), or the new start when it has stored none (never had any, or
    # retention deleted them: left at 0, every pre-1970 event it is sent would be late for ever);
    # the same statement as SQLite's step 2.
    f"""
    ALTER TABLE topics ALTER COLUMN last_ts_ns SET DEFAULT {NO_TIMESTAMP};
    {UNSTICK_TOPICS_AT_1970};
    """,
    # Which daemon serves each named consumer, numbered so that of two claims the later wins: a
    # position is stored only under the name's current claim (see save_consumer_positions).
    """
    CREATE SEQUENCE consumer_claim_numbers;
    CREATE TABLE consumer_claims (
        name  text   PRIMARY KEY,
        claim bigint NOT NULL,
        node  text   NOT NULL
    );
    """,
    # Migrations 6 and 7 again, where an older release ran them before they were mended and
    # left 0; each touches only what is still 0, so what a sweep or a write has set since is kept.
    # Migration 6 as 373c10c released it, until 773e063 gave it the UPDATE above, only added
    # expired_position: a database it migrated kept 0 for every topic retention had deleted
    # from, and stayed so at versions 6 to 8 (a migration never runs twice); so did one that
    # `eventagg migrate --from-sqlite` filled from a SQLite file its step 4 left so.
    # Migration 7 as efec7ae released it, until f01048b, kept 0 for a topic with events but none
    # stored: a database it migrated (written by a release with retention whose topics started
    # at 0, such as 296ca67) kept 0 for each topic made of pre-1970 events that retention had
    # emptied, at versions 7 and 8, as did a copy of a SQLite file step 2 of such a release left
    # so; every pre-1970 event sent to it since was late (and, stored late, the largest of their
    # timestamps is where the topic would be had it started below every instant).
    f"""
    UPDATE topics SET expired_position = coalesce(
        (SELECT position - 1 FROM events WHERE events.topic = topics.topic ORDER BY seq LIMIT 1),
        (SELECT last FROM positions WHERE id = 1), 0)
    WHERE expired > 0 AND expired_position = 0;
    {UNSTICK_TOPICS_AT_1970};
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


def _sized(order: str) -> str:
    """An expiry chunk's rows with their payload's ``size`` and the bytes ``through`` each, in
    ``order``: a chunk takes those within EXPIRE_CHUNK_BYTES, and the first at least, as on
    SQLite (octet_length reads a toasted value's size only)."""
    return (
        "SELECT position, seq, topic, received_at, octet_length(payload) AS size,"
        f" sum(octet_length(payload)) OVER (ORDER BY {order}) AS through"
    )


NODE_COUNTERS = (*COUNTER_NAMES, "topic_count")

_INSERT_EVENTS = """
INSERT INTO events (topic, event_id, seq, position, timestamp, ts_ns, source, payload, received_at, late)
SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::text[], %s::bigint[],
                     %s::text[], %s::bytea[], %s::float8[], %s::boolean[])
"""
_UPDATE_TOPICS = """
UPDATE topics AS t SET
    last_seq = v.last_seq,
    last_ts_ns = greatest(t.last_ts_ns, v.last_ts_ns),
    received = t.received + v.received,
    duplicate_dropped = t.duplicate_dropped + v.duplicate_dropped,
    late = t.late + v.late
FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[])
    AS v(topic, last_seq, last_ts_ns, received, duplicate_dropped, late)
WHERE t.topic = v.topic
"""
_UPDATE_NODE = (
    "UPDATE nodes SET "
    + ", ".join(f"{name} = {name} + %s" for name in NODE_COUNTERS)
    + ", stored_bytes = stored_bytes + %s, last_txn = %s WHERE node = %s"
)

# Stored and kept content of re-sent keys: whether the stored bytes are the re-send's, else the
# stored content to fingerprint; and the fingerprint kept for a deleted key.
_ORIGINALS = """
SELECT k.i, e.topic IS NOT NULL AND e.timestamp = k.timestamp AND e.source = k.source AND e.payload = k.payload,
       e.ts_ns, e.source, e.payload, d.fingerprint
FROM unnest(%s::int[], %s::text[], %s::text[], %s::text[], %s::text[], %s::bytea[])
    AS k(i, topic, event_id, timestamp, source, payload)
LEFT JOIN events AS e ON e.topic = k.topic AND e.event_id = k.event_id
LEFT JOIN deleted_keys AS d ON d.topic = k.topic AND d.event_id = k.event_id
"""
_RECORD_DELETED = """
INSERT INTO deleted_keys (topic, event_id, seq, fingerprint, committed_at)
SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bytea[], %s::bigint[])
ON CONFLICT (topic, event_id) DO UPDATE SET
    seq = excluded.seq, fingerprint = excluded.fingerprint, committed_at = excluded.committed_at
"""
_SOURCE_COLUMNS = "position, topic, event_id, timestamp, source, payload, seq, late"

_row_key = operator.itemgetter(0, 1)


def event_bytes(topic: str, event_id: str, timestamp: str, source: str, payload: bytes | bytearray) -> int:
    """What a stored event's row takes in the database, about (see EVENT_ROW_BYTES)."""
    return EVENT_ROW_BYTES + 3 * len(topic) + 2 * len(event_id) + len(timestamp) + len(source) + len(payload)


def _row_bytes(row: Row) -> int:
    """:func:`event_bytes` of a new row."""
    topic, event_id, _seq, timestamp, _ts_ns, source, payload, _received_at, _late = row
    return event_bytes(topic, event_id, timestamp, source, payload)


def key_bytes(topic: str, event_id: str) -> int:
    """What a kept key's record takes in the database, about (see KEY_ROW_BYTES)."""
    return KEY_ROW_BYTES + 2 * (len(topic) + len(event_id))


def _content(row: Row) -> Content:
    """A row's content, as compared with its original's."""
    topic, event_id, _seq, timestamp, ts_ns, source, payload, _received_at, _late = row
    return (topic, event_id, timestamp, ts_ns, source, bytes(payload))


def _other_daemons(conn: psycopg.Connection[Any]) -> list[str]:
    """The application names of the other eventagg sessions on this database."""
    rows = conn.execute(
        "SELECT DISTINCT application_name FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid() AND application_name LIKE 'eventagg %' ORDER BY 1"
    ).fetchall()
    return [name for (name,) in rows]


def _open_transactions(conn: psycopg.Connection[Any]) -> list[str]:
    """The other sessions on this database with a transaction open, oldest first, each described."""
    rows = conn.execute(
        "SELECT pid, application_name, state, extract(epoch FROM clock_timestamp() - xact_start)::float8"
        " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND xact_start IS NOT NULL ORDER BY xact_start LIMIT 5"
    ).fetchall()
    return [f"{pid} ({name or 'no application_name'}, {state}, {age:.0f} s)" for pid, name, state, age in rows]


class MigrationTooLong(StorageError):
    """The migrations took longer than their budget; the one under way was rolled back."""


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The database's schema version (0: no eventagg schema yet)."""
    (table,) = conn.execute("SELECT to_regclass('eventagg_schema')").fetchone() or (None,)
    if table is None:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM eventagg_schema").fetchone()
    return int(row[0]) if row else 0


def migrate(
    conn: psycopg.Connection[Any],
    node: str,
    lock_wait_s: float = MIGRATION_LOCK_WAIT_S,
    budget_s: float = MIGRATION_BUDGET_S,
    where: str = "the database",
) -> int:
    """Create or migrate the schema under an advisory lock; the version it is at.

    Raises :class:`StorageError` for a database made by a newer eventagg, when another session
    holds the lock for over ``lock_wait_s``, or when the migrations take over ``budget_s`` (the
    one under way is rolled back; the message names ``eventagg migrate``, which has time); and
    :class:`StorageRefused` naming what to do when the role may not read the version (``where``
    names the database), create the tables, or alter them (only their owner may). A database
    already at this version is only read, so a role without CREATE on the schema can run the
    daemon once its owner has migrated it.
    """
    waited_until = time.monotonic() + lock_wait_s
    told = False
    while not conn.execute("SELECT pg_try_advisory_lock(%s)", (MIGRATION_LOCK,)).fetchone()[0]:  # type: ignore[index]
        if not told:
            log.info("waiting for another daemon to finish creating or migrating the schema")
            told = True
        if time.monotonic() >= waited_until:
            high, low = MIGRATION_LOCK >> 32, MIGRATION_LOCK & 0xFFFFFFFF
            raise StorageError(
                f"another session has held eventagg's schema lock for {lock_wait_s:g} s: a daemon still migrating a"
                " large database (start this one again once it is done), or a stuck session (see it with SELECT pid,"
                f" state, query FROM pg_stat_activity JOIN pg_locks USING (pid) WHERE locktype = 'advisory' AND"
                f" classid = {high} AND objid = {low})"
            )
        time.sleep(MIGRATION_LOCK_POLL_S)
    errors = load_psycopg().errors
    try:
        (table,) = conn.execute("SELECT to_regclass('eventagg_schema')").fetchone() or (None,)
        if table is None:
            # Not seen: a new database, or a schema holding the tables that this role may not use.
            refuse_if_lacking(conn, where)
            try:
                conn.execute(
                    "CREATE TABLE eventagg_schema (version integer PRIMARY KEY,"
                    " applied_at timestamptz NOT NULL DEFAULT now(), applied_by text NOT NULL)"
                )
            except (errors.InsufficientPrivilege, errors.InvalidSchemaName) as exc:
                raise StorageRefused(cannot_create(conn, exc)) from None
        try:
            version = schema_version(conn)
        except errors.InsufficientPrivilege as exc:
            refuse_if_lacking(conn, where)  # names every privilege the role lacks
            raise PrivilegeMissing(denied(conn, exc)) from None
        if version > SCHEMA_VERSION:
            raise StorageRefused(
                f"the database's schema is version {version}, made by a newer eventagg; this one knows "
                f"version {SCHEMA_VERSION}: upgrade this daemon, or give it another database"
            )
        if version < SCHEMA_VERSION and (others := _other_daemons(conn)):
            # Their writers keep to the schema they started with; a newer one's columns go stale.
            log.warning(
                "migrating the schema from version %d to %d while other eventagg sessions are connected (%s): "
                "restart every daemon of an older version now (docs/postgresql.md, Upgrading)",
                version,
                SCHEMA_VERSION,
                ", ".join(others),
            )
        deadline = time.monotonic() + budget_s
        for target in range(version + 1, SCHEMA_VERSION + 1):
            try:
                with conn.transaction():
                    left_ms = max(1, int((deadline - time.monotonic()) * 1000))
                    # A lock other sessions hold (an open report, pg_dump) is waited for briefly:
                    # the running daemons' writes queue behind the waiting ALTER.
                    conn.execute(f"SET LOCAL lock_timeout = {min(left_ms, MIGRATION_LOCK_TIMEOUT_MS)}")
                    conn.execute(f"SET LOCAL statement_timeout = {left_ms}")
                    conn.execute(MIGRATIONS[target - 1])
                    conn.execute("INSERT INTO eventagg_schema (version, applied_by) VALUES (%s, %s)", (target, node))
            except errors.InsufficientPrivilege as exc:  # altering a table takes its owner
                raise StorageRefused(cannot_migrate(conn, exc, target)) from None
            except errors.LockNotAvailable:
                holders = _open_transactions(conn)
                raise StorageError(
                    f"migrating the schema to version {target} waited over {MIGRATION_LOCK_TIMEOUT_MS / 1000:g} s for a"
                    f" table lock other sessions hold, and was rolled back; sessions with open transactions: "
                    f"{', '.join(holders) or 'none now'}. End them (or wait for them), then start again"
                ) from None
            except errors.QueryCanceled as exc:
                # Cancelled by the budget: tried again at every start, it would be cancelled again.
                raise MigrationTooLong(
                    f"migrating the schema to version {target} took over {budget_s:g} s ({one_line(exc)}) and was"
                    " rolled back: a large database takes longer. Run `eventagg migrate --config PATH` once (it has"
                    " an hour), then start the daemons"
                ) from None
            log.info("PostgreSQL schema migrated to version %d", target)
        return SCHEMA_VERSION
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


@dataclass(slots=True)
class GroupOutcome:
    """What one write transaction did: which rows were duplicates at write time, and its counts."""

    duplicates: list[int] = field(default_factory=list)  # indexes into the group's rows
    totals: dict[str, int] = field(default_factory=dict)  # node counters added (NODE_COUNTERS)
    # Conflicting duplicates: indexes into the ``duplicates`` given to write(), followed by this
    # outcome's own ``duplicates`` (index len(given) + k is the row duplicates[k]).
    conflicting: list[int] = field(default_factory=list)


class PostgresStore:
    """The writer of one daemon: the transaction described in the module docstring."""

    def __init__(self, dsn: str, node: str, on_session: Callable[[int], None] = lambda pid: None) -> None:
        """``on_session``: called with the backend pid of each session the writer opens."""
        self.dsn = dsn
        self.node = node
        self.where = describe_dsn(dsn)
        self._on_session = on_session
        self._conn: psycopg.Connection[Any] | None = None
        self._known_topics: set[str] = set()  # topics whose counter row exists
        self._last_txn = 0
        self._unknown: tuple[int, GroupOutcome] | None = None  # a COMMIT whose outcome was lost
        self._running_timeout_ms: int | None = None  # set once started (running_statement_timeout_ms)
        # The connection whose session took the sweep lock, while the sweep holds it: the lock is
        # the session's, so a sweep whose session was lost (and made again by a write meanwhile)
        # no longer holds it, and another daemon's sweep may run. (The object, not the backend's
        # pid, which the server may give a new session again.)
        self._sweep_session: psycopg.Connection[Any] | None = None
        # The database server's clock less this host's (see now()), and when it was last read.
        self._clock_offset = 0.0
        self._clock_read = -math.inf

    def open(self) -> dict[str, int]:
        """Connect, migrate, claim this node's row; this node's committed counters."""
        conn = self._connection(NODE_LOCK_WAIT_S)
        migrate(conn, self.node, where=self.where)
        # Every privilege the daemon will use, at once: refused now with all of them named, not
        # one at a time as writes, sweeps, queries and named consumers come to need them.
        refuse_if_lacking(conn, self.where)
        conn.execute("INSERT INTO nodes (node) VALUES (%s) ON CONFLICT DO NOTHING", (self.node,))
        self._running_timeout_ms = running_statement_timeout_ms()
        set_statement_timeout(conn, self._running_timeout_ms)
        return self.counters()

    def _connection(self, claim_wait_s: float = 0.0) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            conn = connect(self.dsn, self.node, "writer")
            self._on_session(conn.info.backend_pid)
            self._claim_node(conn, claim_wait_s)
            if self._running_timeout_ms is not None:
                set_statement_timeout(conn, self._running_timeout_ms)
            self._read_clock(conn)
            self._conn = conn
        return self._conn

    def _read_clock(self, conn: psycopg.Connection[Any]) -> None:
        """Measure how far the server's clock is from this host's."""
        before = time.time()
        row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
        after = time.time()
        if row is not None:
            self._clock_offset = float(row[0]) - (before + after) / 2
            self._clock_read = time.monotonic()

    def now(self) -> float:
        """The time on the database server's clock, in Unix seconds.

        Every daemon writes arrival times (``received_at``, from which a kept key's
        ``committed_at`` follows) and sweeps against them on this one clock: with each host's
        own, a sweeper whose clock is ahead of a writer's expires that writer's events early
        and forgets their keys before the dedup horizon (a replay is then stored again), and
        one whose clock is behind holds every later event of the cluster past max_age.
        """
        return time.time() + self._clock_offset

    def _claim_node(self, conn: psycopg.Connection[Any], wait_s: float) -> None:
        """Hold a session lock on this node's name: two daemons with one name would mix their counters.

        A killed daemon's session ends when the server sees its socket close, so at start a
        restarted one waits ``wait_s`` for it rather than failing at once. On a reconnect it does
        not wait (the writer's thread must keep answering pings): a session of ours the server
        has not yet noticed is gone makes this attempt fail, and the backoff tries again.
        """
        deadline = time.monotonic() + wait_s
        while True:
            row = conn.execute("SELECT pg_try_advisory_lock(hashtext('eventagg node ' || %s))", (self.node,)).fetchone()
            if row and row[0]:
                return
            if time.monotonic() > deadline:
                conn.close()
                raise StorageError(
                    f"another daemon connected to {self.where} uses node name {self.node!r}; "
                    "give each daemon its own [storage] node (if none runs with this name, the session "
                    "of one killed moments ago is still ending: start again in a minute)"
                )
            time.sleep(0.2)

    @contextlib.contextmanager
    def _naming_privileges(self) -> Iterator[None]:
        """PostgreSQL's refusal for want of a privilege, raised as :class:`PrivilegeMissing` naming
        the role, what it lacks and the GRANTs (looked up once the failed statement is rolled back)."""
        try:
            yield
        except load_psycopg().errors.InsufficientPrivilege as exc:
            raise PrivilegeMissing(denied(self._conn, exc)) from None

    def counters(self) -> dict[str, int]:
        """This node's committed counters (and remembers its last transaction serial)."""
        names = ", ".join(NODE_COUNTERS)
        row = (
            self._connection().execute(f"SELECT {names}, last_txn FROM nodes WHERE node = %s", (self.node,)).fetchone()
        )
        if row is None:
            return dict.fromkeys(NODE_COUNTERS, 0)
        self._last_txn = int(row[-1])
        return {name: int(value) for name, value in zip(NODE_COUNTERS, row)}

    def existing_keys(self, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which keys are stored now, or were and are kept as deleted keys (committed by any
        daemon): a hint to the ordering actors, and authoritative under the write's topic locks."""
        return set(self._found(keys, with_content=False))

    def lookup(self, keys: Sequence[tuple[str, str]]) -> tuple[set[tuple[str, str]], StoredContents]:
        """:meth:`existing_keys`, and for keys found in ``events`` their stored (timestamp, source,
        payload hex), the hex None past ``CONTENT_BACK_BYTES`` (as SQLite's lookup answers: the
        ordering actor settles an exact re-send with it; a deleted key's record has all None)."""
        with self._naming_privileges():
            contents = self._found(keys, with_content=True)
        return set(contents), contents

    def _found(self, keys: Sequence[tuple[str, str]], *, with_content: bool) -> StoredContents:
        if not keys:
            return {}
        topics, ids = zip(*keys)
        content = (
            "e.timestamp, e.source, CASE WHEN octet_length(e.payload) <= %s THEN e.payload END"
            if with_content
            else "NULL, NULL, NULL"
        )
        # One statement, so one snapshot: a sweep that moves a key from events to deleted_keys
        # is seen either before or after, never in between.
        rows = (
            self._connection()
            .execute(
                "WITH k AS (SELECT * FROM unnest(%s::text[], %s::text[]) AS k(topic, event_id))"
                f" SELECT e.topic, e.event_id, {content} FROM events AS e JOIN k USING (topic, event_id)"
                " UNION ALL"
                " SELECT d.topic, d.event_id, NULL, NULL, NULL FROM deleted_keys AS d JOIN k USING (topic, event_id)",
                (list(topics), list(ids), *((CONTENT_BACK_BYTES,) if with_content else ())),
            )
            .fetchall()
        )
        return {
            (topic, event_id): (timestamp, source, bytes(payload).hex() if payload is not None else None)
            for topic, event_id, timestamp, source, payload in rows
        }

    def topic_states(self, topics: Iterable[str]) -> dict[str, TopicState]:
        """The stored last seq and last timestamp of each topic (0 and NO_TIMESTAMP for one never seen)."""
        wanted = list(topics)
        states = dict.fromkeys(wanted, TopicState(0, NO_TIMESTAMP))
        if wanted:
            with self._naming_privileges():
                rows = (
                    self._connection()
                    .execute("SELECT topic, last_seq, last_ts_ns FROM topics WHERE topic = ANY(%s)", (wanted,))
                    .fetchall()
                )
            for topic, last_seq, last_ts_ns in rows:
                states[topic] = TopicState(int(last_seq), int(last_ts_ns))
        return states

    def write(
        self,
        rows: Sequence[Row],
        topics: dict[str, TopicDelta],
        totals: dict[str, int],
        duplicates: Sequence[Content] = (),
    ) -> GroupOutcome:
        """Store a group in one transaction (see the module docstring); its outcome.

        ``rows`` are the events the ordering actors believe new, in their order; ``topics`` and
        ``totals`` what they counted (received, duplicates, late; rejected); ``duplicates`` the
        events they found duplicates, compared (with the rows settled as duplicates here) with
        their originals for conflicting content. Raises a psycopg
        error or :class:`StorageError` (:class:`PrivilegeMissing` when the role lacks a privilege)
        when nothing (knowably) committed: call again with the same group, which is then safe
        whatever happened.
        """
        with self._naming_privileges():
            return self._write(rows, topics, totals, duplicates)

    def _write(
        self,
        rows: Sequence[Row],
        topics: dict[str, TopicDelta],
        totals: dict[str, int],
        duplicates: Sequence[Content],
    ) -> GroupOutcome:
        pg = load_psycopg()
        serial = self._last_txn + 1
        if self._unknown is not None:
            lost_serial, lost_outcome = self._unknown
            self.counters()  # reads last_txn back (or raises: still unknown)
            self._unknown = None
            if self._last_txn >= lost_serial:
                log.warning("the COMMIT whose answer was lost had succeeded; its outcome stands")
                return lost_outcome
            serial = self._last_txn + 1
        conn = self._connection()
        if time.monotonic() >= self._clock_read + CLOCK_CHECK_S:
            self._read_clock(conn)
        topic_names = sorted(set(topics).union(row[0] for row in rows).union(d[0] for d in duplicates))
        missing = [topic for topic in topic_names if topic not in self._known_topics]
        if missing:
            # Autocommit, before the transaction: its row locks are then taken only in sorted order.
            conn.execute(
                "INSERT INTO topics (topic) SELECT unnest(%s::text[]) ORDER BY 1 ON CONFLICT DO NOTHING", (missing,)
            )
            self._known_topics.update(missing)
            if len(self._known_topics) > 1_000_000:
                self._known_topics = set(missing)
        committing = False
        try:
            conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
            locked = conn.execute(
                "SELECT topic, last_seq, last_ts_ns FROM topics WHERE topic = ANY(%s) ORDER BY topic FOR NO KEY UPDATE",
                (topic_names,),
            ).fetchall()
            state = {topic: [int(last_seq), int(last_ts_ns)] for topic, last_seq, last_ts_ns in locked}
            if len(state) != len(topic_names):
                self._known_topics.difference_update(topic_names)
                raise StorageError("topic counter rows vanished during a write; retrying")
            stored = self.existing_keys([_row_key(row) for row in rows]) if rows else set()
            outcome, new_rows, deltas = self._number(rows, topics, totals, state, stored)
            if new_rows:
                (last,) = cast(
                    "tuple[int]",
                    conn.execute(
                        "UPDATE positions SET last = last + %s WHERE id = 1 RETURNING last", (len(new_rows),)
                    ).fetchone(),
                )
                first = last - len(new_rows) + 1
                columns: list[list[Any]] = [list(column) for column in zip(*new_rows)]
                columns.insert(3, list(range(first, last + 1)))
                # Arrival times on the server's clock, which every daemon's sweep compares with (see now()).
                columns[8] = [received_at + self._clock_offset for received_at in columns[8]]
                conn.execute(_INSERT_EVENTS, columns)
                # Delivered at COMMIT (and only then) to every daemon's subscription thread.
                conn.execute(f"NOTIFY {COMMITS_CHANNEL}")
            if deltas:
                conn.execute(_UPDATE_TOPICS, [list(column) for column in zip(*deltas)])
            resent = [*duplicates, *(_content(rows[index]) for index in outcome.duplicates)]
            if resent:
                # After the insert: an original written in this very group is compared too.
                outcome.conflicting = self._conflicting(conn, resent)
                if outcome.conflicting:
                    outcome.totals["conflicting_duplicates"] = len(outcome.conflicting)
                    per_topic: dict[str, int] = {}
                    for index in outcome.conflicting:
                        per_topic[resent[index][0]] = per_topic.get(resent[index][0], 0) + 1
                    conn.execute(
                        "UPDATE topics AS t SET conflicting_duplicates = t.conflicting_duplicates + v.n"
                        " FROM unnest(%s::text[], %s::bigint[]) AS v(topic, n) WHERE t.topic = v.topic",
                        (list(per_topic), list(per_topic.values())),
                    )
            added_bytes = sum(map(_row_bytes, new_rows))
            conn.execute(
                _UPDATE_NODE, [*(outcome.totals[name] for name in NODE_COUNTERS), added_bytes, serial, self.node]
            )
            committing = True
            conn.execute("COMMIT")
        except (pg.Error, StorageError):
            if conn.closed or conn.broken:
                if committing:
                    self._unknown = (serial, outcome)
                conn.close()
                self._conn = None
            else:
                try:
                    conn.execute("ROLLBACK")
                except pg.Error:
                    conn.close()
                    self._conn = None
            raise
        self._last_txn = serial
        return outcome

    @staticmethod
    def _conflicting(conn: psycopg.Connection[Any], resent: Sequence[Content]) -> list[int]:
        """The indexes of ``resent`` whose content differs from their original's.

        An exact re-send is settled by the server comparing bytes; the rest are fingerprinted
        against the stored row or, for a deleted event, its key's record. A key found in neither
        (forgotten after the horizon meanwhile) does not conflict. A bug in the comparison must
        not cost the commit: it is logged and nothing counted as conflicting.
        """
        columns: list[list[Any]] = [list(range(len(resent)))]
        for position in (0, 1, 2, 4, 5):
            columns.append([content[position] for content in resent])
        rows = conn.execute(_ORIGINALS, columns).fetchall()
        try:
            differing = []
            for index, same, ts_ns, source, payload, kept in rows:
                if same:
                    continue
                if payload is not None:
                    original = fingerprint(int(ts_ns), source, bytes(payload))
                elif kept is not None:
                    original = bytes(kept)
                else:
                    continue
                _topic, _event_id, _timestamp, r_ts_ns, r_source, r_payload = resent[index]
                if original != fingerprint(r_ts_ns, r_source, bytes(r_payload)):
                    differing.append(int(index))
        except Exception:
            log.exception(
                "comparing %d duplicates with their originals failed; none counted as conflicting", len(resent)
            )
            return []
        return sorted(differing)

    @staticmethod
    def _number(
        rows: Sequence[Row],
        topics: dict[str, TopicDelta],
        totals: dict[str, int],
        state: dict[str, list[int]],
        stored: set[tuple[str, str]],
    ) -> tuple[GroupOutcome, list[Row], list[tuple[str, int, int, int, int, int]]]:
        """Settle each row (duplicate, or new with its seq and lateness) against the locked state."""
        outcome = GroupOutcome()
        seen: set[tuple[str, str]] = set()
        new_rows: list[Row] = []
        added: dict[str, list[int]] = {}  # topic -> [new, late among them, write-time duplicates]
        stored_ts = {topic: values[1] for topic, values in state.items()}
        new_topics = 0
        for index, row in enumerate(rows):
            topic, event_id, _seq, timestamp, ts_ns, source, payload, received_at, late = row
            key = (topic, event_id)
            counts = added.setdefault(topic, [0, 0, 0])
            if key in stored or key in seen:
                outcome.duplicates.append(index)
                counts[2] += 1
                continue
            seen.add(key)
            topic_state = state[topic]
            if topic_state[0] == 0:
                new_topics += 1
            topic_state[0] += 1
            # Late against this daemon's window, or behind what any daemon has committed.
            is_late = bool(late) or ts_ns < stored_ts[topic]
            if is_late:
                counts[1] += 1
            elif ts_ns > topic_state[1]:
                topic_state[1] = ts_ns
            counts[0] += 1
            new_rows.append(
                (topic, event_id, topic_state[0], timestamp, ts_ns, source, bytes(payload), received_at, is_late)
            )
        deltas = []
        for topic in sorted(set(topics) | set(added)):
            counted = topics.get(topic) or TopicDelta()
            _new, late_count, dropped = added.get(topic, (0, 0, 0))
            deltas.append(
                (
                    topic,
                    state[topic][0],
                    state[topic][1],
                    counted.received,
                    counted.duplicate_dropped + dropped,
                    late_count,
                )
            )
        unique = len(new_rows)
        outcome.totals = {
            "received": totals.get("received", 0),
            "unique_processed": unique,
            "duplicate_dropped": totals.get("received", 0) - unique,
            "rejected": totals.get("rejected", 0),
            "late": sum(counts[1] for counts in added.values()),
            "stored": unique,
            "expired": 0,
            "conflicting_duplicates": 0,
            "topic_count": new_topics,
        }
        return outcome, new_rows, deltas

    # --- Retention: each method runs a short transaction of its own (see the module docstring).

    def try_sweep_lock(self) -> bool:
        """Take the cluster's sweep lock if no other daemon holds it: only one sweeps at a time.

        A session lock: it lasts across the sweep's transactions until :meth:`sweep_unlock`
        (or the connection's end). Should two sweeps still overlap (a lost connection lets
        another daemon in), each deletion and count stays exact: a row deleted by the other
        sweep is skipped by this one's DELETE.
        """
        row = self._run(lambda conn: conn.execute("SELECT pg_try_advisory_lock(%s)", (SWEEP_LOCK,)).fetchone())
        held = bool(row and row[0])
        self._sweep_session = self._connection() if held else None
        return held

    def sweep_unlock(self) -> None:
        """Let another daemon's sweep run (no error if the lock went with a lost connection)."""
        held_by, self._sweep_session = self._sweep_session, None
        if held_by is None:
            return
        if self._conn is not None and not (self._conn.closed or self._conn.broken):
            if self._conn is not held_by:
                return  # the lock went with the session that held it
            try:
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (SWEEP_LOCK,))
            except Exception as exc:
                log.warning("releasing the sweep lock failed: %s", one_line(exc))

    def expire_oldest(self, received_before: float, max_rows: int) -> int:
        """Delete up to ``max_rows`` of the oldest events in commit order, stopping at the first
        that arrived at or after ``received_before``; how many went.

        Commit positions are taken under one row lock held until COMMIT, so commit order is
        position order and a prefix of it is a prefix of every topic's seqs: stored seqs stay
        gapless from first to last.
        """

        def chunk(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            rows = conn.execute(
                f"SELECT position, topic, received_at FROM ({_sized('position')}"
                " FROM events ORDER BY position LIMIT %s) AS oldest"
                " WHERE through <= %s OR through = size ORDER BY position",
                (max_rows, EXPIRE_CHUNK_BYTES),
            ).fetchall()
            doomed = []
            for row in rows:
                if row[2] >= received_before:
                    break
                doomed.append(row)
            return doomed

        return self._expire(chunk)

    def topics_over(self, max_events: int) -> list[tuple[str, int]]:
        """(topic, how many events over ``max_events`` it holds), for every topic of the cluster."""
        return self._run(
            lambda conn: [
                (str(topic), int(excess))
                for topic, excess in conn.execute(
                    "SELECT topic, last_seq - expired - %s FROM topics WHERE last_seq - expired > %s ORDER BY topic",
                    (max_events, max_events),
                ).fetchall()
            ]
        )

    def expire_topic_oldest(self, topic: str, count: int) -> int:
        """Delete the ``count`` lowest-seq events of ``topic``; how many went."""
        return self._expire(
            lambda conn: conn.execute(
                f"SELECT position, topic, received_at FROM ({_sized('seq')}"
                " FROM events WHERE topic = %s ORDER BY seq LIMIT %s) AS oldest"
                " WHERE through <= %s OR through = size ORDER BY seq",
                (topic, count, EXPIRE_CHUNK_BYTES),
            ).fetchall()
        )

    def forget_keys(self, committed_before: float, max_rows: int) -> int:
        """Drop up to ``max_rows`` deleted keys committed before ``committed_before`` (the dedup
        horizon has passed: a replay of them is new again); how many went."""

        def run(conn: psycopg.Connection[Any]) -> int:
            self._sweeping(conn)
            with conn.transaction():
                gone = conn.execute(
                    "DELETE FROM deleted_keys WHERE (topic, event_id) IN (SELECT topic, event_id FROM deleted_keys"
                    " WHERE committed_at < %s ORDER BY committed_at LIMIT %s) RETURNING topic, event_id",
                    (int(committed_before), max_rows),
                ).fetchall()
                if gone:
                    freed = sum(key_bytes(topic, event_id) for topic, event_id in gone)
                    conn.execute(
                        "UPDATE nodes SET stored_bytes = stored_bytes - %s WHERE node = %s", (freed, self.node)
                    )
                return len(gone)

        return self._run(run)

    def stored_bytes(self) -> tuple[int, int]:
        """The bytes [retention] max_bytes budgets, summed over every daemon: the stored events'
        rows and the kept keys' records as loaded tables hold them (row and index entries, text
        and payload bytes), not the files on disk, which also hold dead rows until (auto)vacuum
        and never shrink by themselves; with the number of events stored."""
        (row,) = self._run(
            lambda conn: conn.execute(
                "SELECT coalesce(sum(stored_bytes), 0), coalesce(sum(stored), 0) FROM nodes"
            ).fetchall()
        )
        return int(row[0]), int(row[1])

    def _expire(self, chunk: Callable[[psycopg.Connection[Any]], list[tuple[Any, ...]]]) -> int:
        """In one transaction: pick a chunk's rows, lock their topics' counter rows (in sorted
        order, as writers do, so neither deadlocks the other and a writer's key lookup never
        sees a topic half-swept), delete the rows, keep their keys and count them."""

        def run(conn: psycopg.Connection[Any]) -> int:
            self._sweeping(conn)
            with conn.transaction():
                doomed = chunk(conn)
                if not doomed:
                    return 0
                names = sorted({row[1] for row in doomed})
                conn.execute(
                    "SELECT 1 FROM topics WHERE topic = ANY(%s) ORDER BY topic FOR NO KEY UPDATE", (names,)
                ).fetchall()
                # RETURNING gives only the rows this transaction deleted, never one another sweep took.
                deleted = conn.execute(
                    "DELETE FROM events WHERE position = ANY(%s)"
                    " RETURNING position, topic, event_id, seq, ts_ns, source, payload, received_at, timestamp",
                    ([row[0] for row in doomed],),
                ).fetchall()
                if not deleted:
                    return 0
                records = [
                    (topic, event_id, seq, fingerprint(int(ts_ns), source, bytes(payload)), int(received_at) + 1)
                    for _position, topic, event_id, seq, ts_ns, source, payload, received_at, _timestamp in deleted
                ]
                # The events' rows go; their keys' records stay.
                freed = sum(
                    event_bytes(topic, event_id, timestamp, source, payload) - key_bytes(topic, event_id)
                    for _position, topic, event_id, _seq, _ts_ns, source, payload, _received_at, timestamp in deleted
                )
                conn.execute(_RECORD_DELETED, [list(column) for column in zip(*records)])
                per_topic: dict[str, list[int]] = {}  # topic -> [how many went, the last one's position]
                for position, topic, *_ in deleted:
                    gone = per_topic.setdefault(topic, [0, 0])
                    gone[0] += 1
                    gone[1] = max(gone[1], position)
                conn.execute(
                    "UPDATE topics AS t SET expired = t.expired + v.n,"
                    " expired_position = greatest(t.expired_position, v.position)"
                    " FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS v(topic, n, position)"
                    " WHERE t.topic = v.topic",
                    (list(per_topic), [n for n, _ in per_topic.values()], [p for _, p in per_topic.values()]),
                )
                conn.execute(
                    "UPDATE nodes SET expired = expired + %s, stored = stored - %s, stored_bytes = stored_bytes - %s"
                    " WHERE node = %s",
                    (len(deleted), len(deleted), freed, self.node),
                )
                return len(deleted)

        return self._run(run)

    def _sweeping(self, conn: psycopg.Connection[Any]) -> None:
        """Raise :class:`StorageError` when the sweep lock was taken by a session since lost:
        another daemon may be sweeping, and a chunk of this sweep would delete on top of its
        (each trimming a topic by the excess it counted)."""
        if self._sweep_session is not None and conn is not self._sweep_session:
            raise StorageError(
                f"{self.where}: the sweep lock went with the writer's lost session; this sweep stops (the next"
                " one takes the lock again)"
            )

    def _run(self, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        """``work(connection)``, its psycopg errors raised as one-line :class:`StorageError`; a
        lost connection is dropped, to be made again by the next call."""
        pg = load_psycopg()
        conn = self._connection()
        try:
            return work(conn)
        except pg.Error as exc:
            if isinstance(exc, pg.errors.InsufficientPrivilege):
                # Looked up on the connection that was refused, which stays usable.
                raise PrivilegeMissing(f"{self.where}: {denied(conn, exc)}") from None
            if conn.closed or conn.broken:
                conn.close()
                self._conn = None
            raise StorageError(f"{self.where}: {one_line(exc)}") from None

    def save_consumer_positions(
        self, positions: Mapping[str, tuple[str | None, int] | None], claims: Mapping[str, Claim], at: float
    ) -> set[str]:
        """Store named consumers' acknowledged positions: name -> (topic or None for all topics,
        cursor), or None to delete the name's row; the names refused, which another daemon
        claimed after ``claims`` (nothing is stored or deleted for those).

        Each row is written only while the name's claim in ``consumer_claims`` is still this
        follower's, with that claim row locked: a forget through another daemon (which claims
        the name first) can never be undone by an acknowledgement this daemon stores just after.
        """
        kept = {name: value for name, value in sorted(positions.items()) if value is not None}
        forgotten = sorted(name for name, value in positions.items() if value is None)
        with self._naming_privileges():
            return self._save_consumer_positions(kept, forgotten, claims, at)

    def _save_consumer_positions(
        self,
        kept: dict[str, tuple[str | None, int]],
        forgotten: list[str],
        claims: Mapping[str, Claim],
        at: float,
    ) -> set[str]:
        done: set[str] = set()
        conn = self._connection()
        if forgotten:
            rows = conn.execute(
                "WITH mine AS (DELETE FROM consumer_claims AS c USING unnest(%s::text[], %s::bigint[]) AS v(n, k)"
                " WHERE c.name = v.n AND c.claim = v.k RETURNING c.name),"
                " gone AS (DELETE FROM consumers WHERE name IN (SELECT name FROM mine))"
                " SELECT name FROM mine",
                (forgotten, [claims[name][0] for name in forgotten]),
            ).fetchall()
            done.update(row[0] for row in rows)
        if kept:
            rows = conn.execute(
                "INSERT INTO consumers (name, topic, position, updated_at)"
                " SELECT v.n, v.t, v.p, %s FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[])"
                " AS v(n, t, p, k) JOIN consumer_claims AS c ON c.name = v.n AND c.claim = v.k"
                " ORDER BY v.n FOR SHARE OF c"
                " ON CONFLICT (name) DO UPDATE SET topic = excluded.topic, position = excluded.position,"
                " updated_at = excluded.updated_at RETURNING name",
                (
                    at,
                    list(kept),
                    [topic for topic, _ in kept.values()],
                    [position for _, position in kept.values()],
                    [claims[name][0] for name in kept],
                ),
            ).fetchall()
            done.update(row[0] for row in rows)
        return (set(kept) | set(forgotten)) - done

    def keep_session(self) -> None:
        """Make sure the writer's session, and with it this node's lock, is alive: a session a
        server restart ended is made again at once, not at the next write, so another daemon
        started meanwhile with this node's name is refused rather than taking it. Raises
        :class:`StorageError` when the server is away or the name was taken."""
        try:
            self._run(lambda conn: conn.execute("SELECT 1"))
        except StorageError:
            self._connection()

    def close(self) -> None:
        """Close the connection (an open transaction is rolled back by the server)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class PostgresReader:
    """The query side on a connection of its own: events, topics, this node's and the cluster's counters."""

    def __init__(self, dsn: str, node: str, max_page_bytes: int = 4 * 1024 * 1024) -> None:
        self.dsn = dsn
        self.node = node
        self.where = describe_dsn(dsn)
        self.max_page_bytes = max_page_bytes
        self._conn: psycopg.Connection[Any] | None = None
        self._troubled_at = -math.inf  # when the server last failed to answer or to take a connection
        self._connecting: threading.Thread | None = None  # a connection made for the probes, in the background
        self._connected: psycopg.Connection[Any] | None = None  # what it made, taken by the next query
        self._connect_error = ""

    def _usable(self, answer_within: float | None) -> psycopg.Connection[Any]:
        """The connection, made again if it was lost. A probe (``answer_within`` given) never waits
        for a connection to a server in trouble lately: connecting may block for connect_timeout,
        longer than a probe's caller waits, so it is made in the background meanwhile."""
        if self._conn is not None and not (self._conn.closed or self._conn.broken):
            return self._conn
        if self._connected is not None:
            self._conn, self._connected = self._connected, None
            return self._conn
        if answer_within is not None:
            if self._connecting is None or not self._connecting.is_alive():
                self._connecting = threading.Thread(target=self._connect_for_probes, name="pg-reconnect", daemon=True)
                self._connecting.start()
            if time.monotonic() - self._troubled_at >= TROUBLED_S:
                # Not in trouble lately: worth the probe's own time (a healthy server connects in
                # milliseconds), never connect_timeout's.
                self._connecting.join(answer_within)
                if self._connected is not None:
                    self._conn, self._connected = self._connected, None
                    return self._conn
                self._troubled_at = time.monotonic()
                raise StorageError(f"{self.where} did not take a connection within {answer_within:g} s; reconnecting")
            raise StorageError(f"{self.where} did not answer lately; reconnecting{self._connect_error}")
        try:
            self._conn = self._connect()
        except StorageError:
            self._troubled_at = time.monotonic()
            raise
        return self._conn

    def _connect(self) -> psycopg.Connection[Any]:
        conn = connect(self.dsn, self.node, "reader")
        set_statement_timeout(conn, running_statement_timeout_ms())
        return conn

    def _connect_for_probes(self) -> None:
        try:
            self._connected = self._connect()
            self._connect_error = ""
        except Exception as exc:  # said by the next probe
            self._connect_error = f" (the last try: {one_line(exc)})"

    def _query(self, sql: str, params: Sequence[Any] = (), answer_within: float | None = None) -> list[tuple[Any, ...]]:
        """Rows of one query; one reconnect is tried if the connection was lost (not if the
        server did not answer: it would not answer the new one either). ``answer_within``
        seconds, when given, bound the wait for the answer below the statement timeout."""
        pg = load_psycopg()
        for attempt in (1, 2):
            conn: Any = self._usable(answer_within)
            usual = conn.answer_timeout_s
            if answer_within is not None:
                conn.answer_timeout_s = min(usual, answer_within)
            try:
                rows: list[tuple[Any, ...]] = conn.execute(sql, params).fetchall()
                return rows
            except pg.errors.InsufficientPrivilege as exc:
                raise PrivilegeMissing(f"{self.where}: {denied(conn, exc)}") from None
            except pg.OperationalError as exc:
                if isinstance(exc, no_answer_error()):  # hung: a new connection would hang as well
                    self._troubled_at = time.monotonic()
                if isinstance(exc, no_answer_error()) or not (conn.closed or conn.broken) or attempt == 2:
                    raise StorageError(f"{self.where}: {one_line(exc)}") from None
            finally:
                conn.answer_timeout_s = usual
        raise AssertionError("unreachable")

    def event_rows(self, topic: str | None, after: int, limit: int) -> list[tuple[Any, ...]]:
        """A page of events as rows ``(cursor, topic, event_id, timestamp, source, payload, seq,
        late)``, for :func:`actors.reader.pack_events_page`: by seq within a topic, by commit
        position across all. Payloads stay the bytes stored, as SQLite's reader passes them: a
        payload unpacked here and packed again lost keys a dict merges (``1`` and ``true``)."""
        columns = "topic, event_id, timestamp, source, payload, seq, late"
        # The page also stops at max_page_bytes of payload (always holding its first event); the
        # server sums the sizes of the limited rows, so rows past the budget are never sent.
        if topic is not None:
            limited = f"SELECT seq AS cursor, {columns} FROM events WHERE topic = %s AND seq > %s ORDER BY seq LIMIT %s"
            params: tuple[Any, ...] = (topic, after, limit)
        else:
            limited = f"SELECT position AS cursor, {columns} FROM events WHERE position > %s ORDER BY position LIMIT %s"
            params = (after, limit)
        rows = self._query(
            f"SELECT cursor, {columns} FROM ("
            f" SELECT *, sum(octet_length(payload)) OVER w AS running, row_number() OVER w AS n"
            f" FROM ({limited}) AS limited WINDOW w AS (ORDER BY cursor)"
            ") AS page WHERE n = 1 OR running <= %s ORDER BY cursor",
            (*params, self.max_page_bytes),
        )
        return [(int(cursor), *rest) for cursor, *rest in rows]

    def topics(self, after: str = "", limit: int | None = None) -> list[dict[str, Any]]:
        """Every topic with an event, with its count, last seq and counters, by name (in the
        database's collation); only those named after ``after``, at most ``limit`` of them."""
        rows = self._query(
            "SELECT topic, last_seq, received, duplicate_dropped, late, expired, conflicting_duplicates"
            " FROM topics WHERE last_seq > 0 AND topic > %s ORDER BY topic LIMIT %s",
            (after, limit),
        )
        return [
            {
                "topic": topic,
                # Seqs are gapless from 1 and retention deletes the lowest first, so the stored
                # ones run from expired + 1 to the last seq.
                "count": last_seq - expired,
                "first_seq": expired + 1,
                "last_seq": last_seq,
                "received": received,
                "unique_processed": last_seq,
                "duplicate_dropped": duplicates,
                "conflicting_duplicates": conflicting,
                "expired": expired,
                "late": late,
            }
            for topic, last_seq, received, duplicates, late, expired, conflicting in rows
        ]

    def first(self, topic: str | None) -> int:
        """The lowest seq of ``topic`` (or, without one, the lowest commit position) still stored;
        when nothing is stored, one past the last assigned (as :meth:`EventReader.first`)."""
        if topic is not None:
            ((lowest, last),) = self._query(
                "SELECT (SELECT min(seq) FROM events WHERE topic = %s), (SELECT last_seq FROM topics WHERE topic = %s)",
                (topic, topic),
            )
            return int(lowest) if lowest is not None else int(last or 0) + 1
        ((lowest, last),) = self._query("SELECT (SELECT min(position) FROM events), (SELECT last FROM positions)")
        return int(lowest) if lowest is not None else int(last or 0) + 1

    def consumers(self) -> list[dict[str, Any]]:
        """Every named consumer: its topic (None: all topics), acknowledged position and lag (as
        :meth:`EventReader.consumers`: the head past the position, the topic's or the commit one)."""
        rows = self._query(
            "SELECT c.name, c.topic, c.position, c.updated_at, t.last_seq, (SELECT last FROM positions)"
            " FROM consumers AS c LEFT JOIN topics AS t ON t.topic = c.topic ORDER BY c.name"
        )
        return [
            {
                "name": name,
                "topic": topic,
                "position": int(position),
                "lag": int(head if topic is None else (last_seq or 0)) - int(position),
                "updated_at": updated_at,
            }
            for name, topic, position, updated_at, last_seq, head in rows
        ]

    def cluster_counters(self) -> dict[str, int]:
        """Every node's committed counters, summed."""
        sums = ", ".join(f"coalesce(sum({name}), 0)" for name in NODE_COUNTERS)
        (row,) = self._query(f"SELECT {sums} FROM nodes", answer_within=CLUSTER_ANSWER_S)
        return {name: int(value) for name, value in zip(NODE_COUNTERS, row)}

    def blockers(self, session: int | None) -> list[str]:
        """The sessions backend ``session`` waits for a lock of, each described (with None: just
        whether the server answers); raises :class:`StorageError` unless the server answers."""
        if session is None:
            self._query("SELECT 1", answer_within=PROBE_ANSWER_S)
            return []
        rows = self._query(
            "SELECT b.pid, b.application_name, b.state, extract(epoch FROM clock_timestamp() - b.state_change)::float8"
            " FROM unnest(pg_blocking_pids(%s)) AS blocker(pid) JOIN pg_stat_activity AS b USING (pid) ORDER BY b.pid",
            (session,),
            answer_within=PROBE_ANSWER_S,
        )
        return [
            f"session {pid} ({name or 'no application_name'}, {state or 'state hidden'}"
            + (f" for {seconds:.0f} s)" if seconds is not None else ")")
            for pid, name, state, seconds in rows
        ]

    def close(self) -> None:
        """Close the connection (and one made in the background, once it is done)."""
        if self._connecting is not None:
            self._connecting.join(CONNECT_TIMEOUT_S + 1)
        for conn in (self._conn, self._connected):
            if conn is not None:
                conn.close()
        self._conn = self._connected = None


class PostgresEventSource:
    """The subscription thread's reads (:class:`~actors.event_sources.EventSource`) on a connection
    of its own. Positions are the gapless commit positions.

    Other daemons' commits wake this one through a second connection that LISTENs on the channel
    every write transaction NOTIFYs: the thread polls its socket (:meth:`wakeup_fd`) beside its
    own. While that connection is down the head is read every 100 ms instead, and every second
    otherwise, as a safety net. The same connection hears which named consumers other daemons
    took (:meth:`claim`); those notices are not repeated, so one sent while it is down is missed.
    """

    def __init__(self, dsn: str, node: str) -> None:
        self.dsn = dsn
        self.node = node
        self.where = describe_dsn(dsn)
        self.errors: tuple[type[BaseException], ...] = (StorageError, load_psycopg().Error)
        self._conn: psycopg.Connection[Any] | None = None
        self._retry_connect = 0.0
        self._listener: psycopg.Connection[Any] | None = None
        self._retry_listen = 0.0
        self._listening: threading.Thread | None = None  # making the LISTEN connection
        self._made_listener: psycopg.Connection[Any] | None = None  # what it made, taken by wakeup_fd
        self._odd_notices = RateLimitedLog(log)

    @property
    def poll_s(self) -> float:
        return SUBSCRIBE_POLL_S if self._listener is not None else SUBSCRIBE_POLL_UNHEARD_S

    def wakeup_fd(self, make: bool) -> int | None:
        """The LISTEN connection's socket, readable when a commit was notified; None while there is none.

        When missing and ``make``, it is made again on a thread of its own (connecting can take
        the whole connect timeout, and the subscription thread's heartbeats must not wait for
        it), at most once a second and only while reads work.
        """
        if self._listening is not None and not self._listening.is_alive():
            self._listening = None
            self._listener, self._made_listener = self._made_listener, None
        if (
            make
            and self._listener is None
            and self._listening is None
            and self._conn is not None
            and time.monotonic() >= self._retry_listen
        ):
            self._retry_listen = time.monotonic() + RECONNECT_PAUSE_S
            self._listening = threading.Thread(target=self._make_listener, name="pg-listen", daemon=True)
            self._listening.start()
        return None if self._listener is None else self._listener.fileno()

    def _make_listener(self) -> None:
        """On the pg-listen thread: a connection LISTENing for commits, left for :meth:`wakeup_fd`."""
        try:
            listener = connect(self.dsn, self.node, "commit notices")
            listener.execute(f"LISTEN {COMMITS_CHANNEL}")
            listener.execute(f"LISTEN {CONSUMERS_CHANNEL}")
        except Exception as exc:
            log.warning("listening for commits on %s failed (%s); polling", self.where, one_line(exc))
        else:
            self._made_listener = listener

    def drain_wakeups(self) -> list[tuple[str, Claim]]:
        """Take the notices that arrived: commits (only that they happened matters) and the
        named consumers other daemons took."""
        listener = self._listener
        taken: list[tuple[str, Claim]] = []
        if listener is None:
            return taken
        try:
            listener.pgconn.consume_input()
            while (notice := listener.pgconn.notifies()) is not None:
                if notice.relname.decode() == CONSUMERS_CHANNEL:
                    claim = _claim_of(notice.extra)
                    if claim is None:  # any session may NOTIFY: not one of ours
                        self._odd_notices.warning(
                            "a notice on %s that is not [node, name, claim number] was ignored", CONSUMERS_CHANNEL
                        )
                    elif claim[1][1] != self.node:
                        taken.append(claim)
        except load_psycopg().Error as exc:
            log.warning("the commit notices from %s stopped (%s); polling", self.where, one_line(exc))
            listener.close()
            self._listener = None
        return taken

    def claim(self, name: str) -> Claim:
        # The claim row is raised only: of two claims committed out of their numbers' order,
        # the later number stays, as every daemon's notice handling decides too.
        rows = self._rows(
            "WITH claim AS (SELECT nextval('consumer_claim_numbers') AS number),"
            " taken AS (INSERT INTO consumer_claims (name, claim, node) SELECT %s, number, %s FROM claim"
            " ON CONFLICT (name) DO UPDATE SET claim = excluded.claim, node = excluded.node"
            " WHERE consumer_claims.claim < excluded.claim)"
            " SELECT number, pg_notify(%s, json_build_array(%s::text, %s::text, number)::text) FROM claim",
            (name, self.node, CONSUMERS_CHANNEL, self.node, name),
        )
        return (int(rows[0][0]), self.node)

    def open(self) -> None:
        """Nothing to do: the connection is made on the first read (and again after one is lost)."""

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not (self._conn.closed or self._conn.broken):
            return self._conn
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        # Connecting blocks up to connect_timeout: while the server is away, try once a second,
        # so the thread keeps serving heartbeats in between.
        if time.monotonic() < self._retry_connect:
            raise StorageError(f"{self.where} is unavailable; reconnecting")
        try:
            conn = connect(self.dsn, self.node, "subscriptions")
            set_statement_timeout(conn, SUBSCRIBE_STATEMENT_TIMEOUT_MS)
        except Exception:
            self._retry_connect = time.monotonic() + RECONNECT_PAUSE_S
            raise
        self._conn = conn
        return conn

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        conn = self._connection()
        try:
            return conn.execute(sql, params).fetchall()
        except BaseException as exc:
            named = None
            if isinstance(exc, load_psycopg().errors.InsufficientPrivilege):
                # Looked up on the connection that was refused: subscribers and the log say what to grant.
                named = PrivilegeMissing(f"{self.where}: {denied(conn, exc)}")
            if conn.closed or conn.broken:
                # Lost (a hung server is given up on this way): neither the next read, maybe in
                # the same pass over the subscriptions, nor the LISTEN connection (made only
                # while reads work) may block on a connect right away.
                conn.close()
                self._conn = None
                self._retry_connect = time.monotonic() + RECONNECT_PAUSE_S
            if named is not None:
                raise named from None
            raise

    def head(self) -> int:
        ((head,),) = self._rows("SELECT last FROM positions")
        return int(head)

    def first(self) -> int | None:
        ((first,),) = self._rows("SELECT min(position) FROM events")
        return None if first is None else int(first)

    def expired_total(self) -> int:
        ((total,),) = self._rows("SELECT coalesce(sum(expired), 0) FROM nodes")
        return int(total)

    def expired_marks(self, topics: Collection[str]) -> dict[str, tuple[int, int]]:
        rows = self._rows(
            "SELECT topic, expired, expired_position FROM topics WHERE topic = ANY(%s) AND expired > 0", (list(topics),)
        )
        return {topic: (int(expired), int(position)) for topic, expired, position in rows}

    def topic_last(self, topic: str) -> int:
        rows = self._rows("SELECT last_seq FROM topics WHERE topic = %s", (topic,))
        return int(rows[0][0]) if rows else 0

    def after(self, cursor: int, limit: int) -> list[tuple[Any, ...]]:
        return self._rows(
            f"SELECT {_SOURCE_COLUMNS} FROM events WHERE position > %s ORDER BY position LIMIT %s", (cursor, limit)
        )

    def filtered(self, cursor: int, upper: int, topics: Collection[str], limit: int) -> list[tuple[Any, ...]]:
        return self._rows(
            f"SELECT {_SOURCE_COLUMNS} FROM events WHERE position > %s AND position <= %s AND topic = ANY(%s)"
            " ORDER BY position LIMIT %s",
            (cursor, upper, list(topics), limit),
        )

    def topic_after(self, topic: str, seq: int, limit: int) -> list[tuple[Any, ...]]:
        return self._rows(
            f"SELECT {_SOURCE_COLUMNS} FROM events WHERE topic = %s AND seq > %s ORDER BY seq LIMIT %s",
            (topic, seq, limit),
        )

    def consumer(self, name: str) -> tuple[str | None, int] | None:
        rows = self._rows("SELECT topic, position FROM consumers WHERE name = %s", (name,))
        return (rows[0][0], int(rows[0][1])) if rows else None

    def close(self) -> None:
        """Close the connections (the one being made too, once made: at most a connect timeout)."""
        if self._listening is not None:
            self._listening.join(CONNECT_TIMEOUT_S + 1)
            self._listening = None
        for conn in (self._conn, self._listener, self._made_listener):
            if conn is not None:
                conn.close()
        self._conn = self._listener = self._made_listener = None


def _claim_of(payload: bytes) -> tuple[str, Claim] | None:
    """The consumer name and :data:`~actors.event_sources.Claim` of a notice on
    :data:`CONSUMERS_CHANNEL` (``[node, name, claim number]``), or None when it is not one."""
    try:
        claim = json.loads(payload)
    except ValueError:
        return None
    if not (isinstance(claim, list) and len(claim) == 3):
        return None
    node, name, number = claim
    if isinstance(node, str) and isinstance(name, str) and isinstance(number, int) and not isinstance(number, bool):
        return name, (number, node)
    return None


class PostgresDedupActor(DedupActor):
    """The dedup actor on PostgreSQL: lookups are hints, the write transaction settles each event.

    It keeps the SQLite actor's grouping, in-flight credit and acknowledgements, and replaces
    what touches the database. A failed group is retried as it was (later writes wait behind
    it), so a COMMIT whose outcome was lost is retried with exactly the rows it held.
    """

    # Another daemon may store the same key first, with other content: a re-send of a held row
    # must then be compared with what is stored, not with the held row, so it waits for the write.
    held_rows_are_stored_as_held = False

    def __init__(self, dsn: str, node: str, **kwargs: Any) -> None:
        # The SQLite settings the base class keeps are unused here.
        super().__init__(Path("/nonexistent/postgresql"), synchronous="NORMAL", **kwargs)
        self._pg = PostgresStore(dsn, node, on_session=self._note_session)
        self._group_writes = 0  # writes in the group that failed and must be retried as it was
        self._group_rejected = 0
        self._group_replies = 0
        self._session_checked = time.monotonic()

    def _note_session(self, pid: int) -> None:
        self._live.writer_session = pid

    def on_start(self) -> None:
        import zmq

        from actors.dedup import ACK_ENDPOINT

        try:
            self._counters = self._pg.open()
        except StorageError as exc:
            self._pg.close()
            self._startup_error = exc
            return
        except Exception as exc:  # a psycopg error during migration
            self._pg.close()
            self._startup_error = StorageError(f"cannot prepare {self._pg.where}: {one_line(exc)}")
            return
        self._live.committed = dict(self._counters)
        self._acks = self._zmq_context.socket(zmq.PUSH)
        self._acks.setsockopt(zmq.LINGER, 0)
        self._acks.connect(ACK_ENDPOINT)
        log.info("storage: %s as node %r", self._pg.where, self._pg.node)

    def _close(self) -> None:
        self._pg.close()
        if self._acks is not None:
            self._acks.close(linger=1000)
            self._acks = None

    def _handle(self, message: Any) -> Any:
        if isinstance(message, Ping):
            return self._startup_error if self._startup_error is not None else True
        if isinstance(message, Tick):
            self._keep_session()
        return super()._handle(message)

    def _keep_session(self) -> None:
        """While idle, every SESSION_CHECK_S: the writer's session is alive (see PostgresStore.keep_session)."""
        now = time.monotonic()
        if now < self._session_checked + SESSION_CHECK_S or self._startup_error is not None:
            return
        self._session_checked = now
        if self._writes or self._failures:
            return  # a write is due, or being retried: it makes the session again itself
        try:
            self._pg.keep_session()
        except StorageError as exc:
            self._warn.warning("the writer's session: %s", exc)

    def _classify(
        self, keys: list[tuple[str, str]], unknown_topics: list[str], keys_json: str | None = None
    ) -> ClassifyResult:
        """A hint: what is stored now, or nothing while the database is away (the write settles it).
        ``keys_json`` is not needed here: PostgreSQL takes the keys as two arrays.

        Every unknown topic gets a state, a topic never seen's when the database cannot say: the
        ordering actor adopts each one before it orders the topic's events, and the write numbers
        them from the locked ``last_seq`` whatever the hint was.
        """
        existing: set[tuple[str, str]] = set()
        contents: StoredContents = {}
        states = dict.fromkeys(unknown_topics, TopicState(0, NO_TIMESTAMP))
        if not self._failures:
            try:
                existing, contents = self._pg.lookup(keys)
                if unknown_topics:
                    states.update(self._pg.topic_states(unknown_topics))
            except Exception as exc:
                log.warning(
                    "lookup on %s failed (%s); the write will settle these events", self._pg.where, one_line(exc)
                )
        self._add_held(keys, existing, contents)
        return ClassifyResult(existing, states, contents=contents)

    def _commit(self) -> None:
        # A retried group holds only the writes it failed with: the rest follow in their own.
        recovering = self._failures > 0
        held = sum(write.events for write in self._writes)
        while self._startup_error is None and (self._writes or self._rejected):
            if not self._commit_group():
                return
        if recovering:
            log.warning("%s takes writes again; the %d events held meanwhile are committed", self._pg.where, held)

    def _commit_group(self) -> bool:
        """Write one group; False when it failed (kept for a retry)."""
        self._answer_lookups()
        if self._group_writes or self._failures:
            writes = self._writes[: self._group_writes]
            rejected, replied = self._group_rejected, self._group_replies
        else:
            writes = list(self._writes)
            rejected, replied = self._rejected, len(self._rejected_replies)
        rows: list[Row] = list(itertools.chain.from_iterable(write.rows for write in writes))
        topics: dict[str, TopicDelta] = {}
        received = 0
        for write in writes:
            received += write.events
            for topic, delta in write.topics.items():
                total = topics.setdefault(topic, TopicDelta())
                total.received += delta.received
                total.duplicate_dropped += delta.duplicate_dropped
        resent = list(itertools.chain.from_iterable(write.duplicates for write in writes))
        try:
            outcome = self._pg.write(
                rows, topics, {"received": received, "rejected": rejected}, [event for event, _ticket in resent]
            )
        except Exception as exc:
            self._group_writes, self._group_rejected, self._group_replies = len(writes), rejected, replied
            self._fail_pg(exc)
            return False
        self._failures = 0
        self._group_writes = self._group_rejected = self._group_replies = 0
        self._live.last_commit_error = None
        del self._writes[: len(writes)]
        self._rejected -= rejected
        replies = self._rejected_replies[:replied]
        del self._rejected_replies[:replied]
        self._held = {_row_key(row): row for write in self._writes for row in write.rows}
        self._txn_events = sum(write.events for write in self._writes)
        self._txn_started = time.monotonic()
        self._settle(writes, outcome)
        if outcome.conflicting:
            self._name_conflicting(writes, resent, outcome)
        self._after_commit(writes, {name: outcome.totals[name] for name in COUNTER_NAMES}, replies)
        return True

    @staticmethod
    def _settle(writes: list[WriteBatch], outcome: GroupOutcome) -> None:
        """Turn rows found stored at write time into duplicates in their acknowledgements."""
        if writes:
            writes[0].new_topics = outcome.totals["topic_count"]
            for write in writes[1:]:
                write.new_topics = 0
        if not outcome.duplicates:
            return
        duplicates = iter(outcome.duplicates)
        target = next(duplicates)
        index = 0
        for write in writes:
            end = index + len(write.rows)
            while index <= target < end:
                ticket = write.row_tickets[target - index] if write.row_tickets else None
                if ticket is not None:
                    counts = write.tickets[ticket]
                    counts[0] -= 1
                    counts[1] += 1
                target = next(duplicates, -1)
            index = end
            if target < 0:
                return

    def _name_conflicting(
        self, writes: list[WriteBatch], resent: list[tuple[Event, AckTicket | None]], outcome: GroupOutcome
    ) -> None:
        """Log each conflicting duplicate and name it in its batch's acknowledgement."""
        rows: list[tuple[Row, AckTicket | None]] = []
        for write in writes:
            tickets = write.row_tickets or [None] * len(write.rows)
            rows.extend(zip(write.rows, tickets))
        for index in outcome.conflicting:
            event: Event | None
            if index < len(resent):
                event, ticket = resent[index]
                topic, event_id = event.topic, event.event_id
            else:
                # A row found stored (or kept) at write time: its event is the batch's first with that key.
                row, ticket = rows[outcome.duplicates[index - len(resent)]]
                topic, event_id = row[0], row[1]
                events = ticket.events if ticket is not None and ticket.events else []
                event = next((e for e in events if e.topic == topic and e.event_id == event_id), None)
            self._warn.warning(
                "conflicting duplicate: topic %r event_id %r was re-sent with different content; the first stored"
                " version is kept (a publisher reuses event ids)",
                topic,
                event_id,
            )
            if ticket is not None and event is not None:
                ticket.conflicting.append(event)

    # --- Retention: the sweep of the SQLite actor, on the shared database, by one daemon at a time.

    def _sweep_chunks(self, retention: RetentionConfig) -> Iterator[None]:
        """One sweep, if this daemon gets the cluster's sweep lock: every limit in turn, one
        short transaction of at most EXPIRE_CHUNK rows per step."""
        store = self._pg
        if not store.try_sweep_lock():
            return  # another daemon sweeps the shared database now
        try:
            max_age = retention.max_age_s
            if max_age is not None:
                received_before = store.now() - max_age
                while self._expire_chunk(store.expire_oldest, received_before, self._chunk):
                    yield
            keep = retention.max_events_per_topic
            if keep:
                # Every topic, not only this daemon's: the others' writes count as well.
                for topic, excess in store.topics_over(keep):
                    yield from self._in_chunks(
                        functools.partial(self._expire_chunk, store.expire_topic_oldest, topic), excess
                    )
            budget = retention.max_bytes_value
            if budget is not None:
                # Every daemon's rows count. Oldest first in commit order, each chunk no more than
                # the share of events by which the count is over, until it fits.
                while True:
                    used, stored = store.stored_bytes()
                    if used <= budget or stored <= 0:
                        break
                    share = -(-(used - budget) * stored // used)
                    if not self._expire_chunk(store.expire_oldest, math.inf, min(self._chunk, share)):
                        break
                    yield
                self._note_budget(retention, *store.stored_bytes())
            horizon = retention.dedup_horizon_s
            if horizon is not None:
                committed_before = store.now() - horizon
                while store.forget_keys(committed_before, EXPIRE_CHUNK) == EXPIRE_CHUNK:
                    yield
        finally:
            store.sweep_unlock()

    def _expire_chunk(self, delete: Callable[..., int], *args: Any) -> int:
        """Run one expiry chunk, ``delete(*args)`` (a transaction of its own), size the next one
        and publish the counters it changed."""
        started = time.monotonic()
        deleted = delete(*args)
        self._count_expired(deleted, time.monotonic() - started)
        return deleted

    def _save_positions(self, message: SaveConsumerPositions) -> PositionsSaved:
        """Between commits, like on SQLite: commit what is held, then the positions (autocommit)."""
        self._commit()
        try:
            refused = self._pg.save_consumer_positions(message.positions, message.claims, time.time())
        except Exception as exc:
            return PositionsSaved(error=f"storing consumer positions on {self._pg.where} failed: {one_line(exc)}")
        return PositionsSaved(refused=frozenset(refused))

    def _fail_pg(self, exc: BaseException) -> None:
        delay = STORAGE_RETRY.delay(self._failures)
        self._failures += 1
        self._retry_at = time.monotonic() + delay
        if isinstance(exc, PrivilegeMissing):  # a GRANT mends it: the next retry commits what is held
            message = f"storage {self._pg.where} refuses this daemon's writes: {exc}"
        else:
            message = f"storage {self._pg.where} is unavailable: {one_line(exc)}"
        if self._failures == 1 or self._failures % 20 == 0:
            log.error(
                "writing the %d events held to %s failed (%s); none of them is acknowledged; retrying %s",
                sum(write.events for write in self._writes),
                self._pg.where,
                one_line(exc),
                self._retry_words(delay),
            )
        self._live.last_commit_error = message


class _Background(Generic[_T]):
    """``work()`` run on a thread of its own; :meth:`result` waits for it a bounded time."""

    def __init__(self, work: Callable[[], _T]) -> None:
        self._answer: _T | BaseException = TimeoutError("no answer yet")
        self._thread = threading.Thread(target=self._run, args=(work,), name="health-pings", daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], _T]) -> None:
        try:
            self._answer = work()
        except BaseException as exc:
            self._answer = exc

    def result(self, timeout: float) -> _T:
        """What ``work`` returned; raises what it raised, or TimeoutError when it is still running."""
        self._thread.join(timeout)
        if isinstance(self._answer, BaseException):
            raise self._answer
        return self._answer


class PostgresStatsActor(StatsActor):
    """The stats actor on PostgreSQL: stats gain ``cluster``, health asks the server."""

    def __init__(self, dsn: str, node: str, max_page_bytes: int = 4 * 1024 * 1024, **kwargs: Any) -> None:
        super().__init__(Path("/nonexistent/postgresql"), **kwargs)
        self._pg_reader = PostgresReader(dsn, node, max_page_bytes)

    def on_start(self) -> None:
        # Same methods as EventReader (topics, consumers, first), which is what answer() calls.
        self._reader = cast(EventReader, self._pg_reader)

    def answer(self, query: Query) -> dict[str, Any] | PackedReply:
        try:
            if isinstance(query, EventsQuery):
                reader, topic = self._pg_reader, query.topic
                return pack_events_page(
                    reader.event_rows(topic, query.after, query.limit),
                    query.after,
                    reader.max_page_bytes,
                    lambda: reader.first(topic),
                    with_position=topic is None,
                )
            return super().answer(query)
        except StorageError as exc:
            return {"error": f"storage {exc}"}

    def stats(self) -> dict[str, Any]:
        reply = super().stats()
        if "storage_error" in reply:  # commits fail: the server would not answer this one either
            reply["cluster_error"] = "not asked while this daemon's commits fail (see storage_error)"
            return reply
        try:
            reply["cluster"] = self._pg_reader.cluster_counters()
        except StorageError as exc:
            reply["cluster_error"] = f"storage {exc}"
        return reply

    def health(self) -> dict[str, Any]:
        # The actors are pinged while the server is asked, not after it: each may wait 2 s.
        pings = _Background(self._liveness)
        try:
            blockers = self._pg_reader.blockers(self._live.writer_session)
        except StorageError as exc:
            blockers = []
            server_error: str | None = f"storage {exc}"
        else:
            server_error = None
        problems = []
        try:
            alive = pings.result(LIVENESS_WAIT_S)
        except TimeoutError:
            alive = {}
            problems.append(f"the actors' pings took over {LIVENESS_WAIT_S:g} s")
        alive["stats"] = True
        problems += [f"{name} is not answering" for name, ok in alive.items() if not ok]
        if self._live.last_commit_error is not None:
            problems.append(f"the last commit failed: {self._live.last_commit_error}")
        elif server_error is not None:
            problems.append(server_error)
        problems += self._live.background_errors()
        # Daemons' commits take turns at the positions row, so a writer waits for another's lock
        # many times a second: only one that does not answer, or whose commit failed, is stuck.
        if blockers and (not alive.get("dedup", True) or self._live.last_commit_error is not None):
            problems.append(
                f"the writer's session waits for a lock held by {', '.join(blockers)}"
                " (a daemon paused in a commit holds every daemon's commits; see docs/postgresql.md)"
            )
        reply: dict[str, Any] = {
            "actors": alive,
            "database": self._pg_reader.where,
            "decoding": self._live.decoding,
            "endpoints": self._endpoints,
        }
        if problems:
            reply["error"] = "; ".join(problems)
        else:
            reply["status"] = "ok"
        return reply
