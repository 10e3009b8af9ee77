"""Frame codec: msgpack bytes in, lists of valid events and per-item refusals out.

A fire-and-forget ingest frame holds one event map or an array of event maps. An acknowledged
ingest frame holds ``{"batch": ID, "events": [...]}``. Decoding never raises anything but
:class:`FrameError` (the whole frame is refused) and never lets one bad event spoil the others
in its batch: those come back as ``(index, reason)`` pairs. Pure: no sockets, no threads.

Two decoders, one set of rules. The fast one (msgspec, in C) decodes a frame straight into
typed structs and keeps each payload as the msgpack bytes that arrived; it takes only frames in
which every event is plainly valid, with exactly the schema's fields. Anything else (an unknown
field, a bad event, a msgpack Timestamp, a limit passed) goes to the exact one (msgpack plus
:func:`transport.schema.validate_event`), which finds every refusal and says why. So the fast
decoder changes how fast a frame is read, never what is accepted or how it is explained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import msgpack
import msgspec

from transport.schema import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    EMPTY_PAYLOAD,
    MAX_NAME_CHARS,
    VALID_TOPICS,
    Event,
    InvalidEvent,
    check_topic,
    parse_timestamp,
    type_name,
    validate_event,
)

DEFAULT_MAX_BATCH_EVENTS = 10_000


class FrameError(ValueError):
    """A whole frame is refused: not msgpack, not an event or a batch, empty, or too large."""


@dataclass(slots=True)
class DecodedBatch:
    """What one frame held: the valid events in order, and each refused item by its index."""

    events: list[Event] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Limits:
    """The size limits a frame is checked against."""

    max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES


_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
_EMPTY_PAYLOAD = msgspec.Raw(EMPTY_PAYLOAD)
# First bytes of a msgpack map: fixmap, map 16, map 32.
_MAP_MARKERS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])


class _WireEvent(msgspec.Struct, forbid_unknown_fields=True):
    """An event exactly as the fast decoder takes it; any other shape goes to the exact decoder."""

    topic: _Name
    event_id: _Name
    timestamp: Annotated[str, msgspec.Meta(max_length=64)]
    source: Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
    payload: msgspec.Raw = _EMPTY_PAYLOAD


class _WireAckRequest(msgspec.Struct, forbid_unknown_fields=True):
    batch: int | str
    events: list[_WireEvent]


# Builds a NamedTuple from a tuple in C, skipping its Python-level __new__ (once per event).
_make = tuple.__new__
_frame_decoder = msgspec.msgpack.Decoder(_WireEvent | list[_WireEvent])
_ack_decoder = msgspec.msgpack.Decoder(_WireAckRequest)


def _fast_events(wire: list[_WireEvent], limits: Limits) -> list[Event] | None:
    """The events of a decoded frame, or None when any of them needs the exact decoder."""
    if not wire or len(wire) > limits.max_batch_events:
        return None
    unpackb = msgpack.unpackb
    valid_topics = VALID_TOPICS
    max_payload = limits.max_payload_bytes
    events = []
    try:
        for item in wire:
            payload = bytes(item.payload)
            if payload[0] not in _MAP_MARKERS or len(payload) > max_payload:
                return None
            # Decoded only to be sure it decodes exactly as the exact decoder would (UTF-8,
            # hashable keys): the bytes that arrived are what is stored.
            unpackb(payload, raw=False, strict_map_key=False)
            topic = item.topic
            if topic not in valid_topics:
                check_topic(topic)
            timestamp, ts_ns = parse_timestamp(item.timestamp)
            events.append(_make(Event, (topic, item.event_id, timestamp, ts_ns, item.source, payload)))
    except (InvalidEvent, ValueError, TypeError, msgpack.UnpackException):
        return None
    return events


def unpack(frame: bytes) -> Any:
    """Decode one msgpack object, raising :class:`FrameError` for anything that is not exactly that."""
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except msgpack.ExtraData:
        raise FrameError("frame holds more than one msgpack object; send one event map or one array") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # UnicodeDecodeError (a ValueError) lands here too: strings must be UTF-8.
        raise FrameError(f"frame is not valid msgpack ({type(exc).__name__}: {exc})") from None


def validate_items(obj: Any, limits: Limits) -> DecodedBatch:
    """Check a decoded event map or array of event maps."""
    if isinstance(obj, dict):
        items: list[Any] = [obj]
    elif isinstance(obj, list):
        items = obj
        if not items:
            raise FrameError("empty batch: send at least one event")
        if len(items) > limits.max_batch_events:
            raise FrameError(f"batch of {len(items)} events is over the limit of {limits.max_batch_events}")
    else:
        raise FrameError(f"frame must hold an event map or an array of event maps, not {type_name(obj)}")
    batch = DecodedBatch()
    for index, item in enumerate(items):
        try:
            batch.events.append(validate_event(item, limits.max_payload_bytes))
        except InvalidEvent as exc:
            batch.rejected.append((index, str(exc)))
    return batch


def decode_frame(frame: bytes, limits: Limits = Limits()) -> DecodedBatch:
    """Decode a fire-and-forget ingest frame."""
    try:
        wire = _frame_decoder.decode(frame)
    except Exception:
        wire = None
    if wire is not None:
        events = _fast_events(wire if isinstance(wire, list) else [wire], limits)
        if events is not None:
            return DecodedBatch(events)
    return validate_items(unpack(frame), limits)


def decode_ack_request(frame: bytes, limits: Limits = Limits()) -> tuple[int | str, DecodedBatch]:
    """Decode an acknowledged ingest frame into its batch id and its events.

    Raises :class:`FrameError` when the frame is not a map with an integer or string ``batch``
    and an ``events`` array; the error says which.
    """
    try:
        wire = _ack_decoder.decode(frame)
    except Exception:
        wire = None
    if wire is not None:
        events = _fast_events(wire.events, limits)
        if events is not None:
            return wire.batch, DecodedBatch(events)
    obj = unpack(frame)
    if not isinstance(obj, dict):
        raise FrameError(f"an acknowledged batch must be a map with 'batch' and 'events', not {type_name(obj)}")
    batch_id = obj.get("batch")
    if not isinstance(batch_id, (int, str)) or isinstance(batch_id, bool):
        raise FrameError("an acknowledged batch needs a 'batch' id that is an integer or a string")
    events = obj.get("events")
    if not isinstance(events, list):
        raise FrameError(f"'events' must be an array of event maps, not {type_name(events)}")
    return batch_id, validate_items(events, limits)


def batch_id_of(frame: bytes) -> int | str | None:
    """Best effort: the batch id of a refused acknowledged frame, so the error reply can name it."""
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception:
        return None
    if isinstance(obj, dict):
        batch_id = obj.get("batch")
        if isinstance(batch_id, (int, str)) and not isinstance(batch_id, bool):
            return batch_id
    return None
