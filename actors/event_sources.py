"""Where the subscription thread reads events and consumer positions: one small interface, one
implementation per storage backend (SQLite here, PostgreSQL in actors/postgres.py).

Every read returns stored rows as ``(position, topic, event_id, timestamp, source, payload, seq,
late)``, the payload still msgpack, in the order asked for. Positions are commit positions
(gapless commit order, except where retention deleted); a read sees committed events only.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol

EventRow = tuple[Any, ...]
Claim = tuple[int, str]
"""A daemon's claim of a consumer name: a number from the database's sequence, and which daemon.
Of two claims of one name, the larger is the later, and its follower is the one that stays."""

_COLUMNS = "rowid, topic, event_id, timestamp, source, payload, seq, late"


class EventSource(Protocol):
    """The subscription thread's reads; used on that thread only.

    ``errors`` are the exceptions a read may raise when the database is unavailable: the thread
    retries later. Other writers' commits (PostgreSQL) are noticed two ways: a file descriptor
    that becomes readable when they commit (:meth:`wakeup_fd`), and reading the head every
    ``poll_s``. On SQLite this daemon is the only writer, and its dedup actor's wake-up is enough.
    """

    errors: tuple[type[BaseException], ...]

    @property
    def poll_s(self) -> float | None:
        """How often to read the head for other writers' commits (None: never)."""

    def wakeup_fd(self, make: bool) -> int | None:
        """A descriptor readable when another writer committed, or None; made when missing only
        if ``make`` (making it may block for the connect timeout)."""

    def drain_wakeups(self) -> list[tuple[str, Claim]]:
        """Consume what made :meth:`wakeup_fd` readable; the name and :data:`Claim` of each named
        consumer another daemon took meanwhile (see :meth:`claim`)."""

    def claim(self, name: str) -> Claim:
        """Tell the other daemons sharing the database that this one now serves consumer ``name``,
        so each ends its own follower under that name unless its own claim came later (none:
        SQLite has one daemon a file)."""

    def open(self) -> None:
        """Prepare (called on the subscription thread before any read)."""

    def head(self) -> int:
        """The last committed position (0 when nothing was ever stored)."""

    def first(self) -> int | None:
        """The lowest position still stored, or None when nothing is."""

    def expired_total(self) -> int:
        """How many events retention has deleted so far (it changes whenever any are)."""

    def expired_marks(self, topics: Collection[str]) -> dict[str, tuple[int, int]]:
        """For each of ``topics`` retention deleted events of: (how many, the commit position of
        the last one). A topic's deletions are its lowest seqs: seqs 1 to that count."""

    def topic_last(self, topic: str) -> int:
        """The last seq committed in ``topic`` (0 for a topic never stored)."""

    def after(self, cursor: int, limit: int) -> list[EventRow]:
        """Up to ``limit`` events of every topic after position ``cursor``, by position."""

    def filtered(self, cursor: int, upper: int, topics: Collection[str], limit: int) -> list[EventRow]:
        """Up to ``limit`` events of ``topics`` after ``cursor`` and up to ``upper``, by position."""

    def topic_after(self, topic: str, seq: int, limit: int) -> list[EventRow]:
        """Up to ``limit`` events of ``topic`` after ``seq``, by seq."""

    def consumer(self, name: str) -> tuple[str | None, int] | None:
        """A named consumer's stored (topic or None for all topics, position), or None if unknown."""

    def close(self) -> None:
        """Release the connection."""


class SqliteEventSource:
    """Reads the SQLite database on a read-only connection of its own; the position is the rowid
    (rowids grow in commit order under the single writer). Rows of topic '' are not events."""

    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
    poll_s: float | None = None

    def wakeup_fd(self, make: bool) -> None:
        return None

    def drain_wakeups(self) -> list[tuple[str, Claim]]:
        return []

    def claim(self, name: str) -> Claim:
        return (0, "")

    def __init__(self, database: Path) -> None:
        self._database = database
        self._conn: sqlite3.Connection | None = None

    def open(self) -> None:
        self._conn = sqlite3.connect(f"{self._database.as_uri()}?mode=ro", uri=True)
        self._conn.execute("PRAGMA busy_timeout=5000")

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[EventRow]:
        assert self._conn is not None, "open() first"
        return self._conn.execute(sql, params).fetchall()

    def head(self) -> int:
        ((head,),) = self._rows("SELECT coalesce(max(rowid), 0) FROM events", ())
        return int(head)

    def first(self) -> int | None:
        ((first,),) = self._rows("SELECT min(rowid) FROM events WHERE topic <> ''", ())
        return None if first is None else int(first)

    def expired_total(self) -> int:
        rows = self._rows("SELECT value FROM counters WHERE name = 'expired'", ())
        return int(rows[0][0]) if rows else 0

    def expired_marks(self, topics: Collection[str]) -> dict[str, tuple[int, int]]:
        marks = ",".join("?" * len(topics))
        rows = self._rows(
            f"SELECT topic, expired, expired_position FROM topic_retention WHERE topic IN ({marks}) AND expired > 0",
            tuple(topics),
        )
        return {topic: (int(expired), int(position)) for topic, expired, position in rows}

    def topic_last(self, topic: str) -> int:
        rows = self._rows("SELECT last_seq FROM topics WHERE topic = ?", (topic,))
        return int(rows[0][0]) if rows else 0

    def after(self, cursor: int, limit: int) -> list[EventRow]:
        return self._rows(
            f"SELECT {_COLUMNS} FROM events WHERE rowid > ? AND topic <> '' ORDER BY rowid LIMIT ?", (cursor, limit)
        )

    def filtered(self, cursor: int, upper: int, topics: Collection[str], limit: int) -> list[EventRow]:
        marks = ",".join("?" * len(topics))
        return self._rows(
            f"SELECT {_COLUMNS} FROM events WHERE rowid > ? AND rowid <= ? AND topic IN ({marks})"
            " ORDER BY rowid LIMIT ?",
            (cursor, upper, *topics, limit),
        )

    def topic_after(self, topic: str, seq: int, limit: int) -> list[EventRow]:
        return self._rows(
            f"SELECT {_COLUMNS} FROM events WHERE topic = ? AND seq > ? ORDER BY seq LIMIT ?", (topic, seq, limit)
        )

    def consumer(self, name: str) -> tuple[str | None, int] | None:
        rows = self._rows("SELECT topic, position FROM consumers WHERE name = ?", (name,))
        return (rows[0][0], int(rows[0][1])) if rows else None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
