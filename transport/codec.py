"""Frame codec: msgpack bytes in, lists of valid events and per-item refusals out.

A fire-and-forget ingest frame holds one event map or an array of event maps. An acknowledged
ingest frame holds ``{"batch": ID, "events": [...]}``. Decoding never raises anything but
:class:`FrameError` (the whole frame is refused) and never lets one bad event spoil the others
in its batch: those come back as ``(index, reason)`` pairs. Pure: no sockets, no threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from transport.schema import DEFAULT_MAX_PAYLOAD_BYTES, Event, InvalidEvent, type_name, validate_event

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
    return validate_items(unpack(frame), limits)


def decode_ack_request(frame: bytes, limits: Limits = Limits()) -> tuple[int | str, DecodedBatch]:
    """Decode an acknowledged ingest frame into its batch id and its events.

    Raises :class:`FrameError` when the frame is not a map with an integer or string ``batch``
    and an ``events`` array; the error says which.
    """
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
    except Exception:  # noqa: BLE001 - any garbage simply has no id
        return None
    if isinstance(obj, dict):
        batch_id = obj.get("batch")
        if isinstance(batch_id, (int, str)) and not isinstance(batch_id, bool):
            return batch_id
    return None
