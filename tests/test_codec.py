"""Frame decoding: whole-frame refusals and per-event refusals inside a batch."""

from __future__ import annotations

import re
import time
from typing import Any

import msgpack
import pytest

from transport.codec import FrameError, Limits, batch_id_of, decode_ack_request, decode_frame
from transport.schema import msgpack_problem, unpack_from_peer

GOOD = {"topic": "t", "event_id": "1", "timestamp": "2025-10-22T10:00:00Z", "source": "s"}


def test_single_event_frame() -> None:
    batch = decode_frame(msgpack.packb(GOOD))
    assert [e.event_id for e in batch.events] == ["1"] and batch.rejected == []


def test_batch_keeps_valid_events_and_names_each_invalid_one_by_index() -> None:
    frame = msgpack.packb([GOOD, 5, {**GOOD, "event_id": "2"}, {**GOOD, "topic": ""}])
    batch = decode_frame(frame)
    assert [e.event_id for e in batch.events] == ["1", "2"]
    assert [index for index, _ in batch.rejected] == [1, 3]
    assert "must be a map" in batch.rejected[0][1]


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\xc1", "not valid msgpack"),
        (b"", "not valid msgpack"),
        (msgpack.packb([]), "empty batch"),
        (msgpack.packb(42), "not int"),
        (msgpack.packb("text"), "not str"),
        (msgpack.packb(GOOD) + b"\x01", "more than one msgpack object"),
        (b"\xa3\xff\xfe\xfd", "not valid msgpack: a str holds bytes that are not UTF-8; send such data as bin"),
        (msgpack.packb([GOOD] * 11), "over the limit of 10"),
    ],
)
def test_refused_frames(frame: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        decode_frame(frame, Limits(max_batch_events=10))


def test_ack_request() -> None:
    batch_id, batch = decode_ack_request(msgpack.packb({"batch": 7, "events": [GOOD, "x"]}))
    assert batch_id == 7 and len(batch.events) == 1 and batch.rejected[0][0] == 1


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        ([GOOD], "must be a map"),
        ({"events": [GOOD]}, "'batch' id"),
        ({"batch": True, "events": [GOOD]}, "'batch' id"),
        ({"batch": 1, "events": GOOD}, "'events' must be an array"),
        ({"batch": 1, "events": []}, "empty batch"),
    ],
)
def test_refused_ack_requests(request_: object, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        decode_ack_request(msgpack.packb(request_))


def test_a_plain_frame_keeps_each_payload_as_the_bytes_that_arrived() -> None:
    # A float32 is re-encoded as a float64 by msgpack, so equal bytes show the fast decoder ran.
    payload = b"\x81\xa1x\xca\x3f\xc0\x00\x00"  # {"x": 1.5} with a float32
    head = msgpack.packb({"topic": "t", "event_id": "1", "timestamp": "2025-10-22T10:00:00Z", "source": "s"})
    frame = b"\x85" + head[1:] + msgpack.packb("payload") + payload
    [event] = decode_frame(frame).events
    assert event.payload == payload
    # With an unknown field the exact decoder takes it: the same event, the same payload bytes.
    extra = b"\x86" + head[1:] + msgpack.packb("payload") + payload + msgpack.packb("extra") + b"\x01"
    [again] = decode_frame(extra).events
    assert again == event
    # Re-encoded from the map Python built, a payload lost keys Python takes as equal (1 and
    # true), only when something else in its frame sent it to the exact decoder.
    keys = b"\x82\x01\xa3int\xc3\xa4bool"  # {1: "int", true: "bool"}
    plain = b"\x85" + head[1:] + msgpack.packb("payload") + keys
    stamped = msgpack.packb({**GOOD, "event_id": "ts", "timestamp": msgpack.Timestamp(1, 0)})
    for frame in (b"\x91" + plain, b"\x92" + plain + stamped):
        assert decode_frame(frame).events[0].payload == keys


def test_a_nil_payload_is_taken_as_none_and_stored_as_an_empty_map() -> None:
    frame = msgpack.packb([{**GOOD, "payload": None}, {**GOOD, "event_id": "2", "payload": []}])
    batch = decode_frame(frame)
    assert [(e.event_id, e.payload) for e in batch.events] == [("1", msgpack.packb({}))]
    assert batch.rejected == [(1, "payload must be a map, not array")]
    batch_id, acked = decode_ack_request(msgpack.packb({"batch": 1, "events": [{**GOOD, "payload": None}]}))
    assert batch_id == 1 and [e.payload for e in acked.events] == [msgpack.packb({})]


@pytest.mark.parametrize("key", [[1, 2], {"a": 1}])
def test_an_event_whose_payload_has_an_array_or_map_key_is_refused_alone(key: object) -> None:
    bad_payload = b"\x81" + msgpack.packb(key) + b"\x01"
    head = msgpack.packb({**GOOD, "event_id": "bad"})
    bad = b"\x85" + head[1:] + msgpack.packb("payload") + bad_payload
    frame = b"\x93" + msgpack.packb(GOOD) + bad + msgpack.packb({**GOOD, "event_id": "2"})
    batch = decode_frame(frame)
    assert [e.event_id for e in batch.events] == ["1", "2"]
    [(index, reason)] = batch.rejected
    assert index == 1 and "key is an array or a map" in reason
    batch_id, acked = decode_ack_request(b"\x82" + msgpack.packb("batch") + b"\x07" + msgpack.packb("events") + frame)
    assert batch_id == 7 and [e.event_id for e in acked.events] == ["1", "2"] and acked.rejected[0][0] == 1


@pytest.mark.parametrize(
    ("ext", "said"),
    [
        (b"\xc7\x05\xff" + bytes(5), "invalid timestamp data (length 5)"),  # 4, 8 or 12 bytes only
        (b"\xd4\xff\x00", "invalid timestamp data (length 1)"),
        (b"\xd7\xff" + ((10**9) << 34).to_bytes(8, "big"), "999999999"),  # nanoseconds past a second
    ],
)
def test_an_event_holding_a_timestamp_msgpack_cannot_read_is_refused_alone(ext: bytes, said: str) -> None:
    """Such a Timestamp threw the whole frame away: fire-and-forget, its good neighbours were lost
    without a word."""
    marker = msgpack.packb("MARKER")
    frame = msgpack.packb([GOOD, {**GOOD, "event_id": "bad", "timestamp": "MARKER"}, {**GOOD, "event_id": "2"}])
    frame = frame.replace(marker, ext)
    batch = decode_frame(frame)
    assert [e.event_id for e in batch.events] == ["1", "2"]
    [(index, reason)] = batch.rejected
    assert index == 1 and said in reason, reason
    batch_id, acked = decode_ack_request(b"\x82" + msgpack.packb("batch") + b"\x07" + msgpack.packb("events") + frame)
    assert batch_id == 7 and [e.event_id for e in acked.events] == ["1", "2"] and acked.rejected[0][0] == 1


def test_an_acknowledged_request_with_thousands_of_keys_is_refused_unread_naming_its_batch() -> None:
    junk = b"".join(msgpack.packb(n) + b"\xc0" for n in range(100_000))
    body = msgpack.packb("batch") + msgpack.packb(7) + msgpack.packb("events") + msgpack.packb([GOOD])
    frame = b"\xdf" + (100_002).to_bytes(4, "big") + body + junk
    with pytest.raises(FrameError, match="^an acknowledged batch map has 100002 keys, over the limit of 64"):
        decode_ack_request(frame)
    assert batch_id_of(frame) == 7
    # A few unknown keys are still taken (fields a later version may add).
    few = b"\x84" + body + msgpack.packb("later") + b"\x01" + msgpack.packb("other") + b"\xc0"
    assert decode_ack_request(few)[0] == 7


# CPython's tuple hash (xxHash's round, as in Objects/tupleobject.c), inverted: with int hashes not
# randomized, any number of (seconds, nanoseconds) pairs, so msgpack Timestamps, share one hash.
_M = (1 << 64) - 1
_P1, _P2, _P5 = 11400714785074694791, 14029467366897019727, 2870177450012600261
_PAIR_TAIL = 2 ^ (_P5 ^ 3527539)


def _rotate_right(x: int) -> int:
    return ((x >> 31) | (x << 33)) & _M


def colliding_timestamps(count: int, target: int = 0x1234567890ABCDEF) -> list[msgpack.Timestamp]:
    """``count`` distinct Timestamps whose Python hashes are all ``target``."""
    p1_inverse, p2_inverse = pow(_P1, -1, 1 << 64), pow(_P2, -1, 1 << 64)
    second_lane = (target - _PAIR_TAIL) & _M
    found = []
    nanoseconds = 0
    while len(found) < count:
        first_lane = (_rotate_right(second_lane * p1_inverse & _M) - nanoseconds * _P2) & _M
        seconds = ((_rotate_right(first_lane * p1_inverse & _M) - _P5) * p2_inverse) & _M
        if seconds < (1 << 61) - 1:  # an int below the modulus hashes to itself
            found.append(msgpack.Timestamp(seconds, nanoseconds))
        nanoseconds += 1
    return found


def test_a_payload_keyed_by_timestamps_is_refused_alone_without_building_its_map() -> None:
    keys = colliding_timestamps(20_000)
    assert len({hash(key) for key in keys[:50]}) == 1  # the generator works: one hash for all
    payload = b"\xde" + len(keys).to_bytes(2, "big") + b"".join(msgpack.packb(key) + b"\xc0" for key in keys)
    head = msgpack.packb({**GOOD, "event_id": "bad"})
    bad = b"\x85" + head[1:] + msgpack.packb("payload") + payload
    frame = b"\x93" + msgpack.packb(GOOD) + bad + msgpack.packb({**GOOD, "event_id": "2"})
    started = time.monotonic()
    batch = decode_frame(frame)
    took = time.monotonic() - started
    assert [e.event_id for e in batch.events] == ["1", "2"]
    [(index, reason)] = batch.rejected
    assert index == 1 and "a map key is a msgpack Timestamp" in reason
    # Building the map took ~14 s on this machine: its keys are refused before it is built.
    assert took < 2, f"decoding took {took:.1f} s"
    # Not only colliding ones: no Timestamp is a key, in the payload or in the event map itself.
    one = msgpack.packb({**GOOD, "payload": {msgpack.Timestamp(1, 0): 1}})
    assert "Timestamp" in decode_frame(one).rejected[0][1]
    outer = msgpack.packb({**GOOD, msgpack.Timestamp(1, 0): 1})
    assert "Timestamp" in decode_frame(outer).rejected[0][1]


def test_payloads_holding_the_byte_0xff_otherwise_are_taken() -> None:
    payload = {"minus_one": -1, "byte": 255, "when": msgpack.Timestamp(1, 5), "raw": b"\xff\xff", -1: "key"}
    batch = decode_frame(msgpack.packb({**GOOD, "payload": payload}))
    assert not batch.rejected and msgpack.unpackb(batch.events[0].payload, strict_map_key=False) == payload


@pytest.mark.parametrize(
    ("frame", "said"),
    [
        (
            msgpack.packb({"batch": 1, "events": [GOOD]}) + b"\x01",
            'frame holds more than one msgpack object; an acknowledged batch is one map {"batch": N, "events": [...]}',
        ),
        (msgpack.packb(5) + b"\x01", "a map with 'batch' and 'events', not int"),
    ],
    ids=["map", "scalar"],
)
def test_trailing_bytes_in_an_acknowledged_batch_are_refused_saying_what_one_is(frame: bytes, said: str) -> None:
    # Not the fire-and-forget wording ("send one event map or one array"): the ROUTER wants one map.
    with pytest.raises(FrameError) as caught:
        decode_ack_request(frame)
    assert said in str(caught.value) and "one event map or one array" not in str(caught.value)


def _ack_map(*pairs: tuple[Any, Any]) -> bytes:
    """An acknowledged batch map written pair by pair, as a msgpack writer in any language may."""
    return bytes([0x80 + len(pairs)]) + b"".join(msgpack.packb(key) + msgpack.packb(value) for key, value in pairs)


@pytest.mark.parametrize(
    ("frame", "said"),
    [
        (_ack_map(("batch", 1), ("events", [GOOD]), ("events", [])), "gives 'events' twice; give it once"),
        (_ack_map(("batch", 1), ("batch", 2), ("events", [GOOD])), "gives 'batch' twice; give it once"),
        (_ack_map(("batch", 1), (b"events", [GOOD])), "needs 'events' (a str key), an array of event maps"),
    ],
    ids=["events-twice", "batch-twice", "bin-key"],
)
def test_an_acknowledged_batch_with_a_key_twice_or_missing_is_refused_naming_it(frame: bytes, said: str) -> None:
    with pytest.raises(FrameError, match=re.escape(said)):
        decode_ack_request(frame)


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (msgpack.packb({"op": "stats"})[:-1], "it ends inside a msgpack value (cut short?)"),
        (b"\xdd\xff\xff\xff\xff", "a length it declares runs past its end (cut short?)"),
        (b"\x81\x91\x01\x01", "a map is keyed by an array or a map, which no request or event takes"),
        (b"\x81\x80\x01", "a map is keyed by an array or a map, which no request or event takes"),
        (b"\x81\xa2op\xd5\xff\x00\x00", "a msgpack Timestamp (ext -1) must hold 4, 8 or 12 bytes"),
        (msgpack.packb({"op": "stats"}) + b"\x01", "bytes follow the msgpack object; send exactly one object"),
        (b"\xa2\xed\xa0", "a str holds bytes that are not UTF-8; send such data as bin"),
    ],
    ids=["cut", "long-header", "array-key", "map-key", "timestamp", "trailing", "utf8"],
)
def test_bytes_that_are_not_one_msgpack_object_are_named_in_msgpack_terms(data: bytes, said: str) -> None:
    # What the query and subscribe sockets answer: a client in any language reads it.
    with pytest.raises(Exception) as caught:
        unpack_from_peer(data)
    assert msgpack_problem(caught.value) == said


def test_a_frame_cut_short_is_refused_in_msgpack_terms() -> None:
    with pytest.raises(FrameError, match=re.escape("frame is not valid msgpack: it ends inside a msgpack value")):
        decode_frame(msgpack.packb([GOOD, GOOD])[:-3])
    five_said_one_sent = _ack_map(("batch", 1)) + msgpack.packb("events") + b"\xdd\0\0\0\x05" + msgpack.packb(GOOD)
    with pytest.raises(FrameError, match=re.escape("frame is not valid msgpack: it ends inside a msgpack value")):
        decode_ack_request(b"\x82" + five_said_one_sent[1:])
