"""The key filter: every stored key passes it, most new ones do not, and a build over a real
SQLite file reads every stored and kept key while the writer goes on (actors.key_filter)."""

from __future__ import annotations

import logging
import queue
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest
import zmq

from actors.dedup import DedupActor
from actors.flow import InFlight, LiveFigures
from actors.key_filter import BITS_PER_KEY, FilterBuild, KeyFilter
from actors.messages import ClassifyRequest, Freeze, Sync, WriteBatch
from actors.store import EventStore, Row, TopicDelta, connect_writer

pytestmark = pytest.mark.timeout(120)

TIMEOUT_S = 10.0


def uuid_keys(count: int, topics: int = 10) -> list[tuple[str, str]]:
    return [(f"topic-{index % topics}", str(uuid.uuid4())) for index in range(count)]


def rows_of(keys: list[tuple[str, str]], first_seq: int = 1) -> list[Row]:
    return [
        (topic, event_id, first_seq + index, "2025-10-22T10:00:00Z", 1_761_127_200_000_000_000, "t", b"\x80", 1.0, 0)
        for index, (topic, event_id) in enumerate(keys)
    ]


def test_every_added_key_passes_and_few_new_ones_do() -> None:
    key_filter = KeyFilter(100_000, 1 << 30, min_keys=1)
    stored = uuid_keys(100_000)
    key_filter.add(stored)
    assert key_filter.may_hold(stored) == stored
    new = uuid_keys(100_000)
    passed = len(key_filter.may_hold(new))
    # One bit per key in at least 16 per key: about 1 - e^(-1/16), 6 %, of new keys share a bit.
    assert 0.03 < passed / len(new) < 0.09, passed
    assert key_filter.added == 100_000 and not key_filter.crowded()
    key_filter.add(uuid_keys(key_filter.room))
    assert key_filter.crowded()


def test_size_is_a_power_of_two_within_the_cap() -> None:
    assert KeyFilter(0, 1 << 30).size_bytes == (1 << 20) * BITS_PER_KEY // 8  # the default minimum
    assert KeyFilter(10**9, 1 << 20).size_bytes == 1 << 20
    small = KeyFilter(1000, 1 << 30, min_keys=1)
    assert small.room >= 1000 and small.size_bytes == 1 << (small.size_bytes.bit_length() - 1)


def test_a_build_reads_every_stored_and_kept_key_while_the_writer_goes_on(tmp_path: Path) -> None:
    store = EventStore(connect_writer(tmp_path / "events.db"))
    before = uuid_keys(3000)
    store.begin()
    store.insert(rows_of(before))
    store.commit()
    store.begin()
    assert store.expire_oldest(None, 500) == 500  # kept in deleted_keys
    store.commit()

    target = KeyFilter(0, 1 << 20, min_keys=1)
    build = FilterBuild(store, target, chunk=256)
    assert build.step()
    # The writer goes on: new rows (which it adds to the filter itself), and expiry that moves
    # keys the build has not read yet from events to deleted_keys.
    after = uuid_keys(700)
    store.begin()
    store.insert(rows_of(after, first_seq=10_000))
    store.commit()
    target.add(after)
    store.begin()
    assert store.expire_oldest(None, 1500) == 1500
    store.commit()
    steps = 1
    while build.step():
        steps += 1
    assert steps >= (3000 - 500) // 256  # chunked, in both tables
    assert target.may_hold(before) == before
    assert target.may_hold(after) == after
    store.close()


def test_an_empty_database_builds_nothing(tmp_path: Path) -> None:
    store = EventStore(connect_writer(tmp_path / "events.db"))
    assert not store.holds_keys()
    build = FilterBuild(store, KeyFilter(0, 1 << 20, min_keys=1))
    assert build.step() is False
    store.close()


# ------------------------------------------------------------ in the dedup actor


class Collector(pykka.ThreadingActor):
    def __init__(self, inbox: queue.Queue[Any]) -> None:
        super().__init__()
        self._inbox = inbox

    def on_receive(self, message: Any) -> None:
        self._inbox.put(message)


def write_of(rows: list[Row]) -> WriteBatch:
    write = WriteBatch(rows=rows, events=len(rows))
    for topic, _, seq, _, ts_ns, *_ in rows:
        delta = write.topics.setdefault(topic, TopicDelta())
        delta.received += 1
        delta.last_seq = max(delta.last_seq, seq)
        delta.last_ts_ns = max(delta.last_ts_ns, ts_ns)
    return write


@pytest.fixture
def dedup_on(tmp_path: Path) -> Iterator[Any]:
    refs: list[pykka.ActorRef[Any]] = []
    context: zmq.Context[Any] = zmq.Context()

    def start(**options: Any) -> pykka.ActorRef[Any]:
        in_flight = InFlight(1_000_000)
        in_flight.add(1_000_000, 0)
        ref = DedupActor.start(
            tmp_path / "events.db",
            synchronous="NORMAL",
            commit_max_events=5000,
            commit_max_ms=50,
            in_flight=in_flight,
            live=LiveFigures(),
            zmq_context=context,
            **options,
        )
        refs.append(ref)
        return ref

    yield start
    for ref in refs:
        if ref.is_alive():
            ref.stop(timeout=TIMEOUT_S)
    context.destroy(linger=0)


def classify(dedup: pykka.ActorRef[Any], keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
    inbox: queue.Queue[Any] = queue.Queue()
    asker = Collector.start(inbox)
    try:
        dedup.tell(ClassifyRequest(keys, [], reply_to=asker, token=1))
        answer = inbox.get(timeout=TIMEOUT_S)
    finally:
        asker.stop()
    assert answer.error is None
    return set(answer.existing)


def test_the_writer_grows_its_filter_and_every_stored_key_stays_a_duplicate(
    dedup_on: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="actors.dedup")
    dedup = dedup_on(key_filter_min_keys=64, key_filter_bytes=1 << 20)
    stored: list[tuple[str, str]] = []
    for round_ in range(12):  # 12 x 100 keys through a filter with room for 64 at first
        keys = uuid_keys(100)
        dedup.tell(write_of(rows_of(keys, first_seq=1 + 100 * round_)))
        stored += keys
        assert classify(dedup, keys + uuid_keys(5)) == set(keys)
    assert dedup.ask(Sync(), timeout=TIMEOUT_S) is True
    grown = [record.getMessage() for record in caplog.records if "key filter ready" in record.getMessage()]
    assert len(grown) >= 2, grown  # 64 -> 200 -> ... room, each filled from the database
    assert classify(dedup, stored) == set(stored)

    # Restarted on that database: a filter is built from it, and every key is still found.
    dedup.stop(timeout=TIMEOUT_S)
    caplog.clear()
    dedup = dedup_on(key_filter_min_keys=64, key_filter_bytes=1 << 20)
    new = uuid_keys(50)
    assert classify(dedup, stored + new) == set(stored)

    def ready() -> bool:
        return any("key filter ready: 1200 keys" in record.getMessage() for record in caplog.records)

    for _ in range(100):
        if ready():
            break
        dedup.ask(Sync(), timeout=TIMEOUT_S)
    assert ready(), [record.getMessage() for record in caplog.records]
    assert classify(dedup, stored + new) == set(stored)


def test_no_filter_when_switched_off(dedup_on: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="actors.dedup")
    dedup = dedup_on(key_filter_bytes=0)
    keys = uuid_keys(300)
    dedup.tell(write_of(rows_of(keys)))
    assert dedup.ask(Sync(), timeout=TIMEOUT_S) is True
    assert classify(dedup, keys + uuid_keys(10)) == set(keys)
    assert not any("key filter" in record.getMessage() for record in caplog.records)


def test_keys_held_for_the_next_commit_go_into_a_filter_begun_meanwhile(
    dedup_on: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="actors.dedup")
    dedup = dedup_on(key_filter_min_keys=64, key_filter_bytes=1 << 20)
    held, crowding = uuid_keys(50), uuid_keys(50)
    # Frozen, the actor finds both writes queued: the second crowds the filter (room 64) while
    # the first is still held, uncommitted, so the database cannot give its keys to the build.
    dedup.tell(Freeze(0.3))
    dedup.tell(write_of(rows_of(held)))
    dedup.tell(write_of(rows_of(crowding, first_seq=100)))
    for _ in range(100):
        dedup.ask(Sync(), timeout=TIMEOUT_S)
        if any("key filter ready" in record.getMessage() for record in caplog.records):
            break
    else:
        pytest.fail("no larger filter was built")
    assert classify(dedup, held + crowding) == set(held + crowding)
