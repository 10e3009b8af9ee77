"""The gateway's ``GET /events/stream`` (docs/gateway.md): stored then live events as Server-Sent Events.

Real daemon, real gateway process, real HTTP with httpx; on SQLite and on a real PostgreSQL.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import resource
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from harness import Gateway, Stream, eventually, publish
from prometheus_client.parser import text_string_to_metric_families
from test_gateway import event, ok, scrape
from test_retention import QUICK

from transport.gateway import NEW_QUERY_DESCRIPTORS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture
def stream_gateway(request: pytest.FixtureRequest, gateway_factory: Callable[..., Gateway]) -> Callable[..., Gateway]:
    """A gateway in front of a daemon on the backend the test is parametrized with."""

    def make(**overrides: Any) -> Gateway:
        if request.param == "postgresql":
            dsn = request.getfixturevalue("database")
            overrides["storage"] = {"backend": "postgresql", "dsn": dsn, "node": "gw"}
        return gateway_factory(**overrides)

    return make


@pytest.mark.parametrize("stream_gateway", ["sqlite", "postgresql"], indirect=True)
def test_a_stream_replays_then_follows_and_a_reconnect_with_last_event_id_misses_nothing(
    stream_gateway: Callable[..., Gateway],
) -> None:
    gateway = stream_gateway()
    ok(
        gateway.publish(
            {"events": [event("orders", f"o-{i}", f"2025-10-22T10:00:0{i}Z", payload={"n": i}) for i in range(3)]}
        )
    )
    ok(gateway.publish({"events": [event("other", "x-1")]}))
    one_topic = Stream(gateway, topic="orders")
    every_topic = Stream(gateway, after=1)
    try:
        assert one_topic.response.status_code == 200
        assert one_topic.response.headers["content-type"].startswith("text/event-stream")
        stored = one_topic.take(3)
        assert [(m["id"], m["event"], m["data"]["event_id"], m["data"]["seq"]) for m in stored] == [
            ("1", "event", "o-0", 1),
            ("2", "event", "o-1", 2),
            ("3", "event", "o-2", 3),
        ]
        assert stored[2]["data"]["payload"] == {"n": 2} and stored[2]["data"]["topic"] == "orders"
        # Without a topic the id is the commit position, and `after` starts past it.
        assert [(m["id"], m["data"]["event_id"]) for m in every_topic.take(3)] == [
            ("2", "o-1"),
            ("3", "o-2"),
            ("4", "x-1"),
        ]
        # Live: events committed while the stream is open come through it.
        ok(gateway.publish({"events": [event("orders", "o-3", "2025-10-22T10:00:09Z")]}))
        assert one_topic.next()["data"]["event_id"] == "o-3"
        assert every_topic.next()["id"] == "5"
    finally:
        one_topic.close()
        every_topic.close()
    ok(gateway.publish({"events": [event("orders", "o-4", "2025-10-22T10:00:10Z")]}))
    # A reconnecting EventSource sends its last id, which wins over `after`.
    resumed = Stream(gateway, headers={"Last-Event-ID": "3"}, topic="orders", after=0)
    try:
        assert [(m["id"], m["data"]["event_id"]) for m in resumed.take(2)] == [("4", "o-3"), ("5", "o-4")]
    finally:
        resumed.close()


def test_a_stream_of_a_few_topics_gives_only_theirs_in_commit_order(gateway: Gateway) -> None:
    ok(gateway.publish({"events": [event(topic, f"{topic}-{n}") for n in range(2) for topic in ("a", "b", "c")]}))
    stream = Stream(gateway, topics=["a", "c"])
    try:
        got = [(int(m["id"]), m["data"]["event_id"]) for m in stream.take(4)]
        every = ok(gateway.client.get("/events"))["events"]
        assert got == [(e["position"], e["event_id"]) for e in every if e["topic"] in ("a", "c")]
        assert len(every) == 6 and len(got) == 4
    finally:
        stream.close()


@pytest.mark.parametrize(
    ("params", "headers", "words"),
    [
        ({"topic": "has space"}, {}, "topic"),
        ({"after": "-1"}, {}, "after"),
        ({"after": "x"}, {}, "after"),
        ({"limit": "3"}, {}, "unknown query parameter 'limit': GET /events/stream takes topic, topics, after"),
        ({}, {"Last-Event-ID": "abc"}, "Last-Event-ID must be an id this stream sent"),
        ({}, {"Last-Event-ID": "-4"}, "Last-Event-ID must be an id this stream sent"),
        ({}, {"Last-Event-ID": "١٢".encode()}, "not '١٢'"),
        (
            {"topic": "a", "topics": "b"},
            {},
            "give topic (one topic, by seq) or topics (several, by position), not both",
        ),
        ({"topics": ["a", ""]}, {}, "topic"),
        ({"topics": [f"t{n}" for n in range(1001)]}, {}, "topics may be given at most 1000 times, not 1001"),
        ({"after": ["1", "2"]}, {}, "query parameter 'after' given more than once"),
        ({}, [("Last-Event-ID", "1"), ("Last-Event-ID", "2")], "Last-Event-ID given 2 times"),
    ],
)
def test_a_bad_parameter_or_last_event_id_is_400(
    gateway: Gateway, params: dict[str, Any], headers: dict[str, str | bytes] | list[tuple[str, str]], words: str
) -> None:
    response = gateway.client.get("/events/stream", params=params, headers=headers)
    assert response.status_code == 400 and words in response.json()["error"], response.text


def test_a_cursor_past_the_last_commit_is_refused_with_400_before_any_stream(gateway: Gateway) -> None:
    # Not a 200 stream that ends in an error event: an EventSource reconnects after a stream
    # ends (for ever, here), but gives up on an error status.
    ok(gateway.publish({"events": [event(topic="orders")]}))
    for params, headers, said in [
        ({"after": 5}, {}, "after 5 is past the last commit position, 1"),
        ({"topic": "orders"}, {"Last-Event-ID": "9"}, "after 9 is past the last seq of topic 'orders', 1"),
    ]:
        stream = Stream(gateway, headers=headers, **params)
        try:
            assert stream.response.status_code == 400, stream.response.headers
            assert stream.response.headers["content-type"] == "application/json"
            stream.response.read()
            error = stream.response.json()["error"]
            assert error.startswith(f"the daemon refused the stream: {said}") and "tcp://" not in error
        finally:
            stream.close()
    assert scrape(gateway)["eventagg_gateway_open_streams"][0] == 0  # the refused streams' slots freed
    stream = Stream(gateway, after=1)  # at the head: a stream, waiting for what comes next
    try:
        assert stream.response.status_code == 200
        ok(gateway.publish({"events": [event(topic="orders", event_id="next", timestamp="2025-10-22T10:00:01Z")]}))
        assert stream.next()["data"]["event_id"] == "next"
    finally:
        stream.close()


def test_one_stream_past_max_streams_gets_503_and_a_closed_stream_frees_its_slot(
    gateway_factory: Callable[..., Gateway],
) -> None:
    gateway = gateway_factory(http={"max_streams": 1})

    def open_streams() -> tuple[float, float]:
        samples = scrape(gateway)
        return samples["eventagg_gateway_open_streams"][0], samples["eventagg_gateway_max_streams"][0]

    assert open_streams() == (0, 1)
    first = Stream(gateway)
    try:
        assert first.response.status_code == 200
        assert open_streams() == (1, 1)
        refused = gateway.client.get("/events/stream")
        assert refused.status_code == 503 and "[http] max_streams" in refused.json()["error"], refused.text
    finally:
        first.close()

    eventually(lambda: open_streams() == (0, 1), 10, "the closed stream's slot freed, as /metrics tells")

    def slot_free() -> bool:
        with gateway.client.stream("GET", "/events/stream") as response:
            return response.status_code == 200

    eventually(slot_free, 10, "the closed stream's slot freed")


def test_a_stream_for_a_web_page_of_another_origin_is_refused_before_it_takes_a_slot(
    gateway_factory: Callable[..., Gateway],
) -> None:
    """Any web page could open GET /events/stream on a loopback gateway: CORS kept the page from
    reading it, but each such stream held one of [http] max_streams and a subscription to the
    daemon, so a page a local user opened could take them all."""
    gateway = gateway_factory(http={"max_streams": 1, "allowed_origins": ["https://app.example.com"]})
    own = gateway.url  # http://127.0.0.1:PORT, the Host the client sends
    for origin in ("https://evil.example", "null", own.replace("127.0.0.1", "localhost"), own + "1"):
        refused = Stream(gateway, headers={"Origin": origin}, topic="orders")
        try:
            assert refused.response.status_code == 403, (origin, refused.response.status_code)
            said = refused.response.read().decode()
        finally:
            refused.close()
        assert "[http] allowed_origins" in said and "this gateway does not stream to" in said, said
    assert scrape(gateway)["eventagg_gateway_open_streams"][0] == 0
    ok(gateway.publish(event("orders", "o-1")))
    # No Origin (not a browser), the gateway's own (http, or https behind a TLS proxy), a listed one.
    for origin in (None, own, own.replace("http:", "https:"), "https://APP.example.com:443"):
        stream = Stream(gateway, headers=None if origin is None else {"Origin": origin}, topic="orders")
        try:
            assert stream.response.status_code == 200, (origin, stream.response.status_code)
            assert stream.next()["data"]["event_id"] == "o-1"
        finally:
            stream.close()
        eventually(lambda: scrape(gateway)["eventagg_gateway_open_streams"][0] == 0, 10, "the slot freed")


def test_a_client_that_pipelined_a_request_behind_its_stream_and_left_frees_the_stream_at_once(
    gateway_factory: Callable[..., Gateway],
) -> None:
    """uvicorn tells only a connection's latest request that the client left: the stream ahead
    of it kept its slot and subscription until a keep-alive write failed, with a traceback."""
    gateway = gateway_factory(http={"max_streams": 1})
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as client:
        stream = b"GET /events/stream HTTP/1.1\r\nHost: localhost\r\n\r\n"
        client.sendall(stream + b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert client.recv(4096).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    eventually(lambda: scrape(gateway)["eventagg_gateway_open_streams"][0] == 0, 10, "the stream's slot freed")
    assert time.monotonic() - started < 5  # not at the next keep-alive, 15 s on
    stream = Stream(gateway)
    try:
        assert stream.response.status_code == 200
    finally:
        stream.close()
    assert "Traceback" not in gateway.log(), gateway.log()


def test_metrics_count_the_streams_of_every_worker_process_whichever_answers(
    gateway_factory: Callable[..., Gateway],
) -> None:
    gateway = gateway_factory(http={"workers": 2, "max_streams": 10})

    def scrapes() -> set[tuple[float, float]]:
        """What six scrapes said, each on a connection of its own (so on either worker)."""
        seen = set()
        for _ in range(6):
            with httpx.Client(base_url=gateway.url, timeout=10) as client:
                samples = {
                    sample.name: sample.value
                    for family in text_string_to_metric_families(client.get("/metrics").text)
                    for sample in family.samples
                }
            seen.add((samples["eventagg_gateway_open_streams"], samples["eventagg_gateway_max_streams"]))
        return seen

    with contextlib.ExitStack() as streams:
        for _ in range(6):  # each on a client of its own: a connection of its own, accepted by either worker
            client = streams.enter_context(httpx.Client(base_url=gateway.url, timeout=10))
            assert streams.enter_context(client.stream("GET", "/events/stream")).status_code == 200
        eventually(lambda: scrapes() == {(6, 20)}, 20, "every scrape counting the six streams of both workers")
    eventually(lambda: scrapes() == {(0, 20)}, 20, "the closed streams uncounted by every worker")


def test_a_stream_rides_out_a_daemon_restart(gateway: Gateway) -> None:
    ok(gateway.publish({"events": [event(event_id="before")]}))
    stream = Stream(gateway, topic="orders")
    try:
        assert stream.next()["data"]["event_id"] == "before"
        assert gateway.daemon.terminate(timeout=30) == 0
        gateway.daemon.start()
        ok(gateway.publish({"events": [event(event_id="after", timestamp="2025-10-22T10:00:01Z")]}))
        assert stream.next()["data"]["event_id"] == "after"
    finally:
        stream.close()


def test_a_stream_opened_while_the_daemon_is_down_begins_within_the_request_timeout_and_waits(
    gateway_factory: Callable[..., Gateway],
) -> None:
    gateway = gateway_factory(http={"request_timeout_ms": 1000})
    assert gateway.daemon.terminate(timeout=30) == 0
    began = time.monotonic()
    stream = Stream(gateway, topic="orders")
    try:
        assert stream.response.status_code == 200
        assert 0.9 <= time.monotonic() - began < 5
        gateway.daemon.start()
        ok(gateway.publish({"events": [event(topic="orders", event_id="first")]}))
        assert stream.next()["data"]["event_id"] == "first"
    finally:
        stream.close()


def test_events_retention_deleted_after_the_cursor_are_told_before_what_follows(
    gateway_factory: Callable[..., Gateway],
) -> None:
    gateway = gateway_factory(retention={**QUICK, "max_events_per_topic": 2}, ordering={"window_ms": 0})
    daemon = gateway.daemon
    publish(daemon.ack, "--acked", "--events", "6", "--topics", "1")
    daemon.wait_stats(timeout=60, stored=2, expired=4)
    stream = Stream(gateway)
    try:
        notice, *events = stream.take(3)
        assert (notice["event"], notice["data"]) == ("expired", {"after": 0, "first": 5})
        assert [message["id"] for message in events] == ["5", "6"]
    finally:
        stream.close()


def test_each_expired_notice_comes_just_before_the_first_event_past_it(
    gateway_factory: Callable[..., Gateway],
) -> None:
    """Holes between stored events: the subscriber reads several messages at once, and every
    notice once went ahead of all the events read with it."""
    gateway = gateway_factory(retention={**QUICK, "max_events_per_topic": 1}, ordering={"window_ms": 0})
    for i in range(1, 11):  # positions: x1 y1 x2 y2 ...; each x but the last is deleted
        ok(gateway.publish(event(topic="x", event_id=f"x{i}")))
        ok(gateway.publish(event(topic=f"y{i}", event_id="only")))
    gateway.daemon.wait_stats(timeout=60, stored=11, expired=9)
    stream = Stream(gateway)
    try:
        messages = stream.take(9 + 11)
    finally:
        stream.close()
    told = [
        ("expired", message["data"]["after"], message["data"]["first"])
        if message["event"] == "expired"
        else ("event", int(message["id"]))
        for message in messages
    ]
    expected: list[tuple[Any, ...]] = []
    for position in [*range(2, 20, 2), 19, 20]:
        if position % 2 == 0 and position < 20:
            expected.append(("expired", position - 2, position))
        expected.append(("event", position))
    assert told == expected


def test_an_http_1_0_client_gets_the_stream_unchunked_ended_by_the_connection(gateway: Gateway) -> None:
    # HTTP/1.0 has no chunked encoding; nginx's proxy_pass speaks it unless told otherwise.
    ok(gateway.publish({"events": [event("orders", "o-1")]}))
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as client:
        client.sendall(b"GET /events/stream?topic=orders HTTP/1.0\r\n\r\n")
        received = b""
        while b"\n\n" not in received.partition(b"\r\n\r\n")[2]:
            chunk = client.recv(65536)
            assert chunk, received
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in head, head
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower(), head
    assert body.startswith(b"id: 1\nevent: event\ndata: {"), body


def test_stopping_the_gateway_ends_its_open_streams_and_it_exits_soon(gateway: Gateway) -> None:
    stream = Stream(gateway)
    try:
        assert gateway.proc is not None
        gateway.proc.send_signal(signal.SIGTERM)
        with pytest.raises((EOFError, httpx.RemoteProtocolError)):
            stream.next()
        assert gateway.proc.wait(10) == 0
    finally:
        stream.close()


def test_a_stream_whose_client_left_before_its_body_began_still_frees_its_slot() -> None:
    # The slot is freed by the response, not by the body's `finally`, which never runs when the
    # body never began (the client gone as the headers went out).
    import anyio

    from transport.gateway_stream import EventStreamResponse

    began: list[bool] = []
    freed: list[bool] = []

    async def body() -> AsyncIterator[bytes]:
        began.append(True)
        yield b": hello\n\n"

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await anyio.sleep(0.05)  # the disconnect is heard meanwhile

    async def serve() -> None:
        response = EventStreamResponse(body(), on_close=lambda: freed.append(True))
        await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)  # type: ignore[arg-type]

    anyio.run(serve)
    assert began == [] and freed == [True]


def test_streams_whose_clients_left_during_a_long_backlog_free_their_slots_at_once(
    gateway_factory: Callable[..., Gateway],
) -> None:
    """A hundred clients that asked for a long backlog and left together: their streams went on
    sending it to nobody, holding their max_streams slots, their subscriptions and the event
    loop (other routes took seconds) for as long as the backlog lasted, minutes with more."""
    gateway = gateway_factory()
    publish(gateway.daemon.ack, "--acked", "--events", "30000", "--topics", "1")
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    clients = [socket.create_connection((host, int(port)), timeout=30) for _ in range(100)]
    try:
        for client in clients:
            client.sendall(b"GET /events/stream?topic=topic-0&after=0 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        for client in clients:
            assert client.recv(12) == b"HTTP/1.1 200"
    finally:
        for client in clients:
            client.close()
    eventually(lambda: scrape(gateway)["eventagg_gateway_open_streams"][0] == 0, 15, "the streams' slots freed")


def test_a_stream_whose_client_reads_slowly_keeps_its_subscription(gateway_factory: Callable[..., Gateway]) -> None:
    """While the client's socket was full the stream's thread waited without a word to the
    daemon, which dropped the subscription after [subscribe] timeout_ms; it started over, and
    the daemon's log blamed a restart, for as long as the client stayed slow."""
    gateway = gateway_factory(subscribe={"timeout_ms": 1000, "heartbeat_ms": 200})
    publish(gateway.daemon.ack, "--acked", "--events", "30000", "--topics", "1")
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    client = socket.create_connection((host, int(port)), timeout=30)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    try:
        client.sendall(b"GET /events/stream?topic=topic-0&after=0 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = client.recv(65536)
        time.sleep(3)  # the client takes nothing for three of the daemon's timeouts
        ids = 0
        while True:
            ids += data.count(b"\nid: ")  # each event's first line
            if ids >= 30000:
                break
            chunk = client.recv(1 << 20)
            assert chunk, f"the stream ended after {ids} events"
            data = data[-4:] + chunk  # 4 bytes: no whole "\nid: " counted twice
    finally:
        client.close()
    assert "not heard from" not in gateway.daemon.log()
    assert "with no subscription" not in gateway.daemon.log()


BIG_PAYLOAD = 512 * 1024
BIG_EVENTS = 300  # 150 MiB of payloads


def test_a_stream_whose_client_reads_nothing_holds_a_few_mib_of_large_events_then_gives_them_all(
    gateway: Gateway,
) -> None:
    """A stream held up to ~2 500 events whatever their size: a client that read nothing made
    the gateway take every one of 300 events of 512 KiB (150 MiB and more as JSON) into memory."""
    from transport.publisher import Publisher

    publisher = Publisher(gateway.daemon.ack, batch_size=5, deadline=30.0)
    try:
        for i in range(BIG_EVENTS):
            publisher.publish(event("big", f"b-{i}", payload={"n": f"{i:06d}" + "x" * (BIG_PAYLOAD - 16)}))
        publisher.flush(timeout=30.0)
    finally:
        publisher.close(timeout=10.0)
    assert gateway.proc is not None
    pid = gateway.proc.pid
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    before = _rss(pid)
    with socket.create_connection((host, int(port)), timeout=20) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        # HTTP/1.0: the body unchunked, plain Server-Sent Events.
        client.sendall(b"GET /events/stream?topic=big&after=0 HTTP/1.0\r\nHost: localhost\r\n\r\n")
        received = client.recv(4096)
        assert received.startswith(b"HTTP/1.1 200 "), received
        grown = 0
        deadline = time.monotonic() + 4  # the client takes nothing more meanwhile
        while time.monotonic() < deadline:
            grown = max(grown, _rss(pid) - before)
            time.sleep(0.1)
        assert grown < 32 * 2**20, f"the gateway's RSS grew {grown / 2**20:.0f} MiB for one stream that read nothing"
        ids: list[int] = []
        rest = received.partition(b"\r\n\r\n")[2]
        while len(ids) < BIG_EVENTS:
            chunk = client.recv(1 << 20)
            assert chunk, f"the stream ended after {len(ids)} events"
            messages = (rest + chunk).split(b"\n\n")
            rest = messages.pop()
            for message in messages:
                head, _, data = message.partition(b"\ndata: ")
                assert head.startswith(b"id: ") and head.endswith(b"\nevent: event"), message[:200]
                ids.append(int(head[4:].partition(b"\n")[0]))
                assert json.loads(data)["payload"]["n"][:6] == f"{len(ids) - 1:06d}"
    assert ids == list(range(1, BIG_EVENTS + 1))


def _rss(pid: int) -> int:
    """The process's resident memory, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_gateway_near_its_descriptor_limit_says_so_even_when_the_limit_is_lowered_while_it_runs(
    gateway: Gateway,
) -> None:
    """At its limit the gateway reset connections with one traceback in its log; and a limit
    lowered by prlimit after the start went unseen by a watch that read it once."""
    assert gateway.proc is not None
    pid = gateway.proc.pid
    held = len(os.listdir(f"/proc/{pid}/fd"))
    hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (held + 12, hard))
    streams = []
    try:
        for _ in range(8):  # about three descriptors a stream
            with contextlib.suppress(httpx.HTTPError, AssertionError):
                streams.append(Stream(gateway))
        eventually(lambda: "the gateway process holds" in gateway.log(), 20, "the warning", detail=gateway.log)
        assert f"of the {held + 12} file descriptors it may open (RLIMIT_NOFILE)" in gateway.log()
    finally:
        for stream in streams:
            stream.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
    eventually(lambda: "back under the limit" in gateway.log(), 20, "the all-clear", detail=gateway.log)
    assert gateway.client.get("/healthz").status_code == 200


def test_a_gateway_out_of_descriptors_answers_503_saying_so_and_serves_again_once_some_are_free(
    gateway: Gateway,
) -> None:
    """With no descriptor free but the connection's, a stream and /healthz answered a plain-text
    500 with a traceback in the log (the subscriber's socket failed with EMFILE, and anyio, which
    imports its backend at its first use, could not read it), and so did a publish; the warning
    came only at the watch's next count, up to 2 s later."""
    assert gateway.proc is not None
    pid = gateway.proc.pid
    for _attempt in range(10):
        limit, hard = _hold_still(gateway, free=1)  # one for the connection below
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
        try:
            with httpx.Client(base_url=gateway.url, timeout=10.0, limits=httpx.Limits(max_connections=1)) as client:
                with client.stream("GET", "/events/stream", params={"topic": "orders"}) as streamed:
                    if streamed.status_code == 200:
                        # A descriptor of the gateway's closed after it was counted (on a busy
                        # machine): the stream had one to spare. Not the case tested: again.
                        continue
                    streamed.read()
                answers = [streamed, client.get("/healthz"), client.post("/publish", json=event("orders", "o-1"))]
                break
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
    else:
        pytest.fail("the gateway's descriptors never held still long enough to leave it none")
    for answer in answers:
        assert answer.status_code == 503, answer.text
        body = answer.json()
        said = body.get("error") or body.get("reason")
        assert "out of file descriptors" in said and "LimitNOFILE=" in said, body
    assert "Traceback" not in gateway.log()
    assert f"of the {limit} file descriptors it may open" in gateway.log()  # at once
    with httpx.Client(base_url=gateway.url, timeout=10.0) as client:
        assert client.get("/healthz").status_code == 200
        assert client.post("/publish", json=event("orders", "o-1")).status_code == 200
    stream = Stream(gateway, topic="orders")
    try:
        assert stream.next()["data"]["event_id"] == "o-1"
    finally:
        stream.close()


def test_a_gateway_with_a_few_descriptors_free_refuses_a_publish_rather_than_abort(gateway: Gateway) -> None:
    """A publisher has a ZeroMQ context of its own, whose threads libzmq starts with its first
    socket: with two to four descriptors free it could not have theirs and aborted the gateway."""
    limit, hard = _hold_still(gateway, free=3)  # the connection's, and two
    assert gateway.proc is not None
    pid = gateway.proc.pid
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
    try:
        with httpx.Client(base_url=gateway.url, timeout=10.0, limits=httpx.Limits(max_connections=1)) as client:
            answer = client.post("/publish", json=event("orders", "o-1"))
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
    assert answer.status_code == 503 and "out of file descriptors" in answer.json()["error"], answer.text
    assert "nothing was sent" in answer.json()["error"]
    ok(gateway.publish(event("orders", "o-1")))


@pytest.mark.parametrize("free", [3, 4, NEW_QUERY_DESCRIPTORS + 1])
def test_a_gateway_with_too_few_descriptors_for_a_query_says_so_at_once(gateway: Gateway, free: int) -> None:
    """A new query client's socket takes four descriptors, its TCP connection last, which
    libzmq's I/O thread makes and tells no one when it cannot: with the request's connection and
    three free, /healthz waited its whole timeout and answered that the daemon's query endpoint
    did not answer. (With two, making the socket failed at once, as it should.)"""
    limit, hard = _hold_still(gateway, free=free)  # the connection's, and the rest
    assert gateway.proc is not None
    pid = gateway.proc.pid
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
    try:
        with httpx.Client(base_url=gateway.url, timeout=10.0, limits=httpx.Limits(max_connections=1)) as client:
            began = time.monotonic()
            answer = client.get("/healthz")
            took = time.monotonic() - began
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
    if free > NEW_QUERY_DESCRIPTORS:  # enough for the connection and the query
        assert answer.status_code == 200, answer.text
    else:
        assert answer.status_code == 503 and "out of file descriptors" in answer.json()["reason"], answer.text
        assert took < 1.0, f"{took:.3g} s: the whole request timeout was waited"
    assert gateway.client.get("/healthz").status_code == 200


@pytest.mark.parametrize("without", [(), ("uvloop",)], ids=["uvloop", "asyncio"])
def test_a_gateway_that_cannot_accept_a_connection_warns_once_and_serves_again_once_descriptors_are_free(
    gateway_factory: Callable[..., Gateway], without: tuple[str, ...]
) -> None:
    """With no descriptor free the gateway cannot accept() a connection, so nothing can answer
    it: uvloop (libuv) accepts it with a descriptor kept in reserve and closes it at once (the
    client sees it reset), asyncio leaves it waiting and tries again a second later. On asyncio
    (uvicorn's loop where uvloop is not installed) every attempt logged a traceback, hundreds a
    second; the log should say once what the matter is and what to do."""
    gateway = gateway_factory(without=without)
    assert gateway.proc is not None
    pid = gateway.proc.pid
    failed = 0
    limit, hard = _hold_still(gateway, free=0)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
    try:
        for _ in range(3):
            with httpx.Client(base_url=gateway.url, timeout=1.5) as client:
                try:
                    client.get("/healthz")  # answered (503) only if one of the gateway's closed meanwhile
                except httpx.TransportError:  # reset, or not accepted within the timeout
                    failed += 1
        said = "file descriptors it may open (RLIMIT_NOFILE)"
        eventually(lambda: said in gateway.log(), 10, "the warning", detail=gateway.log)
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
    assert failed, "every connection was accepted: the gateway was never at its limit"
    eventually(lambda: _answers(gateway), 10, "the gateway serving again", detail=gateway.log)
    log = gateway.log()
    assert log.count(said) == 1, log
    assert "Traceback" not in log and "out of system resource" not in log, log


def _answers(gateway: Gateway) -> bool:
    """Whether a new connection to the gateway gets /healthz answered 200."""
    try:
        with httpx.Client(base_url=gateway.url, timeout=2.0) as client:
            return client.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False


def _hold_still(gateway: Gateway, free: int) -> tuple[int, int]:
    """A soft limit that leaves the gateway ``free`` descriptors, once its own stay put, and its
    hard limit. The test's client is replaced first: its keep-alive connection could close,
    freeing one, at any time.

    The kernel gives a new descriptor the lowest number free and refuses it at the limit: what
    is free is the numbers under the limit not in use, not the limit less the count. A gateway
    that closed a low one while holding a higher one (on a busy machine, often) has holes."""
    assert gateway.proc is not None
    pid = gateway.proc.pid
    gateway.client.close()
    eventually(lambda: _settled(pid), 10, "the gateway's descriptors settle")
    gateway.client = httpx.Client(base_url=gateway.url, timeout=30.0)
    in_use = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    unused = (number for number in itertools.count() if number not in in_use)
    limit = next(itertools.islice(unused, free, None))  # the first unused number past ``free`` of them
    return limit, resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]


def _settled(pid: int) -> bool:
    """Whether the process's count of open descriptors stayed the same for a moment."""
    before = len(os.listdir(f"/proc/{pid}/fd"))
    time.sleep(0.3)
    return len(os.listdir(f"/proc/{pid}/fd")) == before
