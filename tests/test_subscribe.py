"""Live subscribe and replay (docs/subscribe.md), against the real daemon, real sockets and SQLite.

Followers are scripts/events.py --follow processes, the Subscriber library, and a consumer
written with raw pyzmq from the protocol page alone.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from harness import SCRIPTS, Daemon, default_sigint, eventually, free_port, publish, run_script, stored_rows
from test_security import curve_daemon, wait_ready
from test_security import keys as keys  # the fixture: a server certificate and clients alice and mallory

from transport.config import ConfigError, parse_config
from transport.security import InsecureBindError, ServerSecurity, curve_client
from transport.subscriber import Subscriber

pytestmark = pytest.mark.e2e  # every test but the settings check starts a daemon or a script

# Quick heartbeats, so a dead consumer is dropped within a test's patience.
FAST = {"subscribe": {"heartbeat_ms": 200, "timeout_ms": 2000}}


def follow_command(daemon: Daemon, *args: str) -> list[str]:
    """scripts/events.py --follow against ``daemon``, with ``args`` before the flags."""
    return [
        sys.executable,
        str(SCRIPTS / "events.py"),
        *args,
        "--follow",
        "--endpoint",
        daemon.query,
        "--subscribe-endpoint",
        daemon.subscribe,
    ]


class Follower:
    """scripts/events.py --follow in a process of its own, its JSON Lines in a file."""

    def __init__(self, daemon: Daemon, path: Path, *args: str) -> None:
        self.path = path
        self._out = path.open("wb")
        self.proc = subprocess.Popen(
            follow_command(daemon, *args),
            stdout=self._out,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # SIGABRT prints every thread's stack
            preexec_fn=default_sigint,
        )

    def events(self) -> list[dict[str, Any]]:
        text = self.path.read_text()
        complete = text[: text.rfind("\n") + 1]  # a line being written is not one yet
        return [json.loads(line) for line in complete.splitlines()]

    def count(self) -> int:
        return self.path.read_bytes().count(b"\n")

    def interrupt(self) -> tuple[int, str]:
        """SIGINT, as Ctrl-C; the exit status and what it said on stderr."""
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            _, err = self.proc.communicate(timeout=30)
            stacks = err.decode(errors="replace")
            raise AssertionError(f"the follower ignored SIGINT for 30 s; where it was:\n{stacks}") from None
        self._out.close()
        return self.proc.returncode, err.decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()


@pytest.fixture
def followers() -> Any:
    made: list[Follower] = []
    yield made
    for follower in made:
        follower.kill()


def subscriptions_logged(daemon: Daemon) -> int:
    return daemon.log().count("actors.subscriptions: subscription ") - daemon.log().count(") ended: ")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def identities(events: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    return [(event["topic"], event["event_id"], event["seq"]) for event in events]


def test_followers_see_every_stored_event_once_in_order_through_a_kill_and_restart(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, followers: list[Follower]
) -> None:
    daemon = daemon_factory(**FAST).start()
    early = Follower(daemon, tmp_path / "early.jsonl")
    followers.append(early)
    eventually(lambda: subscriptions_logged(daemon) >= 1, 30, "the early follower subscribed")
    publisher = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "publish.py"), "--endpoint", daemon.ack, "--acked"]
        + ["--events", "30000", "--topics", "5", "--rate", "4000", "--deadline", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        eventually(lambda: daemon.stats()["unique_processed"] >= 4000, 60, "publishing under way")
        joiner = Follower(daemon, tmp_path / "joiner.jsonl", "topic-1")
        followers.append(joiner)
        eventually(lambda: daemon.stats()["unique_processed"] >= 12000, 60, "more events stored")
        daemon.kill()
        daemon.start()
        out, _ = publisher.communicate(timeout=150)
    finally:
        if publisher.poll() is None:
            publisher.kill()
    assert publisher.returncode == 0, out
    stored = stored_rows(daemon.db_path)
    assert len(stored) == 30000
    late = Follower(daemon, tmp_path / "late.jsonl", "--after", "0")
    followers.append(late)
    topic_1 = [row for row in stored if row[0] == "topic-1"]
    for follower, expected in ((early, stored), (joiner, topic_1), (late, stored)):
        wanted = len(expected)
        eventually(lambda f=follower, n=wanted: f.count() >= n, 90, f"{follower.path.name} caught up")
    for follower, expected in ((early, stored), (joiner, topic_1), (late, stored)):
        status, err = follower.interrupt()
        assert status == 0, err
        got = follower.events()
        assert identities(got) == expected, follower.path.name  # every stored event once, in commit order
    assert [event["seq"] for event in joiner.events()] == list(range(1, len(topic_1) + 1))
    assert [event["position"] for event in early.events()] == sorted({e["position"] for e in early.events()})


def test_a_stopped_follower_holds_nothing_in_the_daemon_and_then_catches_up(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, followers: list[Follower]
) -> None:
    daemon = daemon_factory(**FAST).start()
    assert daemon.proc is not None
    follower = Follower(daemon, tmp_path / "stopped.jsonl")
    followers.append(follower)
    # The same ingest first, followed live: the daemon's own memory (page cache, in-flight
    # bound, allocator) reaches its working size, so what follows measures the stopped follower.
    publish(daemon.ack, "--acked", "--events", "100000", "--topics", "20", "--batch", "500", "--id-prefix", "warm")
    eventually(lambda: follower.count() >= 100000, 60, "the follower read the warm-up")
    before = rss_kb(daemon.proc.pid)
    follower.proc.send_signal(signal.SIGSTOP)
    try:
        publish(daemon.ack, "--acked", "--events", "100000", "--topics", "20", "--batch", "500", timeout=170)
        after = rss_kb(daemon.proc.pid)
        eventually(lambda: "not heard from" in daemon.log(), 30, "the daemon dropped the silent follower")
    finally:
        follower.proc.send_signal(signal.SIGCONT)
    grown_mb = (after - before) / 1024
    assert grown_mb < 30, f"daemon RSS grew {grown_mb:.0f} MB while a follower was stopped"
    eventually(lambda: follower.count() >= 200000, 120, "the resumed follower caught up")
    status, err = follower.interrupt()
    assert status == 0, err
    assert identities(follower.events()) == stored_rows(daemon.db_path)


def take(subscriber: Subscriber, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count} events within {timeout} s"
        event = subscriber.next_event(1.0)
        if event is not None:
            got.append(event)
    return got


def test_a_named_consumer_resumes_after_its_own_restart_and_the_daemons(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory(**FAST).start()
    publish(daemon.ack, "--acked", "--events", "1000", "--topics", "3")
    with Subscriber(daemon.subscribe, name="billing", credit=50) as first:
        got = take(first, 300)
    assert [event["position"] for event in got] == list(range(1, 301))
    assert daemon.request({"op": "consumers"}) == {
        "consumers": [
            {
                "name": "billing",
                "topic": None,
                "position": 300,
                "lag": 700,
                "updated_at": pytest.approx(time.time(), abs=60),
            }
        ]
    }
    with Subscriber(daemon.subscribe, name="billing") as second:  # no after: where it acknowledged
        got = take(second, 300)
    assert [event["position"] for event in got] == list(range(301, 601))
    assert daemon.terminate() == 0
    daemon.start()
    with Subscriber(daemon.subscribe, name="billing") as third:
        got = take(third, 400)
        assert third.next_event(0.5) is None
    assert [event["position"] for event in got] == list(range(601, 1001))
    assert daemon.request({"op": "consumers"})["consumers"][0]["lag"] == 0
    # One topic, named: its cursor is the seq.
    with Subscriber(daemon.subscribe, "topic-2", name="audit") as audit:
        seqs = [event["seq"] for event in take(audit, 10)]
    assert seqs == list(range(1, 11))
    with Subscriber(daemon.subscribe, "topic-2", name="audit") as audit:
        assert audit.next_event(10)["seq"] == 11  # type: ignore[index]


class RawConsumer:
    """A consumer written from docs/subscribe.md with plain pyzmq: DEALER, one msgpack map a frame."""

    def __init__(self, endpoint: str) -> None:
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)

    def send(self, message: Any) -> None:
        self.socket.send(msgpack.packb(message, use_bin_type=True))

    def send_raw(self, *frames: bytes) -> None:
        self.socket.send_multipart(list(frames))

    def receive(self, timeout: float = 10) -> dict[str, Any]:
        """The next message that is not a heartbeat."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and self.socket.poll(int(left * 1000)), "no message from the daemon"
            message = msgpack.unpackb(self.socket.recv(), raw=False)
            if message["op"] != "heartbeat":
                return message  # type: ignore[no-any-return]

    def events(self, count: int) -> list[dict[str, Any]]:
        """The events of the next ``events`` messages, ``count`` of them (however many a message holds)."""
        got: list[dict[str, Any]] = []
        while len(got) < count:
            message = self.receive()
            assert message["op"] == "events", message
            got.extend(message["events"])
        return got

    def quiet(self, seconds: float) -> list[dict[str, Any]]:
        """Every message but heartbeats within ``seconds``."""
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.socket.poll(int(left * 1000)):
                message = msgpack.unpackb(self.socket.recv(), raw=False)
                if message["op"] != "heartbeat":
                    got.append(message)
        return got

    def close(self) -> None:
        self.socket.close(linger=0)


def test_a_raw_consumer_gets_exactly_its_credit_and_bad_messages_change_nothing(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory().start()
    publish(daemon.ack, "--acked", "--events", "200", "--topics", "2")
    consumer = RawConsumer(daemon.subscribe)
    try:
        consumer.send({"op": "subscribe", "topic": "topic-0", "after": 0, "credit": 5, "name": "raw", "ref": 7})
        assert consumer.receive() == {
            "op": "subscribed",
            "topic": "topic-0",
            "after": 0,
            "name": "raw",
            "heartbeat_ms": 1000,
            "max_credit": 10_000,
            "ref": 7,
        }
        got = []
        while len(got) < 5:
            message = consumer.receive()
            assert message["op"] == "events"
            got.extend(message["events"])
        assert [event["seq"] for event in got] == [1, 2, 3, 4, 5]
        assert set(got[0]) == {"topic", "event_id", "timestamp", "source", "payload", "seq", "late"}
        assert got[0]["payload"]["n"] == 0  # the payload map itself, not its encoding
        assert consumer.quiet(0.5) == []  # no more than the credit
        consumer.send({"op": "ack", "position": 5})
        assert consumer.receive() == {"op": "acked", "position": 5}

        bad: list[tuple[tuple[bytes, ...], str]] = [
            ((b"\xc1",), "not valid msgpack"),
            ((msgpack.packb({"op": "credit", "credit": 1}) + b"\x01",), "bytes follow the msgpack object"),
            ((msgpack.packb({"op": "credit", "credit": 1})[:-1],), "it ends inside a msgpack value"),
            ((msgpack.packb([1, 2]),), "must be a map"),
            ((msgpack.packb({"op": "dance"}),), "unknown op 'dance'"),
            ((msgpack.packb({"op": "credit", "credit": -1}),), "'credit' must be an integer"),
            ((msgpack.packb({"op": "credit", "credit": "lots"}),), "'credit' must be an integer"),
            ((msgpack.packb({"op": "ack", "position": 99}),), "beyond what was sent"),
            # Every op refuses fields it does not take, as subscribe does (heartbeat and
            # unsubscribe took any: a misspelt "forgett" unsubscribed without forgetting).
            ((msgpack.packb({"op": "credit", "credit": 1, "x": 1}),), "op 'credit' takes only 'credit', not 'x'"),
            ((msgpack.packb({"op": "ack", "position": 1, "pos": 1}),), "op 'ack' takes only 'position', not 'pos'"),
            ((msgpack.packb({"op": "heartbeat", "x": 1}),), "op 'heartbeat' takes no field but 'op', not 'x'"),
            ((msgpack.packb({"op": "unsubscribe", "forgett": True}),), "takes only 'forget', not 'forgett'"),
            ((msgpack.packb({"op": "subscribe", "after": -1}),), "'after' must be an integer"),
            ((msgpack.packb({"op": "subscribe", "topic": "a", "topics": ["b"]}),), "not both"),
            ((msgpack.packb({"op": "subscribe", "topic": "x", "name": "raw"}),), "follows topic 'topic-0'"),
            ((msgpack.packb({"op": "subscribe", "colour": "red"}),), "unknown field(s) colour"),
            ((msgpack.packb({"op": "subscribe", "topic": "a b"}),), "no event can have this topic in 'topic'"),
            ((msgpack.packb({"op": "subscribe", "topics": ["t", "x" * 256]}),), "in 'topics' (topic must be 1-255"),
            ((b"a", b"b"), "one frame"),
            # PostgreSQL cannot store it: refused on either backend, for good (not "unavailable").
            ((msgpack.packb({"op": "subscribe", "name": "bad\x00name"}),), "must not hold a NUL character"),
            ((msgpack.packb({"op": "subscribe", "name": 5}),), "name must be a string, not int"),
            ((msgpack.packb({"op": "heartbeat", msgpack.Timestamp(1, 0): 1}),), "a map key is a msgpack Timestamp"),
        ]
        for frames, error in bad:
            consumer.send_raw(*frames)
            reply = consumer.receive()
            assert reply["op"] == "error" and reply["code"] == "bad_request", reply
            assert error in reply["error"], (error, reply)
        # Nothing changed: the subscription goes on after seq 5, the stored position is still 5.
        consumer.send({"op": "credit", "credit": 3})
        message = consumer.receive()
        assert [event["seq"] for event in message["events"]] == [6, 7, 8]
        assert daemon.request({"op": "consumers"})["consumers"][0]["position"] == 5
        assert daemon.stats()["unique_processed"] == 200
        assert daemon.request({"op": "health"})["actors"]["subscriptions"] is True
    finally:
        consumer.close()
    stranger = RawConsumer(daemon.subscribe)
    try:
        for _ in range(50):
            stranger.send({"op": "credit", "credit": 10})
            assert stranger.receive()["code"] == "not_subscribed"
    finally:
        stranger.close()
    # Told, and routine (a consumer's last words after its close was seen): no warning for it,
    # and no more lines than any peer may cause.
    assert "WARNING actors.subscriptions: refused a subscriber (not_subscribed)" not in daemon.log()
    assert 1 <= daemon.log().count("a message from a connection with no subscription") <= 10


def test_an_expired_cursor_is_told_the_first_position_still_stored(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory().start()
    publish(daemon.ack, "--acked", "--events", "100", "--topics", "1")
    # What retention will do: the oldest events go (written here straight to the file).
    conn = sqlite3.connect(daemon.db_path, timeout=10)
    with conn:
        conn.execute("DELETE FROM events WHERE seq <= 40")
    conn.close()
    consumer = RawConsumer(daemon.subscribe)
    try:
        consumer.send({"op": "subscribe", "topic": "topic-0", "after": 10, "credit": 100})
        assert consumer.receive()["op"] == "subscribed"
        assert consumer.receive() == {"op": "expired", "after": 10, "first": 41}
        assert [event["seq"] for event in consumer.events(60)] == list(range(41, 101))
        consumer.send({"op": "subscribe", "after": 0, "credit": 100})
        assert consumer.receive()["op"] == "subscribed"
        assert consumer.receive() == {"op": "expired", "after": 0, "first": 41}
        assert [event["position"] for event in consumer.events(60)] == list(range(41, 101))
    finally:
        consumer.close()


def test_one_client_resubscribing_in_a_loop_cannot_flood_the_log(daemon_factory: Callable[..., Daemon]) -> None:
    """Each subscribe once wrote two INFO lines (the old subscription ended, the new one began):
    70 MB of log in 8 s from one client. They are rate-limited now; the client still gets every
    reply (more than its queue of 8 messages holds, so some wait their turn) and its events."""
    daemon = daemon_factory().start()
    publish(daemon.ack, "--acked", "--events", "5", "--topics", "1")
    consumer = RawConsumer(daemon.subscribe)
    try:
        for index in range(400):
            consumer.send({"op": "subscribe", "name": f"n{index % 3}", "after": 0, "credit": 0})
        consumer.send({"op": "subscribe", "after": 0, "credit": 5})
        replies = [consumer.receive() for _ in range(402)]  # none lost to the peer's full queue
    finally:
        consumer.close()
    assert [reply["op"] for reply in replies].count("subscribed") == 401
    assert [e["position"] for r in replies if r["op"] == "events" for e in r["events"]] == [1, 2, 3, 4, 5]
    lines = [line for line in daemon.log().splitlines() if "actors.subscriptions: subscription " in line]
    assert len(lines) <= 60, f"{len(lines)} subscription lines logged for 401 subscribe messages"


def test_a_hundred_consumers_cost_bounded_memory_and_get_only_their_credit(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory().start()
    assert daemon.proc is not None
    publish(daemon.ack, "--acked", "--events", "50000", "--topics", "10", "--batch", "500", "--id-prefix", "warm")
    before = rss_kb(daemon.proc.pid)
    consumers = [RawConsumer(daemon.subscribe) for _ in range(100)]
    try:
        for index, consumer in enumerate(consumers):
            form = {"topic": f"topic-{index % 10}"} if index % 2 else {}
            consumer.send({"op": "subscribe", "after": 0, "credit": 50, **form})
        for consumer in consumers:
            assert consumer.receive()["op"] == "subscribed"
        publish(daemon.ack, "--acked", "--events", "50000", "--topics", "10", "--batch", "500")
        received = []
        for consumer in consumers:
            consumer.send({"op": "heartbeat"})
            events = [e for m in consumer.quiet(0.05) if m["op"] == "events" for e in m["events"]]
            received.append(len(events))
        after = rss_kb(daemon.proc.pid)
    finally:
        for consumer in consumers:
            consumer.close()
    assert received == [50] * 100
    grown_mb = (after - before) / 1024
    assert grown_mb < 30, f"daemon RSS grew {grown_mb:.0f} MB with 100 consumers"


STOPPED_CONSUMER = """
import sys, time, msgpack, zmq
socket = zmq.Context().socket(zmq.DEALER)
socket.setsockopt(zmq.RCVBUF, 4096)
socket.connect(sys.argv[1])
socket.send(msgpack.packb({"op": "subscribe", "after": 0, "credit": 10000}))
assert socket.poll(10_000) and msgpack.unpackb(socket.recv())["op"] == "subscribed"
print("subscribed", flush=True)
time.sleep(60)
"""


def established(port: int) -> int:
    """How many TCP connections to ``port`` on this machine are established, from the server's side."""
    listed = subprocess.run(
        ["ss", "-tnH", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True, timeout=10
    )
    return len(listed.stdout.splitlines())


def test_consumers_that_stop_reading_large_events_cost_the_daemon_little_memory(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """Six consumers that grant all their credit and then stop (SIGSTOP: not even their ZeroMQ
    threads read) hold in the daemon only the few messages of about 1 MiB their queues take, not
    their whole backlog (54 MB each); a consumer that reads still gets every event."""
    from transport.publisher import Publisher

    # Buffers of 128 KiB and more mapped alone and unmapped when freed, so the resident memory
    # follows what is held rather than what glibc keeps of freed buffers in its arenas.
    daemon = daemon_factory().start(env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert daemon.proc is not None
    blob = os.urandom(900_000)
    with Publisher(daemon.ack) as publisher:
        for i in range(60):
            publisher.publish(
                {"topic": "big", "event_id": f"b{i}", "timestamp": "2025-10-22T10:00:00Z", "source": "t",
                 "payload": {"b": blob}}
            )  # fmt: skip
    before = rss_kb(daemon.proc.pid)
    stopped = []
    try:
        for _ in range(6):
            consumer = subprocess.Popen(
                [sys.executable, "-c", STOPPED_CONSUMER, daemon.subscribe], stdout=subprocess.PIPE, text=True
            )
            stopped.append(consumer)
            assert consumer.stdout is not None and consumer.stdout.readline() == "subscribed\n"
            consumer.send_signal(signal.SIGSTOP)
        peak = before
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            peak = max(peak, rss_kb(daemon.proc.pid))
            time.sleep(0.2)
        with Subscriber(daemon.subscribe, credit=10) as reader:
            ids = [reader.next_event(10)["event_id"] for _ in range(60)]  # type: ignore[index]
        # Their subscriptions end after [subscribe] timeout_ms; ZeroMQ's heartbeats then close
        # their connections, and what was queued for them is freed (it was kept for good).
        port = int(daemon.subscribe.rpartition(":")[2])
        eventually(lambda: established(port) == 0 or None, 30, "the stopped consumers' connections to close")
        eventually(lambda: rss_kb(daemon.proc.pid) < before + 20 * 1024 or None, 10, "their queues to be freed")
    finally:
        for consumer in stopped:
            consumer.kill()
            consumer.send_signal(signal.SIGCONT)
            consumer.wait(10)
    assert ids == [f"b{i}" for i in range(60)]
    grown_mb = (peak - before) / 1024
    assert grown_mb < 150, f"daemon RSS grew {grown_mb:.0f} MB for six consumers that read nothing"


def test_follow_with_limit_stops_after_n_events(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory().start()
    publish(daemon.ack, "--acked", "--events", "50", "--topics", "1")
    result = run_script(
        "events.py", "topic-0", "--follow", "--after", "20", "--limit", "7",
        "--endpoint", daemon.query, "--subscribe-endpoint", daemon.subscribe, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["seq"] for line in result.stdout.splitlines()] == list(range(21, 28))
    for topic in ("topic-0", None):  # a followed line is the listed line, byte for byte
        where = [topic] if topic else []
        common = [*where, "--after", "20", "--limit", "7", "--endpoint", daemon.query]
        listed = run_script("events.py", *common, timeout=60)
        followed = run_script("events.py", *common, "--follow", "--subscribe-endpoint", daemon.subscribe, timeout=60)
        assert listed.stdout == followed.stdout and listed.stdout.count("\n") == 7, (listed, followed)


def test_follow_with_only_the_query_endpoint_asks_the_daemon_where_to_subscribe(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory().start()  # its subscribe port is not the default 5558
    publish(daemon.ack, "--acked", "--events", "10", "--topics", "1")
    result = run_script("events.py", "--follow", "--limit", "10", "--endpoint", daemon.query, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["seq"] for line in result.stdout.splitlines()] == list(range(1, 11))
    assert daemon.request({"op": "health"})["endpoints"]["subscribe"] == daemon.subscribe
    # --timeout bounds the question: nothing listens at this query endpoint.
    started = time.monotonic()
    gone = run_script(
        "events.py", "--follow", "--endpoint", f"tcp://127.0.0.1:{free_port()}", "--timeout", "1", timeout=60
    )
    assert gone.returncode == 1 and "no answer from" in gone.stderr and time.monotonic() - started < 20


def test_curve_guards_the_subscription_endpoint(daemon_factory: Callable[..., Daemon], keys: dict[str, Path]) -> None:
    daemon = curve_daemon(daemon_factory, keys).start(wait=False)
    alice = curve_client(keys["server_public"], keys["alice"])
    wait_ready(daemon, alice)
    publish(
        daemon.ack, "--acked", "--events", "20", "--topics", "1",
        "--server-key", str(keys["server_public"]), "--client-cert", str(keys["alice"]),
    )  # fmt: skip
    with Subscriber(daemon.subscribe, "topic-0", configure=alice) as subscriber:
        assert [event["seq"] for event in take(subscriber, 20)] == list(range(1, 21))
    plain = RawConsumer(daemon.subscribe)
    try:
        plain.send({"op": "subscribe", "after": 0, "credit": 10})
        assert plain.quiet(1.0) == []  # the handshake fails: nothing comes back
    finally:
        plain.close()
    eventually(lambda: "refused a client" in daemon.log(), 10, "the plain client counted as refused")


def test_subscribe_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"\[subscribe\] timeout_ms \(500\) must be more than heartbeat_ms"):
        parse_config({"subscribe": {"heartbeat_ms": 1000, "timeout_ms": 500}})
    with pytest.raises(ConfigError, match=r"\[subscribe\] bind needs a port"):
        parse_config({"subscribe": {"bind": "tcp://127.0.0.1:99999"}})
    with pytest.raises(InsecureBindError, match=r"\[subscribe\] bind = tcp://0.0.0.0:5558"):
        ServerSecurity(zmq.Context.instance(), parse_config({"subscribe": {"bind": "tcp://0.0.0.0:5558"}}))


def test_the_subscription_benchmark_runs_and_reports_every_figure() -> None:
    result = run_script(
        "bench_subscribe.py", "--events", "2000", "--followers", "0,1", "--runs", "1",
        "--latency-events", "500", "--backlog", "2000", "--light", "--json", timeout=170,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert set(figures["ingest_median_events_per_s"]) == {"0", "1"}
    assert figures["latency"]["p99_ms"] >= figures["latency"]["p50_ms"]
    assert figures["catch_up_events_per_s"] > 0


def test_an_all_topics_subscription_keeps_only_the_topics_of_its_filter(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory().start()
    publish(daemon.ack, "--acked", "--events", "600", "--topics", "6")
    wanted = [row for row in stored_rows(daemon.db_path) if row[0] in ("topic-1", "topic-4")]
    with Subscriber(daemon.subscribe, topics=["topic-1", "topic-4"], after=0, credit=64) as subscriber:
        got = take(subscriber, len(wanted))
        publish(daemon.ack, "--acked", "--events", "60", "--topics", "6", "--id-prefix", "live")
        live = take(subscriber, 20)
        assert subscriber.next_event(0.5) is None
    assert identities(got) == wanted
    assert [event["position"] for event in got] == sorted(event["position"] for event in got)
    assert {event["topic"] for event in live} == {"topic-1", "topic-4"}
    assert all(event["event_id"].startswith("live") for event in live)


def test_follow_with_a_name_resumes_where_the_last_run_stopped(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory().start()
    publish(daemon.ack, "--acked", "--events", "30", "--topics", "1")
    where = ("--endpoint", daemon.query, "--subscribe-endpoint", daemon.subscribe)
    printed = []
    for _ in range(3):
        result = run_script("events.py", "topic-0", "--follow", "--name", "cli", "--limit", "10", *where, timeout=60)
        assert result.returncode == 0, result.stderr
        printed += [json.loads(line)["seq"] for line in result.stdout.splitlines()]
    assert printed == list(range(1, 31))
    assert daemon.request({"op": "consumers"})["consumers"] == [
        {"name": "cli", "topic": "topic-0", "position": 30, "lag": 0, "updated_at": pytest.approx(time.time(), abs=60)}
    ]
    refused = run_script("events.py", "--name", "cli", *where, timeout=60)
    assert refused.returncode == 2 and "--name and --subscribe-endpoint need --follow" in refused.stderr


def test_topics_and_consumers_print_the_counts_and_each_named_consumers_lag(daemon: Daemon) -> None:
    publish(daemon.ingest, "--events", "600", "--duplicates", "0.25", "--topics", "2", "--seed", "5")
    daemon.wait_idle()
    for name, topic in (("audit", None), ("billing", "topic-1")):
        chosen = [topic] if topic else []
        command = follow_command(daemon, *chosen, "--name", name, "--after", "0", "--limit", "4")
        read = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert read.returncode == 0 and len(read.stdout.splitlines()) == 4, read
    eventually(lambda: len(daemon.request({"op": "consumers"})["consumers"]) == 2, 10, "both positions stored")

    topics = run_script("topics.py", "--endpoint", daemon.query, timeout=30)
    assert topics.returncode == 0, topics.stderr
    header, *lines = topics.stdout.splitlines()[1:]
    assert header.split() == [
        "topic",
        "count",
        "first_seq",
        "last_seq",
        "received",
        "duplicate_dropped",
        "late",
        "expired",
    ]
    reply = daemon.request({"op": "topics"})["topics"]
    assert [line.split() for line in lines] == [
        [
            t["topic"],
            *(
                f"{t[k]:,}"
                for k in ("count", "first_seq", "last_seq", "received", "duplicate_dropped", "late", "expired")
            ),
        ]
        for t in reply
    ]
    assert sum(t["received"] for t in reply) == 600 and sum(t["count"] for t in reply) == 450
    as_json = run_script("topics.py", "--endpoint", daemon.query, "--json", timeout=30)
    assert json.loads(as_json.stdout) == {"topics": reply}

    consumers = run_script("consumers.py", "--endpoint", daemon.query, timeout=30)
    assert consumers.returncode == 0, consumers.stderr
    assert consumers.stdout.splitlines()[0].endswith(": 2 named consumers")
    rows = {line.split()[0]: line.split() for line in consumers.stdout.splitlines()[2:]}
    billing_last = next(t["last_seq"] for t in reply if t["topic"] == "topic-1")
    assert rows["audit"][1:4] == ["*", "4", f"{450 - 4:,}"], rows
    assert rows["billing"][1:4] == ["topic-1", "4", f"{billing_last - 4:,}"], rows
    assert rows["audit"][4].endswith("Z")
    away = run_script("consumers.py", "--endpoint", f"tcp://127.0.0.1:{free_port()}", "--timeout", "1", timeout=30)
    assert away.returncode == 1 and away.stdout == "" and "no answer from" in away.stderr


def test_forgetting_a_named_consumer_deletes_its_position_and_frees_its_name(daemon: Daemon) -> None:
    publish(daemon.ingest, "--events", "300", "--topics", "2", "--seed", "6")
    daemon.wait_idle()
    live = RawConsumer(daemon.subscribe)
    try:
        # Named and acknowledged: "billing" on topic-1, "audit" on every topic, still following.
        for name, topic in (("billing", "topic-1"), ("audit", None)):
            live.send({"op": "subscribe", "name": name, "after": 0, "credit": 3, **({"topic": topic} if topic else {})})
            assert live.receive()["op"] == "subscribed"
            sent: list[dict[str, Any]] = []
            while len(sent) < 3:
                sent += live.receive()["events"]
            live.send({"op": "ack", "position": sent[-1]["seq" if topic else "position"]})
            assert live.receive() == {"op": "acked", "position": 3}
        for bad, why in (({"forget": "yes"}, "'forget' must be true or false"),):
            live.send({"op": "unsubscribe", **bad})
            refused = live.receive()
            assert refused["code"] == "bad_request" and why in refused["error"], refused

        forgot = run_script("consumers.py", "--endpoint", daemon.query, "--forget", "billing", timeout=30)
        assert forgot.returncode == 0, forgot.stderr
        assert forgot.stdout.startswith("forgot named consumer 'billing' (it was at position 3, lag 147)"), forgot
        assert [c["name"] for c in daemon.request({"op": "consumers"})["consumers"]] == ["audit"]
        again = run_script("consumers.py", "--endpoint", daemon.query, "--forget", "billing", timeout=30)
        assert again.returncode == 1 and "no named consumer 'billing' is stored" in again.stderr, again

        # The consumer following under a forgotten name is ended, and told why.
        assert run_script("consumers.py", "--endpoint", daemon.query, "--forget", "audit", timeout=30).returncode == 0
        assert live.receive()["code"] == "replaced"
        assert daemon.request({"op": "consumers"})["consumers"] == []
    finally:
        live.close()

    # A forgotten name may follow another topic (refused while it was stored for topic-1).
    unnamed = RawConsumer(daemon.subscribe)
    try:
        unnamed.send({"op": "subscribe", "topic": "topic-0", "name": "billing", "credit": 0})
        assert unnamed.receive()["after"] == 0  # no stored position to resume from
        unnamed.send({"op": "subscribe", "topic": "topic-0"})
        assert unnamed.receive()["op"] == "subscribed"
        unnamed.send({"op": "unsubscribe", "forget": True})
        refused = unnamed.receive()
        assert refused["code"] == "bad_request" and "for a named subscription" in refused["error"], refused
    finally:
        unnamed.close()


def test_a_query_sent_to_the_subscribe_endpoint_is_told_where_queries_go(daemon_factory: Callable[..., Daemon]) -> None:
    """A REQ socket takes only replies carrying its envelope's empty frame, so the error sent to
    a query here was dropped, and `eventagg stats` pointed at this port waited its whole timeout."""
    daemon = daemon_factory().start()
    started = time.monotonic()
    stats = run_script("stats.py", "--endpoint", daemon.subscribe, "--timeout", "60", timeout=30)
    assert stats.returncode == 1 and "[query] bind" in stats.stderr, stats.stderr
    assert time.monotonic() - started < 20
    # A subscriber's message behind an empty frame is still a subscriber's: told it must be one frame.
    consumer = RawConsumer(daemon.subscribe)
    try:
        consumer.send_raw(b"", msgpack.packb({"op": "subscribe", "after": 0, "credit": 5}))
        told = consumer.receive()
        assert told["op"] == "error" and told["code"] == "bad_request" and "one frame" in told["error"], told
    finally:
        consumer.close()
    with Subscriber(daemon.subscribe, "topic-0", after=0) as follower:  # followers are served as before
        publish(daemon.ack, "--acked", "--events", "3", "--topics", "1")
        assert follower.next_event(timeout=10) is not None
    assert daemon.terminate() == 0


def test_a_refused_subscribe_is_answered_with_its_own_ref(daemon: Daemon) -> None:
    """``ref`` lets a consumer tell its latest subscribe's answers from an older one's; the error
    answering a refused subscribe carried none, so one that subscribed again on the same
    connection could not tell whether its new subscribe or something else was refused."""
    publish(daemon.ack, "--acked", "--events", "3", "--topics", "1")
    consumer = RawConsumer(daemon.subscribe)
    try:
        consumer.send({"op": "subscribe", "topic": "topic-0", "after": 0, "credit": 0, "ref": 1})
        assert consumer.receive()["ref"] == 1
        refusals: list[tuple[dict[str, Any], str]] = [
            ({"op": "subscribe", "topic": "topic-0", "after": 99, "ref": 2}, "past the last seq"),
            ({"op": "subscribe", "topic": "topic-0", "colour": "red", "ref": 3}, "unknown field(s) colour"),
            ({"op": "subscribe", "topic": "a b", "ref": 4}, "no event can have this topic"),
        ]
        for request, error in refusals:
            consumer.send(request)
            reply = consumer.receive()
            assert reply["op"] == "error" and reply["code"] == "bad_request", reply
            assert error in reply["error"] and reply["ref"] == request["ref"], reply
        # A ref that is itself unreadable is not echoed; nor is one on another op's error.
        consumer.send({"op": "subscribe", "topic": "topic-0", "ref": -1})
        assert "ref" not in consumer.receive()
        consumer.send({"op": "credit", "credit": -1, "ref": 5})
        assert "ref" not in consumer.receive()
        # Nothing changed: the first subscription goes on.
        consumer.send({"op": "credit", "credit": 3})
        assert [event["seq"] for event in consumer.events(3)] == [1, 2, 3]
    finally:
        consumer.close()


def test_nil_counts_as_absent_in_every_optional_field_of_subscribe_and_unsubscribe(daemon: Daemon) -> None:
    """An encoder without "omit empty" (a Go struct of pointers) sends nil for each field left
    unset. subscribe took it for topic, topics, after, name and ref, but refused a nil credit,
    and unsubscribe a nil forget, so such a consumer could not subscribe at all."""
    publish(daemon.ack, "--acked", "--events", "3", "--topics", "1")
    consumer = RawConsumer(daemon.subscribe)
    try:
        unset = {"topics": None, "after": None, "name": None, "ref": None, "credit": None}
        consumer.send({"op": "subscribe", "topic": "topic-0", **unset})
        subscribed = consumer.receive()
        assert subscribed["op"] == "subscribed" and subscribed["after"] == 0, subscribed
        assert consumer.quiet(0.5) == []  # nil credit is the default, 0: nothing is sent yet
        consumer.send({"op": "credit", "credit": 3})
        assert [event["seq"] for event in consumer.events(3)] == [1, 2, 3]
        consumer.send({"op": "unsubscribe", "forget": None})
        assert consumer.receive() == {"op": "unsubscribed"}
        # A required field stays required: credit's own credit, ack's position.
        consumer.send({"op": "subscribe", "topic": "topic-0", "name": "nils", "credit": None})
        assert consumer.receive()["op"] == "subscribed"
        for request in ({"op": "credit", "credit": None}, {"op": "ack", "position": None}):
            consumer.send(request)
            reply = consumer.receive()
            assert reply["op"] == "error" and reply["code"] == "bad_request", reply
    finally:
        consumer.close()
