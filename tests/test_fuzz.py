"""Fuzzing the sans-IO decoders: whatever bytes or objects arrive, only the documented errors come out.

``decode_frame`` and ``decode_ack_request`` may raise only :class:`FrameError`;
``validate_event`` only :class:`InvalidEvent`. Inputs are random bytes, msgpack-encoded random
object trees, and near-valid events with one field mutated, so the fuzzer reaches deep into the
validator rather than stopping at the first byte. Pure functions: no sockets, no threads.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transport.codec import (
    DecodedBatch,
    FrameError,
    Limits,
    decode_ack_request,
    decode_frame,
    unpack,
    validate_items,
)
from transport.schema import Event, InvalidEvent, validate_event

# About 3 850 generated inputs a run (most decoded several ways); ~15 s on a 2-core machine. Each
# run draws new ones, so what CI runs adds up over runs.
FUZZ = settings(max_examples=1_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_HEAVY = settings(FUZZ, max_examples=400)
LIMITS = Limits(max_batch_events=50, max_payload_bytes=512)

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can encode
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.builds(msgpack.Timestamp, st.integers(min_value=-(2**40), max_value=2**40), st.integers(0, 999_999_999)),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    st.datetimes(timezones=st.just(dt.UTC)).map(lambda d: msgpack.Timestamp.from_datetime(d)),
)
trees = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(st.one_of(st.text(max_size=12), ints, st.binary(max_size=4)), children, max_size=6),
    ),
    max_leaves=15,
)
timestamps = st.one_of(
    st.sampled_from(
        [
            "2025-10-22T10:00:00Z",
            "2025-10-22T10:00:00+02:00",
            "2025-10-22T10:00:00",
            "9999-12-31T23:59:59+14:00",
            "0001-01-01T00:00:00-14:00",
            "nope",
            "",
        ]
    ),
    st.datetimes(timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=-5))])).map(lambda d: d.isoformat()),
    st.text(max_size=70),
    trees,
)
events = st.fixed_dictionaries(
    {
        "topic": st.one_of(st.text(min_size=1, max_size=20), st.just("a" * 256), trees),
        "event_id": st.one_of(st.text(min_size=1, max_size=20), st.just(""), trees),
        "timestamp": timestamps,
        "source": st.one_of(st.text(max_size=20), trees),
    },
    optional={"payload": st.one_of(trees, st.dictionaries(st.text(max_size=8), trees, max_size=5)), "extra": trees},
)


def packed(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, datetime=False)


def check_batch(batch: DecodedBatch) -> None:
    assert all(isinstance(e, Event) for e in batch.events)
    for index, reason in batch.rejected:
        assert isinstance(index, int) and isinstance(reason, str) and reason


def decode_only_frame_errors(frame: bytes) -> None:
    for decode in (decode_frame, lambda f, limits: decode_ack_request(f, limits)[1]):
        try:
            check_batch(decode(frame, LIMITS))
        except FrameError as exc:
            assert str(exc)


@settings(FUZZ, max_examples=1_500)
@given(st.binary(max_size=300))
def test_random_bytes(frame: bytes) -> None:
    decode_only_frame_errors(frame)


@FUZZ
@given(trees)
def test_random_msgpack_trees(obj: Any) -> None:
    decode_only_frame_errors(packed(obj))


@settings(FUZZ, max_examples=250)  # each example is up to 20 events decoded four ways
@given(st.lists(st.one_of(events, trees), max_size=20), st.one_of(ints, st.text(max_size=5), trees))
def test_near_valid_batches(items: list[Any], batch_id: Any) -> None:
    decode_only_frame_errors(packed(items))
    decode_only_frame_errors(packed({"batch": batch_id, "events": items}))


@FUZZ_HEAVY
@given(events, st.binary(max_size=8), st.integers(min_value=0, max_value=400))
def test_truncated_and_spliced_frames(event: dict[str, Any], junk: bytes, cut: int) -> None:
    frame = packed([event, event])
    decode_only_frame_errors(frame[:cut])
    decode_only_frame_errors(frame + junk)
    decode_only_frame_errors(junk + frame)


@FUZZ_HEAVY
@given(st.one_of(events, trees))
def test_validate_event_raises_only_invalid_event(obj: Any) -> None:
    try:
        event = validate_event(obj, LIMITS.max_payload_bytes)
    except InvalidEvent as exc:
        assert str(exc)
        return
    assert isinstance(event, Event) and 1 <= len(event.topic) <= 255 and len(event.payload) <= 512


# Events the fast decoder takes whole (mostly): exactly the schema's fields, plainly valid values.
plain_events = st.fixed_dictionaries(
    {
        "topic": st.sampled_from(["orders", "a.b-c", "t" * 255, "with space", ""]),
        "event_id": st.text(min_size=1, max_size=12),
        "timestamp": st.datetimes(timezones=st.just(dt.UTC)).map(lambda d: d.isoformat()),
        "source": st.text(max_size=12),
    },
    optional={"payload": st.dictionaries(st.one_of(st.text(max_size=8), ints), trees, max_size=5)},
)


def exact_decode(frame: bytes) -> tuple[list[tuple[Any, ...]], list[tuple[int, str]]] | str:
    """What the exact decoder makes of a frame, payloads compared as the maps they encode (re-encoded,
    so that a NaN inside compares equal to itself)."""
    try:
        batch = validate_items(unpack(frame), LIMITS)
    except FrameError as exc:
        return str(exc)
    return comparable(batch)


def comparable(batch: DecodedBatch) -> tuple[list[tuple[Any, ...]], list[tuple[int, str]]]:
    events = [(*e[:5], packed(msgpack.unpackb(e.payload, raw=False, strict_map_key=False))) for e in batch.events]
    return events, batch.rejected


@settings(FUZZ, max_examples=300)
@given(st.lists(st.one_of(plain_events, plain_events, events), min_size=1, max_size=8))
def test_fast_and_exact_decoders_agree(items: list[Any]) -> None:
    frame = packed(items)
    try:
        fast: Any = comparable(decode_frame(frame, LIMITS))
    except FrameError as exc:
        fast = str(exc)
    assert fast == exact_decode(frame)
