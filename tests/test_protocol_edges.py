"""Edges of the wire protocol: timestamps to the nanosecond, odd ISO-8601 forms, batch ids and ext types."""

from __future__ import annotations

import msgpack
import pytest
from harness import free_port

from actors.cli import main
from transport.codec import FrameError, batch_id_of, decode_ack_request, decode_frame
from transport.schema import InvalidEvent, parse_timestamp

SECOND = 1_761_127_200  # 2025-10-22T10:00:00Z


@pytest.mark.parametrize(
    ("nanoseconds", "text"),
    [
        (0, "2025-10-22T10:00:00Z"),
        (5, "2025-10-22T10:00:00.000000005Z"),
        (123_456_789, "2025-10-22T10:00:00.123456789Z"),
        (5_000, "2025-10-22T10:00:00.000005Z"),  # whole microseconds: six digits, as always stored
        (500_000_000, "2025-10-22T10:00:00.500000Z"),
    ],
)
def test_a_msgpack_timestamp_is_stored_as_its_exact_instant(nanoseconds: int, text: str) -> None:
    assert parse_timestamp(msgpack.Timestamp(SECOND, nanoseconds)) == (text, SECOND * 10**9 + nanoseconds)


def test_the_text_of_a_msgpack_timestamp_reads_back_as_the_same_instant() -> None:
    for ns in (-1, 1, 10**18 + 7, -(2**63), 2**63 - 1):
        text, _ = parse_timestamp(msgpack.Timestamp.from_unix_nano(ns))
        assert parse_timestamp(text)[1] == ns


@pytest.mark.parametrize(
    ("value", "ns"),
    [
        ("20251022T100000.1234569Z", SECOND * 10**9 + 123_456_900),  # the basic format keeps its 7th digit
        ("20251022T100000.123456789Z", SECOND * 10**9 + 123_456_789),
        ("2025-10-22T10:00:00z", SECOND * 10**9),  # RFC 3339 allows a lower-case z
        ("2025-10-22t10:00:00.5z", SECOND * 10**9 + 500_000_000),
    ],
)
def test_accepted_timestamp_forms(value: str, ns: int) -> None:
    assert parse_timestamp(value) == (value, ns)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("2025-10-22T10:00:00.Z", "decimal sign with no digits"),
        ("2025-10-22T10:00:00,+01:00", "decimal sign with no digits"),
        ("2025-02-29T10:00:00Z", "no such date"),
        ("2025-10-22T10:00:00+24:00", "offset out of range"),
        ("2025-10-22T10:00:00-24:30", "offset out of range"),
        ("2016-12-31T23:59:60Z", "leap second"),
        ("20161231T235960Z", "leap second"),
        ("2025-10-22T10:00:00 UTC", "not ISO-8601"),
    ],
)
def test_refused_timestamps_say_what_is_wrong(value: str, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        parse_timestamp(value)


GOOD = {"topic": "t", "event_id": "1", "timestamp": "2025-10-22T10:00:00Z", "source": "s"}


def _with_payload(payload: bytes, event_id: str = "1") -> bytes:
    """An encoded event map whose payload is the raw msgpack ``payload``, built by hand."""
    head = msgpack.packb({**GOOD, "event_id": event_id})
    return bytes([head[0] + 1]) + head[1:] + msgpack.packb("payload") + payload


def _ack_frame(batch_id: object, events: list[bytes]) -> bytes:
    """An acknowledged request with ``batch`` first, its events given as raw msgpack."""
    return (
        b"\x82"
        + msgpack.packb({"batch": batch_id})[1:]
        + msgpack.packb("events")
        + bytes([0x90 | len(events)])
        + b"".join(events)
    )


@pytest.mark.parametrize(
    ("events", "reason"),
    [
        ([_with_payload(b"\x81\xa1d" + b"\x91" * 1100 + b"\xc0")], "more than 1024 levels deep"),
        ([_with_payload(b"\x81\xa1d\xc1")], "0xc1 is never used"),
    ],
)
def test_an_unreadable_request_is_refused_saying_why_and_its_batch_id_is_still_read(
    events: list[bytes], reason: str
) -> None:
    frame = _ack_frame("b-1", events)
    with pytest.raises(FrameError, match=reason):
        decode_ack_request(frame)
    assert batch_id_of(frame) == "b-1"
    assert batch_id_of(_ack_frame(7, [msgpack.packb(GOOD)]) + b"\x00") == 7  # trailing bytes


def test_a_batch_id_over_the_limit_is_refused_naming_the_limit() -> None:
    with pytest.raises(FrameError, match="'batch' id is 5003 bytes encoded, over the limit of 4096"):
        decode_ack_request(msgpack.packb({"batch": "x" * 5000, "events": [GOOD]}))
    assert decode_ack_request(msgpack.packb({"batch": "x" * 4093, "events": [GOOD]}))[0] == "x" * 4093


def test_an_event_holding_a_reserved_ext_type_is_refused_alone() -> None:
    reserved = _with_payload(b"\x81\xa1k\xd4\x80\x00")  # fixext 1 of type -128
    app = _with_payload(b"\x81\xa1k\xd4\x05\x00", "2")  # fixext 1 of type 5
    batch = decode_frame(b"\x92" + reserved + app)
    [(index, reason)] = batch.rejected
    assert index == 0 and "ext value of type -128" in reason
    [stored] = batch.events
    assert stored.event_id == "2" and stored.payload == b"\x81\xa1k\xd4\x05\x00"
    _, acked = decode_ack_request(_ack_frame(1, [app, reserved]))
    assert [e.event_id for e in acked.events] == ["2"] and acked.rejected[0][0] == 1


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--after", "99999999999999999999", "argument --after: must be from 0 to 9223372036854775807"),
        ("--after", "9223372036854775808", "argument --after: must be from 0 to 9223372036854775807"),
        ("--page", "99999999999999999999", "argument --page: must be from 1 to 9223372036854775807"),
        ("--page", "0", "argument --page: must be from 1 to 9223372036854775807, not 0"),
        # ZeroMQ's poll takes milliseconds as a C int: a longer wait ended in an OverflowError traceback.
        ("--timeout", "3000000", "argument --timeout: must be a number of seconds above 0 and at most 2147483"),
        ("--timeout", "1e308", "argument --timeout: must be a number of seconds above 0 and at most 2147483"),
    ],
)
def test_events_flags_out_of_range_are_usage_errors(
    flag: str, value: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Refused before any request: a port nothing listens on, and a short timeout should it get that far.
    with pytest.raises(SystemExit) as leaving:
        main(["events", "topic", "--endpoint", f"tcp://127.0.0.1:{free_port()}", "--timeout", "1", flag, value])
    assert leaving.value.code == 2
    assert words in capsys.readouterr().err
