"""SQLite storage: the schema, the single writer's operations and the read-only query side.

Theory of operation. Exactly one :class:`EventStore` (owned by the dedup actor's thread) writes.
Each unique event is one row of ``events`` under PRIMARY KEY (topic, event_id); its rowid is
its position in commit order, which the all-topics cursor pages on. ``topics`` and ``counters``
hold every counter the stats report, and are updated inside the same transaction as the rows
they count, so after any crash the counters agree with the rows. ``topics`` is WITHOUT ROWID:
every commit upserts one row per topic it touched, and one B-tree instead of a table plus its
key index made that 8-10 -> 6 us per topic (3 000 of 100 000 topics per transaction); a
database made before keeps its rowid table, which the same statements serve just as well.
:class:`EventReader` opens its own read-only connection (WAL lets it read while the writer
writes), so queries never wait behind ingest.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import itertools
import json
import logging
import operator
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from actors.fingerprint import fingerprint
from actors.flow import within_bytes
from actors.migrations import SCHEMA_VERSION as _SCHEMA_VERSION
from actors.migrations import SchemaError, prepare
from transport.schema import MIN_TS_NS

SCHEMA_VERSION = str(_SCHEMA_VERSION)

NO_TIMESTAMP = MIN_TS_NS
"""A topic's last timestamp before its first event: below every instant, so that no event of a
new topic is late, whenever it happened (0 made every pre-1970 event late)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    topic       TEXT    NOT NULL,
    event_id    TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    timestamp   TEXT    NOT NULL,
    ts_ns       INTEGER NOT NULL,
    source      TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    received_at REAL    NOT NULL,
    late        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (topic, event_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS events_by_topic_seq ON events (topic, seq);
CREATE TABLE IF NOT EXISTS topics (
    topic             TEXT PRIMARY KEY,
    last_seq          INTEGER NOT NULL DEFAULT 0,
    last_ts_ns        INTEGER NOT NULL DEFAULT 0,
    received          INTEGER NOT NULL DEFAULT 0,
    duplicate_dropped INTEGER NOT NULL DEFAULT 0,
    late              INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS consumers (
    name       TEXT PRIMARY KEY,
    topic      TEXT,
    position   INTEGER NOT NULL,
    updated_at REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS deleted_keys (
    topic        TEXT    NOT NULL,
    event_id     TEXT    NOT NULL,
    seq          INTEGER NOT NULL,
    fingerprint  BLOB    NOT NULL,
    committed_at INTEGER NOT NULL,
    PRIMARY KEY (topic, event_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deleted_keys_by_age ON deleted_keys (committed_at);
CREATE TABLE IF NOT EXISTS topic_retention (
    topic                  TEXT PRIMARY KEY,
    expired                INTEGER NOT NULL DEFAULT 0,
    conflicting_duplicates INTEGER NOT NULL DEFAULT 0,
    expired_position       INTEGER NOT NULL DEFAULT 0  -- the commit position of its last deleted event
) WITHOUT ROWID;
"""

COUNTER_NAMES = (
    "received",
    "unique_processed",
    "duplicate_dropped",
    "rejected",
    "late",
    "stored",
    "expired",
    "conflicting_duplicates",
)

INSERT_EVENT = (
    "INSERT INTO events (topic, event_id, seq, timestamp, ts_ns, source, payload, received_at, late)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_TOPIC = """
INSERT INTO topics (topic, last_seq, last_ts_ns, received, duplicate_dropped, late)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (topic) DO UPDATE SET
    last_seq = max(last_seq, excluded.last_seq),
    last_ts_ns = max(last_ts_ns, excluded.last_ts_ns),
    received = received + excluded.received,
    duplicate_dropped = duplicate_dropped + excluded.duplicate_dropped,
    late = late + excluded.late
"""


# One statement for all the global counters (executemany would step once per counter).
_ADD_COUNTERS = "UPDATE counters SET value = value + CASE name {} ELSE 0 END".format(
    " ".join(f"WHEN '{name}' THEN ?" for name in COUNTER_NAMES)
)


@functools.cache
def _upsert_topics_sql(size: int) -> str:
    head, _, tail = _UPSERT_TOPIC.partition("VALUES (?, ?, ?, ?, ?, ?)")
    return head + "VALUES " + ",".join(["(?, ?, ?, ?, ?, ?)"] * size) + tail


# Every statement the writer runs drops the GIL around each sqlite3_step, and winning it back
# from busy ingest and ordering threads can take a whole switch interval. So each lookup below
# is one statement that answers in one row (a statement yielding a row per key stepped once
# per row: with another thread busy, 600 us per key found, against 4 us), and an insert is at
# most three multi-row statements below 2 048 rows (see _write_chunks).
#
# Lookups take their keys as one JSON text, which SQLite takes apart with the GIL released:
# bound one by one, each key's two strings were copied by SQLite's allocator under the GIL,
# about 1 500 instructions a key (scripts/writer_cost.py), more than the rest of the lookup's
# Python. SQLite's JSON functions (3.40) cut a string at \u0000, so keys holding a NUL
# (an event id may) are bound instead, in statements of at most 4 096 keys padded to a power
# of two; parameters stay below SQLite's default limit of 32766 per statement.
_KEY_CHUNK = 4096

# A found key comes back with its stored (timestamp, source, payload in lower-case hex), so the
# asker can settle an exact re-send at once: checking it at commit instead took the dedup thread
# a second trip to the same random row, ~3.4 us a re-send, about a quarter of its time at 20 %
# re-sends (docs/performance.md). Larger payloads stay in the database (a batch of large
# re-sends would be read whole into memory): their re-sends are checked at commit.
CONTENT_BACK_BYTES = 2048
_FOUND = (
    "SELECT json_group_array(json_array(asked.key, e.timestamp, e.source,"
    f" CASE WHEN length(e.payload) <= {CONTENT_BACK_BYTES} THEN lower(hex(e.payload)) END))"
)
_ASKED_EVENT = "e.topic = json_extract(asked.value, '$[0]') AND e.event_id = json_extract(asked.value, '$[1]')"
_LOOKUP_JSON = f"{_FOUND} FROM json_each(?) AS asked JOIN events AS e ON {_ASKED_EVENT}"
# A key kept in deleted_keys counts as present too (with no content: a null timestamp).
_LOOKUP_JSON_WITH_DELETED = (
    f"{_FOUND} FROM json_each(?) AS asked LEFT JOIN events AS e ON {_ASKED_EVENT}"
    " WHERE e.topic IS NOT NULL OR EXISTS (SELECT 1 FROM deleted_keys AS d"
    " WHERE d.topic = json_extract(asked.value, '$[0]') AND d.event_id = json_extract(asked.value, '$[1]'))"
)
_TOPIC_STATES_JSON = (
    "SELECT json_group_array(json_array(topic, last_seq, last_ts_ns)) FROM topics"
    " WHERE topic IN (SELECT value FROM json_each(?))"
)
_encode_json = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder(list[tuple[int, str | None, str | None, str | None]]).decode
_first = operator.itemgetter(0)
_content = operator.itemgetter(slice(1, 4))


def json_text(values: Sequence[Any]) -> str | None:
    """``values`` as one JSON text for ``json_each``; None when a string in them holds a NUL."""
    text = _encode_json(values)
    return None if b"\\u0000" in text else text.decode()


def _padded(count: int) -> int:
    """The next power of two: bound lookups are padded to one with keys that cannot exist (an
    empty topic is never valid), so only 13 statement shapes are ever compiled and all stay cached."""
    return 1 << (count - 1).bit_length()


@functools.cache
def _lookup_sql(size: int) -> str:
    values = ",".join(f"({index},?,?)" for index in range(size))
    return (
        f"WITH asked(position, topic, event_id) AS (VALUES {values})"
        " SELECT group_concat(asked.position) FROM asked"
        " JOIN events AS e ON e.topic = asked.topic AND e.event_id = asked.event_id"
    )


@functools.cache
def _lookup_with_deleted_sql(size: int) -> str:
    """Like :func:`_lookup_sql`, but a key kept in ``deleted_keys`` counts as present too."""
    values = ",".join(f"({index},?,?)" for index in range(size))
    return (
        f"WITH asked(position, topic, event_id) AS (VALUES {values})"
        " SELECT group_concat(asked.position) FROM asked"
        " WHERE EXISTS (SELECT 1 FROM events AS e WHERE e.topic = asked.topic AND e.event_id = asked.event_id)"
        " OR EXISTS (SELECT 1 FROM deleted_keys AS d WHERE d.topic = asked.topic AND d.event_id = asked.event_id)"
    )


@functools.cache
def _same_bytes_sql(size: int) -> str:
    """Which asked duplicates have the very bytes of their stored original (one row of positions)."""
    values = ",".join(f"({index},?,?,?,?,?)" for index in range(size))
    return (
        f"WITH asked(position, topic, event_id, timestamp, source, payload) AS (VALUES {values})"
        " SELECT group_concat(asked.position) FROM asked"
        " JOIN events AS e ON e.topic = asked.topic AND e.event_id = asked.event_id"
        " WHERE e.timestamp = asked.timestamp AND e.source = asked.source AND e.payload = asked.payload"
    )


@functools.cache
def _stored_content_sql(size: int) -> str:
    """The stored (instant, source, payload) of the asked keys still in ``events``, as one JSON row."""
    values = ",".join(f"({index},?,?)" for index in range(size))
    return (
        f"WITH asked(position, topic, event_id) AS (VALUES {values})"
        " SELECT json_group_array(json_array(asked.position, e.ts_ns, e.source, hex(e.payload))) FROM asked"
        " JOIN events AS e ON e.topic = asked.topic AND e.event_id = asked.event_id"
    )


@functools.cache
def _kept_fingerprints_sql(size: int) -> str:
    """The fingerprints kept for the asked keys among the deleted ones, as one JSON row."""
    values = ",".join(f"({index},?,?)" for index in range(size))
    return (
        f"WITH asked(position, topic, event_id) AS (VALUES {values})"
        " SELECT json_group_array(json_array(asked.position, hex(d.fingerprint))) FROM asked"
        " JOIN deleted_keys AS d ON d.topic = asked.topic AND d.event_id = asked.event_id"
    )


Row = tuple[str, str, int, str, int, str, bytes | bytearray, float, int]
"""An ``events`` row in INSERT_EVENT's column order; the payload may be a bytearray (binds faster)."""

StoredContents = dict[tuple[str, str], tuple[str | None, str | None, str | None]]
"""Found keys' stored ``(timestamp, source, payload in lower-case hex)``, from :meth:`EventStore.lookup`."""


def row_content(row: Row) -> tuple[str, str, str | None]:
    """A row's content in the form a lookup gives it back (:data:`_FOUND`): ``(timestamp, source,
    payload in lower-case hex)``, the hex None past :data:`CONTENT_BACK_BYTES`."""
    payload = row[6]
    return row[3], row[5], payload.hex() if len(payload) <= CONTENT_BACK_BYTES else None


Content = tuple[str, str, str, int, str, bytes]
"""A duplicate's (topic, event_id, timestamp, ts_ns, source, payload), to compare with its original."""

# Rows per multi-row INSERT or upsert: 9 (or 6) parameters each, below SQLite's limit of 32766.
_INSERT_CHUNK = 2048
# The writer's statement cache: 38 insert, 12 upsert, 13 lookup and 13 topic-state shapes, 13 lookup
# shapes that also see deleted keys, 3 x 13 duplicate-comparison shapes, and the rest.
STATEMENT_CACHE = 192


@functools.cache
def _insert_sql(size: int) -> str:
    return INSERT_EVENT + ",(?, ?, ?, ?, ?, ?, ?, ?, ?)" * (size - 1)


def _pow2_chunks(count: int, largest: int) -> list[tuple[int, int]]:
    """(start, size) slices covering ``count`` items with sizes that are powers of two up to ``largest``."""
    chunks = []
    start = 0
    while start < count:
        size = min(largest, 1 << ((count - start).bit_length() - 1))
        chunks.append((start, size))
        start += size
    return chunks


def _write_chunks(count: int) -> list[tuple[int, int]]:
    """(start, size) slices covering ``count`` rows for multi-row INSERTs: whole statements of
    _INSERT_CHUNK, then the rest as a multiple of 256, a multiple of 16 and what remains.

    Each statement costs the writer a round trip through the GIL, so a write takes at most three
    below _INSERT_CHUNK rows (powers of two took up to twelve), in 38 sizes; every size is a
    compiled statement kept in the cache, and more, larger sizes would cost memory (all 95
    sizes of a 64-row rounding took 43 MB).
    """
    chunks = []
    start = 0
    while count - start >= _INSERT_CHUNK:
        chunks.append((start, _INSERT_CHUNK))
        start += _INSERT_CHUNK
    for step in (256, 16, 1):
        size = (count - start) // step * step
        if size:
            chunks.append((start, size))
            start += size
    return chunks


# SQLite's own automatic checkpoint runs inside the COMMIT that takes the WAL past this many
# pages, and it fsyncs: measured here, such a commit takes 67-114 ms against 0.3 ms for the others.
BACKSTOP_CHECKPOINT_PAGES = 20_000
# The writer's page cache, in MiB ([storage] cache_mb). Once the database outgrows it, it is the
# largest single part of the daemon's memory: 800 000 events over 100 000 topics peaked at
# 185-191 MB of RSS with 64 MiB, 149-151 MB with 32 and 131 MB with 16; a 5 000 000-event
# database ran no slower with 16 than with 32 (two runs each).
DEFAULT_CACHE_MB = 16
CHECKPOINT_INTERVAL_S = 0.2

log = logging.getLogger(__name__)

# The most payload bytes one expiry chunk deletes (one event at least): fingerprinting a deleted
# event decodes its payload, ~0.5 us a msgpack value, and a chunk holds the only writer.
EXPIRE_CHUNK_BYTES = 256 * 1024
# The row that holds the last commit position once every event is deleted (see _keep_position).
_POSITION_MARK = ("", "last commit position")


class StorageError(Exception):
    """The database cannot be opened, is damaged, or refused a write."""


class StorageRefused(StorageError):
    """The daemon will not use this database as it is (its schema is a newer eventagg's or not
    eventagg's; it is damaged, empty or no database): starting again cannot help, so the daemon
    exits 2, like a refused config."""


@dataclass(slots=True)
class TopicDelta:
    """What one transaction adds to one topic's counters."""

    last_seq: int = 0
    last_ts_ns: int = NO_TIMESTAMP
    received: int = 0
    duplicate_dropped: int = 0
    late: int = 0


@dataclass(frozen=True, slots=True)
class TopicState:
    """Where a topic stands in the database: its last seq and the timestamp of its last event."""

    last_seq: int
    last_ts_ns: int


def _make_folders_owner_only(folder: Path) -> None:
    """Create ``folder`` and each missing parent, outermost first, every one 0700.

    ``mkdir(parents=True)`` would give the parents the umask's mode (0755 under umask 022); a
    folder that exists already keeps its mode."""
    missing: list[Path] = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for each in reversed(missing):
        try:
            each.mkdir(mode=0o700)
        except FileExistsError:
            pass  # made meanwhile by someone else: kept as it is


def _open_owner_only(path: Path, database: Path) -> int:
    """Open ``path`` read-write, creating it (0600) and its folders (0700) if need be; a failure is
    a :class:`StorageError` about ``database``, which ``path`` is or belongs to."""
    try:
        _make_folders_owner_only(path.parent)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        also = "" if path == database else f" (its {path.name} first)"
        if exc.errno in (errno.EISDIR, errno.ENOTDIR):
            # A folder where the file goes, or a file where a folder does: no restart can help.
            raise StorageRefused(
                f"cannot create database {database}{also}: {exc.strerror}; [storage] path must name a file,"
                " in a folder (made if missing)"
            ) from exc
        raise StorageError(
            f"cannot create database {database}{also}: {exc.strerror or exc}; make sure its folder can be "
            "created and written by the daemon's user, or set [storage] path"
        ) from exc


def create_database(path: Path) -> None:
    """Build a new database under a temporary name and move it into place.

    So ``path`` is either absent or a whole database with its schema: an empty file there was
    never left by eventagg (not even by one killed while starting), and is refused as truncated.
    """
    temporary = path.with_name(path.name + ".new")
    for leftover in (temporary, *(temporary.with_name(temporary.name + end) for end in ("-wal", "-shm"))):
        leftover.unlink(missing_ok=True)
    # Created owner-only before SQLite opens it, so events are never world-readable.
    os.close(_open_owner_only(temporary, path))
    try:
        conn = sqlite3.connect(temporary, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            prepare(conn, path, _SCHEMA)
            conn.executemany(
                "INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)", [(n,) for n in COUNTER_NAMES]
            )
        finally:
            conn.close()  # the last connection checkpoints and removes the WAL
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except (OSError, sqlite3.DatabaseError) as exc:
        raise StorageError(f"cannot create database {path}: {exc}; make sure its folder is writable") from exc


def connect_writer(path: Path, synchronous: str = "NORMAL", cache_mb: int = DEFAULT_CACHE_MB) -> sqlite3.Connection:
    """Open (creating if needed) the database for writing, with WAL and ``cache_mb`` MiB of page cache,
    and check its integrity."""
    if not path.exists():
        create_database(path)
    elif path.stat().st_size == 0:
        raise StorageRefused(
            f"database {path} is an empty file (0 bytes), which eventagg never leaves: it was truncated or "
            "made by hand, and starting on it would forget every stored key and seq. Restore it from a "
            "backup, or remove it to start an empty database"
        )
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, cached_statements=STATEMENT_CACHE)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute(f"PRAGMA cache_size={-1024 * cache_mb}")  # negative: in KiB, not pages
        conn.execute("PRAGMA busy_timeout=5000")
        # The Checkpointer thread keeps the WAL short; this is only the backstop should it stop.
        conn.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_CHECKPOINT_PAGES}")
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            conn.close()
            raise StorageRefused(
                f"database {path} failed PRAGMA quick_check ({'; '.join(problems[:3])}){_DAMAGED_REMEDY}"
            )
        try:
            prepare(conn, path, _SCHEMA)  # a new database, or a known version migrated to this one
        except SchemaError as exc:
            conn.close()
            raise StorageRefused(str(exc)) from None
        conn.executemany("INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)", [(n,) for n in COUNTER_NAMES])
    except sqlite3.DatabaseError as exc:
        # Not a database, or damaged past opening: the same remedy as a failed quick_check. A lock
        # or a permission problem (also a DatabaseError) is no reason to throw the file away.
        damaged = getattr(exc, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT)
        if damaged:
            raise StorageRefused(f"cannot open database {path}: {exc}{_DAMAGED_REMEDY}") from exc
        raise StorageError(f"cannot open database {path}: {exc}") from exc
    return conn


_DAMAGED_REMEDY = "; restore it from a backup or move it away to start empty"


class DatabaseLock:
    """Keeps a second daemon off a database this one writes: an exclusive ``flock`` on
    ``<database>.lock``, which holds the owner's pid, and one on the database file itself.

    Two writers would number the same topics independently, and the first one's commits would
    then fail on UNIQUE (topic, seq) for ever. The kernel drops the lock with the process, so a
    daemon killed with SIGKILL leaves nothing stale behind; the file itself stays.

    The lock file is named from the database's real path (symlinks resolved), but a hard link
    has another real path: so the database file itself is locked too, which is one lock per
    (device, inode) whatever the path. ``flock`` and SQLite's own (POSIX ``fcntl``) locks are
    independent on Linux; the descriptor stays open until :meth:`release`, after the last
    connection has closed (closing a descriptor drops the POSIX locks of the whole process on
    that file). The same descriptor tells :meth:`replaced` whether the path still leads to it.
    """

    def __init__(self, database: Path) -> None:
        self.database = database
        real = database.resolve()
        self.path = real.with_name(real.name + ".lock")
        self._fd: int | None = None
        self._database_fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (making the database's folder if need be), or raise :class:`StorageError`
        naming the pid that holds it."""
        fd = _open_owner_only(self.path, self.database)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StorageError(
                f"database {self.database} is in use by another eventagg (pid {holder}); "
                "stop that one first, or give this one another [storage] path"
            ) from None
        self._fd = fd
        if not self.database.exists():
            try:
                create_database(self.database)  # under the lock: no other daemon builds it meanwhile
            except StorageError:
                self.release()
                raise
        self._lock_database_file()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())

    def _lock_database_file(self) -> None:
        fd = _open_owner_only(self.database, self.database)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _flock_holder(os.fstat(fd))
            os.close(fd)
            self.release()
            raise StorageError(
                f"database {self.database} is the same file (device and inode) as one another eventagg "
                f"(pid {holder}) writes under another path, through a hard link or symlink; stop that one "
                "first, or give this one another [storage] path"
            ) from None
        self._database_fd = fd
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o077:
            # A file restored or copied in keeps its mode (SQLite gives its -wal and -shm the
            # same): left as the operator made it, but said, since it holds every event.
            log.warning(
                "database %s is mode %04o: other users may read its events (and its -wal and -shm files "
                "take the same mode); run chmod 600 on it unless that is meant",
                self.database,
                mode,
            )

    def replaced(self) -> str | None:
        """Why the database's path no longer leads to the file this daemon writes, or None if it does.

        A deleted file (or one replaced by another at the same path) still takes writes, which
        would all be lost: the caller must stop acknowledging.
        """
        if self._database_fd is None:
            return None
        held = os.fstat(self._database_fd)
        try:
            now = os.stat(self.database)
        except FileNotFoundError:
            return f"database {self.database} was deleted while the daemon ran"
        except OSError as exc:
            return f"database {self.database} cannot be checked: {exc.strerror or exc}"
        if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            return f"database {self.database} was replaced by another file while the daemon ran"
        if held.st_nlink == 0:
            return f"database {self.database} was deleted while the daemon ran"
        return None

    def release(self) -> None:
        """Let another daemon have the database (closing the files drops the locks)."""
        if self._database_fd is not None:
            os.close(self._database_fd)
            self._database_fd = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _flock_holder(stat: os.stat_result) -> str:
    """The pid holding a ``flock`` on the file of ``stat`` according to /proc/locks, or "unknown"."""
    wanted = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 08:01:56789 0 EOF"
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
                    return fields[4]
    except OSError:
        pass
    return "unknown"


class EventStore:
    """The single writer: lookups, inserts and counter updates inside explicit transactions.

    Retention (``expire_*``, :meth:`forget_keys`, :meth:`conflicting`) keeps its SQL together
    at the end of the class. Deleting an event leaves a compact record of its key in
    ``deleted_keys`` (seq, 8-byte content fingerprint, commit second), which the key lookup
    consults once any exists, so a replay stays a duplicate until the first sweep past ``dedup_horizon``.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        # Until a key has been deleted, lookups need not look at deleted_keys at all.
        self._keys_deleted = conn.execute("SELECT EXISTS (SELECT 1 FROM deleted_keys)").fetchone()[0] == 1

    def begin(self) -> None:
        """Start a write transaction (taking the write lock now, not at the first write)."""
        self._conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        """Commit the open transaction; on failure it is rolled back and the error re-raised."""
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error:
            self.rollback()
            raise

    def rollback(self) -> None:
        """Abandon the open transaction, if any."""
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def existing_keys(self, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (topic, event_id) keys are already stored (committed or in this transaction)."""
        return self.lookup(keys)[0]

    def lookup(
        self, keys: Sequence[tuple[str, str]], keys_json: str | None = None
    ) -> tuple[set[tuple[str, str]], StoredContents]:
        """Which of these keys are already stored, and the content of those found in ``events``.

        One statement joining the keys, as one JSON text (``keys_json`` when the caller made it
        already), to the primary key (a query per topic cost 4.9 against 2.2 us per key with
        100 000 topics), answering with one JSON row. A key found in ``events`` comes with
        ``(timestamp, source, payload hex)``, the hex None past :data:`CONTENT_BACK_BYTES`; one
        found only as a deleted key's record has all three None; keys bound because JSON cannot
        carry them come back with no content.
        """
        if not keys:
            return set(), {}
        text = keys_json if keys_json is not None else json_text(keys)
        if text is None:
            return self._existing_keys_bound(keys), {}
        sql = _LOOKUP_JSON_WITH_DELETED if self._keys_deleted else _LOOKUP_JSON
        (found,) = self._conn.execute(sql, (text,)).fetchone()
        rows = _decode_json(found)
        found_keys = list(map(keys.__getitem__, map(_first, rows)))
        return set(found_keys), dict(zip(found_keys, map(_content, rows)))

    def _existing_keys_bound(self, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """:meth:`existing_keys` for keys that JSON cannot carry: bound, 4 096 a statement."""
        found: set[tuple[str, str]] = set()
        for start in range(0, len(keys), _KEY_CHUNK):
            chunk = keys[start : start + _KEY_CHUNK]
            size = _padded(len(chunk))
            params = list(itertools.chain.from_iterable(chunk))
            params.extend(("", "") * (size - len(chunk)))
            sql = _lookup_with_deleted_sql(size) if self._keys_deleted else _lookup_sql(size)
            (positions,) = self._conn.execute(sql, params).fetchone()
            if positions:
                found.update([chunk[int(position)] for position in positions.split(",")])
        return found

    def topic_states(self, topics: Iterable[str]) -> dict[str, TopicState]:
        """The stored last seq and last timestamp of each topic (0 and NO_TIMESTAMP for a topic never seen).

        One query for all of them rather than one per topic: with many topics, most are new to
        an ordering actor at first, and this ran once for each of them. (Topic names hold no
        control characters, so JSON always carries them.)
        """
        wanted = list(topics)
        states = dict.fromkeys(wanted, TopicState(0, NO_TIMESTAMP))
        if wanted:
            (found,) = self._conn.execute(_TOPIC_STATES_JSON, (_encode_json(wanted).decode(),)).fetchone()
            for topic, last_seq, last_ts_ns in json.loads(found):
                states[topic] = TopicState(last_seq, last_ts_ns)
        return states

    def insert(self, rows: Sequence[Row]) -> None:
        """Insert events already known to be new (a conflict here is a bug, and raises).

        Multi-row INSERTs, not ``executemany``: the sqlite3 module releases the GIL around every
        ``sqlite3_step``, and with the ordering actors busy the writer then waits up to a switch
        interval to get it back, once per row. Measured at 10 000 events/s, that made a 25-row
        write take up to 22 ms (0.25 ms typical) and the dedup inbox back up behind it. At most
        three statements below 2 048 rows (see :func:`_write_chunks`); the dedup actor calls this
        once per commit with all the rows it held.
        """
        conn = self._conn
        for start, size in _write_chunks(len(rows)):
            conn.execute(_insert_sql(size), list(itertools.chain.from_iterable(rows[start : start + size])))

    def add_counts(self, topics: Mapping[str, TopicDelta], totals: Mapping[str, int]) -> None:
        """Add this transaction's counts to the per-topic and global counters."""
        if topics:
            deltas = [(t, d.last_seq, d.last_ts_ns, d.received, d.duplicate_dropped, d.late) for t, d in topics.items()]
            for start, size in _pow2_chunks(len(deltas), _INSERT_CHUNK):
                self._conn.execute(
                    _upsert_topics_sql(size), list(itertools.chain.from_iterable(deltas[start : start + size]))
                )
        self._conn.execute(_ADD_COUNTERS, [totals.get(name, 0) for name in COUNTER_NAMES])

    def counters(self) -> dict[str, int]:
        """The global counters as the open transaction sees them."""
        return read_counters(self._conn)

    def save_consumer_positions(self, positions: Mapping[str, tuple[str | None, int] | None], at: float) -> None:
        """Store named consumers' acknowledged positions: name -> (topic or None for all topics,
        cursor), or None to delete the name's row."""
        self._conn.executemany(
            "DELETE FROM consumers WHERE name = ?", [(name,) for name, kept in positions.items() if kept is None]
        )
        self._conn.executemany(
            "INSERT INTO consumers (name, topic, position, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET topic = excluded.topic, position = excluded.position,"
            " updated_at = excluded.updated_at",
            [(name, kept[0], kept[1], at) for name, kept in positions.items() if kept is not None],
        )

    def close(self) -> None:
        """Roll back anything uncommitted and close the connection."""
        self.rollback()
        self._conn.close()

    # --- Retention: conflicting duplicates, expiry and the deleted keys' records. ---
    # Each method runs inside the caller's transaction, and adds to the counters it changes there.

    def conflicting(self, duplicates: Sequence[Content]) -> list[int]:
        """The positions of ``duplicates`` whose content differs from their stored original's.

        The common case, an exact re-send, is settled in SQL by comparing the stored bytes (one
        statement per 4 096); only the rest are fingerprinted, against the stored row or, when
        the event was deleted, against its key's record (one statement each per 4 096 too). A
        duplicate whose original is in neither (its record passed the horizon meanwhile) does
        not conflict.
        """
        differing: list[int] = []
        for start in range(0, len(duplicates), _KEY_CHUNK):
            chunk = duplicates[start : start + _KEY_CHUNK]
            size = _padded(len(chunk))
            # Payloads bound as bytearrays: the sqlite3 module binds one at once, but looks for an
            # adapter before binding bytes (see actors.ordering's rows).
            params: list[Any] = list(
                itertools.chain.from_iterable(
                    (topic, event_id, timestamp, source, bytearray(payload))
                    for topic, event_id, timestamp, _ts_ns, source, payload in chunk
                )
            )
            params.extend(("", "", "", "", bytearray()) * (size - len(chunk)))
            (positions,) = self._conn.execute(_same_bytes_sql(size), params).fetchone()
            same = {int(position) for position in positions.split(",")} if positions else set()
            rest = [position for position in range(len(chunk)) if position not in same]
            if rest:
                differing.extend(start + position for position in self._differing([chunk[p] for p in rest], rest))
        return differing

    def _differing(self, contents: Sequence[Content], positions: Sequence[int]) -> list[int]:
        """Of these duplicates (whose bytes differ from any stored row's), the positions of those
        whose content differs from their original's, by fingerprint."""
        size = _padded(len(contents))
        params = list(itertools.chain.from_iterable(content[:2] for content in contents))
        params.extend(("", "") * (size - len(contents)))
        (live,) = self._conn.execute(_stored_content_sql(size), params).fetchone()
        (kept,) = self._conn.execute(_kept_fingerprints_sql(size), params).fetchone()
        originals: dict[int, bytes] = {}
        for index, ts_ns, source, payload_hex in json.loads(live):
            originals[index] = fingerprint(ts_ns, source, bytes.fromhex(payload_hex))
        for index, fingerprint_hex in json.loads(kept):
            originals.setdefault(index, bytes.fromhex(fingerprint_hex))
        differing = []
        for index, (_topic, _event_id, _timestamp, ts_ns, source, payload) in enumerate(contents):
            original = originals.get(index)
            if original is not None and original != fingerprint(ts_ns, source, bytes(payload)):
                differing.append(positions[index])
        return differing

    def add_conflicts(self, per_topic: Mapping[str, int]) -> None:
        """Add to the topics' ``conflicting_duplicates`` (the global one goes with :meth:`add_counts`)."""
        self._conn.executemany(
            "INSERT INTO topic_retention (topic, conflicting_duplicates) VALUES (?, ?)"
            " ON CONFLICT (topic) DO UPDATE SET"
            " conflicting_duplicates = conflicting_duplicates + excluded.conflicting_duplicates",
            list(per_topic.items()),
        )

    def expire_oldest(self, received_before: float | None, max_rows: int) -> int:
        """Delete up to ``max_rows`` of the oldest events (commit order), stopping at the first one
        that arrived at or after ``received_before`` (None: no age limit, for the size budget).

        Deleting a prefix of commit order deletes a prefix of each topic's seqs, so a topic's
        stored seqs always run without gaps from its first to its last. Returns how many went.
        """
        last = self._within_chunk_bytes("SELECT rowid, length(payload) FROM events ORDER BY rowid LIMIT ?", (max_rows,))
        rows = self._conn.execute(
            "SELECT rowid, topic, event_id, seq, ts_ns, source, payload, received_at FROM events"
            " WHERE rowid <= ? ORDER BY rowid LIMIT ?",
            (last, max_rows),
        ).fetchall()
        doomed = []
        for row in rows:
            if row[1] == _POSITION_MARK[0]:
                continue  # the mark of the last commit position (see _keep_position)
            if received_before is not None and row[7] >= received_before:
                break
            doomed.append(row)
        if not doomed:
            return 0
        last_rowid = doomed[-1][0]
        # Rows first: the pages they free take the key records.
        self._conn.execute("DELETE FROM events WHERE rowid <= ?", (last_rowid,))
        self._keep_position(last_rowid)
        self._record_deleted(doomed)
        return len(doomed)

    def topics_over(self, max_events: int, topics: Iterable[str] | None) -> list[tuple[str, int]]:
        """(topic, how many events over ``max_events`` it holds) for these topics (None: all)."""
        sql = (
            "SELECT t.topic, t.last_seq - coalesce(r.expired, 0) - ? FROM topics AS t"
            " LEFT JOIN topic_retention AS r ON r.topic = t.topic"
            " WHERE t.last_seq - coalesce(r.expired, 0) > ?"
        )
        if topics is None:
            return [(topic, excess) for topic, excess in self._conn.execute(sql, (max_events, max_events))]
        over: list[tuple[str, int]] = []
        wanted = list(topics)
        for start in range(0, len(wanted), _KEY_CHUNK):
            chunk = wanted[start : start + _KEY_CHUNK]
            marks = ",".join("?" * len(chunk))
            over.extend(self._conn.execute(f"{sql} AND t.topic IN ({marks})", [max_events, max_events, *chunk]))
        return over

    def expire_topic_oldest(self, topic: str, count: int) -> int:
        """Delete the ``count`` lowest-seq events of ``topic``; returns how many went."""
        last = self._within_chunk_bytes(
            "SELECT seq, length(payload) FROM events WHERE topic = ? ORDER BY seq LIMIT ?", (topic, count)
        )
        rows = self._conn.execute(
            "SELECT rowid, topic, event_id, seq, ts_ns, source, payload, received_at FROM events"
            " WHERE topic = ? AND seq <= ? ORDER BY seq",
            (topic, last),
        ).fetchall()
        if not rows:
            return 0
        self._conn.execute("DELETE FROM events WHERE topic = ? AND seq <= ?", (topic, rows[-1][3]))
        self._record_deleted(rows)
        return len(rows)

    def _within_chunk_bytes(self, sql: str, params: Sequence[Any]) -> int | None:
        """The last key (rowid or seq) of the rows ``sql`` lists as (key, payload length), in
        order, whose payloads fit in :data:`EXPIRE_CHUNK_BYTES` (the first at least); None for none.

        Each deleted event is fingerprinted (its payload decoded), with the writer held: bytes,
        not rows, bound a chunk's time and memory (SQLite reads a blob's length without it).
        """
        taken = within_bytes(self._conn.execute(sql, params), operator.itemgetter(1), EXPIRE_CHUNK_BYTES)
        return taken[-1][0] if taken else None

    def forget_keys(self, committed_before: float, max_rows: int) -> int:
        """Drop up to ``max_rows`` deleted keys committed before ``committed_before`` (the dedup
        horizon has passed: a replay of them is new again). Returns how many went."""
        cursor = self._conn.execute(
            "DELETE FROM deleted_keys WHERE (topic, event_id) IN"
            " (SELECT topic, event_id FROM deleted_keys WHERE committed_at < ? ORDER BY committed_at LIMIT ?)",
            (int(committed_before), max_rows),
        )
        return cursor.rowcount

    def used_bytes(self) -> int:
        """Bytes of the database's pages in use (the file less its free pages; the WAL apart)."""
        (page_size,) = self._conn.execute("PRAGMA page_size").fetchone()
        (pages,) = self._conn.execute("PRAGMA page_count").fetchone()
        (free,) = self._conn.execute("PRAGMA freelist_count").fetchone()
        return int((pages - free) * page_size)

    def _record_deleted(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Keep each deleted event's key record, and count the deletions (per topic and in all)."""
        records = []
        per_topic: dict[str, list[int]] = {}  # topic -> [how many went, the last one's position]
        for rowid, topic, event_id, seq, ts_ns, source, payload, received_at in rows:
            records.append((topic, event_id, seq, fingerprint(ts_ns, source, bytes(payload)), int(received_at) + 1))
            gone = per_topic.setdefault(topic, [0, 0])
            gone[0] += 1
            gone[1] = max(gone[1], rowid)
        for start, size in _pow2_chunks(len(records), 1024):
            self._conn.execute(
                "INSERT OR REPLACE INTO deleted_keys (topic, event_id, seq, fingerprint, committed_at) VALUES "
                + ",".join(["(?, ?, ?, ?, ?)"] * size),
                list(itertools.chain.from_iterable(records[start : start + size])),
            )
        self._conn.executemany(
            "INSERT INTO topic_retention (topic, expired, expired_position) VALUES (?, ?, ?)"
            " ON CONFLICT (topic) DO UPDATE SET expired = expired + excluded.expired,"
            " expired_position = max(expired_position, excluded.expired_position)",
            [(topic, count, position) for topic, (count, position) in per_topic.items()],
        )
        self._conn.execute(
            "UPDATE counters SET value = value + CASE name WHEN 'expired' THEN ? ELSE -? END"
            " WHERE name IN ('expired', 'stored')",
            (len(rows), len(rows)),
        )
        self._keys_deleted = True

    def _keep_position(self, deleted_rowid: int) -> None:
        """Keep the commit position from going back: SQLite gives a new row the highest rowid
        plus one, so once the newest event is deleted a mark row holds its rowid (topic '' is
        never valid, so no lookup or reader sees it) until newer events exist."""
        conn = self._conn
        (newer,) = conn.execute("SELECT EXISTS (SELECT 1 FROM events WHERE rowid > ?)", (deleted_rowid,)).fetchone()
        if newer:
            return
        conn.execute("DELETE FROM events WHERE topic = ? AND event_id = ?", _POSITION_MARK)
        conn.execute(
            "INSERT INTO events (rowid, topic, event_id, seq, timestamp, ts_ns, source, payload, received_at, late)"
            " VALUES (?, ?, ?, 0, '', 0, '', x'', 0, 0)",
            (deleted_rowid, *_POSITION_MARK),
        )


class Checkpointer:
    """Copies the WAL back into the database on a thread of its own, off the writer's commit path.

    Every ``interval_s`` it runs a PASSIVE checkpoint on its own connection: that waits for no
    reader or writer, and its fsyncs happen with the GIL released, so the writer's commits (and
    the acknowledgements that wait for them) never pay for them. SQLite rewinds the WAL once a
    checkpoint has copied all of it, so the file stays near what a few intervals of ingest write.
    """

    def __init__(
        self,
        path: Path,
        interval_s: float = CHECKPOINT_INTERVAL_S,
        on_outcome: Callable[[str | None], None] = lambda error: None,
    ) -> None:
        """``on_outcome``: told each checkpoint's failure (its message), or None for one that worked."""
        self._path = path
        self._interval_s = interval_s
        self._on_outcome = on_outcome
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpointer", daemon=True)
        self.checkpoints = 0

    def start(self) -> None:
        """Start checkpointing."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop and wait (at most ``timeout``) for the thread; the writer's close checkpoints the rest."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            log.warning("no background checkpoints (%s); SQLite checkpoints inside commits instead", exc)
            return
        try:
            conn.execute("PRAGMA busy_timeout=1000")
            failing = False
            while not self._stop.wait(self._interval_s):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:  # e.g. disk full; said once, not every interval
                    if not failing:
                        log.warning("background checkpoints fail (%s); the WAL grows until they work again", exc)
                    failing = True
                    self._on_outcome(f"background checkpoint failed: {exc}")
                    continue
                self.checkpoints += 1
                if failing:
                    log.warning("background checkpoints work again")
                    failing = False
                self._on_outcome(None)
        finally:
            conn.close()


def read_counters(conn: sqlite3.Connection) -> dict[str, int]:
    """The global counters plus ``topic_count``."""
    values = {name: 0 for name in COUNTER_NAMES}
    values.update(dict(conn.execute("SELECT name, value FROM counters")))
    values["topic_count"] = conn.execute("SELECT count(*) FROM topics").fetchone()[0]
    return values


class EventReader:
    """A read-only connection for queries; it never blocks the writer and never writes."""

    def __init__(self, path: Path) -> None:
        try:
            self._conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, check_same_thread=False)
            self._conn.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open database {path} for reading: {exc}") from exc

    def first(self, topic: str | None) -> int:
        """The lowest seq of ``topic`` (or, without one, the lowest commit position) still stored;
        when nothing is stored, one past the last assigned. A reader whose ``after + 1`` is
        below it knows that events expired before it read them."""
        conn = self._conn
        if topic is not None:
            (lowest,) = conn.execute("SELECT min(seq) FROM events WHERE topic = ?", (topic,)).fetchone()
            if lowest is not None:
                return int(lowest)
            row = conn.execute("SELECT last_seq FROM topics WHERE topic = ?", (topic,)).fetchone()
            return int(row[0]) + 1 if row is not None else 1
        row = conn.execute("SELECT rowid FROM events WHERE topic <> '' ORDER BY rowid LIMIT 1").fetchone()
        if row is not None:
            return int(row[0])
        (last,) = conn.execute("SELECT coalesce(max(rowid), 0) FROM events").fetchone()
        return int(last) + 1

    def event_rows(self, topic: str | None, after: int, limit: int) -> sqlite3.Cursor:
        """The rows of a page as :meth:`events` reads them (position first, payload as stored),
        fetched lazily: the caller stops reading once its page is full."""
        if topic is not None:
            return self._conn.execute(
                "SELECT seq, topic, event_id, timestamp, source, payload, seq, late FROM events"
                " WHERE topic = ? AND seq > ? ORDER BY seq LIMIT ?",
                (topic, after, limit),
            )
        return self._conn.execute(
            "SELECT rowid, topic, event_id, timestamp, source, payload, seq, late FROM events"
            " WHERE rowid > ? AND topic <> '' ORDER BY rowid LIMIT ?",  # not the commit-position mark
            (after, limit),
        )

    def topics(self, after: str = "", limit: int | None = None) -> list[dict[str, Any]]:
        """Every topic with its stored event count, first and last seq and counters, by name;
        only those named after ``after``, at most ``limit`` of them."""
        return list(self.each_topic(after, -1 if limit is None else limit))

    def each_topic(self, after: str = "", limit: int = -1) -> Iterator[dict[str, Any]]:
        """:meth:`topics` one at a time, so a listing of many need not hold them all at once;
        only those named after ``after``, and at most ``limit`` of them (-1: every one)."""
        rows = self._conn.execute(
            "SELECT t.topic, t.last_seq, t.received, t.duplicate_dropped, t.late,"
            " coalesce(r.expired, 0), coalesce(r.conflicting_duplicates, 0)"
            " FROM topics AS t LEFT JOIN topic_retention AS r ON r.topic = t.topic"
            " WHERE t.topic > ? ORDER BY t.topic LIMIT ?",
            (after, limit),
        )
        return (
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
        )

    def counters(self) -> dict[str, int]:
        """The committed global counters."""
        return read_counters(self._conn)

    def consumers(self) -> list[dict[str, Any]]:
        """Every named consumer: its topic (None: all topics), acknowledged position and lag.

        Lag is how far the head is past the position: the topic's last seq minus the position,
        or, for an all-topics consumer, the last commit position minus its position. A position
        past the head (a consumer that acknowledged a cursor it was given) shows as a negative
        lag rather than 0, which would pass for caught up.
        """
        (head,) = self._conn.execute("SELECT coalesce(max(rowid), 0) FROM events").fetchone()
        rows = self._conn.execute(
            "SELECT c.name, c.topic, c.position, c.updated_at, t.last_seq FROM consumers AS c"
            " LEFT JOIN topics AS t ON t.topic = c.topic ORDER BY c.name"
        )
        return [
            {
                "name": name,
                "topic": topic,
                "position": position,
                "lag": (head if topic is None else (last_seq or 0)) - position,
                "updated_at": updated_at,
            }
            for name, topic, position, updated_at, last_seq in rows
        ]

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()
