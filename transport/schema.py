"""The event schema: what a valid event is, checked field by field with a reason for every refusal.

The same rules run in the daemon (on every decoded event) and in the publisher library (before
an event leaves the application), so a caller learns of a bad event at once. This module is
pure: no sockets, no threads, no clock.

Unknown extra fields in an event map are ignored: they are neither stored nor an error, so a
publisher may send fields that a later version of the daemon understands.
"""

from __future__ import annotations

import datetime as dt
import operator
import re
import threading
import unicodedata
from typing import Any, NamedTuple

import msgpack

MAX_NAME_CHARS = 255
DEFAULT_MAX_PAYLOAD_BYTES = 1_048_576

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_NAIVE_EPOCH = dt.datetime(1970, 1, 1)
# ts_ns is stored as an SQLite INTEGER, a signed 64-bit number: 1677-09-21 to 2262-04-11.
MIN_TS_NS = -(2**63)
MAX_TS_NS = 2**63 - 1
_TS_RANGE = "eventagg keeps instants from 1677-09-21T00:12:43.145224192Z to 2262-04-11T23:47:16.854775807Z"


class InvalidEvent(ValueError):
    """An event breaks the schema; the message says which rule and how to fix it."""


class Event(NamedTuple):
    """One valid event as the daemon holds it.

    ``timestamp`` is the publisher's ISO-8601 string as sent (or the RFC 3339 form of a msgpack
    Timestamp, to the nanosecond); ``ts_ns`` is the same instant in nanoseconds since the Unix epoch, which is what
    ordering compares. ``payload`` is the payload map encoded as msgpack, ready to store.

    Immutable like a frozen dataclass, but a NamedTuple because one is built for every event
    received: that costs ~0.7 µs against ~2 µs for a frozen slotted dataclass, whose generated
    ``__init__`` goes through ``object.__setattr__`` once per field.
    """

    topic: str
    event_id: str
    timestamp: str
    ts_ns: int
    source: str
    payload: bytes

    @property
    def key(self) -> tuple[str, str]:
        """The identity that deduplication is keyed on."""
        return (self.topic, self.event_id)


# Each reads one field of an Event in C, for map() over a whole column of events (an attribute
# or property per event would run Python for each).
key_of = operator.itemgetter(0, 1)  # Event.key
topic_of = operator.itemgetter(0)
event_id_of = operator.itemgetter(1)
timestamp_of = operator.itemgetter(2)
ts_ns_of = operator.itemgetter(3)
source_of = operator.itemgetter(4)
payload_of = operator.itemgetter(5)


# The first topics found valid are kept (~100 bytes each) and not checked again. With 100 000
# topics, keeping a million took the decoder process from 23 to 33 MB of RSS; checking a topic
# costs ~0.3 µs, and off the GIL at that.
VALID_TOPICS_KEPT = 10_000
VALID_TOPICS: set[str] = set()
"""Topics already found valid (up to ``VALID_TOPICS_KEPT``): a topic in here needs no :func:`check_topic`."""


# Why a character str.isprintable() refuses is refused, by its Unicode category (whitespace apart).
_UNPRINTABLE = {
    "Cc": "control characters",
    "Cf": "format characters",
    "Co": "private-use characters",
    "Cs": "surrogates",
    "Cn": f"characters unassigned in the daemon's Unicode database ({unicodedata.unidata_version})",
}


def check_topic(topic: Any) -> str:
    """Return ``topic`` if it is a valid topic name, or raise :class:`InvalidEvent` saying why."""
    # isinstance first: a list or map topic is unhashable, and the set lookup would raise TypeError.
    if isinstance(topic, str) and topic in VALID_TOPICS:  # topics repeat: check each distinct one once
        return topic
    if not isinstance(topic, str):
        raise InvalidEvent(f"topic must be a string, not {type_name(topic)}")
    if not 1 <= len(topic) <= MAX_NAME_CHARS:
        raise InvalidEvent(f"topic must be 1-{MAX_NAME_CHARS} characters, not {len(topic)}")
    # isprintable() is False for control characters and for every whitespace except ' '.
    if not topic.isprintable() or " " in topic:
        position, bad = next((n, c) for n, c in enumerate(topic) if c == " " or not c.isprintable())
        what = "whitespace" if bad.isspace() else _UNPRINTABLE.get(unicodedata.category(bad), "whitespace")
        raise InvalidEvent(
            f"topic {topic!r} must not contain {what}"
            f" (U+{ord(bad):04X} at character {position + 1}); remove or replace it"
        )
    if len(VALID_TOPICS) < VALID_TOPICS_KEPT:
        VALID_TOPICS.add(topic)
    return topic


# datetime keeps microseconds and drops any further fraction digits, which Go's RFC3339Nano and
# Java's Instant.toString() send; they are read here so that such instants order to the
# nanosecond.
_LONG_FRACTION = re.compile(r"[.,][0-9]{6}([0-9]{1,3})")
_DIGITS = frozenset("0123456789")
# The seconds field of a time of day, in either format, at its sixtieth second.
_LEAP_SECOND = re.compile(r"T\d\d(:?)\d\d\1(60)(?!\d)", re.IGNORECASE)


def _sub_microsecond_ns(value: str) -> int:
    """The nanoseconds below the microsecond in an ISO string's fraction (its 7th to 9th digits)."""
    match = _LONG_FRACTION.search(value)
    return int(match.group(1).ljust(3, "0")) if match else 0


def _offset_has_fraction(value: str) -> bool:
    """Whether the UTC offset at the end of a parsed ISO string has a fraction of a second.

    Python accepts offsets such as ``+01:00:00.1234567`` (keeping six digits of them); they are
    refused, so that the only fraction left in the string is the seconds' own, whose 7th to 9th
    digits :func:`_sub_microsecond_ns` adds. The offset is what follows the last sign: the time
    of day has none, and the date's hyphens all come before it.
    """
    sign = max(value.rfind("+"), value.rfind("-"))
    offset = value[sign:]
    return "." in offset or "," in offset


def _unparsable(value: str, error: ValueError) -> InvalidEvent:
    """The refusal of a string ``datetime.fromisoformat`` refused, saying which part is wrong.

    datetime's messages name the field out of range ("day is out of range for month", "offset
    must be a timedelta strictly between ...", "second must be in 0..59"); anything else is
    not ISO-8601 at all.
    """
    reason = str(error)
    if reason.startswith("offset"):
        return InvalidEvent(f"timestamp {value!r} has a UTC offset out of range; it must be within +/-23:59")
    if _LEAP_SECOND.search(value):
        return InvalidEvent(
            f"timestamp {value!r} is a leap second, which eventagg does not support (it counts time as POSIX "
            "does, without them); send the second before it or the next one"
        )
    if "out of range" in reason or "must be in" in reason:
        return InvalidEvent(f"timestamp {value!r} is no such date or time ({reason})")
    return InvalidEvent(f"timestamp {value!r} is not ISO-8601; send e.g. '2025-10-22T10:00:00Z'")


def format_ns(ns: int) -> str:
    """The RFC 3339 text in UTC of an instant in nanoseconds since the Unix epoch (in the stored range).

    The fraction has no digits for a whole second, six for a whole microsecond (as
    ``datetime.isoformat`` writes it, which is what such instants were always stored as) and
    nine otherwise, so that the text holds the exact instant and the same instant always gets
    the same text.
    """
    seconds, nanoseconds = divmod(ns, 1_000_000_000)
    text = (_NAIVE_EPOCH + dt.timedelta(seconds=seconds)).isoformat()
    if nanoseconds % 1000:
        return f"{text}.{nanoseconds:09d}Z"
    if nanoseconds:
        return f"{text}.{nanoseconds // 1000:06d}Z"
    return f"{text}Z"


def _lower_case_zulu(value: str) -> dt.datetime:
    """``value``, which ends in a lower-case "z", read with an upper-case one."""
    try:
        return dt.datetime.fromisoformat(value[:-1] + "Z")
    except ValueError as exc:
        raise _unparsable(value, exc) from None


def parse_timestamp(value: Any) -> tuple[str, int]:
    """Return ``(iso_string, ns_since_epoch)`` for an ISO-8601 string with a zone or a msgpack Timestamp.

    A string comes back as sent; a msgpack Timestamp as :func:`format_ns` writes its instant.
    """
    if isinstance(value, str):
        if len(value) > 64:
            raise InvalidEvent(f"timestamp must be at most 64 characters, not {len(value)}")
        if not value.isascii():
            # ISO 8601 is ASCII; datetime skips a seventh fraction digit whatever it is, so "٧"
            # there was taken, the instant sometimes counting it and sometimes not.
            raise InvalidEvent(f"timestamp {value!r} is not ISO-8601: it holds a character that is not ASCII")
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError as exc:
            if value[-1:] != "z":
                raise _unparsable(value, exc) from None
            parsed = _lower_case_zulu(value)  # RFC 3339 allows it; datetime does not read it
        if parsed.tzinfo is None:
            raise InvalidEvent(f"timestamp {value!r} has no timezone; add 'Z' or an offset like '+02:00'")
        # The seconds' decimal sign (a fraction in the offset is refused below): string
        # searches, not a regular expression, as this runs for every event.
        decimal = value.find(".")
        if decimal < 0:
            decimal = value.find(",")
        if decimal >= 0 and value[decimal + 1 : decimal + 2] not in _DIGITS:
            # "10:00:00.Z": datetime takes it as no fraction at all.
            raise InvalidEvent(f"timestamp {value!r} has a decimal sign with no digits after it")
        if value[-1] not in "Zz" and _offset_has_fraction(value):
            raise InvalidEvent(
                f"timestamp {value!r} has a fraction of a second in its UTC offset; send the offset as '+HH:MM'"
            )
        try:
            since = parsed - _EPOCH  # days, seconds, microseconds: cheaper than dividing a timedelta
        except OverflowError:
            raise InvalidEvent(f"timestamp {value!r} is out of range; {_TS_RANGE}") from None
        ns = (since.days * 86_400 + since.seconds) * 1_000_000_000 + since.microseconds * 1000
        # A seventh fraction digit needs at least eight characters after the sign (with "Z").
        if decimal >= 0 and len(value) >= decimal + 9 and value[decimal + 7] in _DIGITS:
            ns += _sub_microsecond_ns(value)
        if not MIN_TS_NS <= ns <= MAX_TS_NS:
            raise InvalidEvent(f"timestamp {value!r} is out of range; {_TS_RANGE}")
        return value, ns
    if isinstance(value, msgpack.Timestamp):
        ns = value.to_unix_nano()
        if not MIN_TS_NS <= ns <= MAX_TS_NS:
            raise InvalidEvent(
                f"msgpack Timestamp of {value.seconds} s and {value.nanoseconds} ns is out of range; {_TS_RANGE}"
            )
        return format_ns(ns), ns
    raise InvalidEvent(
        f"timestamp must be an ISO-8601 string with a timezone or a msgpack Timestamp, not {type_name(value)}"
    )


def check_fields(obj: Any) -> tuple[str, str, str, int, str, Any]:
    """Check a decoded event map by every rule but the payload's size, or raise :class:`InvalidEvent`.

    Returns ``(topic, event_id, timestamp, ts_ns, source, payload)``, where ``payload`` is the
    payload map, or ``None`` when the event has none. The publisher library stops here: it
    packs the whole event anyway, and only an event over the payload limit can have a payload
    over it, so it packs the payload alone (:func:`pack_payload`) only then.
    """
    if not isinstance(obj, dict):
        raise InvalidEvent(f"an event must be a map, not {type_name(obj)}")
    try:
        topic = obj["topic"]
        event_id = obj["event_id"]
        raw_timestamp = obj["timestamp"]
        source = obj["source"]
    except KeyError as exc:
        raise InvalidEvent(
            f"missing field {exc.args[0]!r}; every event needs topic, event_id, timestamp and source"
        ) from None
    check_topic(topic)
    if not isinstance(event_id, str):
        raise InvalidEvent(f"event_id must be a string, not {type_name(event_id)}")
    if not 1 <= len(event_id) <= MAX_NAME_CHARS:
        raise InvalidEvent(f"event_id must be 1-{MAX_NAME_CHARS} characters, not {len(event_id)}")
    if not isinstance(source, str):
        raise InvalidEvent(f"source must be a string, not {type_name(source)}")
    if len(source) > MAX_NAME_CHARS:
        raise InvalidEvent(f"source must be at most {MAX_NAME_CHARS} characters, not {len(source)}")
    timestamp, ts_ns = parse_timestamp(raw_timestamp)
    payload = obj.get("payload", _NO_PAYLOAD)
    if payload is _NO_PAYLOAD or payload is None:  # nil is what many encoders send for an unset map
        payload = None
    elif not isinstance(payload, dict):
        raise InvalidEvent(f"payload must be a map, not {type_name(payload)}")
    return topic, event_id, timestamp, ts_ns, source, payload


MAP_KEYS = "map keys must be strings, numbers, booleans, nil, binary or ext values other than msgpack Timestamps"


def unpack_from_peer(data: bytes | memoryview, ext_hook: Any = msgpack.ExtType) -> Any:
    """``msgpack.unpackb`` for bytes a peer sent: :class:`InvalidEvent` for a map keyed by a msgpack Timestamp.

    Python hashes a Timestamp as the tuple of its two ints, and int hashes are not randomized,
    so a peer can make thousands of keys share one hash, and building their dict takes time
    quadratic in their number (8 000 keys, 128 KB: 2.2 s). Every Timestamp holds the byte 0xff
    (its ext type, -1); bytes without it are decoded as they are, the others with each map's
    keys looked at before it is built. (``255 in`` is a memchr; ``b"\\xff" in`` cost ten times
    more, a tenth of a small payload's decoding.)
    """
    packed = data if type(data) is bytes else bytes(data)
    if 255 not in packed:
        return msgpack.unpackb(packed, raw=False, strict_map_key=False, ext_hook=ext_hook)
    return msgpack.unpackb(
        packed, raw=False, strict_map_key=False, ext_hook=ext_hook, object_pairs_hook=_timestampless_map
    )


def _timestampless_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    for key, _ in pairs:
        if type(key) is msgpack.Timestamp:
            raise InvalidEvent(f"a map key is a msgpack Timestamp; {MAP_KEYS}")
    return dict(pairs)


# Readers get each event three levels down (a query's reply map, its events array, the event
# map; a subscription's events message alike) and msgpack decodes at most 1024 levels, so a
# payload may nest at most 1021 (its own map counting as one), or nothing could read it back.
MAX_PAYLOAD_DEPTH = 1021
_READER_LEVELS = b"\x91" * 3  # three one-element arrays: the levels a reader adds


def readable_depth(packed: bytes | bytearray) -> bool:
    """Whether a packed payload nests no deeper than :data:`MAX_PAYLOAD_DEPTH` (decoding it to know)."""
    if len(packed) < MAX_PAYLOAD_DEPTH:  # each level takes at least a byte
        return True
    try:
        unpack_from_peer(_READER_LEVELS + packed)
    except msgpack.StackError:
        return False
    return True


def too_deep() -> InvalidEvent:
    """The refusal of a payload nested deeper than :data:`MAX_PAYLOAD_DEPTH`."""
    return InvalidEvent(
        f"payload nests arrays and maps more than {MAX_PAYLOAD_DEPTH} levels deep (its own map counts as one): "
        "queries and subscriptions carry it three levels down, and msgpack reads 1024; send a flatter payload"
    )


def pack_payload(payload: dict[Any, Any] | None, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> bytes:
    """The payload map as stored (msgpack; an empty map for none), or :class:`InvalidEvent` if over
    the size limit or nested too deep to be read back."""
    if payload is None:
        return EMPTY_PAYLOAD
    packed: bytes = _packer().pack(payload)
    if len(packed) > max_payload_bytes:
        raise InvalidEvent(f"payload is {len(packed)} bytes, over the limit of {max_payload_bytes}")
    if not readable_depth(packed):
        raise too_deep()
    return packed


def validate_event(obj: Any, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES, nul_in_text: bool = True) -> Event:
    """Check one decoded event map and return it as an :class:`Event`, or raise :class:`InvalidEvent`.

    ``nul_in_text`` False refuses a NUL character in ``event_id`` or ``source``: PostgreSQL's
    text columns cannot hold one, and a row it refuses would block its writer's group for good.
    """
    topic, event_id, timestamp, ts_ns, source, payload = check_fields(obj)
    if not nul_in_text:
        check_no_nul(event_id, source)
    return Event(topic, event_id, timestamp, ts_ns, source, pack_payload(payload, max_payload_bytes))


def check_no_nul(event_id: str, source: str) -> None:
    """Refuse a NUL character in ``event_id`` or ``source`` (where the storage cannot hold one)."""
    for name, value in (("event_id", event_id), ("source", source)):
        if "\x00" in value:
            raise InvalidEvent(
                f"{name} holds a NUL character, which this daemon's storage (PostgreSQL) cannot hold;"
                f" send a {name} without NUL"
            )


# What a peer in any language calls each type msgpack decodes to, for refusals it reads.
_WIRE_TYPE_NAMES: dict[type, str] = {
    type(None): "nil",
    bool: "bool",
    int: "int",
    float: "float",
    str: "str",
    bytes: "bin",
    bytearray: "bin",
    memoryview: "bin",
    list: "array",
    tuple: "array",
    dict: "map",
    msgpack.Timestamp: "timestamp",
    msgpack.ExtType: "ext",
}


def type_name(value: Any) -> str:
    """``value``'s msgpack type as a refusal names it: nil, bool, int, float, str, bin, array, map, ext."""
    return _WIRE_TYPE_NAMES.get(type(value)) or type(value).__name__


def msgpack_problem(exc: Exception) -> str:
    """Why bytes a peer sent are not one msgpack object, in msgpack's terms, from msgpack-python's error."""
    if isinstance(exc, msgpack.ExtraData):
        return "bytes follow the msgpack object; send exactly one object"
    if isinstance(exc, UnicodeDecodeError):
        return "a str holds bytes that are not UTF-8; send such data as bin"
    if isinstance(exc, msgpack.FormatError):
        return "it holds a byte that begins no msgpack value (0xc1 is never used)"
    if isinstance(exc, msgpack.StackError):
        return "it nests arrays and maps too deep"
    text = str(exc)
    if isinstance(exc, msgpack.OutOfData) or "incomplete input" in text:
        return "it ends inside a msgpack value (cut short?)"
    if "exceeds max_" in text:  # a length longer than all the bytes there are
        return "a length it declares runs past its end (cut short?)"
    if isinstance(exc, TypeError) and "unhashable" in text:
        return "a map is keyed by an array or a map, which no request or event takes"
    if "invalid timestamp data" in text:
        return "a msgpack Timestamp (ext -1) must hold 4, 8 or 12 bytes"
    return f"{type(exc).__name__}: {exc}"


def quoted_names(names: list[str], show: int = 5, width: int = 40) -> str:
    """Peer-given names (unknown ops or fields) as a refusal lists them: the first ``show``, each cut
    to ``width`` characters, and how many more, so a request of thousands of long names is not
    echoed back, nor logged, whole."""
    shown = [name if len(name) <= width else f"{name[:width]}..." for name in names[:show]]
    more = f" and {len(names) - show} more" if len(names) > show else ""
    return ", ".join(shown) + more


def quoted_op(op: Any) -> str:
    """An unknown ``op`` as a refusal quotes it: msgpack's words, a long string cut short."""
    return repr(op[:40]) + ("..." if len(op) > 40 else "") if isinstance(op, str) else wire_repr(op)


def wire_repr(value: Any) -> str:
    """``value`` as a refusal quotes it to a peer: msgpack's words for nil and booleans, not Python's."""
    if value is None or isinstance(value, bool):
        return "nil" if value is None else str(value).lower()
    if isinstance(value, (int, float, str)):
        return repr(value)
    return type_name(value)


_NO_PAYLOAD = object()
EMPTY_PAYLOAD: bytes = msgpack.packb({})
"""The stored payload of an event sent without one: an empty msgpack map."""
_local = threading.local()


def _packer() -> msgpack.Packer:
    # msgpack.packb builds a new Packer per call, which costs more than packing a small payload;
    # a Packer is not thread-safe (the publisher library validates on its callers' threads), so
    # each thread keeps its own.
    try:
        return _local.packer
    except AttributeError:
        _local.packer = msgpack.Packer(use_bin_type=True, datetime=False)
        return _local.packer
