"""Flow control and live figures shared between the ingest thread and the actors.

Pykka inboxes are unbounded, so the work in flight is bounded here instead: the ingest loop
admits events only while :class:`InFlight` has room, and the dedup actor gives the credit
back when it commits them. Publishers beyond that wait in ZeroMQ's high-water marks. Work
done a piece at a time (an expiry chunk, a subscription's message) is cut by
:func:`within_bytes`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from transport.schema import Event

T = TypeVar("T")

EVENT_OVERHEAD_BYTES = 256
"""What an event costs in memory beyond its payload: its strings, tuple and bookkeeping."""


def event_bytes(payload: bytes) -> int:
    """The credit an event takes in bytes: its encoded payload plus a fixed overhead."""
    return len(payload) + EVENT_OVERHEAD_BYTES


def events_bytes(events: Sequence[Event]) -> int:
    """The credit of several events: the sum of their :func:`event_bytes`."""
    return sum([len(event.payload) for event in events]) + EVENT_OVERHEAD_BYTES * len(events)


def within_bytes(items: Iterable[T], size: Callable[[T], int], budget: int) -> list[T]:
    """The leading ``items`` whose sizes add up to at most ``budget``, the first one at least (so
    work cut this way always gets on); ``items`` is read one past them at most."""
    taken: list[T] = []
    total = 0
    for item in items:
        total += size(item)
        if taken and total > budget:
            break
        taken.append(item)
    return taken


class InFlight:
    """Valid events admitted by ingest and not yet committed (or settled as duplicates).

    Bounded both in events and in bytes (see :func:`event_bytes`), so a flood of large
    payloads is held back as surely as a flood of small ones.
    """

    def __init__(self, limit: int, limit_bytes: int = 64 * 1024 * 1024) -> None:
        self.limit = limit
        self.limit_bytes = limit_bytes
        self._value = 0
        self._bytes = 0
        self._peak = 0
        self._lock = threading.Lock()

    @property
    def value(self) -> int:
        """How many events are in flight now."""
        return self._value

    @property
    def bytes(self) -> int:
        """How many bytes of credit the events in flight hold."""
        return self._bytes

    @property
    def peak(self) -> int:
        """The most events that were in flight at once since start (``stats``: ``in_flight_peak``)."""
        return self._peak

    def has_room(self, events: int = 0, nbytes: int = 0) -> bool:
        """Whether ingest may admit more events, beyond ``events`` worth ``nbytes`` it is about to admit."""
        return self._value + events < self.limit and self._bytes + nbytes < self.limit_bytes

    def add(self, count: int, nbytes: int) -> None:
        """Admit ``count`` events worth ``nbytes``."""
        with self._lock:
            self._value += count
            self._bytes += nbytes
            self._peak = max(self._peak, self._value)

    def release(self, count: int, nbytes: int) -> None:
        """Give back the credit of ``count`` settled events worth ``nbytes``."""
        with self._lock:
            self._value -= count
            self._bytes -= nbytes


class PipelineDepth:
    """How many messages wait in the actors' inboxes: when many do, ingest lets frames gather.

    Events are batched by what ingest can read without waiting. While the actors are behind,
    reading on would only queue more small batches, each paying the per-message costs (a
    lookup, a write, a release pass). Holding off lets frames gather in the sockets instead, so
    the next read takes one large batch: under load batches grow by themselves, and under light
    load (empty inboxes) nothing waits.
    """

    def __init__(self, inboxes: Sequence[Any], limit: int) -> None:
        self._inboxes = list(inboxes)
        self.limit = limit

    def queued(self) -> int:
        """Messages waiting in the watched inboxes now."""
        return sum([inbox.qsize() for inbox in self._inboxes])

    def busy(self) -> bool:
        """Whether ingest should let frames gather before it reads more."""
        return self.limit > 0 and self.queued() >= self.limit


class LiveFigures:
    """Figures the stats actor reports without touching the database.

    The dedup actor replaces ``committed`` (a fresh dict) after every commit; readers take the
    reference once, so they always see one consistent commit's counters.
    """

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.committed: dict[str, int] = {}
        self.buffered = [0]  # per ordering actor: events waiting in its reorder window
        self.committed_writes = [0]  # per ordering actor: the serial of its last committed write
        self.waiting = threading.Event()  # set by an ordering actor while events wait: wakes the ticks
        self.commits = 0
        self.last_commit_error: str | None = None
        self.refused = 0  # failed CURVE handshakes (transport.security); not stored, since start
        self.decoding = "ingest thread"  # where frames are decoded (actors.ingest keeps it true)
        self.decoder_restarts = 0  # decoder processes replaced since start
        self.writer_session: int | None = None  # PostgreSQL: the writer's backend pid, for health
        # Why the last retention sweep, or the last background checkpoint, failed; None once one works.
        self.sweep_error: str | None = None
        self.checkpoint_error: str | None = None
        # Set (once) when the daemon must stop: e.g. its database file was deleted or replaced.
        self.fatal: str | None = None

    def background_errors(self) -> list[str]:
        """What failed in the writer's background work (retention, checkpoints), for health."""
        return [error for error in (self.sweep_error, self.checkpoint_error) if error is not None]
