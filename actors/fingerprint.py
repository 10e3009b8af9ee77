"""Content fingerprints: what an event says, independent of how it was written down.

Two events are the same content when their timestamps are the same instant, their sources are
equal and their payloads decode to equal values. Map key order, the width an integer was
encoded in and the written form of the timestamp do not count. :func:`fingerprint` hashes a
canonical encoding of exactly that: the instant in nanoseconds, the source, and the payload
re-packed with every map's entries sorted by their packed key (msgpack packs each integer in
its smallest form and every float as a double, so widths vanish on the way).

Fingerprints are only needed for duplicates whose stored bytes differ from the re-send's (an
exact re-send is recognised by comparing bytes) and for deleted events, whose content is gone:
the compact record a deleted key keeps holds 8 bytes of it. 64 bits make a false "same content"
for a changed re-send a 1 in 2**64 chance.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack

FINGERPRINT_BYTES = 8


def _canonical(value: Any, packer: msgpack.Packer, out: list[bytes]) -> None:
    if isinstance(value, dict):
        entries = []
        for key, item in value.items():
            parts: list[bytes] = []
            _canonical(key, packer, parts)
            key_bytes = b"".join(parts)
            parts = []
            _canonical(item, packer, parts)
            entries.append((key_bytes, b"".join(parts)))
        entries.sort()
        out.append(packer.pack_map_header(len(entries)))
        for key_bytes, item_bytes in entries:
            out.append(key_bytes)
            out.append(item_bytes)
    elif isinstance(value, (list, tuple)):
        out.append(packer.pack_array_header(len(value)))
        for item in value:
            _canonical(item, packer, out)
    else:
        out.append(packer.pack(value))


def canonical_payload(payload: bytes) -> bytes:
    """The payload's msgpack with every map's entries sorted: equal for equal decoded values."""
    value = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    packer = msgpack.Packer(use_bin_type=True, datetime=False)
    out: list[bytes] = []
    _canonical(value, packer, out)
    return b"".join(out)


def fingerprint(ts_ns: int, source: str, payload: bytes) -> bytes:
    """An 8-byte digest of an event's content (its instant, source and decoded payload)."""
    digest = hashlib.blake2b(digest_size=FINGERPRINT_BYTES)
    digest.update(ts_ns.to_bytes(8, "big", signed=True))
    encoded_source = source.encode()
    digest.update(len(encoded_source).to_bytes(4, "big"))
    digest.update(encoded_source)
    digest.update(canonical_payload(payload))
    return digest.digest()
