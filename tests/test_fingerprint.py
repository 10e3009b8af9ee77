"""Content fingerprints (actors/fingerprint.py): what counts as the same content for a re-send."""

from __future__ import annotations

import msgpack

from actors.fingerprint import fingerprint


def same(a: bytes, b: bytes) -> bool:
    return fingerprint(0, "s", a) == fingerprint(0, "s", b)


NAN = msgpack.packb(float("nan"))


def test_keys_python_merges_are_kept_apart_whatever_else_the_map_holds() -> None:
    # {1: "b"} against {1: "a", true: "b"}: one key in Python, two in msgpack.
    assert not same(b"\x81\x01\xa1b", b"\x82\x01\xa1a\xc3\xa1b")
    # Two NaN keys (never equal in a dict) cancelled the merged pair out of the count.
    with_nans = b"\x84" + NAN + b"\x01" + NAN + b"\x02" + b"\x01\xa1x" + b"\xc3\xa1y"
    assert not same(with_nans, b"\x83" + NAN + b"\x01" + NAN + b"\x02" + b"\x01\xa1y")
    # A key written twice is the same content as written once, with its last value.
    assert same(b"\x82\xa1a\x01\xa1a\x02", b"\x81\xa1a\x02")


def test_a_payloads_own_extension_value_cannot_pass_for_a_map() -> None:
    """An extension value of the marker's code, holding a merged map's entries, was taken for it."""
    entries = b"\x01\xa1b\xc3\xa1c"
    assert not same(msgpack.packb(msgpack.ExtType(0x4D, entries)), b"\x82" + entries)
    assert not same(msgpack.packb(msgpack.ExtType(0x4D, b"\x01" + entries)), b"\x82" + entries)


def test_ordinary_payloads_compare_as_before() -> None:
    assert same(msgpack.packb({"n": 1, "t": "x"}), msgpack.packb({"t": "x", "n": 1}))
    assert not same(msgpack.packb({"n": 6}), msgpack.packb({"n": 6.0}))
    assert same(msgpack.packb({"x": msgpack.ExtType(5, b"ab")}), msgpack.packb({"x": msgpack.ExtType(5, b"ab")}))
