"""Frame codec: msgpack bytes in, lists of valid events and per-item refusals out.

A fire-and-forget ingest frame holds one event map or an array of event maps. An acknowledged
ingest frame holds ``{"batch": ID, "events": [...]}``. Decoding never raises anything but
:class:`FrameError` (the whole frame is refused) and never lets one bad event spoil the others
in its batch: those come back as ``(index, reason)`` pairs. Pure: no sockets, no threads.

Two decoders, one set of rules. The fast one (msgspec, in C) decodes a frame straight into
typed structs and keeps each payload as the msgpack bytes that arrived; it takes only frames in
which every event is plainly valid, with exactly the schema's fields. Anything else (an unknown
field, a bad event, a msgpack Timestamp, a limit passed) goes to the exact one (msgpack plus
:func:`transport.schema.validate_event`), which finds every refusal and says why, and keeps each
payload's bytes too. So the fast decoder changes how fast a frame is read, never what is
accepted, how it is explained, or what is stored.

Neither builds what a frame holds before its size is known. msgpack headers are counts: 15 MiB
can hold 5 million empty maps, which would take over a gigabyte as Python objects. So the count
of events is read from the array header and checked against ``max_batch_events`` first, and the
exact decoder measures each event by skipping over it (in C, building nothing), refuses one
larger than :data:`EVENT_FIELDS_BYTES` plus the payload limit unread, and unpacks the others one
at a time. A frame then costs about its own size plus one event's objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import msgpack
import msgspec

from transport.schema import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    EMPTY_PAYLOAD,
    MAP_KEYS,
    MAX_NAME_CHARS,
    MAX_PAYLOAD_DEPTH,
    VALID_TOPICS,
    Event,
    InvalidEvent,
    check_no_nul,
    check_topic,
    msgpack_problem,
    parse_timestamp,
    readable_depth,
    type_name,
    unpack_from_peer,
    validate_event,
)

DEFAULT_MAX_BATCH_EVENTS = 10_000
EVENT_FIELDS_BYTES = 64 * 1024
"""What an encoded event may hold beyond its payload: its four named fields (at most 255
characters each, a 64-character timestamp) and their keys, with room to spare."""
MAX_BATCH_ID_BYTES = 4096
"""The longest acknowledged batch id, msgpack-encoded; a top-level key longer than this is not read either."""
_MAX_KEY_BYTES = MAX_BATCH_ID_BYTES
MAX_REQUEST_KEYS = 64
"""The most keys an acknowledged request's map may have: 'batch', 'events' and room for fields a
later version may add. More is refused unread: each is read one at a time, ~0.4 us apiece."""
MAX_NESTING = 1024
"""How deep arrays and maps may nest in a frame, counting the frame's own (msgpack's C unpacker
stops there with a StackError)."""


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
    nul_in_text: bool = True  # False with PostgreSQL storage (see schema.validate_event)


_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
_EMPTY_PAYLOAD = msgspec.Raw(EMPTY_PAYLOAD)
# First bytes of a msgpack map (fixmap, map 16, map 32) and of an array (fixarray, array 16, 32).
_MAP_MARKERS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])
_ARRAY_MARKERS = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])


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
    valid_topics = VALID_TOPICS
    max_payload = limits.max_payload_bytes
    nul_in_text = limits.nul_in_text
    deep_bytes = MAX_PAYLOAD_DEPTH  # each level takes a byte: a shorter payload cannot be too deep
    events = []
    try:
        for item in wire:
            payload = bytes(item.payload)
            if payload[0] not in _MAP_MARKERS or len(payload) > max_payload:
                return None
            # Decoded only to be sure it decodes exactly as the exact decoder would (UTF-8,
            # hashable keys, not too deep for readers): the bytes that arrived are what is stored.
            if len(payload) < deep_bytes:
                unpack_from_peer(payload)
            elif not readable_depth(payload):  # decodes it too
                return None
            topic = item.topic
            if topic not in valid_topics:
                check_topic(topic)
            timestamp, ts_ns = parse_timestamp(item.timestamp)
            if not nul_in_text:
                check_no_nul(item.event_id, item.source)
            events.append(_make(Event, (topic, item.event_id, timestamp, ts_ns, item.source, payload)))
    except (InvalidEvent, ValueError, TypeError, msgpack.UnpackException):
        return None
    return events


def unpack(frame: bytes | memoryview, *, first_only: bool = False) -> Any:
    """Decode one msgpack object, raising :class:`FrameError` for anything that is not exactly that;
    with ``first_only``, the object the frame starts with, whatever follows it."""
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except msgpack.ExtraData as extra:
        if first_only:
            return extra.unpacked
        raise FrameError("frame holds more than one msgpack object; send one event map or one array") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # UnicodeDecodeError (a ValueError) lands here too: strings must be UTF-8.
        raise _not_msgpack(exc) from None


def _reserved_ext(code: int, data: bytes) -> msgpack.ExtType:
    """An ext_hook: the ext value, or :class:`InvalidEvent` for a negative (msgpack-reserved) type.

    msgpack reads the Timestamp (-1) itself before any hook. Python's msgpack has no value for
    the other negative types, so an event holding one could be neither re-encoded nor read
    back by a query: that event alone is refused.
    """
    if code < 0:
        raise InvalidEvent(
            f"event holds a msgpack ext value of type {code}; negative types are reserved by msgpack and "
            "only the Timestamp (-1) is taken: give application ext values a type from 0 to 127"
        )
    return msgpack.ExtType(code, data)


def _unpack_event(data: memoryview) -> Any:
    """Decode one event's span like :func:`unpack`, but with :class:`InvalidEvent` for what refuses it alone."""
    try:
        return unpack_from_peer(data, ext_hook=_reserved_ext)
    except InvalidEvent:
        raise
    except TypeError as exc:
        # The span was read whole by Unpacker.skip, so the only TypeError left is a key Python
        # cannot hash: this event's fault, not the frame's.
        raise InvalidEvent(f"event holds a map whose key is an array or a map ({exc}); {MAP_KEYS}") from None
    except (ValueError, msgpack.UnpackException) as exc:
        if type(exc) is ValueError:
            # Likewise a value msgpack reads but cannot build: a Timestamp (ext -1) whose data is
            # not 4, 8 or 12 bytes, or whose nanoseconds pass 999 999 999.
            raise InvalidEvent(f"event holds a msgpack value that cannot be read: {exc}") from None
        raise _not_msgpack(exc) from None


def _not_msgpack(exc: Exception) -> FrameError:
    """The refusal of a frame msgpack could not read, saying what to fix where msgpack's own error does not."""
    if isinstance(exc, msgpack.StackError):
        return FrameError(
            f"frame nests arrays and maps more than {MAX_NESTING} levels deep, the limit (the batch map, its "
            "'events' array, the event map and its payload map count); send a flatter payload"
        )
    return FrameError(f"frame is not valid msgpack: {msgpack_problem(exc)}")


def _unpacker(data: bytes | memoryview) -> msgpack.Unpacker:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    return unpacker


def _array_count(data: bytes | memoryview) -> int | None:
    """The element count in the array header ``data`` starts with; None when it starts no array."""
    if not data:
        return None
    first = data[0]
    if 0x90 <= first <= 0x9F:
        return first & 0x0F
    if first == 0xDC and len(data) >= 3:
        return int.from_bytes(data[1:3], "big")
    if first == 0xDD and len(data) >= 5:
        return int.from_bytes(data[1:5], "big")
    return None


def _check_count(count: int, limits: Limits) -> None:
    if not count:
        raise FrameError("empty batch: send at least one event")
    if count > limits.max_batch_events:
        raise FrameError(f"batch of {count} events is over the limit of {limits.max_batch_events}")


def _event_spans(data: bytes | memoryview, offset: int, limits: Limits) -> list[tuple[int, int]]:
    """Where each event of an event map, or an array of them, lies (``offset`` added), read without building it.

    Raises :class:`FrameError` for an empty or over-long array, bad msgpack, or trailing bytes.
    """
    unpacker = _unpacker(data)
    spans = []
    try:
        if data[0] in _ARRAY_MARKERS:
            count = unpacker.read_array_header()
            _check_count(count, limits)
        else:
            count = 1
        for _ in range(count):
            start = unpacker.tell()
            unpacker.skip()
            spans.append((offset + start, offset + unpacker.tell()))
    except (ValueError, msgpack.UnpackException) as exc:  # OutOfData, FormatError, StackError
        raise _not_msgpack(exc) from None
    if unpacker.tell() != len(data):
        raise FrameError("frame holds more than one msgpack object; send one event map or one array")
    return spans


def validate_items(obj: Any, limits: Limits) -> DecodedBatch:
    """Check a decoded event map or array of event maps."""
    if isinstance(obj, dict):
        items: list[Any] = [obj]
    elif isinstance(obj, list):
        items = obj
        _check_count(len(items), limits)
    else:
        raise FrameError(f"frame must hold an event map or an array of event maps, not {type_name(obj)}")
    batch = DecodedBatch()
    for index, item in enumerate(items):
        try:
            batch.events.append(validate_event(item, limits.max_payload_bytes, limits.nul_in_text))
        except InvalidEvent as exc:
            batch.rejected.append((index, str(exc)))
    return batch


def validate_spans(frame: bytes, spans: list[tuple[int, int]], limits: Limits) -> DecodedBatch:
    """Check the events at ``spans`` of ``frame`` one at a time; one too large to be valid is refused unread."""
    max_event = limits.max_payload_bytes + EVENT_FIELDS_BYTES
    view = memoryview(frame)
    batch = DecodedBatch()
    for index, (start, end) in enumerate(spans):
        if end - start > max_event:
            batch.rejected.append(
                (
                    index,
                    f"event is {end - start} bytes encoded, over the limit of {max_event} (the payload limit, "
                    f"{limits.max_payload_bytes}, plus {EVENT_FIELDS_BYTES} for its other fields)",
                )
            )
            continue
        try:
            event = validate_event(_unpack_event(view[start:end]), limits.max_payload_bytes, limits.nul_in_text)
            batch.events.append(_with_payload_as_sent(event, view[start:end], limits.max_payload_bytes))
        except InvalidEvent as exc:
            batch.rejected.append((index, str(exc)))
    return batch


def _with_payload_as_sent(event: Event, data: memoryview, max_payload_bytes: int) -> Event:
    """``event`` with its payload the msgpack bytes that arrived, as the fast decoder keeps it.

    Re-encoded from the map Python built, a payload whose keys Python takes as equal (``1``,
    ``True`` and ``1.0``) lost all but one of them, only when its frame came this way.
    """
    if event.payload is EMPTY_PAYLOAD:
        return event  # none, or nil: stored as an empty map
    unpacker = _unpacker(data)
    span = None
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            value_at = unpacker.tell()
            unpacker.skip()
            if key == "payload":
                span = (value_at, unpacker.tell())  # the last one, as the map Python built keeps
    except (ValueError, TypeError, msgpack.UnpackException):
        return event
    if span is None:
        return event
    payload = bytes(data[span[0] : span[1]])
    if len(payload) > max_payload_bytes:
        raise InvalidEvent(f"payload is {len(payload)} bytes, over the limit of {max_payload_bytes}")
    return event._replace(payload=payload)


def decode_frame(frame: bytes, limits: Limits = Limits()) -> DecodedBatch:
    """Decode a fire-and-forget ingest frame."""
    count = _array_count(frame)
    if count is not None:
        _check_count(count, limits)  # before anything is built
    try:
        wire = _frame_decoder.decode(frame)
    except Exception:
        wire = None
    if wire is not None:
        events = _fast_events(wire if isinstance(wire, list) else [wire], limits)
        if events is not None:
            return DecodedBatch(events)
    if not frame or (count is None and frame[0] not in _MAP_MARKERS):
        return validate_items(unpack(frame), limits)  # a scalar: cheap to build, and refused by type
    return validate_spans(frame, _event_spans(frame, 0, limits), limits)


_ABSENT = object()


class _Oversized(int):
    """What :func:`_small_value` gives for an object too long to read: its encoded size."""


def _small_value(unpacker: msgpack.Unpacker, frame: bytes) -> Any:
    """The next object if at most ``_MAX_KEY_BYTES`` long; else skip it and return its :class:`_Oversized` size."""
    start = unpacker.tell()
    unpacker.skip()
    end = unpacker.tell()
    return unpack(memoryview(frame)[start:end]) if end - start <= _MAX_KEY_BYTES else _Oversized(end - start)


def _ack_outline(frame: bytes) -> tuple[Any, tuple[int, int] | None]:
    """An acknowledged frame's batch id (``_ABSENT`` if none) and where its ``events`` value lies.

    Read from the top-level map's headers: values other than the batch id are skipped, never built.
    """
    if not frame or frame[0] not in _MAP_MARKERS:
        what = "array" if frame and frame[0] in _ARRAY_MARKERS else type_name(unpack(frame, first_only=True))
        raise FrameError(f"an acknowledged batch must be a map with 'batch' and 'events', not {what}")
    unpacker = _unpacker(frame)
    batch_id: Any = _ABSENT
    events_at: tuple[int, int] | None = None
    op: Any = None
    try:
        keys = unpacker.read_map_header()
        if keys > MAX_REQUEST_KEYS:
            raise FrameError(
                f"an acknowledged batch map has {keys} keys, over the limit of {MAX_REQUEST_KEYS}; "
                "send 'batch' and 'events'"
            )
        seen: set[str] = set()
        for _ in range(keys):
            key = _small_value(unpacker, frame)
            if key in ("batch", "events"):
                if key in seen:  # which one was meant? msgpack readers differ (most keep the last)
                    raise FrameError(f"the acknowledged batch map gives {key!r} twice; give it once")
                seen.add(key)
            if key == "batch":
                batch_id = _small_value(unpacker, frame)
            elif key == "events":
                start = unpacker.tell()
                unpacker.skip()
                events_at = (start, unpacker.tell())
            elif key == "op":
                op = _small_value(unpacker, frame)
            else:
                unpacker.skip()
    except FrameError:
        raise
    except (ValueError, msgpack.UnpackException) as exc:
        raise _not_msgpack(exc) from None
    if unpacker.tell() != len(frame):
        raise FrameError(
            'frame holds more than one msgpack object; an acknowledged batch is one map {"batch": N, "events": [...]}'
        )
    if batch_id is _ABSENT and events_at is None and isinstance(op, str):
        raise FrameError(
            f"this is the daemon's acknowledged ingest endpoint ([ingest] ack_bind), for batches"
            f' {{"batch": N, "events": [...]}}; queries (op {op[:40]!r}) go to its [query] bind, followers'
            " to its [subscribe] bind"
        )
    return batch_id, events_at


def _valid_batch_id(batch_id: Any) -> bool:
    return isinstance(batch_id, (int, str)) and not isinstance(batch_id, bool)


def decode_ack_request(frame: bytes, limits: Limits = Limits()) -> tuple[int | str, DecodedBatch]:
    """Decode an acknowledged ingest frame into its batch id and its events.

    Raises :class:`FrameError` when the frame is not a map with an integer or string ``batch``
    and an ``events`` array; the error says which.
    """
    batch_id, events_at = _ack_outline(frame)
    if isinstance(batch_id, _Oversized):
        raise FrameError(
            f"the 'batch' id is {int(batch_id)} bytes encoded, over the limit of {MAX_BATCH_ID_BYTES}; "
            "send a shorter id"
        )
    if not _valid_batch_id(batch_id):
        raise FrameError("an acknowledged batch needs a 'batch' id that is an integer or a string")
    if events_at is None:
        raise FrameError("an acknowledged batch needs 'events' (a str key), an array of event maps")
    events = memoryview(frame)[events_at[0] : events_at[1]]
    count = _array_count(events)
    if count is None:
        what = "map" if events[0] in _MAP_MARKERS else type_name(unpack(events))
        raise FrameError(f"'events' must be an array of event maps, not {what}")
    _check_count(count, limits)  # before anything is built
    try:
        wire = _ack_decoder.decode(frame)
    except Exception:
        wire = None
    if wire is not None:
        fast = _fast_events(wire.events, limits)
        if fast is not None:
            return wire.batch, DecodedBatch(fast)
    return batch_id, validate_spans(frame, _event_spans(events, events_at[0], limits), limits)


def batch_id_of(frame: bytes) -> int | str | None:
    """Best effort: the batch id of a refused acknowledged frame, so the error reply can name it.

    Reads the top-level map one key at a time and stops at ``batch``: whatever is wrong after it
    (nesting too deep, a byte that is not msgpack, trailing bytes) does not hide the id, which
    clients send first. Only what lies before it has to be well formed.
    """
    if not frame or frame[0] not in _MAP_MARKERS:
        return None
    unpacker = _unpacker(frame)
    try:
        for _ in range(min(unpacker.read_map_header(), MAX_REQUEST_KEYS)):
            key = _small_value(unpacker, frame)
            if key == "batch":
                batch_id = _small_value(unpacker, frame)
                return batch_id if _valid_batch_id(batch_id) and not isinstance(batch_id, _Oversized) else None
            unpacker.skip()
    except (FrameError, ValueError, msgpack.UnpackException):
        pass
    return None
