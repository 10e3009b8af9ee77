"""The dedup actor on its own thread and a real SQLite file: grouped lookups and held writes.

The askers are small collector actors standing in for ordering actors; the dedup actor, its
store and its database are the real ones.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest
import zmq

from actors.dedup import DedupActor
from actors.flow import InFlight, LiveFigures
from actors.messages import ClassifyRequest, ClassifyResult, Freeze, Sync, WriteBatch
from actors.store import CONTENT_BACK_BYTES, NO_TIMESTAMP, Row, TopicDelta, TopicState, json_text

pytestmark = pytest.mark.timeout(60)

ANSWER_TIMEOUT_S = 10.0


class Collector(pykka.ThreadingActor):
    """Puts every message it is told on a queue the test reads (with a timeout)."""

    def __init__(self, inbox: queue.Queue[Any]) -> None:
        super().__init__()
        self._inbox = inbox

    def on_receive(self, message: Any) -> None:
        self._inbox.put(message)


def row(topic: str, event_id: str, seq: int) -> Row:
    return (
        topic,
        event_id,
        seq,
        "2025-10-22T10:00:00Z",
        1_761_127_200_000_000_000 + seq,
        "test",
        bytearray(b"\x80"),
        1.0,
        0,
    )


def write_of(rows: list[Row]) -> WriteBatch:
    write = WriteBatch(rows=rows, events=len(rows))
    for topic, _, seq, _, ts_ns, *_ in rows:
        delta = write.topics.setdefault(topic, TopicDelta())
        delta.received += 1
        delta.last_seq = max(delta.last_seq, seq)
        delta.last_ts_ns = max(delta.last_ts_ns, ts_ns)
    return write


@pytest.fixture
def start_dedup(tmp_path: Path) -> Iterator[Any]:
    refs: list[pykka.ActorRef[Any]] = []
    context: zmq.Context[Any] = zmq.Context()

    def start(lookup_group: int) -> pykka.ActorRef[Any]:
        in_flight = InFlight(1_000_000)
        in_flight.add(1_000_000, 0)  # whatever the writes settle is given back from here
        ref = DedupActor.start(
            tmp_path / "events.db",
            synchronous="NORMAL",
            commit_max_events=5000,
            commit_max_ms=50,
            lookup_group=lookup_group,
            in_flight=in_flight,
            live=LiveFigures(),
            zmq_context=context,
        )
        refs.append(ref)
        return ref

    yield start
    for ref in refs:
        ref.stop(timeout=ANSWER_TIMEOUT_S)
    context.destroy(linger=0)


def answers(inbox: queue.Queue[Any], count: int) -> dict[int, ClassifyResult]:
    results = [inbox.get(timeout=ANSWER_TIMEOUT_S) for _ in range(count)]
    return {result.token: result for result in results}


@pytest.mark.parametrize("asker_json", ["none", "all", "all-but-one"])
def test_lookups_held_together_get_each_its_own_answer(start_dedup: Any, asker_json: str) -> None:
    """Held lookups are answered with one statement, whether the askers sent their keys' JSON
    text (joined into one), none did, or one did not (then it is made again)."""
    dedup = start_dedup(lookup_group=3)
    dedup.tell(write_of([row("a", "a1", 1), row("a", "a2", 2), row("b", "b1", 1)]))
    assert dedup.ask(Sync(), timeout=ANSWER_TIMEOUT_S) is True
    inbox: queue.Queue[Any] = queue.Queue()
    askers = [Collector.start(inbox) for _ in range(3)]
    try:
        # Frozen, the dedup actor finds all three requests queued and answers them together.
        dedup.tell(Freeze(0.3))
        asked: list[list[tuple[str, str]]] = [[("a", "a1"), ("a", "a9")], [("b", "b1"), ("b", "b2")], [("c", "c1")]]
        texts = [json_text(keys) if asker_json != "none" else None for keys in asked]
        if asker_json == "all-but-one":
            texts[1] = None
        unknown = [["a"], ["b", "new"], []]
        for token, (keys, topics, text) in enumerate(zip(asked, unknown, texts), 1):
            dedup.tell(ClassifyRequest(keys, topics, reply_to=askers[token - 1], token=token, keys_json=text))
        got = answers(inbox, 3)
    finally:
        for asker in askers:
            asker.stop()
    assert sorted(got) == [1, 2, 3]
    assert all(result.error is None for result in got.values())
    for token, stored in ((1, ("a", "a1")), (2, ("b", "b1"))):
        assert stored in got[token].existing
    assert ("a", "a9") not in got[1].existing and ("b", "b2") not in got[2].existing
    assert ("c", "c1") not in got[3].existing
    assert got[1].contents[("a", "a1")] == ("2025-10-22T10:00:00Z", "test", "80")
    assert ("a", "a9") not in got[1].contents
    # Topic states go only to the actor that asked for them.
    assert got[1].states == {"a": TopicState(2, row("a", "a2", 2)[4])}
    assert got[2].states == {"b": TopicState(1, row("b", "b1", 1)[4]), "new": TopicState(0, NO_TIMESTAMP)}
    assert got[3].states == {}


def test_a_lone_lookup_is_answered_when_the_inbox_runs_dry(start_dedup: Any) -> None:
    dedup = start_dedup(lookup_group=4)  # only one of four ordering actors asks
    inbox: queue.Queue[Any] = queue.Queue()
    asker = Collector.start(inbox)
    try:
        dedup.tell(ClassifyRequest([("a", "a1")], ["a"], reply_to=asker, token=7))
        got = answers(inbox, 1)
    finally:
        asker.stop()
    assert got[7].existing == set() and got[7].states == {"a": TopicState(0, NO_TIMESTAMP)}


def test_rows_held_for_the_next_commit_count_as_stored(start_dedup: Any) -> None:
    """A held row is found with its content, as the database gives it once committed (a payload
    over CONTENT_BACK_BYTES without it), so its exact re-sends are settled by the asker."""
    dedup = start_dedup(lookup_group=1)
    inbox: queue.Queue[Any] = queue.Queue()
    asker = Collector.start(inbox)
    large = (*row("a", "big", 2)[:6], bytearray(b"\x00" * (CONTENT_BACK_BYTES + 1)), 1.0, 0)
    asked = [("a", "a1"), ("a", "a2"), ("a", "big")]
    try:
        # The write and the lookup queue up together, so the lookup comes before the commit.
        dedup.tell(Freeze(0.3))
        dedup.tell(write_of([row("a", "a1", 1), large]))
        dedup.tell(ClassifyRequest(asked, [], reply_to=asker, token=1))
        held = answers(inbox, 1)[1]
        assert held.existing == {("a", "a1"), ("a", "big")}
        assert held.contents == {
            ("a", "a1"): ("2025-10-22T10:00:00Z", "test", "80"),
            ("a", "big"): ("2025-10-22T10:00:00Z", "test", None),
        }
        # Committed now, the rows are found in the database just the same, with the same content.
        assert dedup.ask(Sync(), timeout=ANSWER_TIMEOUT_S) is True
        dedup.tell(ClassifyRequest(asked, [], reply_to=asker, token=2, keys_json=json_text(asked)))
        stored = answers(inbox, 1)[2]
        assert (stored.existing, stored.contents) == (held.existing, held.contents)
    finally:
        asker.stop()
