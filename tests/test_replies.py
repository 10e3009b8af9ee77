"""A stored map whose keys Python takes for one (1, 1.0 and true) reads back whole on every path:
the query client, the subscriber, ``eventagg events`` and the gateway, on SQLite and on
PostgreSQL. Real daemon, gateway and PostgreSQL server."""

from __future__ import annotations

import json
from collections.abc import Callable

import msgpack
import pytest
from harness import Daemon, Gateway, push_frames, run_script
from pg_cluster import missing_reason

from transport.jsonlines import from_json, to_json_line
from transport.replies import MapPairs, map_from_pairs, unpack_reply
from transport.subscriber import Subscriber

# {"m": {1: "a", true: "b"}, "z": {0: "zero", 0.0: "float", false: "false"}}: one key each in Python.
_PAYLOAD = b"\x82\xa1m\x82\x01\xa1a\xc3\xa1b\xa1z\x83\x00\xa4zero\xcb" + bytes(8) + b"\xa5float\xc2\xa5false"
_M = MapPairs([(1, "a"), (True, "b")])
_Z = MapPairs([(0, "zero"), (0.0, "float"), (False, "false")])


def _frame(event_id: str) -> bytes:
    fields = {"topic": "keys", "event_id": event_id, "timestamp": "2025-10-22T10:00:00Z", "source": "go"}
    body = b"".join(msgpack.packb(key) + msgpack.packb(value) for key, value in fields.items())
    return b"\x85" + body + msgpack.packb("payload") + _PAYLOAD


def test_a_map_python_would_merge_decodes_as_its_pairs_and_round_trips_through_json_lines() -> None:
    decoded = unpack_reply(_PAYLOAD)
    assert decoded == {"m": _M, "z": _Z}
    assert decoded["m"] != MapPairs([(1, "a"), (1, "b")])  # true is not 1 here
    line = to_json_line(decoded)
    assert json.loads(line)["z"] == {"$map": [[0, "zero"], [0.0, "float"], [False, "false"]]}
    assert from_json(line) == decoded
    assert unpack_reply(msgpack.packb({"a": {1: 2, "1": 3}})) == {"a": {1: 2, "1": 3}}  # a dict holds these
    assert unpack_reply(b"\x82\xa1a\x01\xa1a\x02") == {"a": 2}  # one key written twice: its last value
    assert unpack_reply(b"\x83\x01\xa1a\x01\xa1b\xc3\xa1c") == MapPairs([(1, "a"), (1, "b"), (True, "c")])
    # Maps keyed by strings and bytes alone are decoded by msgpack alone; what is no msgpack still raises.
    assert unpack_reply(msgpack.packb({"a": {b"k": 1, "k": 2}})) == {"a": {b"k": 1, "k": 2}}
    with pytest.raises(msgpack.FormatError):
        unpack_reply(b"\xc1")


def test_pairs_handed_over_as_a_generator_decode_as_a_list_would() -> None:
    # msgpack's pure-Python unpacker before 1.2 (PyPy, or a platform with no wheel) passes
    # object_pairs_hook a generator: every reply failed with "generator has no len()".
    assert map_from_pairs(pair for pair in [("a", 1), ("b", 2)]) == {"a": 1, "b": 2}
    assert map_from_pairs(pair for pair in [(1, "a"), (True, "b")]) == MapPairs([(1, "a"), (True, "b")])


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> dict[str, str]:
    """The [storage] section of each backend (PostgreSQL's skipped where there is no server)."""
    if request.param == "sqlite":
        return {}
    if (why := missing_reason()) is not None:
        pytest.skip(why)
    dsn: str = request.getfixturevalue("database")
    return {"backend": "postgresql", "dsn": dsn, "node": "replies"}


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_every_reader_gets_every_key_back(daemon_factory: Callable[..., Daemon], backend: dict[str, str]) -> None:
    # PostgreSQL's page of events unpacked each payload and packed it again, merging the keys.
    daemon = daemon_factory(storage=backend).start()
    push_frames(daemon.ingest, [_frame("e-1")])
    daemon.wait_stats(unique_processed=1)
    [stored] = daemon.events("keys")
    assert stored["payload"] == {"m": _M, "z": _Z}
    subscriber = Subscriber(daemon.subscribe, topics=["keys"])
    try:
        followed = subscriber.next_event(10)
    finally:
        subscriber.close()
    assert followed is not None and followed["payload"] == {"m": _M, "z": _Z}
    listed = run_script("events.py", "keys", "--endpoint", daemon.query, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["payload"]["m"] == {"$map": [[1, "a"], [True, "b"]]}


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_the_gateway_writes_each_key_by_its_json_text(
    gateway_factory: Callable[..., Gateway], backend: dict[str, str]
) -> None:
    gateway = gateway_factory(storage=backend)
    push_frames(gateway.daemon.ingest, [_frame("e-1")])
    gateway.daemon.wait_stats(unique_processed=1)
    [stored] = gateway.client.get("/events", params={"topic": "keys"}).json()["events"]
    assert stored["payload"] == {"m": {"1": "a", "true": "b"}, "z": {"0": "zero", "0.0": "float", "false": "false"}}
