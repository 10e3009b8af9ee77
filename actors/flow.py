"""Flow control and live figures shared between the ingest thread and the actors.

Pykka inboxes are unbounded, so the work in flight is bounded here instead: the ingest loop
admits events only while :class:`InFlight` has room, and the dedup actor gives the credit
back when it commits them. Publishers beyond that wait in ZeroMQ's high-water marks.
"""

from __future__ import annotations

import threading
import time


class InFlight:
    """Valid events admitted by ingest and not yet committed (or settled as duplicates)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._value = 0
        self._lock = threading.Lock()

    @property
    def value(self) -> int:
        """How many events are in flight now."""
        return self._value

    def has_room(self) -> bool:
        """Whether ingest may admit more events."""
        return self._value < self.limit

    def add(self, count: int) -> None:
        """Admit ``count`` events."""
        with self._lock:
            self._value += count

    def release(self, count: int) -> None:
        """Give back the credit of ``count`` settled events."""
        with self._lock:
            self._value -= count


class LiveFigures:
    """Figures the stats actor reports without touching the database.

    The dedup actor replaces ``committed`` (a fresh dict) after every commit; readers take the
    reference once, so they always see one consistent commit's counters.
    """

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.committed: dict[str, int] = {}
        self.buffered = [0]  # per ordering actor: events waiting in its reorder window
        self.commits = 0
        self.last_commit_error: str | None = None
        self.refused = 0  # failed CURVE handshakes (transport.security); not stored, since start
