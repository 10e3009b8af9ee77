"""The single writer's statements on a real SQLite file: every size of write, lookup and counter update."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from actors.store import (
    CONTENT_BACK_BYTES,
    NO_TIMESTAMP,
    EventStore,
    Row,
    StorageError,
    TopicDelta,
    TopicState,
    connect_writer,
)

pytestmark = pytest.mark.timeout(120)


def rows_for(topic: str, count: int, first_seq: int = 1) -> list[Row]:
    return [
        (topic, f"{topic}-e{i}", first_seq + i, "2025-10-22T10:00:00Z", i, "test", bytearray(b"\x80"), 0.0, 0)
        for i in range(count)
    ]


# Sizes around every boundary of the statements a write is cut into (multiples of 256 and 16, a
# 2 048-row cap).
@pytest.mark.parametrize("count", [1, 15, 16, 17, 255, 256, 257, 1523, 2047, 2048, 2049, 5000])
def test_a_write_of_any_size_stores_every_row_once(tmp_path: Path, count: int) -> None:
    store = EventStore(connect_writer(tmp_path / "events.db"))
    rows = rows_for("t", count)
    store.begin()
    store.insert(rows)
    store.commit()
    stored = store._conn.execute("SELECT topic, event_id, seq FROM events ORDER BY seq").fetchall()
    assert stored == [(r[0], r[1], r[2]) for r in rows]
    store.close()


def test_lookups_find_exactly_the_stored_keys_across_chunks(tmp_path: Path) -> None:
    store = EventStore(connect_writer(tmp_path / "events.db"))
    stored = rows_for("a", 3000) + rows_for("b", 3000)
    store.begin()
    store.insert(stored)
    store.commit()
    stored_keys = {(r[0], r[1]) for r in stored}
    # 12 000 keys: several 4 096-key statements, stored and new ones interleaved.
    asked: list[tuple[str, str]] = []
    for i, key in enumerate(sorted(stored_keys)):
        asked.append(key)
        if i % 2:
            asked.append(("a", f"new-{i}"))
    asked += [("c", f"c-{i}") for i in range(3000)]
    assert store.existing_keys(asked) == stored_keys
    assert store.existing_keys([("zz", "nothing")]) == set()
    store.close()


def test_lookups_find_keys_that_json_cannot_carry(tmp_path: Path) -> None:
    """Lookups send their keys as one JSON text, and SQLite's JSON functions cut a string at
    \\u0000: keys with a NUL in their event id are bound instead, and found all the same."""
    store = EventStore(connect_writer(tmp_path / "events.db"))
    odd = ["a\x00b", "\x00", "tab\there", 'quote"s', "back\\slash", "uni-é-€-𝄞", "\x01\x1f", "\u2028", ""]
    stored = [
        ("t", event_id, seq, "2025-10-22T10:00:00Z", seq, "test", bytearray(b"\x80"), 0.0, 0)
        for seq, event_id in enumerate(odd, 1)
    ]
    store.begin()
    store.insert(stored)
    store.commit()
    asked = [("t", event_id) for event_id in odd] + [("t", "a"), ("t", "a\x00c"), ("t", "b")]
    assert store.existing_keys(asked) == {("t", event_id) for event_id in odd}
    without_nul = [key for key in asked if "\x00" not in key[1]]
    assert store.existing_keys(without_nul) == {key for key in without_nul if key[1] in odd}
    store.close()


def test_lookups_bring_back_the_content_of_what_they_find(tmp_path: Path) -> None:
    """A key found in ``events`` comes back with its stored (timestamp, source, payload hex),
    strings with a NUL or quotes intact, the hex None past CONTENT_BACK_BYTES; one found only as
    a deleted key's record comes back with nothing in it; keys bound instead of sent as JSON
    come back without content."""
    store = EventStore(connect_writer(tmp_path / "events.db"))
    big = b"\xab" * (CONTENT_BACK_BYTES + 1)
    rows: list[Row] = [
        ("t", "small", 1, "2025-10-22T10:00:00Z", 1, "src", bytearray(b"\x81\xa1n\x01"), 0.0, 0),
        ("t", "odd", 2, "2025-10-22T10:00:00.5Z", 2, 'a\x00"b\\é', bytearray(b""), 0.0, 0),
        ("t", "edge", 3, "2025-10-22T10:00:01Z", 3, "src", bytearray(big[:-1]), 0.0, 0),
        ("t", "big", 4, "2025-10-22T10:00:02Z", 4, "src", bytearray(big), 0.0, 0),
    ]
    store.begin()
    store.insert(rows)
    store.commit()
    asked = [("t", "small"), ("t", "odd"), ("t", "edge"), ("t", "big"), ("t", "absent")]
    existing, contents = store.lookup(asked)
    assert existing == set(asked[:4])
    assert contents == {
        ("t", "small"): ("2025-10-22T10:00:00Z", "src", "81a16e01"),
        ("t", "odd"): ("2025-10-22T10:00:00.5Z", 'a\x00"b\\é', ""),
        ("t", "edge"): ("2025-10-22T10:00:01Z", "src", big[:-1].hex()),
        ("t", "big"): ("2025-10-22T10:00:02Z", "src", None),
    }
    store.begin()
    assert store.expire_topic_oldest("t", 1) == 1  # "small" goes; its key's record stays
    store.commit()
    existing, contents = store.lookup(asked)
    assert existing == set(asked[:4])
    assert contents[("t", "small")] == (None, None, None)
    assert contents[("t", "odd")] == ("2025-10-22T10:00:00.5Z", 'a\x00"b\\é', "")
    assert store.lookup([("t", "nul\x00"), ("t", "odd")]) == ({("t", "odd")}, {})
    store.close()


def test_topic_states_and_counters_round_trip(tmp_path: Path) -> None:
    store = EventStore(connect_writer(tmp_path / "events.db"))
    topics = {
        f"topic-{i}": TopicDelta(last_seq=i + 1, last_ts_ns=10**18 + i, received=i + 2, duplicate_dropped=1)
        for i in range(5000)
    }
    store.begin()
    store.add_counts(topics, {"received": 7, "unique_processed": 5, "duplicate_dropped": 2})
    store.commit()
    asked = [*topics, "never-seen"]
    states = store.topic_states(asked)
    assert states["never-seen"] == TopicState(0, NO_TIMESTAMP)
    assert all(states[t] == TopicState(d.last_seq, d.last_ts_ns) for t, d in topics.items())
    counters = store.counters()
    assert (counters["received"], counters["unique_processed"], counters["duplicate_dropped"]) == (7, 5, 2)
    assert counters["topic_count"] == 5000
    store.close()


def test_the_writer_takes_its_page_cache_size_in_mib(tmp_path: Path) -> None:
    conn = connect_writer(tmp_path / "events.db", cache_mb=8)
    try:
        assert conn.execute("PRAGMA cache_size").fetchone() == (-8192,)  # negative: KiB
    finally:
        conn.close()


def test_an_expiry_chunk_deletes_at_most_its_bytes_of_payload_and_one_event_at_least(tmp_path: Path) -> None:
    """Each deleted event is fingerprinted (its payload decoded) with the writer held: a chunk
    asked for 500 events of 100 kB takes only what fits in EXPIRE_CHUNK_BYTES (256 KiB)."""
    import msgpack

    from actors.store import EXPIRE_CHUNK_BYTES

    payload = bytearray(msgpack.packb({"blob": b"x" * 100_000}))
    store = EventStore(connect_writer(tmp_path / "events.db"))
    rows = [(row[0], row[1], row[2], row[3], row[4], row[5], payload, row[7], row[8]) for row in rows_for("t", 8)]
    store.begin()
    store.insert(rows)
    store.commit()
    fit = EXPIRE_CHUNK_BYTES // len(payload)
    for expire, args in ((store.expire_oldest, (None, 500)), (store.expire_topic_oldest, ("t", 500))):
        store.begin()
        assert expire(*args) == fit
        store.commit()
    seqs = [seq for (seq,) in store._conn.execute("SELECT seq FROM events WHERE topic = 't' ORDER BY seq")]
    assert seqs == list(range(2 * fit + 1, 9))  # the oldest went, in order
    big = bytearray(msgpack.packb({"blob": b"y" * (EXPIRE_CHUNK_BYTES + 1)}))
    store.begin()
    store.insert([("u", "big", 1, "2025-10-22T10:00:00Z", 0, "test", big, 0.0, 0)])
    store.commit()
    store.begin()
    assert store.expire_topic_oldest("u", 10) == 1  # one event at least, however large
    store.commit()
    store.close()


def test_every_folder_made_for_the_database_is_owner_only(tmp_path: Path) -> None:
    # Not only the innermost: with umask 022 the folders made on the way were left 0755.
    old = os.umask(0o022)
    try:
        conn = connect_writer(tmp_path / "nest" / "p" / "q" / "events.db")
    finally:
        os.umask(old)
    conn.close()
    for folder in ("nest", "nest/p", "nest/p/q"):
        assert (tmp_path / folder).stat().st_mode & 0o777 == 0o700, folder


@pytest.mark.parametrize("damage", ["random", "header", "schema page"])
def test_a_file_that_is_no_database_or_is_damaged_is_refused_with_the_remedy(tmp_path: Path, damage: str) -> None:
    # As a failed quick_check is: 'file is not a database' and 'database disk image is malformed'
    # said nothing of what to do.
    path = tmp_path / "events.db"
    if damage == "random":
        path.write_bytes(random.Random(1).randbytes(100_000))
    else:
        connect_writer(path).close()
        data = bytearray(path.read_bytes())
        start = 16 if damage == "header" else 100  # the header's page size on; the schema's page
        data[start : start + 50] = random.Random(2).randbytes(50)
        path.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="(file is not a database|database disk image is malformed)") as caught:
        connect_writer(path).close()
    assert str(caught.value).endswith("; restore it from a backup or move it away to start empty")
