"""The ordering actor and reorder buffer as they were before the columnar batch path: the oracle.

Frozen on purpose: ``test_batch_order.py`` drives this event-at-a-time implementation and the
daemon's batch-structured one (:mod:`actors.ordering`, :mod:`actors.reorder`) over the same
random streams and requires the same writes. Do not "fix" it; it defines today's behaviour.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

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
    WriteBatch,
)
from actors.store import TopicDelta, TopicState
from transport.schema import MIN_TS_NS, Event

T = TypeVar("T")

# Below every (timestamp, arrival) key, pre-1970 (negative) timestamps included.
_NOTHING = (MIN_TS_NS - 1, -1)
# Builds a NamedTuple from a tuple in C: the NamedTuple's own __new__ is a Python function, and
# one Released is made for every event stored.
_make = tuple.__new__


class Released(NamedTuple, Generic[T]):
    """An event leaving the buffer with its seq and lateness."""

    topic: str
    ts_ns: int
    event_id: str
    item: T
    seq: int
    late: bool


class _Topic(Generic[T]):
    __slots__ = ("last_seq", "last_ts_ns", "waiting", "released_upto")

    def __init__(self, last_seq: int, last_ts_ns: int) -> None:
        self.last_seq = last_seq
        self.last_ts_ns = last_ts_ns
        # Waiting events as (ts_ns, arrival, event_id, item); sorted only when some leave,
        # which on nearly ordered input is a linear merge in C. None while nothing waits, which
        # is most topics most of the time: an empty list each was 5.5 MB with 100 000 topics.
        self.waiting: list[tuple[int, int, str, T]] | None = None
        self.released_upto: tuple[int, int] = _NOTHING


def _order_key(entry: tuple[int, int, str, object]) -> tuple[int, int]:
    return (entry[0], entry[1])


class ReorderBuffer(Generic[T]):
    """Per-topic reorder buffers with a shared bound, handing out gapless seqs."""

    def __init__(self, window_s: float, max_buffered: int) -> None:
        self.window_s = window_s
        self.max_buffered = max_buffered
        self._topics: dict[str, _Topic[T]] = {}
        # One entry per push, in arrival order: (deadline, topic, largest key pushed, count).
        # An entry whose largest key is at or below its topic's released_upto has left.
        self._arrivals: deque[tuple[float, str, tuple[int, int], int]] = deque()
        self._counter = 0
        self._held: dict[tuple[str, str], T] = {}
        self.buffered = 0

    def unknown(self, topics: Iterable[str]) -> list[str]:
        """Those of ``topics`` whose state (last seq and last timestamp) the buffer does not have."""
        known = self._topics
        return [topic for topic in topics if topic not in known]

    @property
    def topic_count(self) -> int:
        """How many topics' states the buffer holds."""
        return len(self._topics)

    def idle_topics(self) -> list[str]:
        """Topics with nothing waiting and no arrival still queued: their state may be forgotten."""
        queued = {topic for _, topic, _, _ in self._arrivals}
        return [topic for topic, state in self._topics.items() if not state.waiting and topic not in queued]

    def forget(self, topics: Iterable[str]) -> None:
        """Drop the state of idle topics; :meth:`adopt` brings a topic back when it returns."""
        for topic in topics:
            state = self._topics.pop(topic)
            assert not state.waiting, f"topic {topic!r} still has events waiting"

    def adopt(self, states: Mapping[str, TopicState]) -> None:
        """Start each topic not known yet from its stored state, so seqs and lateness continue after a restart."""
        topics = self._topics
        for topic, state in states.items():
            if topic not in topics:
                topics[topic] = _Topic(state.last_seq, state.last_ts_ns)

    @property
    def held(self) -> Mapping[tuple[str, str], T]:
        """Every waiting event's item by (topic, event_id): a copy of one of these arriving now is a duplicate."""
        return self._held

    def push(
        self, topic: str, entries: Iterable[tuple[int, str, T]], now: float, release: bool = True
    ) -> list[Released[T]]:
        """Add new events ``(ts_ns, event_id, item)`` of a known topic, in arrival order; return what leaves now.

        With ``release=False`` only late events (and, with no window, every event) leave; the
        caller pushing several topics then calls :meth:`release_due` once for all of them.
        """
        state = self._topics[topic]
        if self.window_s <= 0:
            return [self._release(state, topic, ts_ns, event_id, item) for ts_ns, event_id, item in entries]
        late: list[Released[T]] = []
        waiting = state.waiting
        if waiting is None:
            waiting = state.waiting = []
        held = self._held
        first_counter = counter = self._counter
        last_ts_ns = state.last_ts_ns  # a late event leaves it as it is
        largest_ts, largest_counter = _NOTHING
        for ts_ns, event_id, item in entries:
            if ts_ns < last_ts_ns:
                late.append(self._release(state, topic, ts_ns, event_id, item))
                continue
            counter += 1
            waiting.append((ts_ns, counter, event_id, item))
            held[(topic, event_id)] = item
            if ts_ns >= largest_ts:
                largest_ts, largest_counter = ts_ns, counter
        self._counter = counter
        pushed = counter - first_counter
        if not waiting:  # every entry was late
            state.waiting = None
        if pushed:
            self._arrivals.append((now + self.window_s, topic, (largest_ts, largest_counter), pushed))
            self.buffered += pushed
        if not release:
            return late
        return late + self.release_due(now) if late else self.release_due(now)

    def release_due(self, now: float) -> list[Released[T]]:
        """Release every event whose window has passed, then as few as the bound forces out."""
        limits: dict[str, tuple[int, int]] = {}
        arrivals = self._arrivals
        topics = self._topics
        while arrivals:
            deadline, topic, key, _ = arrivals[0]
            if key <= topics[topic].released_upto or key <= limits.get(topic, _NOTHING):
                arrivals.popleft()  # left already, or leaves with this round's limit
            elif deadline <= now:
                arrivals.popleft()
                limits[topic] = key
            else:
                break
        released: list[Released[T]] = []
        for topic, limit in limits.items():
            self._release_upto(topic, limit, released)
        while self.buffered > self.max_buffered and arrivals:
            # Over the bound: the topic of the oldest push gives up its earliest events, just
            # enough of them (releasing the earliest keeps the topic in order).
            _, topic, key, _ = arrivals[0]
            state = topics[topic]
            if key <= state.released_upto:
                arrivals.popleft()
                continue
            waiting = state.waiting
            if not waiting:  # its events have all left
                arrivals.popleft()
                continue
            waiting.sort()
            cut = min(self.buffered - self.max_buffered, len(waiting))
            self._release_upto(topic, _order_key(waiting[cut - 1]), released)
        return released

    def _release_upto(self, topic: str, limit: tuple[int, int], released: list[Released[T]]) -> None:
        """Release the topic's waiting events with keys up to ``limit``, in key order."""
        state = self._topics[topic]
        waiting = state.waiting
        if limit > state.released_upto:
            state.released_upto = limit
        if waiting is None:
            return
        # Plain tuple order is key order (arrival counters are unique, so the comparison never
        # reaches the id or the item), and keeps both the sort and the search in C. An entry's
        # key is at most ``limit`` exactly when the entry sorts below (ts, arrival + 1).
        waiting.sort()
        cut = bisect.bisect_left(waiting, (limit[0], limit[1] + 1))
        held = self._held
        seq = state.last_seq
        last_ts_ns = state.last_ts_ns
        append = released.append
        everything = cut == len(waiting)
        for ts_ns, _, event_id, item in waiting if everything else waiting[:cut]:  # _release, inlined: per event
            del held[(topic, event_id)]
            seq += 1
            late = ts_ns < last_ts_ns
            if not late:
                last_ts_ns = ts_ns
            append(_make(Released, (topic, ts_ns, event_id, item, seq, late)))
        state.last_seq = seq
        state.last_ts_ns = last_ts_ns
        if everything:
            state.waiting = None
        else:
            del waiting[:cut]
        self.buffered -= cut

    def flush(self) -> list[Released[T]]:
        """Release everything still waiting, each topic in order (for shutdown)."""
        released: list[Released[T]] = []
        for topic, state in self._topics.items():
            if state.waiting:
                state.waiting.sort()
                for ts_ns, _, event_id, item in state.waiting:
                    released.append(self._release(state, topic, ts_ns, event_id, item))
                state.released_upto = _order_key(state.waiting[-1])
                state.waiting = None
        self._arrivals.clear()
        self._held.clear()
        self.buffered = 0
        return released

    @staticmethod
    def _release(state: _Topic[T], topic: str, ts_ns: int, event_id: str, item: T) -> Released[T]:
        state.last_seq += 1
        late = ts_ns < state.last_ts_ns
        if not late:
            state.last_ts_ns = ts_ns
        return _make(Released, (topic, ts_ns, event_id, item, state.last_seq, late))


log = logging.getLogger(__name__)

CLASSIFY_TIMEOUT_S = 10.0
FORGET_INTERVAL_S = 1.0
CLASSIFY_ATTEMPTS = 6

# A new event on its way to the store: the event, when its batch arrived, and its ack ticket.
_Item = tuple[Event, float, "AckTicket | None"]
_Key = tuple[str, str]


@dataclass(slots=True, eq=False)
class _Pending:
    """A batch whose lookup is under way, with how its events were sorted before the lookup."""

    events: list[Event]
    tickets: list[AckTicket | None]
    received_at: float
    by_topic: dict[str, list[int]]
    copies: list[tuple[int, int]]
    later: list[int]
    request: ClassifyRequest | None
    result: ClassifyResult | None = None
    attached: int = 0
    attached_bytes: int = 0
    keys: list[_Key] = field(default_factory=list)


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
    ) -> None:
        """``row_tickets``: name each row's ticket in its write (see :attr:`WriteBatch.row_tickets`)."""
        super().__init__()
        self._index = index
        self._row_tickets = row_tickets
        self._dedup = dedup
        self._buffer: ReorderBuffer[_Item] = ReorderBuffer(window_ms / 1000, max_buffered)
        self._max_topics = max_topics  # topic states kept at most; beyond it idle ones are forgotten
        self._written: dict[str, int] = {}  # topic -> serial of the last write that counted it
        self._write_serial = 0
        self._next_forget = 0.0
        # Copies that arrived while their original waits in the buffer: (ticket, credit bytes).
        self._copies: dict[_Key, list[tuple[AckTicket | None, Event]]] = {}
        self._awaiting: deque[_Pending] = deque()
        self._looking_up: dict[_Key, int] = {}  # keys of awaiting batches, with how many hold them
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
            if self._buffer.buffered:
                self._send(self._buffer.release_due(time.monotonic()), WriteBatch())
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
        """Sort a batch's events into lookups and copies, and send its lookup on its way."""
        events = batch.events
        tickets = batch.tickets or [None] * len(events)
        buffer = self._buffer
        if buffer.topic_count > self._max_topics:
            # Here, before this batch's topics are looked at: a topic forgotten now is simply
            # unknown to it, and its lookup brings the stored state back.
            self._forget_idle_topics()
        held = buffer.held
        looking_up = self._looking_up
        by_topic: dict[str, list[int]] = {}
        first_of: dict[_Key, int] = {}
        copies: list[tuple[int, int]] = []
        later: list[int] = []
        attached = attached_bytes = 0
        for position, event in enumerate(events):
            key: _Key = event[:2]  # (topic, event_id), sliced in C
            first = first_of.get(key)
            if first is not None:
                copies.append((position, first))
            elif key in held:
                self._copies.setdefault(key, []).append((tickets[position], event))
                attached += 1
                attached_bytes += event_bytes(event.payload)
            elif key in looking_up:
                later.append(position)
            else:
                first_of[key] = position
                positions = by_topic.get(key[0])
                if positions is None:
                    by_topic[key[0]] = [position]
                else:
                    positions.append(position)
        request = None
        keys = list(first_of)
        if by_topic:
            self._token += 1
            request = ClassifyRequest(
                keys,
                buffer.unknown(by_topic),
                reply_to=self.actor_ref,
                token=self._token,
            )
            for key in first_of:
                looking_up[key] = looking_up.get(key, 0) + 1
        elif not later:
            return  # every event is a copy of a waiting one: settled when that one is written
        self._awaiting.append(
            _Pending(
                events,
                tickets,
                batch.received_at,
                by_topic,
                copies,
                later,
                request,
                attached=attached,
                attached_bytes=attached_bytes,
                keys=keys,
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
        looking_up = self._looking_up
        for key in pending.keys:
            count = looking_up[key] - 1
            if count:
                looking_up[key] = count
            else:
                del looking_up[key]
        result = pending.result
        if pending.request is not None and result is None:
            # The dedup actor did not answer: drop the batch (its acks never come, so acked
            # publishers resend) and give its credit back so ingest does not stall for good.
            self._in_flight.release(
                len(pending.events) - pending.attached, events_bytes(pending.events) - pending.attached_bytes
            )
            return
        buffer = self._buffer
        events, tickets = pending.events, pending.tickets
        write = WriteBatch()
        if result is not None:
            buffer.adopt(result.states)
        new_positions: set[int] = set()  # needed only to settle this batch's own copies
        note_new = bool(pending.copies)
        entries_by_topic: list[tuple[str, list[tuple[int, str, _Item]]]] = []
        existing = result.existing if result is not None else set()
        received_at = pending.received_at
        for topic, positions in pending.by_topic.items():
            entries = []
            for position in positions:
                event = events[position]
                if existing and (topic, event.event_id) in existing:
                    self._count_duplicate(write, event, tickets[position])
                    continue
                if note_new:
                    new_positions.add(position)
                entries.append((event.ts_ns, event.event_id, (event, received_at, tickets[position])))
            entries_by_topic.append((topic, entries))
        copies = self._copies
        for position, first in pending.copies:
            event = events[position]
            if first in new_positions:  # settled with its original, in the write that stores it
                copies.setdefault((event.topic, event.event_id), []).append((tickets[position], event))
            else:  # a copy of an event that was already stored
                self._count_duplicate(write, event, tickets[position])
        for position in pending.later:
            event = events[position]
            if (event.topic, event.event_id) in buffer.held:
                copies.setdefault((event.topic, event.event_id), []).append((tickets[position], event))
            else:
                # Its original was resolved before this batch: stored already, or written in an
                # earlier write; either way this write commits with or after it.
                self._count_duplicate(write, event, tickets[position])
        now = time.monotonic()
        released: list[Released[_Item]] = []
        for topic, entries in entries_by_topic:
            if entries:
                released.extend(buffer.push(topic, entries, now, release=False))
        released.extend(buffer.release_due(now))
        self._send(released, write)

    def _sync(self) -> None:
        """Finish every lookup (asking again where the answer has not come), then flush the buffer."""
        for pending in self._awaiting:
            if pending.request is not None and pending.result is None:
                pending.result = self._classify(pending.request)
        while self._awaiting:
            self._resolve(self._awaiting.popleft())
        self._send(self._buffer.flush(), WriteBatch())

    def _classify(self, request: ClassifyRequest) -> ClassifyResult | None:
        """Ask (blocking) for a lookup; asking again after a timeout is safe, since it is a read."""
        ask = ClassifyRequest(request.keys, request.unknown_topics)
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

    @staticmethod
    def _count_duplicate(write: WriteBatch, event: Event, ticket: AckTicket | None) -> None:
        _count_copy(write, event, ticket)

    def _send(self, released: list[Released[_Item]], write: WriteBatch) -> None:
        """Turn released events into rows and tell the dedup actor, if there is anything to say."""
        rows = write.rows
        if self._row_tickets and write.row_tickets is None:
            write.row_tickets = []
        row_tickets = write.row_tickets
        topics = write.topics
        copies = self._copies
        topic = ""
        delta = TopicDelta()
        nbytes = 0
        # Unpacked in the loop header: one step in C instead of an attribute lookup per field.
        for out_topic, ts_ns, event_id, (event, received_at, ticket), seq, late in released:
            _, _, timestamp, _, source, payload = event
            nbytes += len(payload)
            # The payload goes in as a bytearray: the sqlite3 module binds one as a blob at once,
            # while for bytes it first searches for an adapter (~2 600 CPU instructions a row
            # against ~150 for the copy, counted with callgrind). Stored and read back the same.
            rows.append(
                (out_topic, event_id, seq, timestamp, ts_ns, source, bytearray(payload), received_at, 1 if late else 0)
            )
            if out_topic != topic:
                topic = out_topic
                delta = topics.get(topic)  # type: ignore[assignment]
                if delta is None:
                    topics[topic] = delta = TopicDelta()
            delta.received += 1
            delta.last_seq = seq
            if late:
                delta.late += 1
                write.late += 1
            elif ts_ns > delta.last_ts_ns:
                delta.last_ts_ns = ts_ns
            if seq == 1:
                write.new_topics += 1
            if ticket is not None:
                write.settle(ticket, 1, 0)
            if row_tickets is not None:
                row_tickets.append(ticket)
            if copies:
                waiting = copies.pop((topic, event_id), None)
                if waiting:
                    for copy_ticket, copy in waiting:
                        _count_copy(write, copy, copy_ticket)
        write.events += len(released)
        write.bytes += nbytes + EVENT_OVERHEAD_BYTES * len(released)  # event_bytes() of each
        buffered = self._buffer.buffered
        self._live.buffered[self._index] = buffered
        if buffered:
            self._live.waiting.set()  # after the count: the tick thread reads it once woken
        if write.events:
            self._write_serial += 1
            write.origin, write.serial = self._index, self._write_serial
            written = self._written
            for topic in write.topics:
                written[topic] = self._write_serial
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
        protected = {topic for pending in self._awaiting for topic in pending.by_topic}
        written = self._written
        excess = self._buffer.topic_count - int(self._max_topics * 0.8)
        forget: list[str] = []
        for topic in self._buffer.idle_topics():
            if topic not in protected and written.get(topic, 0) <= committed:
                forget.append(topic)
                if len(forget) >= excess:
                    break
        if forget:
            self._buffer.forget(forget)
            for topic in forget:
                written.pop(topic, None)
            log.debug(
                "ordering actor %d forgot %d idle topics (%d kept)", self._index, len(forget), self._buffer.topic_count
            )


def _count_copy(write: WriteBatch, event: Event, ticket: AckTicket | None) -> None:
    """Count one duplicate into ``write``, settling its ticket there; the dedup actor compares
    its content with the original's when the write commits."""
    delta = write.topics.get(event.topic)
    if delta is None:
        write.topics[event.topic] = delta = TopicDelta()
    delta.received += 1
    delta.duplicate_dropped += 1
    write.events += 1
    write.bytes += event_bytes(event.payload)
    write.duplicates.append((event, ticket))
    if ticket is not None:
        write.settle(ticket, 0, 1)
