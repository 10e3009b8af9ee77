"""Issue 20, item 12: only the seconds' own fraction counts in an ISO timestamp."""

from __future__ import annotations

import pytest

from transport.schema import InvalidEvent, parse_timestamp


@pytest.mark.parametrize(
    "value",
    [
        "2025-10-22T10:00:00+01:00:00.1234567",
        "2025-10-22T10:00:00.5+01:00:00.123456",
        "2025-10-22T10:00:00-01:00:00,5",
        "2025-10-22T10:00:00+01:00:00.0000001",
    ],
)
def test_an_offset_with_a_fraction_of_a_second_is_refused(value: str) -> None:
    with pytest.raises(InvalidEvent, match="fraction of a second in its UTC offset"):
        parse_timestamp(value)


def test_whole_second_offsets_and_long_fractions_still_parse_exactly() -> None:
    base = parse_timestamp("2025-10-22T09:00:00Z")[1]
    assert parse_timestamp("2025-10-22T10:00:00+01:00")[1] == base
    assert parse_timestamp("2025-10-22T10:00:30+01:00:30")[1] == base
    assert parse_timestamp("2025-10-22T10:00:00.123456789+01:00")[1] == base + 123_456_789
    assert parse_timestamp("2025-10-22T08:00:00.000000001-01:00")[1] == base + 1
    assert parse_timestamp("1969-12-31T23:59:59.999999999Z")[1] == -1
