"""Edges of the wire protocol: timestamps to the nanosecond, odd ISO-8601 forms, batch ids and ext types."""

from __future__ import annotations

import msgpack
import pytest

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
