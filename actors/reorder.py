"""The reorder window: the pure core of an ordering actor (no threads, no clock of its own).

Theory of operation. New events of a topic wait until ``window`` seconds have passed since
their arrival. At each :meth:`ReorderWindow.release_due`, the due events (a prefix of the
arrival order) are released, and with them every waiting event of the same topic that sorts
before the largest due one by ``(timestamp, arrival counter)``: releasing those early costs
nothing and keeps the output of each topic in timestamp order. So nothing waits longer than
the window, and everything comes out per topic in ``(timestamp, arrival)`` order. When more than
``max_buffered`` events wait, the oldest arrivals are released early the same way.

Each released event gets its topic's next sequence number, 1, 2, 3, ... with no gaps. An event
whose timestamp is older than the last one already released for its topic is *late*: waiting
cannot put it in order any more, so it leaves at once, with the next seq, flagged so (nothing
is dropped). With a window of 0 events are released at once in arrival order.

The window works on columns, never an object per event. A push hands it a batch's new events
grouped by topic (each topic's in arrival order, with how many each topic has), and what
leaves is appended to a :class:`Leaving`: parallel lists over every event leaving, in the order
they are numbered, plus one line per topic run (its first seq, how many, how many late). Seqs
are ranges; late flags are one comparison against the running maximum of the timestamps (a
binary search when the run is in timestamp order, as every run leaving a block is). A topic's
waiting events are kept as blocks sorted by ``(timestamp, arrival)``: a push sorts its own
events once and, when they all come after the last block's, extends it (so in-order input
keeps one block a topic), otherwise starts a block of its own; a release cuts each block with a
binary search and sorts only what leaves. A topic's lone waiting event (with many topics,
nearly every event) is one tuple instead of a block, so it costs few objects, and few cache
misses when it leaves. A key, ``(timestamp, arrival)``, is packed into one int.

Because a topic's events leave in key order and late ones leave at once, every event of a
push has left exactly when the push's largest key is at or below the last key released for its
topic; so the arrival queue holds one entry per push, not per event, and needs no flags.
"""

from __future__ import annotations

import bisect
import itertools
import operator
from collections import deque
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, TypeVar

from actors.store import TopicState
from transport.schema import MIN_TS_NS, Event, event_id_of, ts_ns_of

if TYPE_CHECKING:
    from actors.messages import Tickets

T = TypeVar("T")

# An event's sort key, (timestamp, arrival counter), packed into one int: timestamp * 2**64 +
# counter (the counter starts at 1 and stays below 2**64). A key is then one object instead of
# three, and sorting or bisecting 10 000 of them takes 0.6 of the time pairs took.
_COUNTER_BITS = 64

# Below every key, pre-1970 (negative) timestamps included.
_NOTHING = (MIN_TS_NS - 1) << _COUNTER_BITS


class Leaving:
    """Columns of the events leaving the window, in the order they were numbered.

    ``runs`` has one ``(topic, count, first_seq, late, last_ts_ns)`` per topic run: the run's
    events are the next ``count`` of the columns, numbered from ``first_seq``; ``late`` of
    them are late; ``last_ts_ns`` is the topic's last timestamp after the run (the largest of
    its events that were not late, when ``late`` < ``count``). ``tickets`` is None while no
    leaving event has one; ``lates`` holds 1 for a late event, 0 for the others.
    """

    __slots__ = ("topics", "events", "tickets", "received", "seqs", "lates", "runs")

    def __init__(self) -> None:
        self.topics: list[str] = []
        self.events: list[Event] = []
        self.tickets: Tickets | None = None
        self.received: list[float] = []
        self.seqs: list[int] = []
        self.lates: list[int] = []
        self.runs: list[tuple[str, int, int, int, int]] = []

    def __len__(self) -> int:
        return len(self.events)

    def extend(
        self, topics: Iterable[str], events: list[Event], tickets: Tickets | None, received: Iterable[float]
    ) -> None:
        """Append events leaving, with their topics, tickets (None: they have none) and arrival times."""
        if tickets is not None:
            if self.tickets is None:
                self.tickets = [None] * len(self.events)
            self.tickets += tickets
        elif self.tickets is not None:
            self.tickets += itertools.repeat(None, len(events))
        self.topics += topics
        self.events += events
        self.received += received


class _Block:
    """The events of one push of one topic still waiting, sorted by ``(timestamp, arrival)``."""

    __slots__ = ("keys", "events", "tickets", "received")

    def __init__(self, keys: list[int], events: list[Event], tickets: Tickets | None, received: list[float]) -> None:
        self.keys = keys
        self.events = events
        self.tickets = tickets
        self.received = received


# A topic's one waiting event when nothing else of it waits: (key, event, tickets, received).
_Single = tuple[int, Event, "Tickets | None", float]


class _Topic:
    __slots__ = ("name", "last_seq", "last_ts_ns", "single", "blocks", "released_upto")

    def __init__(self, name: str, last_seq: int, last_ts_ns: int) -> None:
        self.name = name
        self.last_seq = last_seq
        self.last_ts_ns = last_ts_ns
        # Both None while nothing waits, which is most topics most of the time. A lone waiting
        # event (with many topics, nearly every one) is a tuple, not a block of four lists: a
        # release then touches two objects where a block took six, each a cache miss or more.
        self.single: _Single | None = None
        self.blocks: list[_Block] | None = None
        self.released_upto: int = _NOTHING


class ReorderWindow:
    """Per-topic reorder windows with a shared bound, handing out gapless seqs to runs of events."""

    def __init__(self, window_s: float, max_buffered: int) -> None:
        self.window_s = window_s
        self.max_buffered = max_buffered
        self._topics: dict[str, _Topic] = {}
        # One entry per push, in arrival order: (deadline, topic's state, largest key pushed,
        # count). An entry whose largest key is at or below its topic's released_upto has left.
        # It holds the state itself: with many topics, a lookup by name is a cache miss or two.
        self._arrivals: deque[tuple[float, _Topic, int, int]] = deque()
        self._counter = 0
        self._held: set[tuple[str, str]] = set()
        self.buffered = 0

    def unknown(self, topics: Iterable[str]) -> list[str]:
        """Those of ``topics`` whose state (last seq and last timestamp) the window does not have,
        in the order they first appear (the order topics are adopted in, and so forgotten in)."""
        return list(itertools.filterfalse(self._topics.__contains__, dict.fromkeys(topics)))

    @property
    def topic_count(self) -> int:
        """How many topics' states the window holds."""
        return len(self._topics)

    def idle_topics(self) -> list[str]:
        """Topics with nothing waiting and no arrival still queued: their state may be forgotten."""
        queued = {state for _, state, _, _ in self._arrivals}
        return [
            topic
            for topic, state in self._topics.items()
            if state.blocks is None and state.single is None and state not in queued
        ]

    def forget(self, topics: Iterable[str]) -> None:
        """Drop the state of idle topics; :meth:`adopt` brings a topic back when it returns."""
        for topic in topics:
            state = self._topics.pop(topic)
            assert state.blocks is None and state.single is None, f"topic {topic!r} still has events waiting"

    def adopt(self, states: Mapping[str, TopicState]) -> None:
        """Start each topic not known yet from its stored state, so seqs and lateness continue after a restart."""
        topics = self._topics
        for topic, state in states.items():
            if topic not in topics:
                topics[topic] = _Topic(topic, state.last_seq, state.last_ts_ns)

    @property
    def held(self) -> set[tuple[str, str]]:
        """Every waiting event's (topic, event_id): a copy of one of these arriving now is a duplicate."""
        return self._held

    def push(
        self,
        counts: Mapping[str, int],
        events: list[Event],
        tickets: Tickets | None,
        received_at: float,
        now: float,
        out: Leaving,
    ) -> None:
        """Add a batch's new events of known topics; append those that leave at once to ``out``.

        ``events`` are grouped by topic, each topic's in arrival order, ``counts`` giving the
        topics in that order with how many events each has. With no window every event leaves
        at once; otherwise only late ones do, and the caller calls :meth:`release_due` after.
        """
        topics = self._topics
        ts = list(map(ts_ns_of, events))
        start = 0
        if self.window_s <= 0:
            out.extend(_repeat_each(counts), events, tickets, itertools.repeat(received_at, len(events)))
            for topic, count in counts.items():
                end = start + count
                _number(topics[topic], topic, ts[start:end], False, out)
                start = end
            return
        deadline = now + self.window_s
        held = self._held
        arrivals = self._arrivals
        for topic, count in counts.items():
            end = start + count
            if count == 1:
                # One event of this topic (every event, with many topics): no lists to slice.
                state = topics[topic]
                event = events[start]
                ticket = tickets[start] if tickets is not None else None
                if ts[start] < state.last_ts_ns:
                    out.extend((topic,), [event], [ticket] if tickets is not None else None, (received_at,))
                    _number(state, topic, [ts[start]], False, out)
                else:
                    self._counter += 1
                    key = (ts[start] << _COUNTER_BITS) + self._counter
                    if state.blocks is None and state.single is None:
                        state.single = (key, event, [ticket] if tickets is not None else None, received_at)
                    else:
                        _blocks_of(state)
                        _add_block(
                            state, _Block([key], [event], [ticket] if tickets is not None else None, [received_at])
                        )
                    held.add((topic, event[1]))
                    arrivals.append((deadline, state, key, 1))
                    self.buffered += 1
                start = end
                continue
            self._wait(
                topic,
                ts[start:end],
                events[start:end],
                tickets[start:end] if tickets is not None else None,
                received_at,
                now,
                out,
            )
            start = end

    def _wait(
        self,
        topic: str,
        ts: list[int],
        events: list[Event],
        tickets: Tickets | None,
        received_at: float,
        now: float,
        out: Leaving,
    ) -> None:
        """One topic's new events: the late ones leave at once, the rest wait as one sorted block."""
        state = self._topics[topic]
        last_ts_ns = state.last_ts_ns
        if min(ts) < last_ts_ns:
            late = list(map(last_ts_ns.__gt__, ts))
            late_events = list(itertools.compress(events, late))
            out.extend(
                itertools.repeat(topic, len(late_events)),
                late_events,
                list(itertools.compress(tickets, late)) if tickets is not None else None,
                itertools.repeat(received_at, len(late_events)),
            )
            _number(state, topic, list(itertools.compress(ts, late)), False, out)
            on_time = list(map(operator.not_, late))
            events = list(itertools.compress(events, on_time))
            if not events:
                return
            ts = list(itertools.compress(ts, on_time))
            tickets = list(itertools.compress(tickets, on_time)) if tickets is not None else None
        count = len(events)
        first_counter = self._counter + 1
        self._counter += count
        counters = range(first_counter, first_counter + count)
        keys = list(map(operator.add, map(operator.lshift, ts, itertools.repeat(_COUNTER_BITS)), counters))
        if not all(map(operator.lt, keys, itertools.islice(keys, 1, None))):
            # Keys are distinct, so sorting by them keeps equal instants in arrival order.
            order = sorted(range(count), key=keys.__getitem__)
            keys = pick(keys, order)
            events = pick(events, order)
            tickets = pick(tickets, order) if tickets is not None else None
        _blocks_of(state)
        _add_block(state, _Block(keys, events, tickets, [received_at] * count))
        self._held.update(zip(itertools.repeat(topic), map(event_id_of, events)))
        self._arrivals.append((now + self.window_s, state, keys[-1], count))
        self.buffered += count

    def release_due(self, now: float, out: Leaving) -> None:
        """Release every event whose window has passed, then as few as the bound forces out."""
        limits: dict[_Topic, int] = {}
        arrivals = self._arrivals
        while arrivals:
            deadline, state, key, _ = arrivals[0]
            if key <= state.released_upto or key <= limits.get(state, _NOTHING):
                arrivals.popleft()  # left already, or leaves with this round's limit
            elif deadline <= now:
                arrivals.popleft()
                limits[state] = key
            else:
                break
        for state, limit in limits.items():
            self._release_upto(state, limit, out)
        while self.buffered > self.max_buffered and arrivals:
            # Over the bound: the topic of the oldest push gives up its earliest events, just
            # enough of them (releasing the earliest keeps the topic in order).
            _, state, key, _ = arrivals[0]
            if key <= state.released_upto or (state.blocks is None and state.single is None):
                arrivals.popleft()  # its events have all left
                continue
            blocks = _blocks_of(state) or []
            keys = sorted(itertools.chain.from_iterable(block.keys for block in blocks))
            cut = min(self.buffered - self.max_buffered, len(keys))
            self._release_upto(state, keys[cut - 1], out)

    def flush(self, out: Leaving) -> None:
        """Release everything still waiting, each topic in order (for shutdown)."""
        for state in self._topics.values():
            blocks = _blocks_of(state)
            if blocks is not None:
                self._release_upto(state, max(block.keys[-1] for block in blocks), out)
        self._arrivals.clear()

    def _release_upto(self, state: _Topic, limit: int, out: Leaving) -> None:
        """Release the topic's waiting events with keys up to ``limit``, in key order."""
        topic = state.name
        if limit > state.released_upto:
            state.released_upto = limit
        single = state.single
        if single is not None:
            # Since this runs once an event with many topics, the numbering is written out for one.
            key, event, lone_tickets, received_at = single
            if key > limit:
                return
            state.single = None
            self._held.discard((topic, event[1]))
            self.buffered -= 1
            if lone_tickets is None and out.tickets is None:
                out.topics.append(topic)
                out.events.append(event)
                out.received.append(received_at)
            else:
                out.extend((topic,), [event], lone_tickets, (received_at,))
            seq = state.last_seq = state.last_seq + 1
            out.seqs.append(seq)
            late = 1 if event[3] < state.last_ts_ns else 0
            if not late:
                state.last_ts_ns = event[3]
            out.lates.append(late)
            out.runs.append((topic, 1, seq, late, state.last_ts_ns))
            return
        blocks = state.blocks
        if blocks is None:
            return
        keys: list[int] = []
        events: list[Event] = []
        tickets: Tickets | None = None
        received: list[float] = []
        pieces = 0
        emptied = False
        for block in blocks:
            if block.keys[0] > limit:
                continue
            cut = bisect.bisect_right(block.keys, limit)
            pieces += 1
            if tickets is None and block.tickets is not None:
                tickets = [None] * len(events)
            if cut == len(block.keys):
                keys += block.keys
                events += block.events
                received += block.received
                if tickets is not None:
                    tickets += block.tickets if block.tickets is not None else itertools.repeat(None, cut)
                block.keys = []
                emptied = True
            else:
                keys += block.keys[:cut]
                events += block.events[:cut]
                received += block.received[:cut]
                if tickets is not None:
                    tickets += block.tickets[:cut] if block.tickets is not None else itertools.repeat(None, cut)
                del block.keys[:cut], block.events[:cut], block.received[:cut]
                if block.tickets is not None:
                    del block.tickets[:cut]
        if not pieces:
            return
        if emptied:
            kept = [block for block in blocks if block.keys]
            state.blocks = kept or None
        if pieces > 1:
            order = sorted(range(len(keys)), key=keys.__getitem__)
            keys = pick(keys, order)
            events = pick(events, order)
            received = pick(received, order)
            tickets = pick(tickets, order) if tickets is not None else None
        count = len(events)
        self._held.difference_update(zip(itertools.repeat(topic), map(event_id_of, events)))
        self.buffered -= count
        out.extend(itertools.repeat(topic, count), events, tickets, received)
        _number(state, topic, list(map(ts_ns_of, events)), True, out)


def _blocks_of(state: _Topic) -> list[_Block] | None:
    """The topic's waiting blocks, its lone waiting event made into one first."""
    single = state.single
    if single is not None:
        key, event, tickets, received_at = single
        state.single = None
        state.blocks = [_Block([key], [event], tickets, [received_at])]
    return state.blocks


def _add_block(state: _Topic, block: _Block) -> None:
    """Add a push's sorted block to the topic's waiting events.

    In-order input (the usual case) extends the last block, so a topic keeps one block and a
    release is one binary search; a block that overlaps the last one is kept apart. (Merging
    overlapping blocks past a few cost more than it saved: 26 978 against 21 059 instructions
    an event with 10 topics and a 50 ms window in ``scripts/ordering_cost.py``.)
    """
    blocks = state.blocks
    if blocks is None:
        state.blocks = [block]
        return
    last = blocks[-1]
    if last.keys[-1] < block.keys[0]:
        if block.tickets is not None and last.tickets is None:
            last.tickets = [None] * len(last.keys)
        if last.tickets is not None:
            last.tickets += block.tickets if block.tickets is not None else itertools.repeat(None, len(block.keys))
        last.keys += block.keys
        last.events += block.events
        last.received += block.received
        return
    blocks.append(block)


def pick(values: list[T], positions: Iterable[int]) -> list[T]:
    """``values`` at ``positions``, gathered in C."""
    return list(map(values.__getitem__, positions))


def _repeat_each(counts: Mapping[str, int]) -> Iterable[str]:
    """Each topic of ``counts`` repeated its count of times, in order."""
    return itertools.chain.from_iterable(itertools.starmap(itertools.repeat, counts.items()))


def _number(state: _Topic, topic: str, ts: list[int], in_order: bool, out: Leaving) -> None:
    """Give a topic run (its timestamps, in the order they leave) its seqs and late flags."""
    count = len(ts)
    first_seq = state.last_seq + 1
    state.last_seq += count
    last_ts_ns = state.last_ts_ns
    if count == 1:
        late = 1 if ts[0] < last_ts_ns else 0
        if not late:
            last_ts_ns = ts[0]
        out.seqs.append(first_seq)
        out.lates.append(late)
    else:
        if in_order or all(map(operator.le, ts, itertools.islice(ts, 1, None))):
            # In timestamp order: the late ones are those below the last timestamp, a prefix.
            late = bisect.bisect_left(ts, last_ts_ns)
            out.lates += itertools.repeat(1, late)
            out.lates += itertools.repeat(0, count - late)
            if late < count:
                last_ts_ns = ts[-1]
        else:
            # Late is below the largest timestamp before it: a running maximum, in C.
            running = list(itertools.accumulate(ts, max, initial=last_ts_ns))
            lates = list(map(int, map(operator.lt, ts, running)))
            out.lates += lates
            late = sum(lates)
            last_ts_ns = running[-1]
        out.seqs += range(first_seq, first_seq + count)
    state.last_ts_ns = last_ts_ns
    out.runs.append((topic, count, first_seq, late, last_ts_ns))
