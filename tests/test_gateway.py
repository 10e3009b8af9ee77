"""The HTTP gateway (scripts/gateway.py) over real HTTP, in front of a real daemon.

Every e2e test here starts the real daemon and the real gateway process on loopback ports and
talks to the gateway with httpx, as the original service's clients did. The gateway reads the
daemon's own config file, whose ``[http]`` section the daemon must accept and ignore.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from harness import (
    GATEWAY_TIMEOUT_MS as TIMEOUT_MS,
)
from harness import (
    ROOT,
    SCRIPTS,
    Daemon,
    Gateway,
    Stream,
    eventually,
    free_port,
    publish,
    push_frames,
    run_script,
    write_config,
)
from prometheus_client.parser import text_string_to_metric_families

from transport.config import ConfigError, parse_config
from transport.gateway import GatewayError, parse_events

JSON_TYPE = {"content-type": "application/json"}


def event(
    topic: str = "orders", event_id: str = "e-1", timestamp: str = "2025-10-22T10:00:00Z", **extra: Any
) -> dict[str, Any]:
    return {"topic": topic, "event_id": event_id, "timestamp": timestamp, "source": "test", **extra}


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, f"{response.status_code}: {response.text}"
    body: dict[str, Any] = response.json()
    return body


# -- the original service's API ------------------------------------------------------------------


@pytest.mark.e2e
def test_invalid_event_is_400_with_error_and_index_and_nothing_is_sent(gateway: Gateway) -> None:
    batch = [event(event_id="ok-1"), event(event_id="bad", timestamp="2025-10-22T10:00:00"), event(event_id="ok-2")]
    response = gateway.publish({"events": batch})
    assert response.status_code == 400
    body = response.json()
    assert body["index"] == 1
    assert "timezone" in body["error"]
    single = gateway.publish({"topic": "orders", "event_id": 7, "timestamp": "2025-10-22T10:00:00Z", "source": "s"})
    assert single.status_code == 400 and single.json() == {"error": "event_id must be a string, not number", "index": 0}
    # The daemon never saw any of them (checked first, nothing sent).
    assert gateway.daemon.stats()["received"] == 0
    assert ok(gateway.client.get("/events"))["count"] == 0


@pytest.mark.e2e
def test_bad_requests_get_a_4xx_with_a_clear_message(gateway_factory: Callable[..., Gateway]) -> None:
    gateway = gateway_factory(http={"max_body_bytes": 2000, "max_events": 3})
    post = gateway.client.post
    cases = [
        (post("/publish", content=b'{"events": [{', headers=JSON_TYPE), 400, "not valid JSON"),
        (post("/publish", content=b"[1, 2]", headers=JSON_TYPE), 400, "not a JSON array"),
        (post("/publish", json={"events": {"topic": "t"}}), 400, "'events' must be an array"),
        (post("/publish", json={"events": [event(), 5]}), 400, "an event must be an object, not number"),
        (post("/publish", json=event(payload=[1])), 400, "payload must be an object, not array"),
        (post("/publish", json=event(payload={"n": 2**70})), 400, "integers must fit in 64 bits"),
        (post("/publish", content=b"x" * 2001, headers=JSON_TYPE), 413, "[http] max_body_bytes"),
        (post("/publish", json={"events": [event(event_id=str(i)) for i in range(4)]}), 413, "[http] max_events"),
        (gateway.client.get("/events", params={"limit": 0}), 400, "limit"),
        (gateway.client.get("/events", params={"after": "x"}), 400, "after"),
        # pydantic reads these as 1; the daemon, and the stream's Last-Event-ID, refuse them.
        (gateway.client.get("/events", params={"after": "1.0"}), 400, "'after' must be a whole number in digits"),
        (gateway.client.get("/events", params={"limit": "+1"}), 400, "'limit' must be a whole number in digits"),
        (gateway.client.get("/topics", params={"limit": "1.0"}), 400, "'limit' must be a whole number in digits"),
        (gateway.client.get("/topics", params={"after": "a\x00b"}), 400, "'after' must be a topic name"),  # was 503
        (gateway.client.get("/events/stream", params={"after": "1.0"}), 400, "'after' must be a whole number"),
        (gateway.client.get("/events", params={"topic": ""}), 400, "no event can have this topic"),
        (gateway.client.get("/events", params={"topic": "a b"}), 400, "whitespace"),
        (gateway.client.get("/events", params={"limt": 5}), 400, "unknown query parameter 'limt'"),
        (gateway.client.get("/events?topic=a&topic=b"), 400, "'topic' given more than once"),
        (gateway.client.get("/nowhere"), 404, "no route /nowhere: the routes are listed in /openapi.json"),
        (gateway.client.delete("/publish"), 405, "DELETE is not allowed on /publish: it takes POST"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (response.request.url, response.text)
        assert words in response.json()["error"], response.text
    assert gateway.daemon.stats()["received"] == 0


@pytest.mark.e2e
def test_every_route_refuses_a_query_parameter_it_does_not_take(gateway: Gateway) -> None:
    """/events and /topics refused a misspelt parameter, but /stats?x=1, /healthz?x=1, /metrics?x=1
    and a POST /publish?topic=t answered as if nothing were wrong: each route refuses the same way,
    naming the parameter and those it takes."""
    client = gateway.client
    for method, path, params, takes in (
        ("GET", "/stats", {"x": "1"}, "none"),
        ("GET", "/healthz", {"x": "1"}, "none"),
        ("HEAD", "/healthz", {"x": "1"}, "none"),
        ("GET", "/metrics", {"x": "1"}, "none"),
        ("GET", "/openapi.json", {"x": "1"}, "none"),
        ("GET", "/docs", {"x": "1"}, "none"),
        ("GET", "/redoc", {"x": "1"}, "none"),
        ("GET", "/events", {"x": "1"}, "topic, after, limit"),
        ("GET", "/topics", {"x": "1"}, "after, limit"),
        ("GET", "/events/stream", {"x": "1"}, "topic, topics, after"),
    ):
        response = client.request(method, path, params=params)
        assert response.status_code == 400, (method, path, response.status_code, response.text)
        if method != "HEAD":
            error = f"unknown query parameter 'x': {method} {path} takes {takes}"
            assert response.json() == {"error": error}, response.text
        assert response.headers["content-type"] == "application/json", (path, response.headers)
    # Twice the same unknown name is one; two names are both named; a name without a value counts.
    two = client.get("/stats?b=1&a=2&b=3").json()
    assert two == {"error": "unknown query parameter 'a', 'b': GET /stats takes none"}
    assert client.get("/metrics?x").json() == {"error": "unknown query parameter 'x': GET /metrics takes none"}
    # HEAD answered as GET is checked as the GET.
    assert client.head("/stats", params={"x": 1}).status_code == 400
    # A publish whose events would go nowhere else than the body: refused, nothing sent.
    published = client.post("/publish", params={"topic": "orders"}, json=event())
    assert published.json() == {"error": "unknown query parameter 'topic': POST /publish takes none"}, published.text
    assert published.status_code == 400
    # A parameter given twice is refused on every route that takes parameters, but topics.
    for path, repeated in (("/events", "limit=1&limit=2"), ("/topics", "after=a&after=b")):
        twice = client.get(f"{path}?{repeated}")
        assert twice.status_code == 400, (path, twice.text)
        name = repeated.partition("=")[0]
        assert twice.json() == {"error": f"query parameter '{name}' given more than once: give it once"}
    # Swagger UI's OAuth2 login page (no OAuth2 here) is no longer served, with its providers' parameters.
    assert client.get("/docs/oauth2-redirect", params={"code": "c", "state": "s"}).status_code == 404
    # Not a route, or not its method: still 404 and 405, whatever the query.
    assert client.put("/stats", params={"x": 1}).status_code == 405
    assert client.get("/nowhere", params={"x": 1}).status_code == 404
    assert gateway.daemon.stats()["received"] == 0
    # What is documented still works, with an empty query too.
    for path in ("/stats", "/healthz", "/metrics", "/openapi.json", "/docs", "/redoc", "/stats?", "/events?limit=5"):
        assert client.get(path).status_code == 200, path
    assert ok(client.get("/topics", params={"after": "a", "limit": 5}))["topics"] == []
    ok(gateway.publish(event()))
    assert ok(client.get("/events", params={"topic": "orders", "after": 0, "limit": 1}))["count"] == 1


@pytest.mark.e2e
def test_publish_takes_only_a_json_content_type(gateway: Gateway) -> None:
    """What a web page of any origin can make a browser POST without a preflight is refused."""
    body = json.dumps(event()).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {} if content_type is None else {"content-type": content_type}
        response = gateway.client.post("/publish", content=body, headers=headers)
        assert response.status_code == 415, (content_type, response.text)
        assert "application/json" in response.json()["error"]
    assert gateway.daemon.stats()["received"] == 0
    for declared in ("iso-8859-1", "utf-16"):
        latin = gateway.client.post(
            "/publish", content=body, headers={"content-type": f"application/json; charset={declared}"}
        )
        assert latin.status_code == 415 and "UTF-8" in latin.json()["error"], latin.text
    # Quoted as the client wrote it (a header value arrives decoded as Latin-1), bytes not UTF-8 as U+FFFD.
    for declared, quoted_back in (("ü".encode(), "'ü'"), (b"\xff", "'\ufffd'")):
        odd = gateway.client.post(
            "/publish", content=body, headers={"content-type": b"application/json; charset=" + declared}
        )
        assert odd.status_code == 415 and f"declared as charset {quoted_back}" in odd.json()["error"], odd.text
    assert gateway.daemon.stats()["received"] == 0
    # Compressed bytes would be refused as JSON in the parser's words; two Content-Types are ambiguous.
    for coding in ("gzip", "identity, br"):
        zipped = gateway.client.post(
            "/publish",
            content=gzip.compress(body),
            headers={"content-type": "application/json", "content-encoding": coding},
        )
        assert zipped.status_code == 415 and "does not decode: send the JSON uncompressed" in zipped.json()["error"]
    twice = gateway.client.post(
        "/publish", content=body, headers=[("content-type", "application/json"), ("content-type", "text/plain")]
    )
    assert twice.status_code == 400 and "Content-Type given 2 times" in twice.json()["error"], twice.text
    assert gateway.daemon.stats()["received"] == 0
    reply = gateway.client.post("/publish", content=body, headers={"content-type": "Application/JSON; charset=utf-8"})
    assert ok(reply)["added_to_queue"] == 1
    plain = gateway.client.post(
        "/publish", content=body, headers={"content-type": "application/json", "content-encoding": "identity"}
    )
    assert ok(plain)["duplicates"] == 1
    quoted = gateway.client.post("/publish", content=body, headers={"content-type": 'application/json; charset="UTF8"'})
    assert ok(quoted)["duplicates"] == 1


@pytest.mark.e2e
def test_an_event_over_max_message_bytes_is_413_and_a_batch_of_smaller_ones_is_split(
    gateway_factory: Callable[..., Gateway],
) -> None:
    """The daemon's socket drops a message over [ingest] max_message_bytes unseen: no retry could succeed."""
    gateway = gateway_factory(ingest={"max_message_bytes": 4096})
    big = event(event_id="big", payload={"text": "x" * 5000})
    response = gateway.publish({"events": [event(), big]})
    assert response.status_code == 413, response.text
    assert "[ingest] max_message_bytes" in response.json()["error"]
    assert response.json()["index"] == 1
    assert gateway.daemon.stats()["received"] == 0
    # Each well within a message, together over it: sent as several batches, all acknowledged.
    batch = [event(event_id=f"m-{i}", payload={"text": "x" * 1500}) for i in range(5)]
    assert ok(gateway.publish({"events": batch}))["added_to_queue"] == 5


@pytest.mark.e2e
def test_batch_of_five_is_added_and_listed(gateway: Gateway) -> None:
    batch = [event(event_id=f"b-{i}", payload={"n": i, "tags": ["x"], "nested": {"ok": True}}) for i in range(5)]
    reply = ok(gateway.publish({"events": batch}))
    assert reply == {
        "status": "ok",
        "received": 5,
        "added_to_queue": 5,
        "duplicates": 0,
        "conflicting": [],
        "rejected": [],
    }
    # Acknowledged means committed: the events are there at once, no waiting.
    page = ok(gateway.client.get("/events", params={"topic": "orders"}))
    assert page["count"] == 5
    assert [e["event_id"] for e in page["events"]] == [f"b-{i}" for i in range(5)]
    assert page["events"][2]["payload"] == {"n": 2, "tags": ["x"], "nested": {"ok": True}}
    assert page["next"] == 5
    # Paging with the cursor: two at a time, then an empty page that keeps the cursor.
    first = ok(gateway.client.get("/events", params={"topic": "orders", "limit": 2}))
    second = ok(gateway.client.get("/events", params={"topic": "orders", "limit": 2, "after": first["next"]}))
    assert [e["event_id"] for e in first["events"] + second["events"]] == ["b-0", "b-1", "b-2", "b-3"]
    done = ok(gateway.client.get("/events", params={"topic": "orders", "after": 5}))
    # first, as the daemon's reply has it: nothing deleted, so the topic's first seq.
    assert done == {"events": [], "count": 0, "next": 5, "first": 1}


@pytest.mark.e2e
def test_events_hold_what_msgpack_stored_as_valid_lossless_json(gateway: Gateway) -> None:
    """A msgpack publisher can store what JSON has no type for; GET /events writes it all."""
    import msgpack

    payload = {
        "ts": msgpack.Timestamp(1700000000, 5),
        "before_1970": msgpack.Timestamp(-100, 0),
        "ext": msgpack.ExtType(5, b"abc"),
        "clash": {1: "a", "1": "b"},
        "ints": {1: "a", 2: "b"},
    }
    frame = msgpack.packb({**event(topic="odd", event_id="o-1"), "payload": payload}, use_bin_type=True)
    push_frames(gateway.daemon.ingest, [frame])
    gateway.daemon.wait_stats(unique_processed=1)
    response = gateway.client.get("/events", params={"topic": "odd"})
    assert response.status_code == 200

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        assert len(keys) == len(set(keys)), f"an object with a repeated key: {keys}"
        return dict(pairs)

    stored = json.loads(response.text, object_pairs_hook=unique_keys)["events"][0]["payload"]
    assert stored == {
        "ts": "2023-11-14T22:13:20.000000005Z",
        "before_1970": "1969-12-31T23:58:20Z",
        "ext": {"ext_type": 5, "data": "YWJj"},
        "clash": [[1, "a"], ["1", "b"]],
        "ints": {"1": "a", "2": "b"},
    }


def nested(depth: int) -> Any:
    """A value ``depth`` levels of objects and arrays deep, alternately."""
    value: Any = 1
    for level in range(depth):
        value = [value] if level % 2 else {"a": value}
    return value


def deep(depth: int) -> Any:
    """A payload nesting ``depth`` objects, its own included."""
    payload: Any = 1
    for _ in range(depth):
        payload = {"a": payload}
    return payload


@pytest.mark.e2e
def test_the_nesting_the_gateway_reads_is_what_its_refusal_and_docs_say(gateway: Gateway) -> None:
    # gateway.md and the 400 say about 970 levels in all under Python 3.11, and 1021 for a payload
    # whatever the Python: 965 goes through in {"events": [...]}, 1022 is refused.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # for the test's own json.dumps
    try:
        taken = json.dumps({"events": [event(topic="deep", payload=deep(965))]}).encode()
        refused = json.dumps(event(topic="deep", event_id="e-2", payload=deep(1022))).encode()
    finally:
        sys.setrecursionlimit(limit)
    assert ok(gateway.client.post("/publish", content=taken, headers=JSON_TYPE))["added_to_queue"] == 1
    answer = gateway.client.post("/publish", content=refused, headers=JSON_TYPE)
    assert answer.status_code == 400, answer.text
    said = answer.json()["error"]
    assert "nest" in said and "1021 levels" in said, said
    docs = (Path(__file__).parent.parent / "docs" / "gateway.md").read_text()
    assert "about 965 levels" in docs and "1021 levels" in docs


def test_a_payload_is_held_to_the_daemons_depth_whatever_the_json_decoder_reads() -> None:
    """Python 3.12 lets msgspec's decoder go deeper than 3.11's recursion limit did (1498 levels;
    3.13 9999): payloads past the daemon's 1021 were sent to be refused, or refused as "cannot be
    encoded as msgpack (recursion limit exceeded.)". A raised recursion limit makes 3.11 read as deep."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        bodies = {depth: json.dumps(event(topic="deep", payload=deep(depth))).encode() for depth in (1021, 1022, 1030)}
        assert len(parse_events(bodies[1021], 10, 1 << 20)) == 1
        for depth in (1022, 1030):  # the daemon's rule, then msgpack's own limit of 1024
            with pytest.raises(GatewayError) as refused:
                parse_events(bodies[depth], 10, 1 << 20)
            assert refused.value.status == 400 and refused.value.body["index"] == 0
            assert "payload nests arrays and maps more than 1021 levels deep" in refused.value.body["error"]
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.e2e
def test_a_null_payload_counts_as_none_as_nil_does(gateway: Gateway) -> None:
    assert ok(gateway.publish(event(event_id="null", payload=None)))["added_to_queue"] == 1
    [stored] = ok(gateway.client.get("/events"))["events"]
    assert stored["event_id"] == "null" and stored["payload"] == {}


@pytest.mark.e2e
def test_a_deeply_nested_payload_is_listed_and_a_too_deep_body_is_400(gateway: Gateway) -> None:
    """Nesting the gateway accepts, it also lists: one such event must not make GET /events fail."""
    payload = nested(501)
    ok(gateway.publish(event(topic="deep", payload=payload)))
    ok(gateway.publish(event(topic="shallow", event_id="e-2")))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # for the test's own json.loads, which recurses per level
    try:
        one = ok(gateway.client.get("/events", params={"topic": "deep"}))
        every = ok(gateway.client.get("/events"))
    finally:
        sys.setrecursionlimit(limit)
    assert one["events"][0]["payload"] == payload
    assert [e["event_id"] for e in every["events"]] == ["e-1", "e-2"]
    assert every["events"][0]["payload"] == payload
    text = b"[" * 100_000 + b"]" * 100_000
    too_deep = gateway.client.post("/publish", content=text, headers=JSON_TYPE)
    assert too_deep.status_code == 400, too_deep.text
    assert "too deeply" in too_deep.json()["error"]


@pytest.mark.e2e
def test_three_topics_make_total_topics_at_least_three(gateway: Gateway) -> None:
    for topic in ("alpha", "beta", "gamma"):
        assert ok(gateway.publish(event(topic=topic)))["added_to_queue"] == 1
    stats = ok(gateway.client.get("/stats"))
    assert stats["total_topics"] >= 3
    assert stats["total_topics"] == stats["topic_count"]
    assert stats["uptime"].endswith("s") and float(stats["uptime"][:-1]) > 0
    topics = ok(gateway.client.get("/topics"))["topics"]
    assert [t["topic"] for t in topics] == ["alpha", "beta", "gamma"]
    assert ok(gateway.client.get("/topics", params={"limit": 2})) == {"topics": topics[:2], "next": "beta"}
    assert ok(gateway.client.get("/topics", params={"after": "beta"})) == {"topics": topics[2:], "next": "gamma"}
    misspelt = gateway.client.get("/topics", params={"afterr": "beta"})
    assert misspelt.status_code == 400 and "afterr" in misspelt.text, misspelt.text
    # Without a topic, /events lists every topic in commit order.
    assert {e["topic"] for e in ok(gateway.client.get("/events"))["events"]} == {"alpha", "beta", "gamma"}


@pytest.mark.e2e
def test_events_are_listed_in_timestamp_order(gateway: Gateway) -> None:
    seconds = list(range(20))
    random.Random(7).shuffle(seconds)
    batch = [event(topic="t", event_id=f"s{s}", timestamp=f"2025-10-22T10:00:{s:02d}Z") for s in seconds]
    assert ok(gateway.publish({"events": batch}))["added_to_queue"] == 20
    listed = ok(gateway.client.get("/events", params={"topic": "t"}))["events"]
    assert [e["timestamp"] for e in listed] == [f"2025-10-22T10:00:{s:02d}Z" for s in range(20)]
    assert [e["seq"] for e in listed] == list(range(1, 21))


@pytest.mark.e2e
def test_duplicates_are_counted(gateway: Gateway) -> None:
    assert ok(gateway.publish({"events": [event(event_id=f"d-{i}") for i in range(3)]}))["added_to_queue"] == 3
    again = ok(gateway.publish({"events": [event(event_id=f"d-{i}") for i in range(5)]}))
    assert (again["received"], again["added_to_queue"], again["duplicates"]) == (5, 2, 3)
    twice_in_one = ok(gateway.publish({"events": [event(event_id="x"), event(event_id="x")]}))
    assert (twice_in_one["added_to_queue"], twice_in_one["duplicates"]) == (1, 1)
    stats = ok(gateway.client.get("/stats"))
    assert (stats["unique_processed"], stats["duplicate_dropped"]) == (6, 4)
    assert ok(gateway.client.get("/events"))["count"] == 6


# -- metrics and health --------------------------------------------------------------------------

METRICS = {  # exposed sample name -> stats key
    "eventagg_received_total": "received",
    "eventagg_unique_processed_total": "unique_processed",
    "eventagg_duplicate_dropped_total": "duplicate_dropped",
    "eventagg_rejected_total": "rejected",
    "eventagg_late_total": "late",
    "eventagg_conflicting_duplicates_total": "conflicting_duplicates",
    "eventagg_expired_total": "expired",
    "eventagg_refused_total": "refused",
    "eventagg_in_flight": "in_flight",
    "eventagg_stored": "stored",
    "eventagg_topics": "topic_count",
    "eventagg_uptime_seconds": "uptime_s",
}
GATEWAY_METRICS = {"eventagg_gateway_open_streams", "eventagg_gateway_max_streams"}


def scrape(gateway: Gateway) -> dict[str, tuple[float, str]]:
    """Every sample of GET /metrics: name -> (value, HELP text), parsed with prometheus_client's parser."""
    response = gateway.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name] = (sample.value, family.documentation)
    return samples


@pytest.mark.e2e
def test_metrics_are_the_stats(gateway: Gateway) -> None:
    ok(gateway.publish({"events": [event(topic=f"m{i % 2}", event_id=str(i)) for i in range(7)]}))
    ok(gateway.publish({"events": [event(topic="m0", event_id="0")]}))
    gateway.daemon.wait_idle()
    samples = scrape(gateway)
    stats = ok(gateway.client.get("/stats"))
    assert set(samples) == {*METRICS, *GATEWAY_METRICS, "eventagg_up"}
    assert samples["eventagg_up"][0] == 1
    for name, key in METRICS.items():
        value, help_text = samples[name]
        assert help_text, f"{name} has no HELP text"
        if key == "uptime_s":
            assert 0 < value <= stats[key]
        elif key == "received":
            assert value == stats["received"] - stats["in_flight"], name
        else:
            assert value == stats[key], name
    assert samples["eventagg_received_total"][0] == 8
    assert samples["eventagg_duplicate_dropped_total"][0] == 1
    assert samples["eventagg_topics"][0] == 2


@pytest.mark.e2e
def test_the_rejected_help_says_a_message_refused_whole_counts_one(daemon_factory: Callable[..., Daemon]) -> None:
    """A batch over max_batch_events is refused whole and counted once: a HELP text saying the
    counter counts refused events had 11 events refused read as 1."""
    from transport.metrics import render

    daemon = daemon_factory(ingest={"max_batch_events": 10}).start()
    event = {"topic": "t", "event_id": "x", "timestamp": "2025-10-22T10:00:00Z", "source": "s"}
    push_frames(daemon.ingest, [msgpack.packb([event] * 11), msgpack.packb({**event, "event_id": 5})])
    stats = daemon.wait_stats(rejected=2)
    (help_text,) = [
        f.documentation for f in text_string_to_metric_families(render(stats).decode()) if f.name == "eventagg_rejected"
    ]
    assert "refused whole" in help_text and "counts one" in help_text, help_text


@pytest.mark.e2e
def test_the_received_counter_never_goes_back_when_a_daemon_is_killed(daemon_factory: Callable[..., Daemon]) -> None:
    """The stats' ``received`` counts events in flight; the daemon killed, it came back lower, and
    Prometheus took the drop for a reset: an increase of everything ever received."""
    from transport.metrics import render

    def received_total(stats: dict[str, Any]) -> float:
        (sample,) = [
            s.value
            for f in text_string_to_metric_families(render(stats).decode())
            for s in f.samples
            if s.name == "eventagg_received_total"
        ]
        return float(sample)

    hooks = {**os.environ, "EVENTAGG_TEST_HOOKS": "1"}
    daemon = daemon_factory().start(env=hooks)
    publish(daemon.ingest, "--events", "2000")
    daemon.wait_stats(received=2000, in_flight=0)
    # Nothing commits until the kill below ends it: long enough for the publish command, which
    # the full suite's load once kept starting past a 5 s freeze (the 500 then committed).
    assert "error" not in daemon.request({"op": "debug_freeze", "actor": "dedup", "seconds": 60})
    publish(daemon.ingest, "--events", "500", "--id-prefix", "more-")
    before = eventually(lambda: s if (s := daemon.stats())["in_flight"] == 500 else None, 10, "500 in flight")
    assert before["received"] == 2500 and received_total(before) == 2000, before
    daemon.kill()
    daemon.start()
    assert received_total(daemon.wait_idle()) == 2000


@pytest.mark.e2e
def test_metrics_give_each_named_consumers_position_and_lag(gateway: Gateway) -> None:
    from transport.subscriber import Subscriber

    ok(gateway.publish({"events": [event(topic="lagging", event_id=str(i)) for i in range(6)]}))
    gateway.daemon.wait_idle()
    with Subscriber(gateway.daemon.subscribe, "lagging", name="slow", credit=2) as slow:
        assert [slow.next_event(10)["seq"] for _ in range(2)] == [1, 2]  # type: ignore[index]
    with Subscriber(gateway.daemon.subscribe, name="everything", credit=5) as everything:
        assert [everything.next_event(10)["position"] for _ in range(5)] == [1, 2, 3, 4, 5]  # type: ignore[index]
    eventually(lambda: len(gateway.daemon.request({"op": "consumers"})["consumers"]) == 2, 10, "positions stored")
    response = gateway.client.get("/metrics")
    labelled = {
        (sample.name, sample.labels["consumer"], sample.labels["topic"]): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if family.name.startswith("eventagg_consumer_")
    }
    assert labelled == {
        ("eventagg_consumer_lag", "slow", "lagging"): 4,
        ("eventagg_consumer_position", "slow", "lagging"): 2,
        ("eventagg_consumer_lag", "everything", ""): 1,
        ("eventagg_consumer_position", "everything", ""): 5,
    }


@pytest.mark.e2e
def test_head_answers_like_get_without_a_body(gateway: Gateway) -> None:
    head = gateway.client.head("/healthz")
    assert head.status_code == 200 and head.content == b"", head.text
    for path in ("/events", "/stats", "/topics", "/metrics", "/openapi.json"):
        got = gateway.client.get(path)
        head = gateway.client.head(path)
        assert (head.status_code, head.content) == (200, b""), (path, head.status_code, head.text)
        assert head.headers["content-type"] == got.headers["content-type"], path
    assert gateway.client.head("/events", params={"limit": 0}).status_code == 400
    assert gateway.client.head("/publish").status_code == 405
    gateway.daemon.terminate()
    away = gateway.client.head("/healthz")
    assert away.status_code == 503 and away.content == b""


@pytest.mark.e2e
def test_daemon_away_gives_503_in_time_and_the_gateway_recovers(gateway: Gateway) -> None:
    assert ok(gateway.client.get("/healthz"))["status"] == "ok"
    assert ok(gateway.publish(event(event_id="before")))["added_to_queue"] == 1
    gateway.daemon.terminate()

    health = gateway.client.get("/healthz")
    assert health.status_code == 503 and "did not answer" in health.json()["reason"]
    started = time.monotonic()
    refused = gateway.publish(event(event_id="while-away"))
    took = time.monotonic() - started
    assert refused.status_code == 503, refused.text
    assert "not answering" in refused.json()["error"]
    assert took < TIMEOUT_MS / 1000 + 1.5, f"answered after {took:.1f} s, over the {TIMEOUT_MS} ms timeout"
    samples = scrape(gateway)  # each scrape waits the timeout for the daemon
    assert samples.keys() == {*GATEWAY_METRICS, "eventagg_up"} and samples["eventagg_up"][0] == 0
    assert gateway.client.get("/stats").status_code == 503
    assert gateway.proc is not None and gateway.proc.poll() is None  # the gateway itself keeps running

    gateway.daemon.start()
    eventually(lambda: gateway.client.get("/healthz").status_code == 200, 30, "healthz 200 after the restart")
    assert ok(gateway.publish(event(event_id="after")))["added_to_queue"] == 1
    # The refused event may or may not have been stored; publishing it again is safe either way.
    again = ok(gateway.publish(event(event_id="while-away")))
    assert again["added_to_queue"] + again["duplicates"] == 1
    assert scrape(gateway)["eventagg_up"][0] == 1
    ids = {e["event_id"] for e in ok(gateway.client.get("/events"))["events"]}
    assert ids == {"before", "after", "while-away"}


def connections_to(pid: int, port: int) -> int:
    """How many established TCP connections process ``pid`` holds to ``port`` (its sockets, matched
    by inode with its network namespace's table)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], fields[9]
            found += state == "01" and int(remote.rsplit(":", 1)[1], 16) == port and inode in inodes
    return found


@pytest.mark.e2e
def test_a_pooled_query_client_left_idle_is_closed_and_the_next_query_makes_another(
    gateway_factory: Callable[..., Gateway],
) -> None:
    """An idle pooled client holds descriptors, and its monitor grows while something cuts its
    handshakes: after QUERY_CLIENT_IDLE_S (1 s here) unused it is closed, and queries still work."""
    gateway = gateway_factory(constants={"QUERY_CLIENT_IDLE_S": 1.0})
    assert gateway.proc is not None
    port = int(gateway.daemon.query.rsplit(":", 1)[1])
    pid = gateway.proc.pid

    assert ok(gateway.client.get("/healthz"))["status"] == "ok"
    assert connections_to(pid, port) >= 1  # the client went back to the pool, connected
    eventually(lambda: connections_to(pid, port) == 0, 10, "the idle query client closed", detail=lambda: gateway.log())

    assert ok(gateway.client.get("/stats"))["total_topics"] == 0
    assert connections_to(pid, port) >= 1
    assert "Traceback" not in gateway.log()


@pytest.mark.e2e
def test_queries_answer_within_the_timeout_even_when_many_wait(gateway_factory: Callable[..., Gateway]) -> None:
    """64 health checks at once against a stopped daemon: more than the gateway's query slots, so
    most wait for one; each still gets its 503 within request_timeout_ms (plus HTTP's own time)."""
    gateway = gateway_factory(start_daemon=False, http={"request_timeout_ms": 1000})
    together = threading.Barrier(64)

    def check(_: int) -> tuple[int, float]:
        with httpx.Client(base_url=gateway.url, timeout=30.0) as client:
            client.get("/nowhere")  # connected first: only the health check is timed
            together.wait(30)
            started = time.monotonic()
            status = client.get("/healthz").status_code
            return status, time.monotonic() - started

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(check, range(64)))
    assert {status for status, _ in answers} == {503}
    # Without the slot wait counted, the last of the 64 waited for 4 rounds of 16 (about 4 s).
    slowest = max(took for _, took in answers)
    assert slowest < 1.0 + 1.5, f"the slowest answer took {slowest:.2f} s, over the 1 s timeout"


@pytest.mark.e2e
def test_a_slow_daemon_gives_504(gateway_factory: Callable[..., Gateway]) -> None:
    """The daemon answers queries but its writer is frozen: no acknowledgement, so 504, not 503."""
    gateway = gateway_factory()
    daemon = gateway.daemon
    daemon.terminate()
    daemon.start(env={**__import__("os").environ, "EVENTAGG_TEST_HOOKS": "1"})
    frozen = daemon.request({"op": "debug_freeze", "actor": "dedup", "seconds": 6})
    assert "error" not in frozen, frozen
    started = time.monotonic()
    response = gateway.publish(event(event_id="slow"))
    took = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert "did not acknowledge" in response.json()["error"]
    assert took < TIMEOUT_MS / 1000 + 1.5


@pytest.mark.e2e
def test_busy_publishers_give_503_with_nothing_sent(gateway_factory: Callable[..., Gateway]) -> None:
    """One publisher, each acknowledgement a second away (the reorder window): of four publishes
    at once, the later ones find it busy. A 503 says nothing was sent, and indeed nothing was;
    a 504 names how long the events waited since they were sent, within the timeout."""
    gateway = gateway_factory(http={"publishers": 1, "request_timeout_ms": 3000}, ordering={"window_ms": 1000})

    def publish(i: int) -> httpx.Response:
        with httpx.Client(base_url=gateway.url, timeout=30.0) as client:
            return client.post("/publish", json=event(topic=f"busy{i}", event_id=f"busy-{i}"))

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(publish, range(4)))
    statuses = [answer.status_code for answer in answers]
    assert 200 in statuses, [answer.text for answer in answers]
    not_sent = [i for i, answer in enumerate(answers) if answer.status_code == 503]
    assert not_sent, [answer.text for answer in answers]
    for i in not_sent:
        assert "nothing was sent: publishing again is safe" in answers[i].json()["error"], answers[i].text
    for answer in answers:
        assert answer.status_code in (200, 503, 504), answer.text
        if answer.status_code == 504:
            waited = float(answer.json()["error"].split("within ")[1].split(" s")[0])
            assert waited < 3.0, answer.text
    gateway.daemon.wait_idle()
    stored = {e["event_id"] for e in ok(gateway.client.get("/events"))["events"]}
    assert not stored & {f"busy-{i}" for i in not_sent}, stored


@pytest.mark.e2e
def test_a_budget_too_short_to_send_says_so(gateway_factory: Callable[..., Gateway]) -> None:
    """With no time left to wait for an acknowledgement, the 503 blames the budget, not busy publishers."""
    gateway = gateway_factory(http={"request_timeout_ms": 1})
    response = gateway.publish(event())
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert "time budget ran out before sending" in error and "nothing was sent" in error
    assert "busy" not in error and " 0.0 s" not in error
    assert gateway.daemon.stats()["received"] == 0


@pytest.mark.e2e
def test_a_body_that_stalls_gets_a_503_in_time_and_a_client_gone_mid_body_no_traceback(
    gateway_factory: Callable[..., Gateway],
) -> None:
    """A client that stops sending mid-body is answered when the request's budget runs out (it was
    never answered), and one that hangs up mid-body is logged in one line, not a traceback."""
    gateway = gateway_factory(http={"request_timeout_ms": 1000})
    host, port = gateway.url.removeprefix("http://").split(":")
    head = b"POST /publish HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as stalled:
        stalled.sendall(head + b'{"a":')
        started = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = stalled.recv(4096)
            if not chunk:
                break
            answer += chunk
        assert time.monotonic() - started < 5
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b"time budget ran out before sending" in answer and b"5 bytes came" in answer
    with socket.create_connection((host, int(port)), timeout=10) as gone:
        gone.sendall(head + b'{"a":')
        time.sleep(0.3)
    eventually(lambda: "closed its connection before sending the whole body" in gateway.log(), 5, gateway.log())
    assert "Traceback" not in gateway.log()
    assert gateway.daemon.stats()["received"] == 0


@pytest.mark.e2e
def test_a_response_sent_before_its_request_body_had_all_come_closes_the_connection(
    gateway_factory: Callable[..., Gateway],
) -> None:
    """A body sent a byte every few seconds held the connection for ever: after the response,
    the rest of the body was read and dropped, and each byte put off the keep-alive timeout."""
    gateway = gateway_factory(http={"request_timeout_ms": 1000, "max_body_bytes": 1000})
    host, port = gateway.url.removeprefix("http://").split(":")
    heads = [
        b"GET /stats HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000000000\r\n\r\n",  # never read
        b"POST /publish HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{",  # 503 once the request's time runs out
        b"POST /publish HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n",  # 413, the body never sent
    ]
    for head, status in zip(heads, (b"200", b"503", b"413")):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head)
            answer = read_response(sock)
            assert answer.startswith(b"HTTP/1.1 " + status), answer
            assert b"\r\nconnection: close\r\n" in answer.partition(b"\r\n\r\n")[0] + b"\r\n", answer  # not reused
            started = time.monotonic()
            try:
                sock.sendall(b"x")  # a byte of the body, as a dripping client sends it
                closed = sock.recv(4096) == b""
            except ConnectionResetError:  # closed with the byte unread
                closed = True
            assert closed and time.monotonic() - started < 3, "the connection stayed open"
    body = json.dumps(event()).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:  # a whole body keeps the connection
        for _ in range(2):
            sock.sendall(
                b"POST /publish HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /stats HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")


@pytest.mark.e2e
def test_headers_past_a_mebibyte_get_431_and_the_connection_is_closed(gateway: Gateway) -> None:
    """httptools bounds no header's size: 8 connections of 30 MB headers took the gateway from 76
    to 418 MB."""
    from transport.http_protocol import MAX_HEAD_BYTES

    host, port = gateway.url.removeprefix("http://").split(":")
    line = b"X-Pad: " + b"a" * 8000 + b"\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /stats HTTP/1.1\r\nHost: localhost\r\n" + line * 100 + b"\r\n")  # 800 KB: served
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        # Up to just under the bound, then the rest and the blank line that ends the headers in
        # one read (the first cut let a head ending in such a read through), then nothing: a byte
        # the server has not read when it refuses would reset the connection, and the answer with it.
        head = b"GET /stats HTTP/1.1\r\nHost: localhost\r\n" + line * (MAX_HEAD_BYTES // len(line) + 1) + b"\r\n"
        cut = MAX_HEAD_BYTES - 100
        sock.sendall(head[:cut])
        time.sleep(0.3)  # all of it read, and under the bound
        sock.sendall(head[cut:])
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 431 ") and b"send shorter ones" in answer, answer[:300]
    assert b"application/json" in answer


@pytest.mark.e2e
def test_a_request_httptools_cannot_parse_gets_a_json_400(gateway: Gateway) -> None:
    host, port = gateway.url.removeprefix("http://").split(":")
    for request in (
        b"BREW /stats HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"POST /publish HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n",
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(request)
            answer = read_response(sock)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ") and b"application/json" in head, answer[:300]
        assert "not a well-formed HTTP/1.1 request" in json.loads(body)["error"]


@pytest.mark.e2e
def test_a_405_allows_every_method_the_path_takes(gateway: Gateway) -> None:
    # RFC 9110: Allow lists them all; /healthz said HEAD alone (its first route), /stats GET alone.
    for path, allowed in (
        ("/healthz", "GET, HEAD"),
        ("/stats", "GET, HEAD"),
        ("/events/stream", "GET"),
        ("/publish", "POST"),
        ("/openapi.json", "GET, HEAD"),  # FastAPI's own routes, which said "Allow: " (none)
    ):
        refused = gateway.client.put(path)
        assert (refused.status_code, refused.headers["allow"]) == (405, allowed), (path, refused.headers)
        assert refused.json()["error"] == f"PUT is not allowed on {path}: it takes {allowed}"


def test_an_origin_is_the_gateways_own_or_one_listed_and_null_never() -> None:
    """Which Origin may open an event stream: compared in lower case, without a default port."""
    from transport.gateway import allowed_origins, foreign_origin

    listed = allowed_origins(parse_config({"http": {"allowed_origins": ["https://App.example.com:443"]}}))
    assert listed == {"https://app.example.com"}
    for origin, host in (
        (None, "localhost:8080"),  # not a browser
        ("http://localhost:8080", "localhost:8080"),
        ("https://events.example.com", "events.example.com"),  # behind a TLS proxy passing Host on
        ("http://events.example.com", "events.example.com:80"),
        ("HTTPS://app.example.com", None),
    ):
        assert foreign_origin(origin, host, listed) is None, origin
    for origin, host in (
        ("http://localhost:8081", "localhost:8080"),
        ("http://localhost", "localhost:8080"),
        ("https://evil.example", "localhost:8080"),
        ("http://app.example.com", None),
        ("null", "localhost:8080"),
    ):
        refusal = foreign_origin(origin, host, listed)
        assert refusal is not None and "[http] allowed_origins" in refusal, origin
    assert "no origin (Origin: null" in (foreign_origin("null", "x", listed) or "")
    anyone = allowed_origins(parse_config({"http": {"allowed_origins": ["*"]}}))
    assert anyone is None and foreign_origin("null", "localhost:8080", anyone) is None


@pytest.mark.e2e
def test_a_trailing_slash_gets_a_json_404_naming_the_route_not_a_bodiless_redirect(gateway: Gateway) -> None:
    """GET /events/ got Starlette's 307 to /events, with no body: no JSON for a JSON client."""
    client = gateway.client
    for response, meant in (
        (client.get("/events/"), "/events"),
        (client.get("/stats/", params={"x": 1}), "/stats"),
        (client.get("/events/stream/"), "/events/stream"),
        (client.post("/publish/", json=event()), "/publish"),
        (client.options("/topics/"), "/topics"),
        (client.get("/healthz//"), "/healthz"),
    ):
        path = response.request.url.path
        assert response.status_code == 404, (path, response.status_code, response.headers)
        assert response.json() == {"error": f"no route {path}: did you mean {meant}? (without the trailing slash)"}
    head = client.head("/metrics/")
    assert (head.status_code, head.content) == (404, b""), head.headers
    assert client.get("/nowhere/").json() == {"error": "no route /nowhere/: the routes are listed in /openapi.json"}
    long = "/" + "x" * 60_000  # quoted back cut short, not whole
    error = client.get(long).json()["error"]
    assert error == f"no route {long[:200]}... (60001 characters): the routes are listed in /openapi.json"
    assert gateway.daemon.stats()["received"] == 0


def read_response(sock: socket.socket) -> bytes:
    """One HTTP response with a Content-Length (or what came before the connection closed)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _content_length(data):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _content_length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@pytest.mark.e2e
def test_headers_that_do_not_all_arrive_in_time_get_a_408_and_the_connection_is_closed(
    gateway_factory: Callable[..., Gateway],
) -> None:
    """A connection that sends nothing, or half a request, was held open for ever (uvicorn has no
    header timeout); each request's headers now have [http] header_timeout_ms to arrive."""
    gateway = gateway_factory(http={"header_timeout_ms": 600})
    host, port = gateway.url.removeprefix("http://").split(":")
    for sent in (b"", b"GET /stats HTTP/1.1\r\nHost: localhost\r\nAccept: appl"):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(sent)
            answer = read_response(sock)
            took = time.monotonic() - started
            assert sock.recv(4096) == b"", "the connection stayed open"
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"[http] header_timeout_ms" in answer and 0.5 < took < 5, (answer, took)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /stats HTTP/1.1\r\nHost: localhost\r\n")
        time.sleep(0.3)  # slow, but within the deadline: answered
        sock.sendall(b"\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        time.sleep(0.4)  # the next request has a deadline of its own, from its first byte
        sock.sendall(b"GET /stats HTTP/1.1\r\nHost: localhost\r\n")
        time.sleep(0.3)
        sock.sendall(b"\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /sta")
        assert read_response(sock).startswith(b"HTTP/1.1 408 ")
    assert "Traceback" not in gateway.log()


@pytest.mark.e2e
def test_a_client_that_reads_none_of_its_response_is_dropped_after_write_timeout_ms(
    gateway_factory: Callable[..., Gateway],
) -> None:
    """A client that asked for pages of events and read none held each page in the gateway for as
    long as it kept its connection: 40 such clients grew it from 57 to 235 MB, for good."""
    from transport.publisher import Publisher

    gateway = gateway_factory(http={"write_timeout_ms": 1000})
    with Publisher(gateway.daemon.ack, acked=True) as publisher:
        for n in range(1000):
            publisher.publish(event(topic="t", event_id=f"e{n}", payload={"x": "x" * 4000}))
    gateway.daemon.wait_stats(unique_processed=1000)
    host, port = gateway.url.removeprefix("http://").split(":")
    stalled = []
    for _ in range(5):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(b"GET /events?limit=1000 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        stalled.append(sock)
    time.sleep(3)  # none of them reads: each is dropped a second after its buffers filled
    for sock in stalled:
        sock.settimeout(10)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        finally:
            sock.close()
        head, _, body = got.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        assert 0 < len(body) < length, f"{len(body)} bytes of {length}: the response was not given up"
    # A client that reads, however slowly it started, gets all of it.
    assert len(gateway.client.get("/events", params={"limit": 1000}).json()["events"]) == 1000
    assert "Traceback" not in gateway.log()


def _make_keys(tmp_path: Path, client: str) -> tuple[Path, Path]:
    """A server key pair and ``client``'s, authorized, made by the keys command: (keys folder, authorized folder)."""
    folder, authorized = tmp_path / "keys", tmp_path / "authorized"
    for args in (("server", str(folder)), ("client", client, str(folder), "--authorize", str(authorized))):
        result = run_script("keys.py", *args, timeout=30)
        assert result.returncode == 0, result.stderr
    return folder, authorized


def _curve_gateway(gateway_factory: Callable[..., Gateway], tmp_path: Path) -> Gateway:
    """A gateway and its daemon speaking CURVE (the gateway's key authorized), both answering."""
    folder, authorized = _make_keys(tmp_path, "gateway")
    security = {
        "curve_secret_key": str(folder / "server.key_secret"),
        "authorized_keys": str(authorized),
        "client_certificate": str(folder / "gateway.key_secret"),
    }
    gateway = gateway_factory(start_daemon=False, security=security)
    assert gateway.daemon.proc is None
    gateway.daemon.start(wait=False)
    eventually(lambda: gateway.client.get("/healthz").status_code == 200, 30, "healthz 200 over CURVE")
    return gateway


@pytest.mark.e2e
def test_curve_when_the_config_says_so(gateway_factory: Callable[..., Gateway], tmp_path: Path) -> None:
    gateway = _curve_gateway(gateway_factory, tmp_path)
    assert ok(gateway.publish(event(event_id="secret")))["added_to_queue"] == 1
    assert [e["event_id"] for e in ok(gateway.client.get("/events"))["events"]] == ["secret"]
    stream = Stream(gateway)  # the stream's subscription speaks CURVE too
    try:
        assert stream.next()["data"]["event_id"] == "secret"
    finally:
        stream.close()


@pytest.mark.e2e
def test_a_daemon_that_starts_refusing_the_gateway_is_named_so_in_its_503s(
    gateway_factory: Callable[..., Gateway], tmp_path: Path
) -> None:
    """A daemon restarted with CURVE behind a gateway without keys: its queries were answered 503
    "did not answer within 2 s", at once and naming no cause."""
    folder, authorized = _make_keys(tmp_path, "alice")
    gateway = gateway_factory()
    daemon = gateway.daemon
    assert gateway.client.get("/stats").status_code == 200
    daemon.terminate()
    with daemon.config_path.open("a") as config:
        config.write(f"\n[security]\ncurve_secret_key = '{folder / 'server.key_secret'}'\n")
        config.write(f"authorized_keys = '{authorized}'\n")
    daemon.start(wait=False)

    def refused() -> bool:
        answer = gateway.client.get("/stats")
        assert answer.status_code == 503, answer.text
        return "the daemon does not take this gateway's connections" in answer.json()["error"]

    eventually(refused, 30, "a 503 naming the refusal")
    assert "security handshake failed" in gateway.client.get("/stats").json()["error"]
    assert "Traceback" not in gateway.log()


@pytest.mark.e2e
def test_a_gateway_whose_key_is_revoked_answers_503_naming_it_and_serves_again_once_restored(
    gateway_factory: Callable[..., Gateway], tmp_path: Path
) -> None:
    """The gateway's key removed from the daemon's authorized folder (and SIGHUP): a publish on
    its pooled connection was answered 502 ("refused the events"), every later one 504 "the
    daemon answers queries but did not acknowledge ... (overloaded?)", the probe taking the
    daemon's revocation error to its stats query for an answer."""
    gateway = _curve_gateway(gateway_factory, tmp_path)
    daemon = gateway.daemon
    authorized = tmp_path / "authorized"  # the folder _curve_gateway authorized the gateway in
    assert ok(gateway.publish(event(event_id="before")))["added_to_queue"] == 1
    live = Stream(gateway)
    assert live.next()["data"]["event_id"] == "before"
    (authorized / "gateway.key").rename(tmp_path / "gateway.key")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    eventually(lambda: "1 revoked" in daemon.log(), 15, "the revocation to be logged")
    try:  # a stream open at the revocation ends, saying why
        told = live.next()
        assert told["event"] == "error" and "no longer authorized" in told["data"]["error"], told
    finally:
        live.close()
    # A stream asked for now was answered 200 and then kept open, silent, for ever.
    with gateway.client.stream("GET", "/events/stream", timeout=httpx.Timeout(20.0)) as refused:
        assert refused.status_code == 503, refused.status_code
        assert "refused this client's CURVE key" in refused.read().decode(), refused.text
    for attempt in range(3):  # on the pooled connection, then on new ones the daemon refuses
        published = gateway.publish(event(event_id=f"revoked-{attempt}"))
        assert published.status_code == 503, (attempt, published.text)
        assert (
            "no longer authorized" in published.json()["error"]
            or "refused this client's CURVE key" in (published.json()["error"])
        ), (attempt, published.text)
        assert "publishing again once it does is safe" in published.json()["error"], published.text
        answer = gateway.client.get("/stats")
        assert answer.status_code == 503 and "no longer authorized" in answer.json()["error"], answer.text
    (tmp_path / "gateway.key").rename(authorized / "gateway.key")
    daemon.proc.send_signal(signal.SIGHUP)
    eventually(lambda: daemon.log().count("reloaded") >= 2, 15, "the key to be authorized again")
    eventually(lambda: gateway.publish(event(event_id="after")).status_code == 200, 15, "a publish served again")
    assert [e["event_id"] for e in ok(gateway.client.get("/events"))["events"]] == ["before", "after"]
    assert "Traceback" not in gateway.log()


@pytest.mark.e2e
def test_a_gateway_whose_key_the_daemon_refuses_says_so_at_start(
    gateway_factory: Callable[..., Gateway], tmp_path: Path
) -> None:
    folder, authorized = tmp_path / "keys", tmp_path / "authorized"
    for args in (("server", str(folder)), ("client", "gateway", str(folder))):  # not authorized
        result = run_script("keys.py", *args, timeout=30)
        assert result.returncode == 0, result.stderr
    authorized.mkdir(mode=0o700)
    security = {
        "curve_secret_key": str(folder / "server.key_secret"),
        "authorized_keys": str(authorized),
        "client_certificate": str(folder / "gateway.key_secret"),
    }
    gateway = gateway_factory(start_daemon=False, security=security)  # (the harness's readiness check is plain)
    daemon = gateway.daemon
    daemon.start(wait=False)  # within the gateway's start-up check, which waits for it
    refused = "refused this client's CURVE key (ZAP status 400)"
    for endpoint in (daemon.ack, daemon.query):
        words = f"cannot reach the daemon: {endpoint} {refused}"
        eventually(lambda words=words: words in gateway.log(), 15, f"the gateway to log {words!r}")
    # The hint names the gateway's config keys, not the command-line tools' flags it does not have.
    assert "or point [security] client_certificate at an authorized certificate" in gateway.log()
    assert "--client-cert" not in gateway.log()
    # Requests say the key was refused, not that the daemon may not be running.
    health = gateway.client.get("/healthz")
    assert health.status_code == 503 and f"{daemon.query} {refused}" in health.json()["reason"], health.text
    published = gateway.publish(event(event_id="refused"))
    assert published.status_code == 503 and f"{daemon.ack} {refused}" in published.json()["error"], published.text
    assert "is it running" not in published.json()["error"]
    # The daemon names the socket of each refusal.
    for socket_name in ("acknowledged ingest", "query"):
        words = f"refused a client on the {socket_name} socket: key not authorized"
        eventually(lambda words=words: words in daemon.log(), 15, f"the daemon to log {words!r}")


@pytest.mark.e2e
def test_the_start_up_check_waits_for_both_endpoints_at_once(gateway_factory: Callable[..., Gateway]) -> None:
    """With no daemon, each endpoint's check gives up after 10 s; both warnings come within
    that, not one 10 s after the other."""
    gateway = gateway_factory(start_daemon=False)
    started = time.monotonic()
    eventually(
        lambda: gateway.log().count("accepted no connection within 10 s") == 2,
        25,
        "both start-up warnings",
        detail=gateway.log,
    )
    assert time.monotonic() - started < 15, gateway.log()


# -- the OpenAPI document, fuzzed -----------------------------------------------------------------


@pytest.mark.e2e
def test_openapi_lists_every_route(gateway: Gateway) -> None:
    paths = ok(gateway.client.get("/openapi.json"))["paths"]
    assert set(paths) >= {"/publish", "/events", "/events/stream", "/stats", "/topics", "/metrics", "/healthz"}
    assert "post" in paths["/publish"] and "requestBody" in paths["/publish"]["post"]


# What each route can answer, from its code: the OpenAPI document must list exactly these.
ANSWERS = {
    ("post", "/publish"): {"200", "400", "413", "415", "502", "503", "504", "421"},
    ("get", "/events"): {"200", "400", "502", "503", "421"},
    ("get", "/events/stream"): {"200", "400", "403", "503", "421"},
    ("get", "/stats"): {"200", "400", "502", "503", "421"},
    ("get", "/topics"): {"200", "400", "502", "503", "421"},
    ("get", "/healthz"): {"200", "400", "503", "421"},
    ("head", "/healthz"): {"200", "400", "503", "421"},
    ("get", "/metrics"): {"200", "400", "421"},
}


def documented_answers(document: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    return {
        (method, path): set(operation["responses"])
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    }


def test_openapi_lists_the_answers_each_route_can_give() -> None:
    from transport.gateway import create_app

    document = create_app(parse_config({})).openapi()
    assert documented_answers(document) == ANSWERS
    assert "HTTPValidationError" not in document.get("components", {}).get("schemas", {})


def test_openapi_says_a_stored_payload_may_be_an_array_of_pairs() -> None:
    """A map whose keys clash as strings is written as [key, value] pairs, payload included."""
    from transport.gateway import create_app

    document = create_app(parse_config({})).openapi()
    payload = document["components"]["schemas"]["StoredEvent"]["properties"]["payload"]
    assert {option["type"] for option in payload["anyOf"]} == {"object", "array"}
    assert "[key, value]" in payload["description"]


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_fuzzing_the_openapi_document_finds_no_server_error(gateway: Gateway) -> None:
    """schemathesis generates requests from the gateway's own OpenAPI document, valid and not: none gets a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")
    # Not the event stream: an answer that never ends would hold each case for its whole timeout
    # (tests/test_gateway_stream.py covers its refusals).
    operations = [result.ok() for result in schema.get_all_operations()]
    operations = [operation for operation in operations if operation.path != "/events/stream"]
    assert len(operations) >= 6
    # Positive cases follow the document (valid events reach the daemon); negative ones break it.
    strategy = st.one_of(
        [operation.as_strategy(mode) for operation in operations for mode in schemathesis.GenerationMode]
    )
    seen: Counter[tuple[str, int]] = Counter()
    budget_end = time.monotonic() + 45  # bounded in time whatever hypothesis decides

    @settings(
        max_examples=300,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def no_server_error(case: Any) -> None:
        if time.monotonic() > budget_end:
            return
        response = case.call(base_url=gateway.url, timeout=10)
        seen[(f"{case.method} {case.path}", response.status_code)] += 1
        assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text}"

    no_server_error()
    # Every answer seen is one the document lists for its route.
    documented = documented_answers(ok(gateway.client.get("/openapi.json")))
    for (operation, status), _ in seen.items():
        method, path = operation.split(" ", 1)
        assert str(status) in documented[(method.lower(), path)], (operation, status)
    # The fuzz reached the daemon: some publishes and queries succeeded, some were refused.
    assert sum(seen.values()) >= 100, seen
    assert seen[("POST /publish", 200)] and seen[("POST /publish", 400)], seen
    assert seen[("GET /events", 200)] and seen[("GET /events", 400)], seen
    print(sorted(seen.items()))
    assert gateway.proc is not None and gateway.proc.poll() is None


# -- config and body parsing, in process ------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"bind": "8080"}, "[http] bind must be HOST:PORT"),
        ({"bind": "127.0.0.1:0"}, "[http] bind must be HOST:PORT"),
        ({"bind": "::1:8080"}, "[http] bind must be HOST:PORT"),
        ({"bind": "http://127.0.0.1:8080"}, "[http] bind must be HOST:PORT"),
        ({"request_timeout_ms": 0}, "[http] request_timeout_ms must be greater than 0"),
        ({"max_body_bytes": "1"}, "[http] max_body_bytes must be an integer, not a string"),
        ({"colour": 1}, "unknown key [http] colour"),
    ],
)
def test_http_config_errors_name_the_key(values: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"http": values})
    assert words in str(caught.value)


def test_http_config_defaults_and_ipv6() -> None:
    http = parse_config({}).http
    assert (http.host, http.port, http.request_timeout_ms) == ("127.0.0.1", 8080, 5000)
    v6 = parse_config({"http": {"bind": "[::1]:9000"}}).http
    assert (v6.host, v6.port) == ("::1", 9000)


EVENT_JSON = b'{"topic": "t", "event_id": "1", "timestamp": "2025-10-22T10:00:00Z", "source": "s"%s}'


def test_parse_events_keeps_only_the_schema_fields() -> None:
    body = b'{"events": [{"topic": "t", "event_id": "1", "timestamp": "2025-10-22T10:00:00Z", "source": "s", "x": 1}]}'
    assert parse_events(body, 10, 1000) == [
        {"topic": "t", "event_id": "1", "timestamp": "2025-10-22T10:00:00Z", "source": "s"}
    ]
    big = b'{"topic": "t", "event_id": "1", "timestamp": "2025-10-22T10:00:00Z", "source": "s", "payload": {"b": "%s"}}'
    with pytest.raises(GatewayError) as caught:
        parse_events(big % (b"x" * 2000), 10, 1000)
    assert (
        caught.value.status == 400
        and "over the limit of 1000 ([ingest] max_payload_bytes)" in caught.value.body["error"]
    )


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"events": [1]}', "an event must be an object, not number"),
        (b'{"events": [null]}', "an event must be an object, not null"),
        (EVENT_JSON % b', "payload": "x"', "payload must be an object, not string"),
        (EVENT_JSON.replace(b'"s"', b"true") % b"", "source must be a string, not boolean"),
        (EVENT_JSON.replace(b'"t"', b"[]") % b"", "topic must be a string, not array"),
        (EVENT_JSON % b', "payload": {"k": "\\ud800"}', "lone UTF-16 surrogate"),
        (EVENT_JSON % b', "payload": {"k": "\\udc00x"}', "lone UTF-16 surrogate"),
    ],
)
def test_event_errors_name_json_types(body: bytes, words: str) -> None:
    with pytest.raises(GatewayError) as caught:
        parse_events(body, 10, 1000)
    assert caught.value.status == 400 and words in caught.value.body["error"], caught.value.body
    assert "map" not in caught.value.body["error"] and "nil" not in caught.value.body["error"]


def test_a_valid_surrogate_pair_is_no_error_and_bad_utf8_keeps_its_reason() -> None:
    pair = parse_events(EVENT_JSON % b', "payload": {"k": "\\ud83d\\ude00"}', 10, 1000)
    assert pair[0]["payload"] == {"k": "\U0001f600"}
    with pytest.raises(GatewayError) as caught:
        parse_events(EVENT_JSON % b', "payload": {"k": "\xff"}', 10, 1000)
    assert caught.value.body["error"] == "the body is not valid JSON: Invalid UTF-8 encoded string"


def test_a_timestamp_beyond_year_9999_keeps_its_figures() -> None:
    import msgpack

    from transport.gateway import _jsonable

    assert _jsonable(msgpack.Timestamp(2**40, 7)) == {"seconds": 2**40, "nanoseconds": 7}


# -- installation: the systemd unit and install.sh --with-gateway ------------------------------------

UNIT = ROOT / "scripts" / "systemd" / "eventagg-gateway.service"
DAEMON_UNIT = ROOT / "scripts" / "systemd" / "eventagg.service"
needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (apt-get install systemd)"
)


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""}
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60, env=env, check=False)


def test_gateway_unit_runs_the_gateway_after_the_daemon_hardened_like_it() -> None:
    gateway, daemon = unit_settings(UNIT), unit_settings(DAEMON_UNIT)
    assert gateway["ExecStart"] == ["/opt/eventagg/venv/bin/eventagg gateway --config /etc/eventagg/config.toml"]
    assert "eventagg.service" in gateway["After"][0].split()
    # Every hardening setting of the daemon's unit, with the same value.
    hardening = [k for k in daemon if k.startswith(("Protect", "Private", "Restrict", "SystemCall", "Capability"))]
    hardening += ["NoNewPrivileges", "DynamicUser", "MemoryDenyWriteExecute", "LockPersonality", "UMask"]
    assert len(hardening) > 20
    for key in hardening:
        assert gateway.get(key) == daemon[key], key


@needs_systemd_analyze
def test_gateway_unit_verifies_and_exposure_is_at_most_two(tmp_path: Path) -> None:
    unit = tmp_path / "eventagg-gateway.service"
    unit.write_text(
        UNIT.read_text().replace("/opt/eventagg/venv/bin/eventagg", str(Path(sys.executable).with_name("eventagg")))
    )
    verify = analyze("verify", str(unit))
    problems = [line for line in (verify.stdout + verify.stderr).splitlines() if line.strip()]
    assert problems == [] and verify.returncode == 0, "\n".join(problems)
    security = analyze("security", "--offline=yes", "--threshold=20", str(UNIT))
    assert security.returncode == 0, security.stdout[-2000:]


def staged(prefix: Path, script: str, *args: str) -> str:
    """Run scripts/install.sh or uninstall.sh into the staging root ``prefix``, as a clean
    environment would (no checkout on the path); its stdout, after checking it succeeded."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        ["bash", str(SCRIPTS / script), "--prefix", str(prefix), *args],
        capture_output=True,
        text=True,
        timeout=500,
        env=env,
        cwd="/",
        check=False,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def installed_python_runs(prefix: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The staged virtualenv's python, run with ``args``."""
    python = prefix / "opt/eventagg/venv/bin/python"
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_install_with_gateway_and_postgresql_installs_their_dependencies_and_the_units(tmp_path: Path) -> None:
    """Without --with-postgresql no install could run the PostgreSQL backend: psycopg was missing."""
    staged(tmp_path, "install.sh", "--with-gateway", "--with-postgresql")
    installed = tmp_path / "etc/systemd/system/eventagg-gateway.service"
    assert installed.read_text() == UNIT.read_text()
    check = installed_python_runs(tmp_path, str(tmp_path / "opt/eventagg/scripts/gateway.py"), "--help")
    assert check.returncode == 0 and "--config" in check.stdout, check.stderr
    imports = installed_python_runs(
        tmp_path, "-c", "import fastapi, uvicorn, prometheus_client, transport.gateway, psycopg"
    )
    assert imports.returncode == 0, imports.stderr
    assert "removed" in staged(tmp_path, "uninstall.sh")
    assert not installed.exists()


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_an_upgrade_of_an_install_whose_config_names_postgresql_installs_psycopg(tmp_path: Path) -> None:
    """Found by matching the text `backend = "postgresql"`: single quotes or an inline table
    were missed, and the upgraded service could not start."""
    config = tmp_path / "etc/eventagg/config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("storage = { backend = 'postgresql', dsn = \"host=db\" }\n")
    staged(tmp_path, "install.sh")
    found = installed_python_runs(tmp_path, "-c", "import psycopg")
    assert found.returncode == 0, found.stderr


# -- the process ---------------------------------------------------------------------------------


@pytest.mark.e2e
def test_several_workers_serve_one_port_and_stop_on_sigterm(gateway_factory: Callable[..., Gateway]) -> None:
    gateway = gateway_factory(http={"workers": 2})
    for i in range(6):  # keep-alive off: connections land on either worker
        response = gateway.client.post("/publish", json=event(event_id=f"w{i}"), headers={"Connection": "close"})
        assert ok(response)["added_to_queue"] == 1
    assert ok(gateway.client.get("/stats"))["unique_processed"] == 6
    assert gateway.proc is not None
    # Each worker ignores SIGHUP from its start-up on, so both must have started.
    eventually(lambda: gateway.log().count("Application startup complete") == 2, 30, "both workers started")
    workers = _workers(gateway.proc.pid)
    assert len(workers) == 2
    gateway.proc.send_signal(signal.SIGHUP)  # uvicorn's supervisor would restart the workers
    for worker in workers:  # as a SIGHUP to the process group (a closing terminal) reaches them
        os.kill(worker, signal.SIGHUP)
    eventually(lambda: "SIGHUP: the gateway re-reads nothing" in gateway.log(), 10, "SIGHUP logged")
    assert ok(gateway.client.get("/stats"))["unique_processed"] == 6 and gateway.proc.poll() is None
    assert _workers(gateway.proc.pid) == workers  # none died
    gateway.proc.terminate()
    assert gateway.proc.wait(30) == 0
    assert "restarting processes" not in gateway.log() and "died" not in gateway.log()


def _workers(pid: int) -> list[int]:
    """The worker processes the gateway ``pid`` started (not multiprocessing's resource tracker)."""
    children = [
        int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()
    ]
    return sorted(child for child in children if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes())


@pytest.mark.e2e
def test_sighup_is_logged_and_the_gateway_keeps_serving(gateway_factory: Callable[..., Gateway]) -> None:
    gateway = gateway_factory()
    assert gateway.proc is not None
    gateway.proc.send_signal(signal.SIGHUP)
    eventually(lambda: "SIGHUP: the gateway re-reads nothing" in gateway.log(), 10, "SIGHUP logged")
    assert ok(gateway.publish(event(event_id="after-sighup")))["added_to_queue"] == 1
    assert gateway.proc.poll() is None


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_or_sigterm_stops_the_gateway_with_exit_0(
    gateway_factory: Callable[..., Gateway], signum: signal.Signals
) -> None:
    gateway = gateway_factory()
    assert ok(gateway.publish(event(event_id="before-stop")))["added_to_queue"] == 1
    assert gateway.proc is not None
    gateway.proc.send_signal(signum)
    assert gateway.proc.wait(30) == 0, gateway.log()
    assert "Traceback" not in gateway.log()


@pytest.mark.e2e
def test_requests_in_progress_at_sigterm_get_a_json_503_and_the_gateway_exits_soon(
    gateway_factory: Callable[..., Gateway],
) -> None:
    """A publish and a query waiting for a frozen daemon, with long timeouts: SIGTERM ends both
    with a JSON 503 within the grace period (not uvicorn's plain-text 500, nor after their own
    30 s), and the process does not wait for them."""
    gateway = gateway_factory(http={"request_timeout_ms": 30_000}, query={"timeout_ms": 20_000})
    daemon = gateway.daemon
    daemon.terminate()
    daemon.start(env={**os.environ, "EVENTAGG_TEST_HOOKS": "1"})
    for actor in ("dedup", "reader"):  # the writer holds the publish, the reader the query
        frozen = daemon.request({"op": "debug_freeze", "actor": actor, "seconds": 12})
        assert "error" not in frozen, frozen
    answers: dict[str, httpx.Response] = {}
    asking = [
        threading.Thread(target=lambda: answers.update(publish=gateway.publish(event(event_id="stopped")))),
        threading.Thread(target=lambda: answers.update(query=gateway.client.get("/events", timeout=40))),
    ]
    for thread in asking:
        thread.start()
    time.sleep(1.0)  # both are sent and wait for their answers
    assert gateway.proc is not None
    stopped_at = time.monotonic()
    gateway.proc.send_signal(signal.SIGTERM)
    for thread in asking:
        thread.join(20)
    answered = time.monotonic() - stopped_at
    assert answers.keys() == {"publish", "query"}, answers
    for kind, answer in answers.items():
        assert answer.status_code == 503, (kind, answer.text)
        assert answer.headers["content-type"] == "application/json", kind
        assert "the gateway is stopping" in answer.json()["error"], kind
    assert answered < 10.0
    assert gateway.proc.wait(10) == 0, gateway.log()
    assert time.monotonic() - stopped_at < 12.0
    assert "Traceback" not in gateway.log()


@pytest.mark.e2e
def test_a_gateway_stopped_during_its_start_up_check_exits_at_once(gateway_factory: Callable[..., Gateway]) -> None:
    gateway = gateway_factory(start_daemon=False)  # no daemon: the check waits its full 10 s
    assert gateway.proc is not None
    started = time.monotonic()
    gateway.proc.terminate()
    assert gateway.proc.wait(30) == 0, gateway.log()
    assert time.monotonic() - started < 5, "the exit waited for the start-up check"


@pytest.mark.e2e
def test_workers_log_like_a_single_gateway(gateway_factory: Callable[..., Gateway]) -> None:
    gateway = gateway_factory(http={"workers": 2})
    line = "INFO    transport.gateway: eventagg gateway on http://"  # transport.logs' format, at [log] level
    eventually(lambda: gateway.log().count(line) == 2, 30, "both workers log that they serve", detail=gateway.log)


@pytest.mark.e2e
@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_in_use_stops_the_gateway_with_one_message(tmp_path: Path, workers: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "config.toml", {"http": {"bind": f"127.0.0.1:{port}", "workers": workers}})
        result = run_script("gateway.py", "--config", str(config), timeout=60)
    assert result.returncode == 1, result.stderr
    assert f"gateway: cannot listen on [http] bind 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "eventagg gateway on" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.e2e
def test_a_host_that_does_not_resolve_stops_the_gateway_with_one_message(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml", {"http": {"bind": "no-such-host.invalid:8080"}})
    result = run_script("gateway.py", "--config", str(config), timeout=60)
    assert result.returncode == 1, result.stderr
    assert "gateway: cannot listen on [http] bind no-such-host.invalid:8080: the host does not resolve" in result.stderr
    assert "eventagg gateway on" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.e2e
def test_a_bind_beyond_loopback_needs_allow_insecure(gateway_factory: Callable[..., Gateway], tmp_path: Path) -> None:
    """The gateway has no authentication: like the daemon without CURVE, it stays on loopback unless told."""
    config = write_config(tmp_path / "config.toml", {"http": {"bind": f"0.0.0.0:{free_port()}"}})
    result = run_script("gateway.py", "--config", str(config), timeout=60)
    assert result.returncode == 2, result.stderr
    for words in ("[http] bind = 0.0.0.0:", "[security] allow_insecure = true", "no authentication", "proxy"):
        assert words in result.stderr
    assert "eventagg gateway on" not in result.stderr and "Traceback" not in result.stderr
    gateway = gateway_factory(http={"bind": f"0.0.0.0:{free_port()}"}, security={"allow_insecure": True})
    assert gateway.client.get("/openapi.json").status_code == 200
    assert "beyond loopback WITHOUT authentication" in gateway.log()


@pytest.mark.e2e
def test_a_gateway_on_loopback_answers_only_the_names_it_is_known_by(
    gateway_factory: Callable[..., Gateway],
) -> None:
    """A web page whose name its author pointed at 127.0.0.1 (DNS rebinding) is on the gateway's
    origin: no CORS preflight stops its JSON POST. It published and read, its name as Host."""
    gateway = gateway_factory(http={"allowed_hosts": ["events.example.com", "gw.example.com:8080", "[2001:db8::1]"]})
    port = gateway.url.rsplit(":", 1)[1]
    body = {"events": [event(topic="rebound")]}
    for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1.evil.example:{port}"):
        refused = gateway.client.post("/publish", json=body, headers={"Host": host, "Origin": f"http://{host}"})
        assert refused.status_code == 421 and "[http] allowed_hosts" in refused.json()["error"], refused.text
        assert gateway.client.get("/events", headers={"Host": host}).status_code == 421
    answered = [f"127.0.0.1:{port}", f"localhost:{port}", f"EVENTS.example.com:{port}", "events.example.com."]
    # Names listed as a Host header gives them, and loopback however it is written.
    answered += ["gw.example.com:8080", "[2001:db8::1]:80", "[::ffff:127.0.0.1]", f"[0:0:0:0:0:0:0:1]:{port}"]
    for host in answered:
        assert gateway.client.get("/stats", headers={"Host": host}).status_code == 200, host
    assert ok(gateway.client.get("/events", params={"topic": "rebound"}))["events"] == []  # nothing got in
    from transport.gateway import answered_hosts

    beyond = {"bind": "0.0.0.0:8080"}
    assert answered_hosts(parse_config({"http": beyond})) is None  # reached by any name pointed at it
    assert answered_hosts(parse_config({"http": {**beyond, "allowed_hosts": ["events.example.com"]}})) == {
        "localhost",
        "127.0.0.1",
        "::1",
        "0.0.0.0",
        "events.example.com",
    }
    assert answered_hosts(parse_config({"http": {"allowed_hosts": ["*"]}})) is None


@pytest.mark.e2e
def test_the_host_checked_is_the_one_the_request_is_for(gateway: Gateway) -> None:
    """Two Host headers were taken by the first, and an absolute-form target naming another host
    (``GET http://attacker.example/events``) by its Host: RFC 9112 has the first refused with
    400 and the second answered for the target's host, so a page cannot slip past the 421."""
    host, port = gateway.url.removeprefix("http://").split(":")

    def answer(request: bytes) -> bytes:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(request)
            return read_response(sock)

    two = answer(b"GET /stats HTTP/1.1\r\nHost: localhost\r\nHost: attacker.example\r\n\r\n")
    assert two.startswith(b"HTTP/1.1 400 ") and b"more than one Host header" in two, two
    assert answer(b"GET /stats HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    spaced = answer(b"GET /stats HTTP/1.1\r\nHost: local host\r\n\r\n")
    assert spaced.startswith(b"HTTP/1.1 400 ") and b"is not a host name or address" in spaced, spaced
    for valid in (b"localhost", b"127.0.0.1:" + port.encode(), b"[::1]"):
        assert answer(b"GET /stats HTTP/1.1\r\nHost: " + valid + b"\r\n\r\n").startswith(b"HTTP/1.1 200 "), valid
    assert answer(b"GET /stats HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 ")
    elsewhere = answer(b"GET http://attacker.example/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert elsewhere.startswith(b"HTTP/1.1 421 ") and b"attacker.example" in elsewhere, elsewhere
    here = f"GET http://localhost:{port}/stats HTTP/1.1\r\nHost: attacker.example\r\n\r\n".encode()
    assert answer(here).startswith(b"HTTP/1.1 200 ")
    # The rules on Host hold whatever the target's form; an HTTP/1.0 one names its host there.
    two_here = f"GET http://localhost:{port}/stats HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\n\r\n"
    assert answer(two_here.encode()).startswith(b"HTTP/1.1 400 ")
    assert answer(f"GET http://localhost:{port}/stats HTTP/1.1\r\n\r\n".encode()).startswith(b"HTTP/1.1 400 ")
    assert answer(b"GET http://attacker.example/stats HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 421 ")
    assert answer(f"GET http://localhost:{port}/stats HTTP/1.0\r\n\r\n".encode()).startswith(b"HTTP/1.1 200 ")
    long_scheme = b"GET abcdefghijklmnopqrstuvwxyz://attacker.example/stats HTTP/1.1\r\nHost: localhost\r\n\r\n"
    assert answer(long_scheme).startswith(b"HTTP/1.1 421 ")
    assert answer(b"GET /stats HTTP/1.1\r\nHost: localhost\r\n\r\n").startswith(b"HTTP/1.1 200 ")


@pytest.mark.e2e
def test_a_bad_config_stops_the_gateway_with_a_message_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[http]\nbind = "localhost"\n')
    result = run_script("gateway.py", "--config", str(config), timeout=60)
    assert result.returncode == 2
    assert "[http] bind must be HOST:PORT" in result.stderr
    # libzmq's source;destination form: the loopback check read "gw;127.0.0.1" as loopback.
    config.write_text('[http]\nbind = "gw;127.0.0.1:8080"\n')
    result = run_script("gateway.py", "--config", str(config), timeout=60)
    assert result.returncode == 2 and "[http] bind must be HOST:PORT" in result.stderr, result.stderr


def test_conflicting_positions_pass_through_from_the_ack_to_the_request() -> None:
    """A daemon that names conflicting duplicates in its ack ([ingest] retention's ``conflicting``):
    the publisher keeps them per batch, and the gateway turns them into positions in the request.
    Here a real ROUTER socket plays that daemon, since this daemon does not name them yet."""
    import msgpack
    import zmq

    from transport.gateway import _add_up
    from transport.publisher import Publisher

    context = zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    publisher = Publisher(f"tcp://127.0.0.1:{port}", batch_size=3, linger=3600, ack_timeout=10)
    try:
        publisher.publish_many([event(event_id=str(i)) for i in range(6)])  # two batches of 3
        publisher.poll()
        for _ in range(2):
            assert router.poll(10_000)
            identity, frame = router.recv_multipart()
            batch = msgpack.unpackb(frame)
            size = len(batch["events"])
            reply = {"batch": batch["batch"], "new": size - 1, "duplicate": 1, "conflicting": [size - 1, 99, "x"]}
            router.send_multipart([identity, msgpack.packb(reply)])
        publisher.flush(10)
        results = sorted(publisher.results, key=lambda result: result.batch_id)
        assert [result.conflicting for result in results] == [(2,), (2,)]  # out-of-range and non-int dropped
        outcome = _add_up(results, 6)
        assert (outcome.new, outcome.duplicates, outcome.conflicting) == (4, 2, [2, 5])
    finally:
        publisher.close(flush=False)
        router.close(linger=0)
