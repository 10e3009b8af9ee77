"""Content fingerprints: what an event says, independent of how it was written down.

Two events are the same content when their timestamps are the same instant, their sources are
equal and their payloads decode to equal values. Map key order, the width an integer was
encoded in and the written form of the timestamp do not count. :func:`fingerprint` hashes a
canonical encoding of exactly that: the instant in nanoseconds, the source, and the payload
re-packed with every map's entries sorted by their packed key (msgpack packs each integer in
its smallest form and every float as a double, so widths vanish on the way). An integer and a
float of the same value (6 and 6.0) are different content, as map keys too: a map holding keys
that Python takes for one (1, 1.0 and true) keeps each entry.

Fingerprints are only needed for duplicates whose stored bytes differ from the re-send's (an
exact re-send is recognised by comparing bytes) and for deleted events, whose content is gone:
the compact record a deleted key keeps holds 8 bytes of it. 64 bits make a false "same content"
for a changed re-send a 1 in 2**64 chance.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import msgpack

FINGERPRINT_BYTES = 8


# The extension type code that stands for a map whose keys Python takes for one another, and
# the first byte of its data (a payload's own value of that code gets the other).
_UNMERGED_MAP = 0x4D
_MARKED, _ESCAPED = b"\x01", b"\x00"


def _sorted_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any] | msgpack.ExtType:
    # Called by the C unpacker for every map, innermost first; keys of mixed types sort by their
    # packed form, which also tells 1 from "1". A dict keeps the sorted order for the re-pack.
    pairs.sort(key=_packed_key)
    merged = dict(pairs)
    if len(merged) < len(pairs):
        # A key written twice is the same content as written once with its last value; but keys
        # that differ in msgpack and are equal in Python (1, 1.0 and true) are not one key, and a
        # dict would keep one of them: {1: "a", true: "b"} would be the same content as {1: "b"}.
        # Those entries are packed as they are, marked apart from any extension value a payload
        # holds itself (see _escaped_ext).
        by_packed_key = dict(zip(map(_packed_key, pairs), pairs))
        if len(dict(by_packed_key.values())) < len(by_packed_key):  # NaN keys never merge in a dict
            packer = _packer()
            entries = b"".join(key + packer.pack(value) for key, (_, value) in by_packed_key.items())
            return msgpack.ExtType(_UNMERGED_MAP, _MARKED + entries)
    return merged


def _escaped_ext(code: int, data: bytes) -> msgpack.ExtType:
    # A payload's own extension value of the marker's code cannot pass for an unmerged map.
    return msgpack.ExtType(code, _ESCAPED + data if code == _UNMERGED_MAP else data)


def _packed_key(pair: tuple[Any, Any]) -> bytes:
    packed: bytes = _packer().pack(pair[0])
    return packed


_local = threading.local()


def _packer() -> msgpack.Packer:
    # A Packer is not thread-safe, and msgpack.packb builds a new one per call (costlier than
    # packing a small value): each thread keeps its own.
    try:
        packer: msgpack.Packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True, datetime=False)
    return packer


def canonical_payload(payload: bytes) -> bytes:
    """The payload's msgpack with every map's entries sorted: equal for equal decoded values.

    Decoding and re-packing run in msgpack's C code; Python runs once per map, to sort it
    (about 3 us for a small payload, against 37 us for a walk in Python).
    """
    try:
        value = msgpack.unpackb(
            payload, raw=False, strict_map_key=False, object_pairs_hook=_sorted_map, ext_hook=_escaped_ext
        )
    except (TypeError, ValueError):  # e.g. a map used as a map key: unhashable, so no sorting
        return payload
    packed: bytes = _packer().pack(value)
    return packed


def fingerprint(ts_ns: int, source: str, payload: bytes) -> bytes:
    """An 8-byte digest of an event's content (its instant, source and decoded payload)."""
    encoded_source = source.encode()
    content = b"".join(
        (
            ts_ns.to_bytes(8, "big", signed=True),
            len(encoded_source).to_bytes(4, "big"),
            encoded_source,
            canonical_payload(payload),
        )
    )
    return hashlib.blake2b(content, digest_size=FINGERPRINT_BYTES).digest()
