"""The reorder window: the pure core of an ordering actor (no threads, no clock of its own).

Theory of operation. New events of a topic wait until ``window`` seconds have passed since
their arrival. At each :meth:`ReorderBuffer.release_due`, the due events (a prefix of the
arrival order) are released, and with them every waiting event of the same topic that sorts
before the largest due one by ``(timestamp, arrival counter)``: releasing those early costs
nothing and keeps the output of each topic in timestamp order. So nothing waits longer than
the window, and everything comes out per topic in ``(timestamp, arrival)`` order. When more than
``max_buffered`` events wait, the oldest arrivals are released early the same way.

Each released event gets its topic's next sequence number, 1, 2, 3, ... with no gaps. An event
whose timestamp is older than the last one already released for its topic is *late*: waiting
cannot put it in order any more, so it leaves at once, with the next seq, flagged so (nothing
is dropped). With a window of 0 events are released at once in arrival order.

Because a topic's events leave in key order and late ones leave at once, an event of the
arrival queue has already left exactly when its key is at or below the last key released for
its topic; that is how :meth:`release_due` skips them without a flag on every event.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from typing import Generic, NamedTuple, TypeVar

from actors.store import TopicState

T = TypeVar("T")

_NOTHING = (-1, -1)


class Released(NamedTuple, Generic[T]):
    """An event leaving the buffer with its seq and lateness."""

    topic: str
    ts_ns: int
    event_id: str
    item: T
    seq: int
    late: bool


class _Topic(Generic[T]):
    __slots__ = ("last_seq", "last_ts_ns", "heap", "released_upto")

    def __init__(self, last_seq: int, last_ts_ns: int) -> None:
        self.last_seq = last_seq
        self.last_ts_ns = last_ts_ns
        self.heap: list[tuple[int, int, str, T]] = []
        self.released_upto: tuple[int, int] = _NOTHING


class ReorderBuffer(Generic[T]):
    """Per-topic reorder buffers with a shared bound, handing out gapless seqs."""

    def __init__(self, window_s: float, max_buffered: int) -> None:
        self.window_s = window_s
        self.max_buffered = max_buffered
        self._topics: dict[str, _Topic[T]] = {}
        # (deadline, topic, ts_ns, arrival) in arrival order; entries already released stay
        # until they reach the head.
        self._arrivals: deque[tuple[float, str, int, int]] = deque()
        self._counter = 0
        self._held: dict[tuple[str, str], T] = {}
        self.buffered = 0

    def knows(self, topic: str) -> bool:
        """Whether the buffer has this topic's state (its last seq and last timestamp)."""
        return topic in self._topics

    def set_state(self, topic: str, state: TopicState) -> None:
        """Start a topic from its stored state, so seqs and lateness continue after a restart."""
        self._topics[topic] = _Topic(state.last_seq, state.last_ts_ns)

    def holding(self, topic: str, event_id: str) -> T | None:
        """The item of this event if it is waiting in the buffer (a copy arriving now is a duplicate)."""
        return self._held.get((topic, event_id))

    def push(self, topic: str, entries: Iterable[tuple[int, str, T]], now: float) -> list[Released[T]]:
        """Add new events ``(ts_ns, event_id, item)`` of a known topic, in arrival order; return what leaves now."""
        state = self._topics[topic]
        if self.window_s <= 0:
            return [self._release(state, topic, ts_ns, event_id, item) for ts_ns, event_id, item in entries]
        late: list[Released[T]] = []
        deadline = now + self.window_s
        heap = state.heap
        held = self._held
        arrivals = self._arrivals
        for ts_ns, event_id, item in entries:
            if ts_ns < state.last_ts_ns:
                late.append(self._release(state, topic, ts_ns, event_id, item))
                continue
            self._counter += 1
            heapq.heappush(heap, (ts_ns, self._counter, event_id, item))
            arrivals.append((deadline, topic, ts_ns, self._counter))
            held[(topic, event_id)] = item
            self.buffered += 1
        return late + self.release_due(now) if late else self.release_due(now)

    def release_due(self, now: float) -> list[Released[T]]:
        """Release every event whose window has passed, or that the bound forces out."""
        limits: dict[str, tuple[int, int]] = {}
        excess = self.buffered - self.max_buffered
        arrivals = self._arrivals
        topics = self._topics
        while arrivals:
            deadline, topic, ts_ns, arrival = arrivals[0]
            key = (ts_ns, arrival)
            if key <= topics[topic].released_upto or key <= limits.get(topic, _NOTHING):
                arrivals.popleft()  # left already, or leaves with this round's limit
                continue
            if deadline > now and excess <= 0:
                break
            arrivals.popleft()
            limits[topic] = key
            # At least this event leaves; that is all the bound needs counted (more may go with it).
            excess -= 1
        released: list[Released[T]] = []
        for topic, limit in limits.items():
            state = topics[topic]
            heap = state.heap
            while heap and (heap[0][0], heap[0][1]) <= limit:
                ts_ns, arrival, event_id, item = heapq.heappop(heap)
                self.buffered -= 1
                del self._held[(topic, event_id)]
                released.append(self._release(state, topic, ts_ns, event_id, item))
            state.released_upto = limit
        return released

    def flush(self) -> list[Released[T]]:
        """Release everything still waiting, each topic in order (for shutdown)."""
        released: list[Released[T]] = []
        for topic, state in self._topics.items():
            while state.heap:
                ts_ns, arrival, event_id, item = heapq.heappop(state.heap)
                released.append(self._release(state, topic, ts_ns, event_id, item))
                state.released_upto = (ts_ns, arrival)
        self._arrivals.clear()
        self._held.clear()
        self.buffered = 0
        return released

    def next_deadline(self) -> float | None:
        """When the oldest waiting event is due, or None when nothing waits."""
        topics = self._topics
        for deadline, topic, ts_ns, arrival in self._arrivals:
            if (ts_ns, arrival) > topics[topic].released_upto:
                return deadline
        return None

    @staticmethod
    def _release(state: _Topic[T], topic: str, ts_ns: int, event_id: str, item: T) -> Released[T]:
        state.last_seq += 1
        late = ts_ns < state.last_ts_ns
        if not late:
            state.last_ts_ns = ts_ns
        return Released(topic, ts_ns, event_id, item, state.last_seq, late)
