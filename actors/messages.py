"""The messages the actors send each other, one frozen-ish dataclass each.

Batches flow through the pipeline, never single events: ingest → router (:class:`IngestBatch`)
→ ordering actor (:class:`OrderingBatch`) → dedup actor (:class:`ClassifyRequest`, answered
with a :class:`ClassifyResult` told back, then :class:`WriteBatch`). An :class:`AckTicket` rides
along with the events of an
acknowledged batch and is answered once every one of its events is committed.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from actors.store import Row, StoredContents, TopicDelta, TopicState
from transport.schema import Event


@dataclass(slots=True, eq=False)
class AckTicket:
    """An acknowledged batch waiting for its events to commit.

    Only the dedup actor's thread touches ``remaining``, ``new`` and ``duplicate`` after the
    ticket is handed to the router, so they need no lock.
    """

    envelope: list[bytes]
    batch_id: int | str
    remaining: int
    rejected: list[tuple[int, str]]
    new: int = 0
    duplicate: int = 0
    events: list[Event] | None = None  # the batch's valid events, in order: to name conflicting ones
    conflicting: list[Event] = field(default_factory=list)

    def reply(self) -> dict[str, object]:
        """The acknowledgement map sent back to the publisher."""
        reply: dict[str, object] = {
            "batch": self.batch_id,
            "new": self.new,
            "duplicate": self.duplicate,
            "rejected": [[index, reason] for index, reason in self.rejected],
        }
        if self.conflicting:
            reply["conflicting"] = self.conflicting_indexes()
        return reply

    def conflicting_indexes(self) -> list[int]:
        """The indexes, in the batch as sent, of the events found to be conflicting duplicates."""
        if not self.events:
            return []
        # The k-th valid event is the k-th index of the batch that was not rejected.
        rejected = {index for index, _reason in self.rejected}
        indexes = (index for index in itertools.count() if index not in rejected)
        batch_index = {id(event): index for event, index in zip(self.events, indexes)}
        return sorted(batch_index[id(event)] for event in self.conflicting if id(event) in batch_index)


Tickets = list[AckTicket | None]
"""Each event's ticket, parallel to a list of events (None: the event has none)."""


@dataclass(frozen=True, slots=True)
class IngestBatch:
    """Valid events of one or more frames, as the ingest loop hands them to the router.

    ``tickets`` is None when no event belongs to an acknowledged batch; otherwise it runs
    parallel to ``events`` and names each event's ticket (or None).
    """

    events: list[Event]
    received_at: float
    tickets: list[AckTicket | None] | None = None


@dataclass(frozen=True, slots=True)
class OrderingBatch:
    """The share of one ingest batch owned by one ordering actor (same shape as the batch)."""

    events: list[Event]
    received_at: float
    tickets: list[AckTicket | None] | None = None


@dataclass(frozen=True, slots=True)
class ClassifyRequest:
    """Ask the dedup actor which of these events are already stored.

    ``keys`` are ``(topic, event_id)`` pairs in arrival order (no repeats). ``unknown_topics``
    are topics the asking ordering actor has no state for yet; their stored state comes back.
    With ``reply_to`` the answer is told to that actor, tagged with ``token``, so the asker
    need not wait; without it the request is an ask and the answer is its return value.
    ``keys_json`` is ``keys`` as the one JSON text the lookup sends to SQLite, made by the asker
    so the dedup thread, which sets the daemon's pace, need not (None: not made).
    """

    keys: list[tuple[str, str]]
    unknown_topics: list[str]
    reply_to: Any = None
    token: int = 0
    keys_json: str | None = None


@dataclass(slots=True)
class ClassifyResult:
    """The answer to a :class:`ClassifyRequest`: which keys are already stored, and topic states.

    Every asked key not in ``existing`` is new. ``contents`` has, for stored keys found in
    ``events``, their stored ``(timestamp, source, payload hex)`` as the lookup brought them back
    (see :meth:`actors.store.EventStore.lookup`): a re-send equal to it needs no check at commit.
    ``error`` is set (and the rest empty) when the lookup failed, e.g. on an I/O error.
    """

    existing: set[tuple[str, str]]
    states: dict[str, TopicState]
    token: int = 0
    error: str | None = None
    contents: StoredContents = field(default_factory=dict)


@dataclass(slots=True)
class WriteBatch:
    """Rows to insert and counts to add, with the tickets whose events they complete.

    ``tickets`` maps a ticket to ``[new, duplicate]``: how many of the ticket's events this write
    settles; ``events`` counts every valid event it settles (new or duplicate) and ``bytes``
    their credit in bytes: what its commit gives back to the in-flight bound (``events`` less the
    rows are the duplicates); ``late`` counts the late rows; ``new_topics`` counts topics whose first event
    (seq 1) is among the rows. ``duplicates`` are the events it settles as duplicates (with their
    tickets), which the dedup actor compares with their stored originals. ``origin`` and
    ``serial`` say which ordering actor sent it and its place in that actor's writes (1, 2, ...),
    so the actor can learn what has committed.
    """

    rows: list[Row] = field(default_factory=list)
    topics: dict[str, TopicDelta] = field(default_factory=dict)
    duplicates: list[tuple[Event, AckTicket | None]] = field(default_factory=list)
    tickets: dict[AckTicket, list[int]] = field(default_factory=dict)
    events: int = 0
    bytes: int = 0
    late: int = 0
    new_topics: int = 0
    origin: int = 0
    serial: int = 0
    # Each row's ticket, parallel to ``rows``: kept only for a backend that may still find a row
    # stored at write time (PostgreSQL shared by several daemons), to acknowledge it as a duplicate.
    row_tickets: list[AckTicket | None] | None = None

    def settle(self, ticket: AckTicket | None, new: int, duplicate: int) -> None:
        """Record that ``new`` + ``duplicate`` events of ``ticket`` are settled by this write."""
        if ticket is not None:
            counts = self.tickets.get(ticket)
            if counts is None:
                self.tickets[ticket] = [new, duplicate]
            else:
                counts[0] += new
                counts[1] += duplicate

    def settle_each(self, tickets: Iterable[AckTicket | None], *, new: bool) -> None:
        """Record the events with these tickets (one entry an event; None: no ticket) as settled
        by this write, all new or all duplicates: one :meth:`settle` a ticket."""
        for ticket, count in Counter(tickets).items():
            if ticket is not None:
                if new:
                    self.settle(ticket, count, 0)
                else:
                    self.settle(ticket, 0, count)

    def topic(self, topic: str) -> TopicDelta:
        """What this write adds to ``topic``'s counters (made empty when first asked for)."""
        delta = self.topics.get(topic)
        if delta is None:
            self.topics[topic] = delta = TopicDelta()
        return delta


@dataclass(frozen=True, slots=True)
class AddRejected:
    """Count refused events and frames (committed with the next transaction).

    ``replies`` are the answers (envelope frames, then the encoded reply) to acknowledged
    messages refused whole: the writer sends them once the commit that counts them is done, so a
    publisher told of a refusal finds it in ``rejected``.
    """

    count: int
    replies: tuple[list[bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Sync:
    """Ask an actor to finish all it holds: ordering actors release their buffers, dedup commits."""


@dataclass(frozen=True, slots=True)
class Ping:
    """Liveness check: answered with True by a responsive actor (the dedup actor answers with the
    StorageError that kept it from opening the database, if one did)."""


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passes: ordering actors release events whose reorder window has ended."""


@dataclass(frozen=True, slots=True)
class Freeze:
    """Test hook: make the receiving actor unresponsive for ``seconds``."""

    seconds: float


@dataclass(frozen=True, slots=True)
class SaveConsumerPositions:
    """Store named consumers' acknowledged positions: name -> (topic or None for all topics, cursor),
    or None to forget the name's stored position; ``claims`` holds each name's claim by the
    follower that acknowledged (PostgreSQL: nothing is stored under a claim another daemon
    has since raised).

    An ask: the dedup actor commits what it holds, writes these in a transaction of their own
    and answers with a :class:`PositionsSaved` once committed.
    """

    positions: dict[str, tuple[str | None, int] | None]
    claims: dict[str, tuple[int, str]]


@dataclass(frozen=True, slots=True)
class PositionsSaved:
    """The answer to :class:`SaveConsumerPositions`: the error's text if nothing was stored, and
    the names refused because another daemon claimed them meanwhile."""

    error: str | None = None
    refused: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class QueryRequest:
    """A query for the stats or reader actor, answered by calling ``done(reply)`` (from the actor's
    thread) rather than through a future, so that the query server can wait for many at once.

    Past ``deadline`` (``time.monotonic()``) the client has been told the daemon did not answer:
    the actor then calls ``done(EXPIRED)`` without doing the work, so queries a crowd of clients
    gave up on cost the actor next to nothing."""

    query: Any
    done: Callable[[Any], None]
    deadline: float = math.inf


EXPIRED = object()
"""What an actor answers a :class:`QueryRequest` whose deadline had passed when its turn came."""
