"""The batch-structured ordering actor against the event-at-a-time one it replaced (the oracle).

Both actors (:mod:`actors.ordering` and the frozen :mod:`reference_ordering`) are driven
without threads, on one clock, through the same random schedule (hypothesis) of batches (copies
within and across batches, late events, acked or not), ticks, lookup answers arriving late,
commits, idle topics forgotten and restarts. Each has its own stand-in dedup actor that answers
lookups from the writes it was told, as the real one does (held writes count as stored), and a
forgotten topic's state from the committed ones only, as the database has it. Every
lookup and every write must match: rows with their seqs and late flags, per-topic counters,
duplicates, ticket settlements and each row's ticket.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import reference_ordering
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors import ordering
from actors.flow import InFlight, LiveFigures
from actors.messages import AckTicket, ClassifyRequest, ClassifyResult, OrderingBatch, Sync, Tick, WriteBatch
from actors.store import NO_TIMESTAMP, TopicState
from transport.schema import Event

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from ordering_cost import Clock  # the driver's clock, from scripts/

BASE_NS = 1_761_127_200_000_000_000


@contextlib.contextmanager
def one_clock() -> Iterator[Clock]:
    """Both actors read the time from one driven clock for the block."""
    clock = Clock()
    saved = ordering.time, reference_ordering.time
    ordering.time = reference_ordering.time = clock  # type: ignore[assignment]
    try:
        yield clock
    finally:
        ordering.time, reference_ordering.time = saved  # type: ignore[assignment]


class Side:
    """One ordering actor with its stand-in dedup actor, and a log of what it asked and wrote."""

    def __init__(self, actor_class: type, params: dict[str, Any]) -> None:
        self.actor_class = actor_class
        self.params = params
        self.stored: set[tuple[str, str]] = set()
        self.topics: dict[str, TopicState] = {}  # as committed: what a topic's lookup reads back
        self.uncommitted: list[WriteBatch] = []
        self.answers: deque[ClassifyResult] = deque()
        self.log: list[Any] = []
        self.tickets: dict[int, int] = {}  # id(ticket) -> the schedule's number for it
        self.last_serial = 0
        self.start()

    def start(self) -> None:
        self.live = LiveFigures()
        self.actor = self.actor_class(
            0, self, in_flight=InFlight(10**9), live=self.live, **self.params
        )  # the stand-in is its dedup reference: tell() and ask()
        self.last_serial = 0

    # The dedup actor's side: lookups are answered from every write told before them (held keys
    # count as stored), but a topic's state only from committed writes, as the database has it:
    # an actor that forgot a topic whose last write is not committed yet would read back a stale
    # state and number its next events again.
    def _lookup(self, request: ClassifyRequest) -> ClassifyResult:
        self.log.append(("lookup", list(request.keys), sorted(request.unknown_topics)))
        existing = self.stored.intersection(request.keys)
        states = {topic: self.topics.get(topic, TopicState(0, NO_TIMESTAMP)) for topic in request.unknown_topics}
        return ClassifyResult(existing, states, token=request.token)

    def tell(self, message: Any) -> None:
        if isinstance(message, ClassifyRequest):
            self.answers.append(self._lookup(message))
        elif isinstance(message, WriteBatch):
            self.log.append(("write", self._normal(message)))
            self.stored.update((row[0], row[1]) for row in message.rows)
            self.uncommitted.append(message)
            self.last_serial = message.serial
        else:
            raise AssertionError(f"unexpected message {message!r}")

    def ask(self, message: Any, block: bool = True, timeout: float | None = None) -> Any:
        return self._lookup(message)

    def _normal(self, write: WriteBatch) -> Any:
        number = self.tickets.get
        rows = [(*row[:6], bytes(row[6]), *row[7:]) for row in write.rows]
        row_tickets = None
        if write.row_tickets is not None:
            row_tickets = sorted(
                (row[:2], number(id(ticket)) if ticket is not None else -1)
                for row, ticket in zip(rows, write.row_tickets, strict=True)
            )
        return {
            "rows": sorted(rows),
            "row tickets": row_tickets,
            "topics": {topic: dataclasses.astuple(delta) for topic, delta in write.topics.items()},
            "duplicates": sorted(
                (event.topic, event.event_id, event.payload, number(id(ticket)) if ticket is not None else -1)
                for event, ticket in write.duplicates
            ),
            "tickets": {number(id(ticket)): counts for ticket, counts in write.tickets.items()},
            "counts": (write.events, write.bytes, write.late, write.new_topics, write.origin, write.serial),
        }

    # The schedule's steps.
    def batch(self, events: list[Event], ticket_plan: list[int | None], received_at: float) -> None:
        made: dict[int, AckTicket] = {}
        tickets: list[AckTicket | None] | None = None
        if any(number is not None for number in ticket_plan):
            tickets = []
            for number in ticket_plan:
                if number is None:
                    tickets.append(None)
                    continue
                if number not in made:
                    made[number] = AckTicket([], number, ticket_plan.count(number), [])
                    self.tickets[id(made[number])] = number
                tickets.append(made[number])
        self.actor.on_receive(OrderingBatch(events, received_at, tickets))

    def answer(self, count: int) -> None:
        for _ in range(min(count, len(self.answers))):
            self.actor.on_receive(self.answers.popleft())

    def commit(self) -> None:
        for write in self.uncommitted:
            for topic, delta in write.topics.items():
                state = self.topics.get(topic, TopicState(0, NO_TIMESTAMP))
                self.topics[topic] = TopicState(
                    max(state.last_seq, delta.last_seq), max(state.last_ts_ns, delta.last_ts_ns)
                )
        self.uncommitted.clear()
        self.live.committed_writes[0] = self.last_serial

    def restart(self) -> None:
        self.finish()
        self.start()

    def finish(self) -> None:
        self.actor.on_receive(Sync())
        self.answers.clear()  # answered again by Sync's own asks
        self.commit()


TOPICS = [f"t{n}" for n in range(12)]
event_spec = st.tuples(
    st.integers(min_value=0, max_value=11),  # topic
    st.integers(min_value=0, max_value=30),  # event id: few, so copies are common
    st.integers(min_value=-3_000, max_value=200),  # ms from the schedule's start: some late
    st.booleans(),  # a conflicting payload
    st.sampled_from([None, None, 0, 1]),  # ticket
)
step = st.one_of(
    st.tuples(st.just("batch"), st.lists(event_spec, min_size=1, max_size=25)),
    st.tuples(st.just("tick"), st.sampled_from([0.0, 0.004, 0.02, 0.06, 0.3, 1.2])),
    st.tuples(st.just("answer"), st.integers(min_value=1, max_value=3)),
    st.tuples(st.just("commit"), st.none()),
    st.tuples(st.just("restart"), st.none()),
)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    schedule=st.lists(step, max_size=40),
    window_ms=st.sampled_from([0, 10, 50]),
    max_buffered=st.sampled_from([2, 7, 10_000]),
    max_topics=st.sampled_from([2, 5, 1_000]),
    row_tickets=st.booleans(),
    topic_count=st.sampled_from([1, 3, 12]),
)
def test_the_batch_path_writes_what_the_event_at_a_time_path_wrote(
    schedule: list[tuple[str, Any]],
    window_ms: int,
    max_buffered: int,
    max_topics: int,
    row_tickets: bool,
    topic_count: int,
) -> None:
    with one_clock() as clock:
        params = {
            "window_ms": window_ms,
            "max_buffered": max_buffered,
            "max_topics": max_topics,
            "row_tickets": row_tickets,
        }
        sides = [Side(ordering.OrderingActor, params), Side(reference_ordering.OrderingActor, params)]
        ticket_base = 0
        for kind, arg in schedule:
            if kind == "batch":
                events = [
                    Event(
                        TOPICS[topic % topic_count],
                        f"e{event_id}",
                        "",
                        BASE_NS + ms * 1_000_000 + int(clock.now * 1e9),
                        "s",
                        b"other" if conflicting else b"p%d" % event_id,
                    )
                    for topic, event_id, ms, conflicting, _ in arg
                ]
                plan = [None if ticket is None else ticket_base + ticket for *_, ticket in arg]
                ticket_base += 2
                for side in sides:
                    side.batch(events, plan, clock.now)
            elif kind == "tick":
                clock.now += arg
                for side in sides:
                    side.actor.on_receive(Tick())
            elif kind == "answer":
                for side in sides:
                    side.answer(arg)
            else:
                for side in sides:
                    getattr(side, kind)()
            if sides[0].log != sides[1].log:
                for mine, theirs in zip(sides[0].log, sides[1].log):
                    assert mine == theirs, f"after {kind}"
                assert sides[0].log == sides[1].log, f"after {kind}"
        for side in sides:
            side.finish()
        assert sides[0].log == sides[1].log
        assert sides[0].stored == sides[1].stored


def test_a_topic_whose_last_write_is_not_committed_is_not_forgotten() -> None:
    """Over max_topics an idle topic is forgotten only once its last write has committed:
    forgotten sooner, its next event would be numbered from the stale stored state again."""
    with one_clock() as clock:
        params = {"window_ms": 0, "max_buffered": 10_000, "max_topics": 2, "row_tickets": False}
        sides = [Side(ordering.OrderingActor, params), Side(reference_ordering.OrderingActor, params)]
        for number, topic in enumerate(["t0", "t1", "t2", "t0"]):  # t0's first write never commits
            for side in sides:
                side.batch([Event(topic, f"e{number}", "", BASE_NS + number, "s", b"p")], [None], clock.now)
                side.answer(1)
        writes = [entry[1] for entry in sides[0].log if entry[0] == "write"]
        assert [(row[0], row[2]) for write in writes for row in write["rows"]] == [
            ("t0", 1),
            ("t1", 1),
            ("t2", 1),
            ("t0", 2),
        ]
        assert sides[0].log == sides[1].log


def test_the_oracle_is_the_event_at_a_time_path() -> None:
    """The reference keeps today's shape: one Released tuple per event out of its buffer."""
    buffer = reference_ordering.ReorderBuffer[str](0, 10)
    buffer.adopt({"t": TopicState(0, NO_TIMESTAMP)})
    released = buffer.push("t", [(1, "a", "a"), (0, "b", "b")], now=time.monotonic())
    assert [(r.event_id, r.seq, r.late) for r in released] == [("a", 1, False), ("b", 2, True)]


def test_a_resend_with_its_stored_content_is_settled_without_a_check_at_commit() -> None:
    """A duplicate whose lookup brought back its original's very timestamp, source and payload
    is counted and settled at once; any other (a field differs, or no content came back) still
    rides in the write, for the dedup actor to compare with its original at commit."""
    events = [
        Event("t", "same", "2025-10-22T10:00:00Z", 1, "src", b"\x01"),
        Event("t", "payload", "2025-10-22T10:00:00Z", 2, "src", b"\x02"),
        Event("t", "source", "2025-10-22T10:00:00Z", 3, "else", b"\x03"),
        Event("t", "timestamp", "2025-10-22T12:00:00+02:00", 4, "src", b"\x04"),
        Event("t", "no-content", "2025-10-22T10:00:00Z", 5, "src", b"\x05"),
        Event("u", "same-empty", "2025-10-22T10:00:00Z", 6, "s\x00rc", b""),
    ]
    stored: dict[tuple[str, str], tuple[str | None, str | None, str | None]] = {
        ("t", "same"): ("2025-10-22T10:00:00Z", "src", "01"),
        ("t", "payload"): ("2025-10-22T10:00:00Z", "src", "ff"),
        ("t", "source"): ("2025-10-22T10:00:00Z", "src", "03"),
        ("t", "timestamp"): ("2025-10-22T10:00:00Z", "src", "04"),
        ("t", "no-content"): ("2025-10-22T10:00:00Z", "src", None),  # a payload too large to bring back
        ("u", "same-empty"): ("2025-10-22T10:00:00Z", "s\x00rc", ""),
    }
    tickets = [AckTicket([b"peer"], n, 1, []) for n in range(len(events))]
    write = WriteBatch()
    ordering._count_copies(write, events, list(tickets), stored)
    assert [event.event_id for event, _ in write.duplicates] == ["payload", "source", "timestamp", "no-content"]
    assert [ticket for _, ticket in write.duplicates] == tickets[1:5]
    assert (write.events, write.topics["t"].duplicate_dropped, write.topics["u"].duplicate_dropped) == (6, 5, 1)
    without = WriteBatch()
    ordering._count_copies(without, events, None)
    assert [event.event_id for event, _ in without.duplicates] == [event.event_id for event in events]
