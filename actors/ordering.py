"""The ordering actor: owns a share of the topics, keeps each in order and numbers its new events.

For each batch it sets aside copies (of an event earlier in the batch, of one waiting in its
reorder window, or of one in a batch still being looked up), asks the dedup actor which of the
rest are new, counts the duplicates, and puts the new events through its
:class:`~actors.reorder.ReorderWindow`, which hands out the per-topic seqs. What leaves the
window goes to the dedup actor as one :class:`WriteBatch`. A topic is only ever owned by one
ordering actor, so nobody else can number its events or hold them back.

A batch goes through as a whole, never an event at a time: its keys are a column, copies are
found with set operations on it (only they are visited one by one), the new events are grouped
by topic with one stable sort, the window numbers whole topic runs, and the rows are zipped from
the columns of what leaves. The Python work per event is a handful of C-level passes.

The lookups are pipelined: the request is told to the dedup actor and its answer told back, so
the actor takes the next batch while the dedup actor works, and answers are applied strictly in
the order the batches came. Because a batch's writes are sent only after its answer, a later
batch's lookup may not see them yet; that is why a copy of an event from a batch still being
looked up is never looked up itself, but settled once that batch is resolved. A copy is always
settled in the same write as its original or a later one, so no copy is acknowledged before
the original is committed.

Each topic's state (last seq, last timestamp) stays in the window while the topic is in use.
Beyond ``max_topics`` the actor forgets idle topics whose last write has committed (the
dedup actor publishes, per ordering actor, the serial of its last committed write); a
forgotten topic's next batch asks for its stored state like a topic never seen before.
"""

from __future__ import annotations

import itertools
import logging
import operator
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import pykka

from actors.dedup import STORAGE_RETRY
from actors.flow import EVENT_OVERHEAD_BYTES, InFlight, LiveFigures, event_bytes, events_bytes
from actors.messages import (
    AckTicket,
    ClassifyRequest,
    ClassifyResult,
    Freeze,
    OrderingBatch,
    Ping,
    Sync,
    Tick,
    Tickets,
    WriteBatch,
)
from actors.reorder import Leaving, ReorderWindow, pick
from actors.store import NO_TIMESTAMP, StoredContents, TopicDelta, json_text
from transport.schema import (
    Event,
    event_id_of,
    key_of,
    payload_of,
    source_of,
    timestamp_of,
    topic_of,
    ts_ns_of,
)

log = logging.getLogger(__name__)

CLASSIFY_TIMEOUT_S = 10.0
FORGET_INTERVAL_S = 1.0
CLASSIFY_ATTEMPTS = 6

_Key = tuple[str, str]


@dataclass(slots=True, eq=False)
class _Pending:
    """A batch whose lookup is under way, with how its events were sorted before the lookup.

    ``firsts`` are the positions looked up (each key's first, in arrival order) and ``keys``
    their keys; ``copies`` are the positions of later copies of those; ``later`` are copies
    of events of a batch looked up before this one, settled once that one is resolved.
    """

    events: list[Event]
    tickets: Tickets | None
    received_at: float
    firsts: list[int] | range
    keys: list[_Key]
    copies: list[int]
    later: list[int]
    request: ClassifyRequest | None
    result: ClassifyResult | None = None
    attached: int = 0
    attached_bytes: int = 0


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
        max_topics: int,
        row_tickets: bool = False,
        keys_json: bool = True,
    ) -> None:
        """``row_tickets``: name each row's ticket in its write (see :attr:`WriteBatch.row_tickets`);
        ``keys_json``: send each lookup's keys as JSON too (SQLite's lookup reads it, PostgreSQL's does not)."""
        super().__init__()
        self._index = index
        self._row_tickets = row_tickets
        self._keys_json = keys_json
        self._dedup = dedup
        self._window = ReorderWindow(window_ms / 1000, max_buffered)
        self._max_topics = max_topics  # topic states kept at most; beyond it idle ones are forgotten
        self._written: dict[str, int] = {}  # topic -> serial of the last write that counted it
        self._write_serial = 0
        self._next_forget = 0.0
        # Copies that arrived while their original waits in the window: (ticket, copy) each.
        self._copies: dict[_Key, list[tuple[AckTicket | None, Event]]] = {}
        self._awaiting: deque[_Pending] = deque()
        # Keys of awaiting batches' lookups: a key is in at most one, since a copy of a key being
        # looked up is never looked up itself.
        self._looking_up: set[_Key] = set()
        self._token = 0
        self._in_flight = in_flight
        self._live = live

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, OrderingBatch):
            try:
                self._admit(message)
            except Exception:
                # A bug must not kill the actor (its topics would stop for good): log it, give
                # the batch's credit back, and carry on; acked publishers will resend.
                log.exception("ordering actor %d: a batch of %d events failed", self._index, len(message.events))
                self._in_flight.release(len(message.events), events_bytes(message.events))
        elif isinstance(message, ClassifyResult):
            self._answer(message)
        elif isinstance(message, Tick):
            if self._window.buffered:
                leaving = Leaving()
                self._window.release_due(time.monotonic(), leaving)
                self._send(leaving, WriteBatch())
        elif isinstance(message, Sync):
            self._sync()
            return True
        elif isinstance(message, Ping):
            return True
        elif isinstance(message, Freeze):
            time.sleep(message.seconds)
        else:
            log.error("ordering actor %d got an unknown message %r", self._index, message)
        return None

    def _admit(self, batch: OrderingBatch) -> None:
        """Sort a batch's events into lookups and copies, and send its lookup on its way.

        Set operations over the batch's keys find the copies; only they are visited one by one.
        """
        events = batch.events
        tickets = batch.tickets
        count = len(events)
        window = self._window
        if window.topic_count > self._max_topics:
            # Here, before this batch's topics are looked at: a topic forgotten now is simply
            # unknown to it, and its lookup brings the stored state back.
            self._forget_idle_topics()
        keys: list[_Key] = list(map(key_of, events))
        first_of = dict(zip(reversed(keys), range(count - 1, -1, -1)))  # each key's first position
        repeated = len(first_of) < count
        held = window.held
        looking_up = self._looking_up
        attach = held.intersection(first_of) if held else None
        wait = looking_up.intersection(first_of) if looking_up else None
        later: list[int] = []
        attached = attached_bytes = 0
        if attach or wait:
            set_aside = (attach or set()) | (wait or set())
            for position in itertools.compress(range(count), map(set_aside.__contains__, keys)):
                key = keys[position]
                if attach and key in attach:
                    event = events[position]
                    self._hold_copy(event, tickets[position] if tickets else None)
                    attached += 1
                    attached_bytes += event_bytes(event.payload)
                else:
                    later.append(position)
        else:
            set_aside = None
        copies: list[int] = []
        if repeated:
            firsts_by_position = map(first_of.__getitem__, keys)
            for position in itertools.compress(range(count), map(operator.ne, firsts_by_position, range(count))):
                key = keys[position]
                if set_aside is None or key not in set_aside:
                    copies.append(position)
        if set_aside:
            for key in set_aside:
                del first_of[key]
        firsts: list[int] | range
        if repeated or set_aside:
            firsts = sorted(first_of.values())
            keys = list(map(keys.__getitem__, firsts))
        else:
            firsts = range(count)
        request = None
        if firsts:
            self._token += 1
            request = ClassifyRequest(
                keys,
                window.unknown(map(topic_of, keys)),
                reply_to=self.actor_ref,
                token=self._token,
                keys_json=json_text(keys) if self._keys_json else None,
            )
            looking_up.update(keys)
        elif not later:
            return  # every event is a copy of a waiting one: settled when that one is written
        self._awaiting.append(
            _Pending(
                events,
                tickets,
                batch.received_at,
                firsts,
                keys,
                copies,
                later,
                request,
                attached=attached,
                attached_bytes=attached_bytes,
            )
        )
        if request is not None:
            self._dedup.tell(request)
        else:
            self._resolve_ready()

    def _answer(self, result: ClassifyResult) -> None:
        for pending in self._awaiting:
            if pending.request is not None and pending.request.token == result.token:
                if result.error is not None:
                    log.warning("ordering actor %d: lookup failed (%s); asking again", self._index, result.error)
                    pending.result = self._classify(pending.request)
                else:
                    pending.result = result
                break
        else:
            return  # an answer to a lookup already repeated by _sync
        self._resolve_ready()

    def _resolve_ready(self) -> None:
        """Apply answers in batch order, as far as they have come."""
        awaiting = self._awaiting
        while awaiting and (awaiting[0].result is not None or awaiting[0].request is None):
            self._resolve(awaiting.popleft())

    def _resolve(self, pending: _Pending) -> None:
        self._looking_up.difference_update(pending.keys)
        result = pending.result
        events, tickets = pending.events, pending.tickets
        if pending.request is not None and result is None:
            # The dedup actor did not answer: drop the batch (its acks never come, so acked
            # publishers resend) and give its credit back so ingest does not stall for good.
            self._in_flight.release(len(events) - pending.attached, events_bytes(events) - pending.attached_bytes)
            return
        window = self._window
        write = WriteBatch()
        new: list[int] | range = pending.firsts
        existing = result.existing if result is not None else None
        if result is not None:
            window.adopt(result.states)
            if existing:
                stored = list(map(existing.__contains__, pending.keys))
                known = list(itertools.compress(new, stored))
                _count_copies(write, pick(events, known), pick(tickets, known) if tickets else None, result.contents)
                new = list(itertools.compress(new, map(operator.not_, stored)))
        duplicates: list[int] = []
        for position in pending.copies:
            event = events[position]
            if existing is None or event.key not in existing:  # its original is new: written later
                self._hold_copy(event, tickets[position] if tickets else None)
            else:  # a copy of an event that was already stored
                duplicates.append(position)
        held = window.held
        for position in pending.later:
            event = events[position]
            if event.key in held:
                self._hold_copy(event, tickets[position] if tickets else None)
            else:
                # Its original was resolved before this batch: stored already, or written in an
                # earlier write; either way this write commits with or after it.
                duplicates.append(position)
        if duplicates:
            _count_copies(
                write,
                pick(events, duplicates),
                pick(tickets, duplicates) if tickets else None,
                result.contents if result is not None else None,
            )
        leaving = Leaving()
        now = time.monotonic()
        if new:
            new_events = pick(events, new)
            new_tickets = pick(tickets, new) if tickets else None
            topics = list(map(topic_of, new_events))
            counts = Counter(topics)  # topics in the order they first appear among the new
            stored_some = len(new) < len(pending.firsts)
            if len(counts) > 1 and (stored_some or len(counts) < len(topics)):
                # Group by topic, each topic's events in arrival order, topics in the order they
                # first appear among the keys looked up (which decides whose events the bound
                # lets go first): a stable sort on each topic's rank.
                firsts = dict.fromkeys(map(topic_of, pending.keys)) if stored_some else counts
                rank = dict(zip(firsts, itertools.count()))
                order = sorted(range(len(topics)), key=list(map(rank.__getitem__, topics)).__getitem__)
                new_events = pick(new_events, order)
                new_tickets = pick(new_tickets, order) if new_tickets is not None else None
                counts = Counter(pick(topics, order))
            window.push(counts, new_events, new_tickets, pending.received_at, now, leaving)
        window.release_due(now, leaving)
        self._send(leaving, write)

    def _hold_copy(self, copy: Event, ticket: AckTicket | None) -> None:
        """Keep a copy of an event not written yet: it is settled with its original, in the write
        that stores it (:meth:`_send`)."""
        self._copies.setdefault(copy.key, []).append((ticket, copy))

    def _sync(self) -> None:
        """Finish every lookup (asking again where the answer has not come), then flush the window."""
        for pending in self._awaiting:
            if pending.request is not None and pending.result is None:
                pending.result = self._classify(pending.request)
        while self._awaiting:
            self._resolve(self._awaiting.popleft())
        leaving = Leaving()
        self._window.flush(leaving)
        self._send(leaving, WriteBatch())

    def _classify(self, request: ClassifyRequest) -> ClassifyResult | None:
        """Ask (blocking) for a lookup; asking again after a timeout is safe, since it is a read."""
        ask = ClassifyRequest(request.keys, request.unknown_topics, keys_json=request.keys_json)
        for attempt in range(1, CLASSIFY_ATTEMPTS + 1):
            try:
                result: ClassifyResult = self._dedup.ask(ask, block=True, timeout=CLASSIFY_TIMEOUT_S)
                return result
            except pykka.Timeout:
                log.warning(
                    "ordering actor %d: dedup actor did not answer in %.0f s (attempt %d of %d)",
                    self._index,
                    CLASSIFY_TIMEOUT_S,
                    attempt,
                    CLASSIFY_ATTEMPTS,
                )
            except pykka.ActorDeadError:
                break
            except Exception:
                log.exception(
                    "ordering actor %d: classifying a batch failed (attempt %d of %d)",
                    self._index,
                    attempt,
                    CLASSIFY_ATTEMPTS,
                )
                time.sleep(STORAGE_RETRY.ceiling(attempt))
        log.error(
            "ordering actor %d: dropping a batch of %d events: the dedup actor is not answering",
            self._index,
            len(request.keys),
        )
        return None

    def _send(self, leaving: Leaving, write: WriteBatch) -> None:
        """Turn the events leaving the window into rows and tell the dedup actor, if there is
        anything to say.

        The rows are zipped from the columns in C; only the counts per topic run are Python.
        """
        if self._row_tickets and write.row_tickets is None:
            write.row_tickets = []
        events = leaving.events
        if events:
            payloads = list(map(payload_of, events))
            # The payload goes in as a bytearray: the sqlite3 module binds one as a blob at once,
            # while for bytes it first searches for an adapter (~2 600 CPU instructions a row
            # against ~150 for the copy, counted with callgrind). Stored and read back the same.
            write.rows += zip(
                leaving.topics,
                map(event_id_of, events),
                leaving.seqs,
                map(timestamp_of, events),
                map(ts_ns_of, events),
                map(source_of, events),
                map(bytearray, payloads),
                leaving.received,
                leaving.lates,
            )
            deltas = write.topics
            for topic, count, first_seq, late, last_ts_ns in leaving.runs:
                delta = deltas.get(topic)
                if delta is None:  # a topic's first run in this write (every run, with many topics)
                    deltas[topic] = TopicDelta(
                        first_seq + count - 1, last_ts_ns if late < count else NO_TIMESTAMP, count, 0, late
                    )
                else:
                    delta.received += count
                    delta.last_seq = first_seq + count - 1
                    delta.late += late
                    if late < count and last_ts_ns > delta.last_ts_ns:
                        delta.last_ts_ns = last_ts_ns
                if late:
                    write.late += late
                if first_seq == 1:
                    write.new_topics += 1
            tickets = leaving.tickets
            if tickets is not None:
                write.settle_each(tickets, new=True)
            if write.row_tickets is not None:
                write.row_tickets += tickets if tickets is not None else itertools.repeat(None, len(events))
            copies = self._copies
            if copies:
                found = copies.keys() & zip(leaving.topics, map(event_id_of, events))
                if found:
                    waiting = [copy for key in found for copy in copies.pop(key)]
                    _count_copies(write, [copy for _, copy in waiting], [ticket for ticket, _ in waiting])
            write.events += len(events)
            write.bytes += sum(map(len, payloads)) + EVENT_OVERHEAD_BYTES * len(events)  # event_bytes() of each
        buffered = self._window.buffered
        self._live.buffered[self._index] = buffered
        if buffered:
            self._live.waiting.set()  # after the count: the tick thread reads it once woken
        if write.events:
            self._write_serial += 1
            write.origin, write.serial = self._index, self._write_serial
            self._written.update(dict.fromkeys(write.topics, self._write_serial))
            self._dedup.tell(write)

    def _forget_idle_topics(self) -> None:
        """Over ``max_topics``: forget idle topics whose last write has committed, down to 80 % of it.

        Only then is the topic's stored state (last seq and timestamp) its real one, which a
        later lookup reads back when the topic returns. Topics of batches still being looked
        up are kept, since their answer will not carry their state.
        """
        now = time.monotonic()
        if now < self._next_forget:
            return
        self._next_forget = now + FORGET_INTERVAL_S  # a sweep visits every topic: not every batch
        committed = self._live.committed_writes[self._index]
        protected = {topic for pending in self._awaiting for topic, _ in pending.keys}
        written = self._written
        excess = self._window.topic_count - int(self._max_topics * 0.8)
        forget: list[str] = []
        for topic in self._window.idle_topics():
            if topic not in protected and written.get(topic, 0) <= committed:
                forget.append(topic)
                if len(forget) >= excess:
                    break
        if forget:
            self._window.forget(forget)
            for topic in forget:
                written.pop(topic, None)
            log.debug(
                "ordering actor %d forgot %d idle topics (%d kept)", self._index, len(forget), self._window.topic_count
            )


def _count_copies(
    write: WriteBatch, events: list[Event], tickets: Tickets | None, stored: StoredContents | None = None
) -> None:
    """Count duplicates into ``write``, settling their tickets there (``tickets`` parallel to
    ``events``, or None). A duplicate with the very bytes of its original's content in ``stored``
    (as its lookup brought it back) is settled; the dedup actor compares the rest with their
    originals when the write commits."""
    if not events:
        return
    for topic, count in Counter(map(topic_of, events)).items():
        delta = write.topic(topic)
        delta.received += count
        delta.duplicate_dropped += count
    write.events += len(events)
    write.bytes += events_bytes(events)
    duplicates = zip(events, tickets if tickets is not None else itertools.repeat(None))
    if stored:
        unchanged = [stored.get(key_of(event)) == (event[2], event[4], event[5].hex()) for event in events]
        write.duplicates += itertools.compress(duplicates, map(operator.not_, unchanged))
    else:
        write.duplicates += duplicates
    if tickets is not None:
        write.settle_each(tickets, new=False)
