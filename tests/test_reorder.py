"""The reorder window's pure core: examples, then properties over random streams (hypothesis)."""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.reorder import Leaving, ReorderWindow
from actors.store import TopicState
from transport.schema import Event, parse_timestamp


class Released(NamedTuple):
    """One event as it left the window: read back from the columns of a :class:`Leaving`."""

    topic: str
    ts_ns: int
    event_id: str
    seq: int
    late: bool


class Buffer:
    """A :class:`ReorderWindow` fed one topic's events at a time, reporting each event that leaves."""

    def __init__(self, window: ReorderWindow) -> None:
        self.window = window

    @property
    def held(self) -> set[tuple[str, str]]:
        return self.window.held

    @property
    def buffered(self) -> int:
        return self.window.buffered

    def push(self, topic: str, entries: list[tuple[int, str]], now: float) -> list[Released]:
        """Push ``(ts_ns, event_id)`` entries of one topic, then release what is due."""
        out = Leaving()
        events = [Event(topic, event_id, "", ts_ns, "s", b"") for ts_ns, event_id in entries]
        self.window.push({topic: len(events)}, events, None, now, now, out)
        self.window.release_due(now, out)
        return released(out)

    def release_due(self, now: float) -> list[Released]:
        out = Leaving()
        self.window.release_due(now, out)
        return released(out)

    def flush(self) -> list[Released]:
        out = Leaving()
        self.window.flush(out)
        return released(out)


def released(out: Leaving) -> list[Released]:
    """The events of ``out``, checking its runs agree with its columns."""
    events = [
        Released(topic, event.ts_ns, event.event_id, seq, bool(late))
        for topic, event, seq, late in zip(out.topics, out.events, out.seqs, out.lates, strict=True)
    ]
    start = 0
    for topic, count, first_seq, late, _ in out.runs:
        run = events[start : start + count]
        assert [r.topic for r in run] == [topic] * count
        assert [r.seq for r in run] == list(range(first_seq, first_seq + count))
        assert sum(r.late for r in run) == late
        start += count
    assert start == len(events)
    return events


def buffer(window_s: float = 1.0, max_buffered: int = 100, topics: tuple[str, ...] = ("t",)) -> Buffer:
    window = ReorderWindow(window_s, max_buffered)
    window.adopt(dict.fromkeys(topics, TopicState(0, 0)))
    return Buffer(window)


def ids(released: list[Released]) -> list[str]:
    return [r.event_id for r in released]


def test_window_zero_releases_at_once_in_arrival_order() -> None:
    buf = buffer(window_s=0)
    out = buf.push("t", [(30, "a"), (10, "b"), (20, "c")], now=0.0)
    assert ids(out) == ["a", "b", "c"]
    assert [r.seq for r in out] == [1, 2, 3]
    assert [r.late for r in out] == [False, True, True]


def test_events_wait_for_the_window_then_leave_in_timestamp_order() -> None:
    buf = buffer(window_s=1.0)
    assert buf.push("t", [(30, "a"), (10, "b")], now=0.0) == []
    assert buf.push("t", [(20, "c")], now=0.5) == []
    assert ("t", "a") in buf.held and buf.buffered == 3
    first = buf.release_due(1.0)  # a and b are due; c sorts before a, so it leaves early with them
    assert ids(first) == ["b", "c", "a"] and [r.seq for r in first] == [1, 2, 3]
    assert not any(r.late for r in first) and buf.buffered == 0 and ("t", "a") not in buf.held


def test_an_event_older_than_what_was_released_is_late_but_kept() -> None:
    buf = buffer(window_s=1.0)
    buf.push("t", [(50, "a")], now=0.0)
    buf.release_due(1.0)
    out = buf.push("t", [(40, "old")], now=1.1) + buf.release_due(2.2)
    assert len(out) == 1 and out[0].late and out[0].seq == 2


def test_equal_instants_leave_in_arrival_order() -> None:
    buf = buffer(window_s=1.0)
    buf.push("t", [(5, "first")], now=0.0)
    buf.push("t", [(5, "second"), (5, "third")], now=0.1)
    assert ids(buf.release_due(5.0)) == ["first", "second", "third"]


def test_mixed_precision_and_offsets_order_by_instant() -> None:
    stamps = ["2025-10-22T10:00:01.001000Z", "2025-10-22T17:00:01+07:00", "2025-10-22T10:00:00.5Z"]
    buf = buffer(window_s=1.0)
    buf.push("t", [(parse_timestamp(s)[1], s) for s in stamps], now=0.0)
    assert ids(buf.release_due(1.0)) == [stamps[2], stamps[1], stamps[0]]


def test_bound_releases_just_enough_of_the_earliest_events() -> None:
    buf = buffer(window_s=100.0, max_buffered=2)
    out = buf.push("t", [(3, "a"), (2, "b"), (1, "c")], now=0.0)
    # Three waiting, bound two: one must go, and the earliest goes, so the topic stays in order.
    assert ids(out) == ["c"] and buf.buffered == 2
    out = buf.push("t", [(4, "d")], now=1.0)
    assert ids(out) == ["b"] and buf.buffered == 2
    assert ids(buf.release_due(101.0)) == ["a", "d"] and not any(r.late for r in out)


def test_state_continues_from_storage() -> None:
    window = ReorderWindow(0, 10)
    window.adopt({"t": TopicState(last_seq=41, last_ts_ns=100)})
    buf = Buffer(window)
    out = buf.push("t", [(99, "x"), (101, "y")], now=0.0)
    assert [(r.seq, r.late) for r in out] == [(42, True), (43, False)]


def test_flush_releases_everything_in_order_per_topic() -> None:
    buf = buffer(window_s=10.0, topics=("a", "b"))
    buf.push("a", [(2, "a2"), (1, "a1")], now=0.0)
    buf.push("b", [(9, "b9")], now=0.0)
    out = buf.flush()
    assert sorted(ids(out)) == ["a1", "a2", "b9"]
    assert [r.event_id for r in out if r.topic == "a"] == ["a1", "a2"]
    assert buf.buffered == 0


# Properties. A stream is a list of steps: (time advance, topic, event id, timestamp). Ids are
# drawn from a small set so duplicates are common; dedup happens before the buffer, as in the
# ordering actor: an arriving event is dropped if stored (already released) or held.
steps = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=0.3, allow_nan=False),
        st.sampled_from(["a", "b", "c"]),
        st.integers(min_value=0, max_value=40).map(str),
        st.integers(min_value=0, max_value=50),
    ),
    max_size=200,
)


TICK = 0.05


def run(stream: list[tuple[float, str, str, int]], window_s: float, max_buffered: int):
    buf = buffer(window_s, max_buffered, topics=("a", "b", "c"))
    stored: set[tuple[str, str]] = set()
    arrived_at: dict[tuple[str, str], float] = {}
    arrival_no: dict[tuple[str, str], int] = {}
    out: list[tuple[Released, float]] = []
    now = 0.0
    max_step = 0.0
    forced = False
    for number, (advance, topic, event_id, ts) in enumerate(stream):
        now += advance
        max_step = max(max_step, advance)
        for r in buf.release_due(now):
            out.append((r, now))
            stored.add((r.topic, r.event_id))
        key = (topic, event_id)
        if key in stored or (topic, event_id) in buf.held:
            continue
        arrived_at[key] = now
        arrival_no[key] = number
        before = buf.buffered
        pushed = buf.push(topic, [(ts, event_id)], now)
        if window_s > 0 and before + 1 > max_buffered:
            forced = True
        for r in pushed:
            out.append((r, now))
            stored.add((r.topic, r.event_id))
        assert buf.buffered <= max_buffered
    # Then time goes on in ticks of TICK until everything has left.
    for _ in range(int(window_s / TICK) + 2):
        now += TICK
        out.extend((r, now) for r in buf.release_due(now))
    assert buf.buffered == 0
    return out, arrived_at, arrival_no, max(max_step, TICK), forced


@settings(max_examples=300, deadline=None)
@given(steps, st.sampled_from([0.0, 0.5, 1.0]), st.integers(min_value=1, max_value=50))
def test_every_distinct_event_is_released_once_with_gapless_seqs(stream, window_s, max_buffered) -> None:
    out, arrived_at, _, _, _ = run(stream, window_s, max_buffered)
    keys = [(r.topic, r.event_id) for r, _ in out]
    assert len(keys) == len(set(keys)) == len(arrived_at)
    by_topic: dict[str, list[int]] = defaultdict(list)
    for r, _ in out:
        by_topic[r.topic].append(r.seq)
    for seqs in by_topic.values():
        assert seqs == list(range(1, len(seqs) + 1))


@settings(max_examples=300, deadline=None)
@given(steps, st.sampled_from([0.0, 0.5, 1.0]), st.integers(min_value=1, max_value=50))
def test_on_time_events_are_in_timestamp_then_arrival_order(stream, window_s, max_buffered) -> None:
    out, _, arrival_no, _, _ = run(stream, window_s, max_buffered)
    last: dict[str, tuple[int, int]] = {}
    highest_ts: dict[str, int] = {}
    for r, _ in out:
        # late means exactly: older than something already released for the topic
        assert r.late == (r.ts_ns < highest_ts.get(r.topic, -1))
        highest_ts[r.topic] = max(highest_ts.get(r.topic, -1), r.ts_ns)
        if not r.late:
            key = (r.ts_ns, arrival_no[(r.topic, r.event_id)])
            if window_s > 0:
                assert key >= last.get(r.topic, (-1, -1))
            last[r.topic] = key


@settings(max_examples=300, deadline=None)
@given(steps, st.sampled_from([0.5, 1.0]))
def test_nothing_waits_longer_than_the_window(stream, window_s) -> None:
    out, arrived_at, _, max_step, _ = run(stream, window_s, max_buffered=10_000)
    for r, released_at in out:
        waited = released_at - arrived_at[(r.topic, r.event_id)]
        # tolerance: the buffer is only looked at when the clock moves (one step or tick)
        assert waited <= window_s + max_step + 1e-9


@settings(max_examples=200, deadline=None)
@given(steps)
def test_flush_releases_everything_in_order(stream) -> None:
    buf = buffer(5.0, 10_000, topics=("a", "b", "c"))
    pushed: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for number, (_, topic, event_id, ts) in enumerate(stream):
        if (topic, event_id) in buf.held:
            continue
        buf.push(topic, [(ts, event_id)], 0.0)
        pushed[topic].append((ts, number))
    out = buf.flush()
    for topic, keys in pushed.items():
        assert [r.ts_ns for r in out if r.topic == topic] == [ts for ts, _ in sorted(keys)]
    assert buf.buffered == 0
