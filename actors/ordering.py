"""The ordering actor: owns a share of the topics, keeps each in order and numbers its new events.

For each batch it drops repeats within the batch and of events still waiting in its reorder
window, asks the dedup actor which of the rest are new (one ask per batch, covering every topic
in it), counts the duplicates, and puts the new events through its :class:`ReorderBuffer`, which
hands out the per-topic seqs. What the buffer releases goes to the dedup actor as one
:class:`WriteBatch`. A topic is only ever owned by one ordering actor, so nobody else can number
its events or hold them back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pykka

from actors.flow import InFlight, LiveFigures
from actors.messages import (
    AckTicket,
    ClassifyRequest,
    ClassifyResult,
    Freeze,
    OrderingBatch,
    Ping,
    Sync,
    Tick,
    WriteBatch,
)
from actors.reorder import Released, ReorderBuffer
from actors.store import TopicDelta
from transport.schema import Event

log = logging.getLogger(__name__)

CLASSIFY_TIMEOUT_S = 10.0
CLASSIFY_ATTEMPTS = 6


@dataclass(slots=True)
class _Held:
    """A new event on its way to the store, with what its row and its ack need.

    ``copies`` are the tickets of duplicates that arrived before it was written: they are
    settled in the same write, so no copy is acknowledged before the original is committed.
    """

    event: Event
    received_at: float
    ticket: AckTicket | None
    copies: list[AckTicket | None] = field(default_factory=list)


class OrderingActor(pykka.ThreadingActor):
    """Dedups a batch against the store, then orders and numbers the new events per topic."""

    def __init__(
        self,
        index: int,
        dedup: pykka.ActorRef[Any],
        *,
        window_ms: int,
        max_buffered: int,
        in_flight: InFlight,
        live: LiveFigures,
    ) -> None:
        super().__init__()
        self._index = index
        self._dedup = dedup
        self._buffer: ReorderBuffer[_Held] = ReorderBuffer(window_ms / 1000, max_buffered)
        self._in_flight = in_flight
        self._live = live

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, OrderingBatch):
            try:
                self._accept(message)
            except Exception:
                # A bug must not kill the actor (its topics would stop for good): log it, give
                # the batch's credit back, and carry on; acked publishers will resend.
                log.exception("ordering actor %d: a batch of %d events failed", self._index, len(message.events))
                self._in_flight.release(len(message.events))
        elif isinstance(message, Tick):
            if self._buffer.buffered:
                self._send(self._buffer.release_due(time.monotonic()), WriteBatch())
        elif isinstance(message, Sync):
            self._send(self._buffer.flush(), WriteBatch())
            return True
        elif isinstance(message, Ping):
            return True
        elif isinstance(message, Freeze):
            time.sleep(message.seconds)
        else:
            log.error("ordering actor %d got an unknown message %r", self._index, message)
        return None

    def _accept(self, batch: OrderingBatch) -> None:
        events = batch.events
        tickets = batch.tickets or [None] * len(events)
        buffer = self._buffer
        # Group by topic in arrival order. A copy of an event earlier in this batch, or of one
        # waiting in the buffer, follows that event: it is settled when the event is written.
        by_topic: dict[str, list[int]] = {}
        first_of: dict[tuple[str, str], int] = {}
        copies: list[tuple[int, int]] = []
        for position, event in enumerate(events):
            key = (event.topic, event.event_id)
            first = first_of.get(key)
            if first is not None:
                copies.append((position, first))
                continue
            waiting = buffer.holding(event.topic, event.event_id)
            if waiting is not None:
                waiting.copies.append(tickets[position])
                continue
            first_of[key] = position
            by_topic.setdefault(event.topic, []).append(position)
        if not by_topic:
            self._publish_buffered()
            return
        ids = {topic: [events[p].event_id for p in positions] for topic, positions in by_topic.items()}
        unknown = [topic for topic in by_topic if not buffer.knows(topic)]
        result = self._classify(ClassifyRequest(ids, unknown))
        if result is None:
            # The dedup actor did not answer: drop the batch (its acks never come, so acked
            # publishers resend) and give its credit back so ingest does not stall for good.
            self._in_flight.release(len(events))
            return
        for topic, state in result.states.items():
            buffer.set_state(topic, state)

        write = WriteBatch()
        held: dict[int, _Held] = {}
        entries_by_topic: dict[str, list[tuple[int, str, _Held]]] = {}
        for topic, positions in by_topic.items():
            new_ids = result.new_ids.get(topic, set())
            entries = entries_by_topic[topic] = []
            for position in positions:
                event = events[position]
                if event.event_id in new_ids:
                    item = held[position] = _Held(event, batch.received_at, tickets[position])
                    entries.append((event.ts_ns, event.event_id, item))
                else:
                    self._count_duplicate(write, topic, tickets[position])
        for position, first in copies:
            original = held.get(first)
            if original is not None:
                original.copies.append(tickets[position])
            else:  # a copy of an event that was already stored
                self._count_duplicate(write, events[position].topic, tickets[position])
        now = time.monotonic()
        released: list[Released[_Held]] = []
        for topic, entries in entries_by_topic.items():
            if entries:
                released.extend(buffer.push(topic, entries, now))
        self._send(released, write)

    def _classify(self, request: ClassifyRequest) -> ClassifyResult | None:
        # Classifying is a read, so asking again after a timeout is safe.
        for attempt in range(1, CLASSIFY_ATTEMPTS + 1):
            try:
                result: ClassifyResult = self._dedup.ask(request, timeout=CLASSIFY_TIMEOUT_S)
                return result
            except pykka.Timeout:
                log.warning(
                    "ordering actor %d: dedup actor did not answer in %.0f s (attempt %d of %d)",
                    self._index, CLASSIFY_TIMEOUT_S, attempt, CLASSIFY_ATTEMPTS,
                )
            except pykka.ActorDeadError:
                break
            except Exception:  # noqa: BLE001 - e.g. an I/O error reading the database; try again
                log.exception("ordering actor %d: classifying a batch failed (attempt %d of %d)",
                              self._index, attempt, CLASSIFY_ATTEMPTS)
                time.sleep(min(0.1 * 2**attempt, 5.0))
        log.error("ordering actor %d: dropping a batch of %d events: the dedup actor is not answering",
                  self._index, sum(len(ids) for ids in request.ids.values()))
        return None

    @staticmethod
    def _count_duplicate(write: WriteBatch, topic: str, ticket: AckTicket | None) -> None:
        delta = write.topics.get(topic)
        if delta is None:
            write.topics[topic] = delta = TopicDelta()
        delta.received += 1
        delta.duplicate_dropped += 1
        write.events += 1
        write.settle(ticket, 0, 1)

    def _send(self, released: list[Released[_Held]], write: WriteBatch) -> None:
        """Turn released events into rows and tell the dedup actor, if there is anything to say."""
        rows = write.rows
        for out in released:
            held = out.item
            event = held.event
            rows.append(
                (event.topic, event.event_id, out.seq, event.timestamp, event.ts_ns, event.source,
                 event.payload, held.received_at, int(out.late))
            )
            delta = write.topics.get(out.topic)
            if delta is None:
                write.topics[out.topic] = delta = TopicDelta()
            delta.received += 1
            delta.last_seq = out.seq
            if out.ts_ns > delta.last_ts_ns:
                delta.last_ts_ns = out.ts_ns
            if out.late:
                delta.late += 1
            if out.seq == 1:
                write.new_topics += 1
            write.events += 1
            write.settle(held.ticket, 1, 0)
            for ticket in held.copies:
                self._count_duplicate(write, out.topic, ticket)
        self._publish_buffered()
        if write.events:
            self._dedup.tell(write)

    def _publish_buffered(self) -> None:
        self._live.buffered[self._index] = self._buffer.buffered
