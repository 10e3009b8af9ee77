"""Frame decoding: whole-frame refusals and per-event refusals inside a batch."""

from __future__ import annotations

import msgpack
import pytest

from transport.codec import FrameError, Limits, batch_id_of, decode_ack_request, decode_frame

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
        (b"\xa3\xff\xfe\xfd", "not valid msgpack"),  # a str that is not UTF-8
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
    # With an unknown field the exact decoder takes it: the same event, the payload re-encoded.
    extra = b"\x86" + head[1:] + msgpack.packb("payload") + payload + msgpack.packb("extra") + b"\x01"
    [again] = decode_frame(extra).events
    assert again[:5] == event[:5]
    assert again.payload == msgpack.packb({"x": 1.5}) != payload


def test_a_nil_payload_is_taken_as_none_and_stored_as_an_empty_map() -> None:
    frame = msgpack.packb([{**GOOD, "payload": None}, {**GOOD, "event_id": "2", "payload": []}])
    batch = decode_frame(frame)
    assert [(e.event_id, e.payload) for e in batch.events] == [("1", msgpack.packb({}))]
    assert batch.rejected == [(1, "payload must be a map, not list")]
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


def test_an_acknowledged_request_with_thousands_of_keys_is_refused_unread_naming_its_batch() -> None:
    junk = b"".join(msgpack.packb(n) + b"\xc0" for n in range(100_000))
    body = msgpack.packb("batch") + msgpack.packb(7) + msgpack.packb("events") + msgpack.packb([GOOD])
    frame = b"\xdf" + (100_002).to_bytes(4, "big") + body + junk
    with pytest.raises(FrameError, match="100002 keys, over the limit of 64"):
        decode_ack_request(frame)
    assert batch_id_of(frame) == 7
    # A few unknown keys are still taken (fields a later version may add).
    few = b"\x84" + body + msgpack.packb("later") + b"\x01" + msgpack.packb("other") + b"\xc0"
    assert decode_ack_request(few)[0] == 7
