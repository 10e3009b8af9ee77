"""The event schema, rule by rule: accepted and rejected cases for every field."""

from __future__ import annotations

import datetime as dt
import unicodedata
from typing import Any

import msgpack
import pytest

from transport.schema import Event, InvalidEvent, parse_timestamp, validate_event


def event(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "topic": "orders",
        "event_id": "e-1",
        "timestamp": "2025-10-22T10:00:00Z",
        "source": "shop",
        "payload": {"amount": 3},
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


def test_valid_event_is_returned_with_packed_payload_and_instant() -> None:
    result = validate_event(event())
    assert isinstance(result, Event)
    assert result.key == ("orders", "e-1")
    assert msgpack.unpackb(result.payload) == {"amount": 3}
    assert result.ts_ns == int(dt.datetime(2025, 10, 22, 10, tzinfo=dt.UTC).timestamp()) * 10**9


@pytest.mark.parametrize(
    "topic",
    ["a", "x" * 255, "orders.eu-west/1", "ünïcødé", "with:colon"],
)
def test_topic_accepted(topic: str) -> None:
    assert validate_event(event(topic=topic)).topic == topic


# An emoji of a Unicode version after this Python's (U+1FAE8 was one under 3.11, not under 3.12).
NEXT_EMOJI = next(chr(code) for code in range(0x1FA70, 0x1FB00) if unicodedata.category(chr(code)) == "Cn")


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("", "1-255 characters"),
        ("x" * 256, "1-255 characters"),
        ("has space", "whitespace"),
        ("tab\there", "whitespace"),
        ("new\nline", "whitespace"),
        ("bell\x07", "control"),
        ("nbsp\u00a0x", "whitespace"),
        ("bom\ufeff", r"format characters \(U\+FEFF at character 4\)"),
        ("shake" + NEXT_EMOJI, "unassigned in the daemon's Unicode database"),
        ("p\ue000", "private-use"),
        (5, "must be a string"),
        (None, "must be a string"),
        (b"bytes", "must be a string"),
    ],
)
def test_topic_rejected(topic: Any, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        validate_event(event(topic=topic))


@pytest.mark.parametrize("event_id", ["1", "x" * 255, "id with spaces"])
def test_event_id_accepted(event_id: str) -> None:
    assert validate_event(event(event_id=event_id)).event_id == event_id


@pytest.mark.parametrize(("event_id", "reason"), [("", "1-255"), ("x" * 256, "1-255"), (7, "string")])
def test_event_id_rejected(event_id: Any, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        validate_event(event(event_id=event_id))


@pytest.mark.parametrize(
    "timestamp",
    [
        "2025-10-22T10:00:00Z",
        "2025-10-22T10:00:00.123Z",
        "2025-10-22T10:00:00.123456+07:00",
        "2025-10-22T10:00:00-05:30",
        msgpack.Timestamp(1761127200, 5000),
    ],
)
def test_timestamp_accepted(timestamp: Any) -> None:
    validate_event(event(timestamp=timestamp))


@pytest.mark.parametrize(
    ("timestamp", "reason"),
    [
        ("2025-10-22T10:00:00", "no timezone"),
        ("2025-10-22", "no timezone"),
        ("yesterday", "not ISO-8601"),
        ("", "not ISO-8601"),
        (1761127200, "ISO-8601 string with a timezone or a msgpack Timestamp"),
        (None, "ISO-8601"),
        ("2025-10-22T10:00:00Z" + " " * 60, "at most 64"),
        # A digit of another script past the sixth of the fraction was taken, as 0 or as itself.
        ("2025-10-22T10:00:00.123456\u0667Z", "not ASCII"),
        ("2025-10-22T10:00:00.1234567\u0668Z", "not ASCII"),
        ("\uff12\uff10\uff12\uff15-10-22T10:00:00Z", "not ASCII"),
    ],
)
def test_timestamp_rejected(timestamp: Any, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        validate_event(event(timestamp=timestamp))


def test_timestamps_compare_as_instants() -> None:
    plain = parse_timestamp("2025-10-22T10:00:01Z")[1]
    finer = parse_timestamp("2025-10-22T10:00:01.001000Z")[1]
    offset = parse_timestamp("2025-10-22T16:00:00+07:00")[1]  # 09:00 UTC
    assert offset < plain < finer


@pytest.mark.parametrize(
    ("timestamp", "ns"),
    [
        # Go's RFC3339Nano and Java's Instant.toString() send up to nine digits: all of them count.
        ("2025-10-22T10:00:00.123456789Z", 1761127200_123456789),
        ("2025-10-22T10:00:00.1234567Z", 1761127200_123456700),
        ("2025-10-22T10:00:00,12345678+00:00", 1761127200_123456780),
        ("2025-10-22T15:30:00.123456789+05:30", 1761127200_123456789),
        ("2025-10-22T10:00:00.123456789123Z", 1761127200_123456789),  # beyond nanoseconds: cut
        ("1969-12-31T23:59:59.9999995Z", -500),
        ("2025-10-22T10:00:00.123456Z", 1761127200_123456000),
    ],
)
def test_iso_timestamps_keep_their_nanoseconds(timestamp: str, ns: int) -> None:
    assert parse_timestamp(timestamp) == (timestamp, ns)


def test_msgpack_timestamp_is_kept_as_iso_text() -> None:
    text, ns = parse_timestamp(msgpack.Timestamp(1761127200, 123456000))
    assert text == "2025-10-22T10:00:00.123456Z"
    assert ns == 1761127200_123456000


@pytest.mark.parametrize(("source", "ok"), [("", True), ("s" * 255, True), ("s" * 256, False), (3, False)])
def test_source(source: Any, ok: bool) -> None:
    if ok:
        assert validate_event(event(source=source)).source == source
    else:
        with pytest.raises(InvalidEvent, match="source"):
            validate_event(event(source=source))


def test_payload_defaults_to_empty_map() -> None:
    assert msgpack.unpackb(validate_event(event(payload=_DROP)).payload) == {}


def test_payload_holds_any_msgpack_values() -> None:
    payload = {"nested": {"list": [1, 2.5, None, True, b"\x00bin"]}, 7: "int key"}
    result = validate_event(event(payload=payload))
    assert msgpack.unpackb(result.payload, strict_map_key=False) == payload


@pytest.mark.parametrize("payload", [[1, 2], "text", 3])
def test_payload_must_be_a_map(payload: Any) -> None:
    with pytest.raises(InvalidEvent, match="payload must be a map"):
        validate_event(event(payload=payload))


def test_payload_size_limit() -> None:
    with pytest.raises(InvalidEvent, match="over the limit of 100"):
        validate_event(event(payload={"pad": "x" * 200}), max_payload_bytes=100)


@pytest.mark.parametrize("missing", ["topic", "event_id", "timestamp", "source"])
def test_missing_field(missing: str) -> None:
    with pytest.raises(InvalidEvent, match=f"missing field '{missing}'"):
        validate_event(event(**{missing: _DROP}))


@pytest.mark.parametrize("obj", [[1], "event", 3, None])
def test_event_must_be_a_map(obj: Any) -> None:
    with pytest.raises(InvalidEvent, match="must be a map"):
        validate_event(obj)


def test_unknown_fields_are_ignored() -> None:
    result = validate_event(event(priority="high", late=True))
    assert result == validate_event(event())
