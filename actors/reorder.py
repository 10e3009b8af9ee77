"""The reorder window: the pure core of an ordering actor (no threads, no clock of its own).

Theory of operation. New events of a topic wait until ``window`` seconds have passed since
their arrival. At each :meth:`ReorderBuffer.release_due`, the due events (a prefix of the
arrival order) are released, and with them every waiting event of the same topic that sorts
before the largest due one by ``(timestamp, arrival counter)``: releasing those early costs
nothing and keeps the output of each topic in timestamp order. So nothing waits longer than
the window, and everything comes out per topic in ``(timestamp, arrival)`` order. When more than
``max_buffered`` events wait, the oldest arrivals are released early the same way.

Each released event gets its topic's next sequence number, 1, 2, 3, ... with no gaps. An event
whose timestamp is older than the last one already released for its topic is *late*: it still
gets the next seq (nothing is dropped), flagged so. With a window of 0 events are released at
once in arrival order.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from actors.store import TopicState

T = TypeVar("T")


@dataclass(slots=True)
class Released(Generic[T]):
    """An event leaving the buffer with its seq and lateness."""

    topic: str
    ts_ns: int
    event_id: str
    item: T
    seq: int
    late: bool


@dataclass(slots=True, eq=False)
class _Waiting(Generic[T]):
    topic: str
    ts_ns: int
    event_id: str
    arrival: int
    deadline: float
    item: T
    released: bool = False


@dataclass(slots=True)
class _Topic(Generic[T]):
    last_seq: int
    last_ts_ns: int
    heap: list[tuple[int, int, _Waiting[T]]] = field(default_factory=list)


class ReorderBuffer(Generic[T]):
    """Per-topic reorder buffers with a shared bound, handing out gapless seqs."""

    def __init__(self, window_s: float, max_buffered: int) -> None:
        self.window_s = window_s
        self.max_buffered = max_buffered
        self._topics: dict[str, _Topic[T]] = {}
        self._arrivals: deque[_Waiting[T]] = deque()
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
        deadline = now + self.window_s
        for ts_ns, event_id, item in entries:
            self._counter += 1
            self._held[(topic, event_id)] = item
            waiting = _Waiting(topic, ts_ns, event_id, self._counter, deadline, item)
            heapq.heappush(state.heap, (ts_ns, self._counter, waiting))
            self._arrivals.append(waiting)
            self.buffered += 1
        return self.release_due(now)

    def release_due(self, now: float) -> list[Released[T]]:
        """Release every event whose window has passed, or that the bound forces out."""
        limits: dict[str, tuple[int, int]] = {}
        excess = self.buffered - self.max_buffered
        arrivals = self._arrivals
        while arrivals:
            head = arrivals[0]
            if head.released:
                arrivals.popleft()
                continue
            if head.deadline > now and excess <= 0:
                break
            arrivals.popleft()
            excess -= 1
            key = (head.ts_ns, head.arrival)
            if key > limits.get(head.topic, (-1, -1)):
                limits[head.topic] = key
        released: list[Released[T]] = []
        for topic, limit in limits.items():
            state = self._topics[topic]
            heap = state.heap
            while heap and heap[0][:2] <= limit:
                _, _, waiting = heapq.heappop(heap)
                waiting.released = True
                self.buffered -= 1
                del self._held[(topic, waiting.event_id)]
                released.append(self._release(state, topic, waiting.ts_ns, waiting.event_id, waiting.item))
        return released

    def flush(self) -> list[Released[T]]:
        """Release everything still waiting, each topic in order (for shutdown)."""
        released: list[Released[T]] = []
        for topic, state in self._topics.items():
            while state.heap:
                _, _, waiting = heapq.heappop(state.heap)
                waiting.released = True
                released.append(self._release(state, topic, waiting.ts_ns, waiting.event_id, waiting.item))
        self._arrivals.clear()
        self._held.clear()
        self.buffered = 0
        return released

    def next_deadline(self) -> float | None:
        """When the oldest waiting event is due, or None when nothing waits."""
        for waiting in self._arrivals:
            if not waiting.released:
                return waiting.deadline
        return None

    @staticmethod
    def _release(state: _Topic[T], topic: str, ts_ns: int, event_id: str, item: T) -> Released[T]:
        state.last_seq += 1
        late = ts_ns < state.last_ts_ns
        if not late:
            state.last_ts_ns = ts_ns
        return Released(topic, ts_ns, event_id, item, state.last_seq, late)
