"""A CURVE daemon refusing a client's handshake: acknowledged publishers and subscribers say so at once.

They used to find out late or never: an acknowledged publisher only at its ``deadline``, as a
``DeliveryFailed`` that named no cause, and a subscriber not at all (it reconnected for ever,
logging). Each refusal is tried three ways: a client key the daemon does not authorize (ZAP
refuses it), a server key that is not the daemon's, and no CURVE at all.
"""

from __future__ import annotations

import contextlib
import pickle
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
from harness import Daemon, eventually, run_script
from test_security import Hook, curve_daemon, wait_ready
from test_security import keys as keys  # the fixture: a server certificate and clients alice and mallory

from transport.client import REFUSAL_EVENTS, NoAnswer, QueryClient, close_monitored, unbounded_monitor
from transport.publisher import DeliveryFailed, Publisher, PublisherRefused
from transport.security import curve_client
from transport.subscriber import Subscriber, SubscriberRefused
from transport.workload import plan

pytestmark = pytest.mark.timeout(120)

PROMPT_S = 3.0  # the most a refusal may take to be told, against deadlines of 60 s
KEY_REFUSED = "refused this client's CURVE key (ZAP status 400)"
HANDSHAKE_FAILED = "took the connection but the security handshake failed"


def refused_clients(keys: dict[str, Path], tmp_path: Path) -> dict[str, tuple[Hook | None, str]]:
    """Each way to be refused: the socket hook, and the words the refusal is told in."""
    other = tmp_path / "other"
    made = run_script("keys.py", "server", str(other), timeout=30)
    assert made.returncode == 0, made.stderr
    return {
        "unauthorized key": (curve_client(keys["server_public"], keys["mallory"]), KEY_REFUSED),
        "wrong server key": (curve_client(other / "server.key", keys["alice"]), HANDSHAKE_FAILED),
        "no CURVE": (None, HANDSHAKE_FAILED),
    }


def stats(daemon: Daemon, hook: Hook) -> dict[str, Any]:
    with QueryClient(daemon.query, timeout=5.0, configure=hook) as client:
        return client.call({"op": "stats"})


@pytest.mark.e2e
def test_an_acknowledged_publisher_refused_says_so_at_once_with_every_event(
    daemon_factory: Callable[..., Daemon], keys: dict[str, Path], tmp_path: Path
) -> None:
    daemon = curve_daemon(daemon_factory, keys).start(wait=False)
    alice = curve_client(keys["server_public"], keys["alice"])
    wait_ready(daemon, alice)
    for how, (hook, words) in refused_clients(keys, tmp_path).items():
        events = plan(250, id_prefix=f"{how}-")
        publisher = Publisher(daemon.ack, configure=hook, deadline=60.0, ack_timeout=30.0)
        try:
            started = time.monotonic()
            with pytest.raises(DeliveryFailed) as caught:  # an `except DeliveryFailed` still takes it
                publisher.publish_many(events)
                publisher.flush(timeout=20)
            took = time.monotonic() - started
            assert took < PROMPT_S, (how, took)
            refused = caught.value
            assert isinstance(refused, PublisherRefused), (how, refused)
            assert refused.events == events, how  # every one handed back, in order: nothing lost
            assert publisher.unacknowledged == 0 and publisher.totals.abandoned == 250
            message = str(refused)
            assert message.startswith(f"{daemon.ack} {words}"), (how, message)
            assert "configure=transport.security.curve_client" in message, message  # what to change
            if words == HANDSHAKE_FAILED:
                assert "the server key must be the daemon's" in message, message
            assert "250 unacknowledged events are in this exception's .events" in message, message
            assert refused.refusals == {daemon.ack: message[len(daemon.ack) + 1 : message.index(". 250")]}
            assert str(pickle.loads(pickle.dumps(refused))) == message
            # Still usable, and told again at once while the daemon still refuses.
            started = time.monotonic()
            with pytest.raises(PublisherRefused) as again:
                publisher.publish_many(refused.events)
                publisher.flush(timeout=20)
            assert time.monotonic() - started < PROMPT_S and again.value.events == events
            # close() flushing says it too, at once, rather than wait out close_timeout.
            publisher.publish_many(events[:10])
            started = time.monotonic()
            with pytest.raises(PublisherRefused) as closing:
                publisher.close()
            assert time.monotonic() - started < PROMPT_S and closing.value.events == events[:10]
        finally:
            publisher.close(timeout=0, flush=False)
    # The one the daemon takes gets its events through; none of the refused ones arrived.
    with Publisher(daemon.ack, configure=alice) as publisher:
        publisher.publish_many(plan(20, id_prefix="alice-"))
    assert stats(daemon, alice)["received"] == 20


@pytest.mark.e2e
def test_a_publisher_from_config_names_the_config_keys_to_change(
    daemon_factory: Callable[..., Daemon], keys: dict[str, Path], tmp_path: Path
) -> None:
    daemon = curve_daemon(daemon_factory, keys).start(wait=False)
    wait_ready(daemon, curve_client(keys["server_public"], keys["alice"]))
    config = tmp_path / "client.toml"
    config.write_text(
        f"[ingest]\nbind = '{daemon.ingest}'\nack_bind = '{daemon.ack}'\n"
        f"[security]\nserver_public_key = '{keys['server_public']}'\nclient_certificate = '{keys['mallory']}'\n"
    )
    started = time.monotonic()
    with pytest.raises(PublisherRefused) as refused, Publisher.from_config(config, deadline=60.0) as publisher:
        publisher.publish_many(plan(10, id_prefix="cfg-"))
    assert time.monotonic() - started < PROMPT_S
    message = str(refused.value)
    assert f"{daemon.ack} {KEY_REFUSED}: add its public certificate to the daemon's authorized folder" in message
    assert "([security] authorized_keys) and send SIGHUP" in message, message
    assert "or point [security] client_certificate at an authorized certificate" in message, message
    assert len(refused.value.events) == 10


def two_daemons(daemon_factory: Callable[..., Daemon], keys: dict[str, Path], tmp_path: Path) -> tuple[Daemon, Daemon]:
    """Two CURVE daemons with the same server key: the first authorizes alice, the second only bob
    (its authorized folder is ``tmp_path / "bob-authorized"``)."""
    made = run_script(
        "keys.py", "client", "bob", str(tmp_path / "bob"), "--authorize", str(tmp_path / "bob-authorized"), timeout=30
    )
    assert made.returncode == 0, made.stderr
    takes = curve_daemon(daemon_factory, keys).start(wait=False)
    refuses = daemon_factory(
        "refuses",
        security={"curve_secret_key": str(keys["server_secret"]), "authorized_keys": str(tmp_path / "bob-authorized")},
    ).start(wait=False)
    wait_ready(takes, curve_client(keys["server_public"], keys["alice"]))
    wait_ready(refuses, curve_client(keys["server_public"], tmp_path / "bob" / "bob.key_secret"))
    return takes, refuses


@pytest.mark.e2e
def test_a_publisher_to_several_daemons_passes_over_one_that_refuses_until_its_keys_are_put_right(
    daemon_factory: Callable[..., Daemon], keys: dict[str, Path], tmp_path: Path
) -> None:
    """A daemon that refuses the key is passed over at once, and asked again each second: libzmq
    never connects a socket again after a refused key, so such a daemon stayed passed over for
    good once its keys were put right."""
    takes, refuses = two_daemons(daemon_factory, keys, tmp_path)
    alice = curve_client(keys["server_public"], keys["alice"])
    events = plan(400, 0.0, 20, 3, "aff-")
    publisher = Publisher(endpoints=[takes.ack, refuses.ack], configure=alice, deadline=60.0)
    assert sum(publisher.ranking(event["topic"])[0] == refuses.ack for event in events) > 50
    try:
        started = time.monotonic()
        publisher.publish_many(events)
        publisher.flush(timeout=20)
        assert time.monotonic() - started < PROMPT_S
        assert (publisher.totals.acked_new, publisher.totals.abandoned) == (400, 0), publisher.totals
        (tmp_path / "bob-authorized" / "alice.key").write_bytes(keys["alice"].with_suffix(".key").read_bytes())
        assert refuses.proc is not None
        refuses.proc.send_signal(signal.SIGHUP)
        eventually(lambda: "reloaded 2 authorized client keys" in refuses.log(), 15, "the keys to be reloaded")

        def back() -> bool:
            publisher.publish_many(plan(40, 0.0, 20, 3, f"back-{time.monotonic()}-"))
            publisher.flush(timeout=10)
            return stats(refuses, alice)["unique_processed"] > 0

        eventually(back, 10, "the daemon whose keys were put right to get its topics back", interval=0.2)
    finally:
        publisher.close(timeout=0, flush=False)


@pytest.mark.e2e
def test_a_publisher_to_several_daemons_that_all_refuse_says_so_at_once_naming_each(
    daemon_factory: Callable[..., Daemon], keys: dict[str, Path], tmp_path: Path
) -> None:
    takes, refuses = two_daemons(daemon_factory, keys, tmp_path)
    endpoints = [takes.ack, refuses.ack]
    events = plan(400, 0.0, 20, 3, "all-")
    mallory = curve_client(keys["server_public"], keys["mallory"])  # authorized by neither
    publisher = Publisher(endpoints=endpoints, configure=mallory, deadline=60.0)
    try:
        started = time.monotonic()
        with pytest.raises(DeliveryFailed) as caught:
            publisher.publish_many(events)
            publisher.flush(timeout=20)
        assert time.monotonic() - started < PROMPT_S
        refused = caught.value
        assert isinstance(refused, PublisherRefused), refused
        assert sorted(event["event_id"] for event in refused.events) == sorted(e["event_id"] for e in events)
        assert set(refused.refusals) == set(endpoints) and publisher.unacknowledged == 0
        assert str(refused).startswith(
            f"every daemon refused this publisher's handshake: {takes.ack} and {refuses.ack} {KEY_REFUSED}"
        ), refused
    finally:
        publisher.close(timeout=0, flush=False)


@pytest.mark.e2e
def test_a_subscriber_refused_raises_at_once_instead_of_reconnecting_for_ever(
    daemon_factory: Callable[..., Daemon], keys: dict[str, Path], tmp_path: Path
) -> None:
    daemon = curve_daemon(daemon_factory, keys).start(wait=False)
    alice = curve_client(keys["server_public"], keys["alice"])
    wait_ready(daemon, alice)
    with Publisher(daemon.ack, configure=alice) as publisher:
        publisher.publish_many(plan(5, 0.0, 1, id_prefix="s-"))
    for how, (hook, words) in refused_clients(keys, tmp_path).items():
        with Subscriber(daemon.subscribe, "topic-0", configure=hook, name="reader", timeout=30) as subscriber:
            started = time.monotonic()
            with pytest.raises(SubscriberRefused) as refused:
                subscriber.next_event(timeout=20)
            assert time.monotonic() - started < PROMPT_S, how
            message = str(refused.value)
            assert message.startswith(f"{daemon.subscribe} {words}"), (how, message)
            assert "configure=transport.security.curve_client" in message, message
            # Not closed: asked again, it tries again, and is told again.
            started = time.monotonic()
            with pytest.raises(SubscriberRefused):
                subscriber.next_event(timeout=20)
            assert time.monotonic() - started < PROMPT_S, how
            # Iterating, as most programs do, ends with it too.
            with pytest.raises(SubscriberRefused):
                next(iter(subscriber))
        assert time.monotonic() - started < 2 * PROMPT_S  # closing did not wait on a daemon that refuses

    # Following, then the daemon comes back with other keys: told within a few seconds.
    subscriber = Subscriber(daemon.subscribe, "topic-0", configure=alice, timeout=30)
    try:
        assert [subscriber.next_event(10)["seq"] for _ in range(5)] == [1, 2, 3, 4, 5]  # type: ignore[index]
        daemon.terminate()
        (keys["authorized"] / "alice.key").unlink()
        daemon.start(wait=False)
        started = time.monotonic()
        with pytest.raises(SubscriberRefused, match=KEY_REFUSED.replace("(", r"\(").replace(")", r"\)")):
            while time.monotonic() - started < 40:
                subscriber.next_event(timeout=1)
        assert time.monotonic() - started < 20
    finally:
        subscriber.close()
    assert daemon.terminate() == 0


class Cutter:
    """A TCP server on 127.0.0.1 (on ``port``, or any free one) that accepts each connection and
    closes it at once, so that every ZMTP handshake with it is cut; :attr:`cuts` counts them. A
    ZeroMQ client with a reconnect interval of 1 ms comes back about a thousand times a second."""

    def __init__(self, port: int = 0) -> None:
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a daemon's port, just left
        self._server.bind(("127.0.0.1", port))
        self._server.listen(512)
        self._server.settimeout(0.2)
        self.port: int = self._server.getsockname()[1]
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.cuts = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._cut, name="cutter", daemon=True)
        self._thread.start()

    def _cut(self) -> None:
        while not self._done.is_set():
            with contextlib.suppress(TimeoutError):
                self._server.accept()[0].close()
                self.cuts += 1

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        self._server.close()


def fast_reconnects(sock: zmq.Socket[Any]) -> None:
    """A client's socket hook: reconnect after 1 ms rather than ZeroMQ's 100."""
    sock.setsockopt(zmq.RECONNECT_IVL, 1)


def still_talks(context: zmq.Context[Any]) -> bool:
    """Whether a new pair of sockets of ``context`` can talk over TCP (which its I/O thread carries)."""
    a, b = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    try:
        port = a.bind_to_random_port("tcp://127.0.0.1")
        b.connect(f"tcp://127.0.0.1:{port}")
        b.send(b"still talking")
        return bool(a.poll(5000))
    finally:
        a.close(linger=0)
        b.close(linger=0)


@pytest.mark.timeout(60)
def test_a_subscribers_monitor_left_unread_does_not_stop_the_process_wide_context() -> None:
    """The subscriber's monitor is on the process-wide context and read only within its calls.
    A monitor's queue full (about 2 000 events) blocks libzmq's I/O thread, which stops every
    socket of the context: so its queue has no limit. Here handshakes are cut a thousand times a
    second while nothing reads the monitor; another pair of sockets must still talk."""
    cutter = Cutter()
    context = zmq.Context.instance()
    watched = context.socket(zmq.DEALER)
    fast_reconnects(watched)
    monitor = unbounded_monitor(watched, REFUSAL_EVENTS)
    try:
        watched.connect(cutter.endpoint)
        time.sleep(5)  # thousands of cut handshakes, none read
        assert still_talks(context), "the context's I/O thread is stuck"
        unread = 0
        while monitor.poll(0):
            monitor.recv_multipart()
            unread += 1
        assert unread > 2500, unread  # past where a bounded monitor's queue would have filled
    finally:
        close_monitored(watched, monitor)  # not the monitor first: that alone stopped the context
        cutter.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["query client", "subscriber"])
def test_clients_closed_while_their_handshakes_are_cut_leave_the_process_wide_context_running(kind: str) -> None:
    """A client closed its socket, then its monitor's reader. libzmq tears a socket down a moment
    after ``close()``, and its connection goes on meanwhile: an event then, to the reader already
    closed, blocked libzmq's I/O thread for good, and every socket of the process-wide context
    with it (the gateway's streams and queries). Three threads closing clients while a port cut
    their handshakes each millisecond (a daemon with other CURVE settings, another program)
    stopped it within a second or two."""
    cutter = Cutter()
    stop = threading.Event()
    closed = [0, 0, 0]

    def churn(index: int) -> None:
        while not stop.is_set():
            if kind == "query client":
                with QueryClient(cutter.endpoint, timeout=2.0, configure=fast_reconnects) as client:
                    with contextlib.suppress(NoAnswer):  # HandshakeRefused, at the third cut
                        client.request({"op": "health"})
            else:
                with Subscriber(cutter.endpoint, "topic-0", configure=fast_reconnects, timeout=5) as subscriber:
                    with contextlib.suppress(SubscriberRefused):
                        subscriber.next_event(timeout=2)
            closed[index] += 1

    threads = [threading.Thread(target=churn, args=(index,), daemon=True) for index in range(len(closed))]
    try:
        for thread in threads:
            thread.start()
        time.sleep(8)
        assert still_talks(zmq.Context.instance()), f"the process-wide context is stuck after {closed} closed"
        assert min(closed) > 200, closed  # each closed hundreds of them
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        cutter.close()


@pytest.mark.timeout(60)
def test_acknowledged_publishers_refused_again_and_again_are_told_so_each_time() -> None:
    """A refused acknowledged publisher opens a new socket; it closed the old one, then its
    monitor's reader, and an event of the old socket's connection in between (libzmq tears a
    socket down a moment after ``close()``) blocked its context's I/O thread for good. Told
    nothing more, it failed at its deadline instead of at once, and would not have reached the
    daemon once its keys were put right. Three publishers refused by a port that cuts every
    handshake, reconnecting after 1 ms, each got there within a few seconds."""
    cutter = Cutter()
    told: dict[int, str] = {}

    def refused_again(index: int) -> None:
        publisher = Publisher(cutter.endpoint, configure=fast_reconnects, deadline=5.0, ack_timeout=2.0)
        refusals = 0
        started = time.monotonic()
        try:
            while time.monotonic() - started < 8:
                try:
                    publisher.publish_many(plan(1, id_prefix=f"{index}-{refusals}-"))
                    publisher.flush(timeout=10)
                except PublisherRefused:
                    refusals += 1
            told[index] = f"{refusals} refusals"
        except Exception as exc:
            told[index] = f"after {refusals} refusals, {time.monotonic() - started:.1f} s: {type(exc).__name__}: {exc}"
        finally:
            publisher.close(timeout=0, flush=False)

    threads = [threading.Thread(target=refused_again, args=(index,), daemon=True) for index in range(3)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        cutter.close()
    outcomes = "\n".join(f"publisher {index}: {outcome}" for index, outcome in sorted(told.items()))
    assert len(told) == 3 and all(outcome.endswith(" refusals") for outcome in told.values()), outcomes
    assert min(int(outcome.split()[0]) for outcome in told.values()) > 100, outcomes  # hundreds each


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_an_idle_query_clients_monitor_does_not_stop_the_process_wide_context(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """A query client reads its monitor only within requests, and the gateway keeps idle ones in
    a pool. Its daemon gone and the port taken by a process that cuts every handshake (a daemon
    with other CURVE settings, another program), the cut handshakes piled up unread: at about
    2 000 (a few minutes at ZeroMQ's reconnect interval of 0.1 s; a second or two here, at 1 ms)
    libzmq's I/O thread blocked on the full monitor, which stopped every socket of the
    process-wide context (the gateway's streams and every other query) until a request came to
    that one client."""
    daemon = daemon_factory().start()
    client = QueryClient(daemon.query, timeout=10.0, configure=fast_reconnects)
    try:
        assert "error" not in client.request({"op": "health"})  # connected, then idle
        assert daemon.terminate() == 0
        cutter = Cutter(int(daemon.query.rpartition(":")[2]))
        try:
            with contextlib.suppress(AssertionError):  # a client stopped by it stops coming back
                eventually(lambda: cutter.cuts > 3000, 15, "3 000 cut handshakes")
            cuts = cutter.cuts
            stuck = not still_talks(zmq.Context.instance())
            if stuck:  # until a request to that client reads its monitor (closing it would wait for ever)
                with contextlib.suppress(NoAnswer):
                    client.request({"op": "health"})
            assert not stuck, f"the process-wide context is stuck after {cuts} cut handshakes"
            assert cuts > 3000, cuts  # past where a bounded monitor's queue would have filled
        finally:
            cutter.close()
        # The daemon back: the client, whose last handshake failed, asks on a new socket.
        daemon.start()
        assert "error" not in client.request({"op": "health"})
    finally:
        client.close()
    assert daemon.terminate() == 0
