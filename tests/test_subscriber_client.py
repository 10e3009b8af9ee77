"""The Python Subscriber against a real daemon: credit beyond the daemon's cap, what a named
consumer acknowledges (on an exception, with ``after`` past the head, with a slow handler), and
the daemon's heartbeat sizing how long silence is tolerated."""

from __future__ import annotations

import _thread
import logging
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import msgpack
import pytest
import zmq
from harness import Daemon, publish
from test_subscribe import take

from transport.client import QueryClient
from transport.publisher import Publisher
from transport.subscriber import Subscriber, SubscriberError

pytestmark = pytest.mark.e2e

FAST = {"subscribe": {"heartbeat_ms": 200, "timeout_ms": 2000}}


def positions(daemon: Daemon) -> dict[str, int]:
    """Each named consumer's stored position."""
    return {row["name"]: row["position"] for row in daemon.request({"op": "consumers"})["consumers"]}


@pytest.mark.timeout(180)
def test_a_credit_beyond_the_daemons_default_cap_does_not_stall(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory().start()
    publish(daemon.ack, "--acked", "--events", "25000", "--topics", "5", "--batch", "500")
    with Subscriber(daemon.subscribe, credit=30000) as subscriber:  # the daemon holds at most 10 000
        got = take(subscriber, 25000, timeout=90)
    assert [event["position"] for event in got] == list(range(1, 25001))


@pytest.mark.timeout(120)
def test_a_credit_beyond_a_lower_configured_cap_does_not_stall(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(subscribe={"max_credit": 100}).start()
    publish(daemon.ack, "--acked", "--events", "400", "--topics", "2")
    with Subscriber(daemon.subscribe, credit=1000) as subscriber:
        got = take(subscriber, 400, timeout=60)
    assert [event["position"] for event in got] == list(range(1, 401))


@pytest.mark.timeout(120)
def test_a_trickle_at_the_head_leaves_no_more_than_a_window_sent_ahead(daemon_factory: Callable[..., Daemon]) -> None:
    # Each quiet spell at the head, then one event, once made the subscriber grant a whole
    # window again, which the daemon added to the credit it held: 30 of them left 3 069 events
    # sent ahead of an application that had stopped reading, with a window of 100 (ten of them,
    # over a thousand).
    daemon = daemon_factory(subscribe={"heartbeat_ms": 200}).start()
    event = {"topic": "t", "timestamp": "2025-10-22T10:00:00Z", "source": "s"}
    with Publisher(daemon.ack) as publisher, Subscriber(daemon.subscribe, credit=100, heartbeat=0.2) as subscriber:
        for n in range(10):
            assert subscriber.next_event(0.5) is None  # waiting on an empty buffer, over a heartbeat
            publisher.publish({**event, "event_id": f"trickle-{n}"})
            publisher.flush()
            assert subscriber.next_event(10) is not None
        for n in range(3_000):  # then a burst, while the application does something else
            publisher.publish({**event, "event_id": f"burst-{n}"})
        publisher.flush()
        time.sleep(2)
        assert subscriber.next_event(0) is not None  # one look, as a poll loop takes
        held = len(subscriber._buffer) + 1
    assert held <= 100, f"{held} events sent ahead of the application with a window of 100"


class HandlerFailed(Exception):
    pass


@pytest.mark.timeout(120)
def test_leaving_by_an_exception_does_not_acknowledge_the_event_being_handled(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory(**FAST).start()
    publish(daemon.ack, "--acked", "--events", "20", "--topics", "1")
    with pytest.raises(HandlerFailed), Subscriber(daemon.subscribe, name="invoicer") as events:
        for event in events:
            if event["position"] == 5:
                raise HandlerFailed("the handler of event 5 failed")
    assert positions(daemon) == {"invoicer": 4}
    with Subscriber(daemon.subscribe, name="invoicer") as again:
        assert again.next_event(10)["position"] == 5  # type: ignore[index]


@pytest.mark.timeout(120)
def test_ctrl_c_while_waiting_for_the_next_event_acknowledges_the_one_handled(
    daemon_factory: Callable[..., Daemon],
) -> None:
    # The event handed out last was handled (the application asked for the next): it used to
    # come again on the next run, as if the Ctrl-C had interrupted its handling.
    daemon = daemon_factory(**FAST).start()
    publish(daemon.ack, "--acked", "--events", "5", "--topics", "1")
    # A suite started in the background ignores SIGINT, and interrupt_main() then does nothing.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), Subscriber(daemon.subscribe, name="waiter") as events:
            assert [event["position"] for event in take(events, 5)] == [1, 2, 3, 4, 5]
            timer = threading.Timer(0.5, _thread.interrupt_main)  # SIGINT's KeyboardInterrupt, here
            timer.start()
            events.next_event(10)  # nothing more comes: waiting here when the Ctrl-C arrives
    finally:
        signal.signal(signal.SIGINT, previous)
    assert positions(daemon) == {"waiter": 5}


@pytest.mark.timeout(120)
def test_an_after_past_the_head_stores_no_position(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(**FAST).start()
    publish(daemon.ack, "--acked", "--events", "30", "--topics", "1")
    with pytest.raises(SubscriberError, match="subscribe after 30 or less"):
        with Subscriber(daemon.subscribe, "topic-0", after=999999, name="ahn") as subscriber:
            subscriber.next_event(10.0)
    assert "ahn" not in positions(daemon)
    with Subscriber(daemon.subscribe, "topic-0", name="ahn") as subscriber:  # resumes from the start
        assert subscriber.next_event(10)["seq"] == 1  # type: ignore[index]


@pytest.mark.timeout(120)
def test_a_handler_slower_than_the_daemons_timeout_still_gets_its_position_stored(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory(**FAST).start()  # the daemon drops a consumer silent for 2 s
    publish(daemon.ack, "--acked", "--events", "100", "--topics", "1")
    # Working through a full buffer for 3 s, 0.1 s an event: the subscription must stay alive.
    with Subscriber(daemon.subscribe, name="steady", credit=100) as subscriber:
        for _ in range(30):
            assert subscriber.next_event(10) is not None
            time.sleep(0.1)
    assert subscriber.acked == 30
    assert positions(daemon)["steady"] == 30
    assert "not heard from" not in daemon.log()
    # One event handled for 3 s: the daemon drops the subscription; close stores the position anyway.
    with Subscriber(daemon.subscribe, name="steady") as subscriber:
        assert subscriber.next_event(10)["position"] == 31  # type: ignore[index]
        time.sleep(3.0)
    assert subscriber.acked == 31
    assert positions(daemon)["steady"] == 31
    assert subscriber.reconnects == 1  # the subscription the daemon dropped, made again


@pytest.mark.timeout(120)
def test_the_daemons_announced_heartbeat_sizes_the_silence_tolerated(
    daemon_factory: Callable[..., Daemon], caplog: pytest.LogCaptureFixture
) -> None:
    daemon = daemon_factory(subscribe={"heartbeat_ms": 2000, "timeout_ms": 10000}).start()
    caplog.set_level(logging.WARNING, logger="transport.subscriber")
    with Subscriber(daemon.subscribe, heartbeat=0.5, timeout=1.0) as subscriber:
        assert subscriber.next_event(5.0) is None  # heartbeats every 2 s, beyond the 1 s timeout
        assert subscriber.subscribed
        assert subscriber.reconnects == 0, caplog.text


@pytest.mark.timeout(120)
def test_a_position_past_the_head_shows_a_negative_lag(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(**FAST).start()
    publish(daemon.ack, "--acked", "--events", "30", "--topics", "1")
    # A position no subscribe can store any more: one restored from another database's backup.
    conn = sqlite3.connect(daemon.db_path, timeout=10)
    with conn:
        conn.execute("INSERT INTO consumers (name, topic, position, updated_at) VALUES ('ahead', 'topic-0', 100, 0)")
    conn.close()
    [row] = daemon.request({"op": "consumers"})["consumers"]
    assert (row["position"], row["lag"]) == (100, -70)
    with pytest.raises(SubscriberError, match="after 100 is past the last seq of topic 'topic-0', 30"):
        with Subscriber(daemon.subscribe, "topic-0", name="ahead") as subscriber:
            subscriber.next_event(10.0)


@pytest.mark.timeout(60)
def test_closing_from_another_thread_ends_the_iteration_and_stores_the_position(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory(**FAST).start()
    publish(daemon.ack, "--acked", "--events", "10", "--topics", "1")
    subscriber = Subscriber(daemon.subscribe, name="stoppable")
    reading = Iterating(subscriber)
    reading.wait_for(10)
    subscriber.close()
    reading.join()  # the old behaviour: a raw ZMQError from a socket closed under it
    assert reading.seen == list(range(1, 11))
    assert positions(daemon) == {"stoppable": 10}


@pytest.mark.timeout(60)
def test_closing_from_a_signal_handler_or_while_events_wait_in_the_buffer_closes_now(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """close() from a signal handler on the iterating thread closed the socket under the wait
    (a raw ZMQError); from another thread while events waited in the buffer, the iteration went
    on through them and close() gave up waiting after 3 s."""
    daemon = daemon_factory(**FAST).start()
    publish(daemon.ack, "--acked", "--events", "3", "--topics", "1")
    subscriber = Subscriber(daemon.subscribe, name="signalled")
    previous = signal.signal(signal.SIGALRM, lambda *_: subscriber.close())
    try:
        seen = [event["position"] for event in take(subscriber, 3)]
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        seen += [event["position"] for event in subscriber]  # waits for a fourth: the handler comes then
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert seen == [1, 2, 3] and positions(daemon) == {"signalled": 3}
    publish(daemon.ack, "--acked", "--events", "400", "--topics", "1", "--id-prefix", "more")
    # Another thread's close() while the buffer holds events: no more of them, and at once.
    later = Subscriber(daemon.subscribe, name="buffered")
    reading = Iterating(later, pause=0.001)  # the close() comes mostly in the pause, between two calls
    reading.wait_for(5)
    started = time.monotonic()
    later.close()
    assert time.monotonic() - started < 1.5
    reading.join()  # SubscriberInUse, had the close's lock been taken for a refusal
    assert len(reading.seen) < 20
    assert positions(daemon)["buffered"] == reading.seen[-1]
    # Leaving a with block while another thread iterates: handed over the same way.
    with Subscriber(daemon.subscribe, name="with-block") as scoped:
        iterating = Iterating(scoped, pause=0.05)
        iterating.wait_for(3)
    iterating.join()  # a raw ZMQError, from the socket closed under it
    assert iterating.seen


class Iterating:
    """A thread iterating ``subscriber`` (pausing ``pause`` s an event), noting the positions it
    took and what ended it other than the subscriber closing."""

    def __init__(self, subscriber: Subscriber, pause: float = 0.0) -> None:
        self.seen: list[int] = []
        self.failures: list[BaseException] = []
        self._thread = threading.Thread(target=self._iterate, args=(subscriber, pause))
        self._thread.start()

    def _iterate(self, subscriber: Subscriber, pause: float) -> None:
        try:
            for event in subscriber:
                self.seen.append(event["position"])
                time.sleep(pause)
        except BaseException as exc:
            self.failures.append(exc)

    def wait_for(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.seen) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def join(self) -> None:
        """Wait for the iteration to end; it must have ended quietly."""
        self._thread.join(10)
        assert not self._thread.is_alive() and self.failures == [], self.failures


def test_a_query_interrupted_between_request_and_reply_leaves_the_client_usable() -> None:
    # A REQ socket between its send and its receive cannot send again (EFSM): Ctrl-C there left
    # the client unusable for good.
    context = zmq.Context.instance()
    server = context.socket(zmq.ROUTER)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = QueryClient(f"tcp://127.0.0.1:{port}", timeout=5)
    try:

        def interrupt() -> bool:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            client.request({"op": "stats"}, give_up=interrupt)  # nobody answers: interrupted waiting
        assert server.poll(5000)
        server.recv_multipart()  # the first request, never answered
        answering = threading.Thread(
            target=lambda: server.send_multipart([*server.recv_multipart()[:-1], msgpack.packb({"ok": 1})])
        )
        answering.start()
        assert client.request({"op": "stats"}) == {"ok": 1}
        answering.join(5)
    finally:
        client.close()
        server.close(linger=0)


@pytest.mark.timeout(60)
def test_next_event_with_no_wait_reads_what_arrived_and_a_bad_ack_position_is_refused_here(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory(**FAST).start()
    publish(daemon.ack, "--acked", "--events", "50", "--topics", "1")
    got: list[int] = []
    with Subscriber(daemon.subscribe, "topic-0", name="poller", credit=10) as subscriber:
        deadline = time.monotonic() + 20
        while len(got) < 50 and time.monotonic() < deadline:  # a non-blocking poll loop
            event = subscriber.next_event(0)
            if event is None:
                time.sleep(0.01)
            else:
                got.append(event["seq"])
        assert got == list(range(1, 51))
        for bad in (10**6, -1, "x"):
            with pytest.raises(ValueError, match="ack position"):
                subscriber.ack(bad)  # type: ignore[arg-type]
        subscriber.ack(50)
        assert subscriber.next_event(0.5) is None  # the subscription goes on
    assert positions(daemon) == {"poller": 50}


@pytest.mark.timeout(60)
def test_closing_a_subscriber_whose_name_another_connection_took_logs_and_does_not_raise(
    daemon_factory: Callable[..., Daemon], caplog: pytest.LogCaptureFixture
) -> None:
    daemon = daemon_factory(**FAST).start()
    publish(daemon.ack, "--acked", "--events", "5", "--topics", "1")
    first = Subscriber(daemon.subscribe, name="shared")
    assert first.next_event(10) is not None
    with Subscriber(daemon.subscribe, name="shared") as second:
        assert second.next_event(10) is not None  # takes the name from the first
        with caplog.at_level(logging.ERROR):
            first.close()
    assert "position 1 not stored" in caplog.text


def test_a_subscriber_heartbeats_as_often_as_the_daemon_announces(daemon_factory: Callable[..., Daemon]) -> None:
    """With `[subscribe] timeout_ms` under the Subscriber's own 1 s heartbeat, the daemon dropped it
    every timeout_ms (it read heartbeat_ms only to judge the daemon's silence), and it subscribed
    again each time: warnings in the daemon's log and events late by up to a reconnect."""
    daemon = daemon_factory(subscribe={"heartbeat_ms": 125, "timeout_ms": 200}).start()
    with Publisher(daemon.ack, acked=True) as publisher, Subscriber(daemon.subscribe, "quiet", after=0) as follower:
        for number in range(6):
            publisher.publish(
                {
                    "topic": "quiet",
                    "event_id": f"e{number}",
                    "timestamp": "2026-12-06T10:00:00Z",
                    "source": "test",
                    "payload": {"n": number},
                }
            )
            publisher.flush()
            event = follower.next_event(timeout=5)
            assert event is not None and event["event_id"] == f"e{number}"
            assert follower.next_event(timeout=0.5) is None  # silence, longer than timeout_ms
        # One drop is let pass, should the loaded machine delay this thread by 75 ms; before, 5 or 6.
        assert follower.reconnects <= 1
    assert daemon.log().count("with no subscription") <= 1
    assert daemon.terminate() == 0


def test_a_subscriber_used_in_a_forked_child_refuses_at_once_and_the_parents_goes_on(daemon: Daemon) -> None:
    # The child's copy of the parent's socket is not usable: next_event(2) waited for ever.
    publish(daemon.ingest, "--events", "3", "--topics", "1")
    daemon.wait_stats(unique_processed=3)
    code = (
        "import os, sys\n"
        "from transport.subscriber import Subscriber, SubscriberError\n"
        f"s = Subscriber({daemon.subscribe!r}, after=0)\n"
        "print('parent took', s.next_event(10)['position'])\n"
        "sys.stdout.flush()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    try:\n"
        "        s.next_event(2)\n"
        "    except SubscriberError as exc:\n"
        "        print('refused:', exc)\n"
        "    s.close()\n"
        f"    with Subscriber({daemon.subscribe!r}, after=0) as own:\n"
        "        print('child took', own.next_event(10)['position'])\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print('parent took', s.next_event(10)['position'])\n"
        "s.close()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "refused: this subscriber" in result.stdout and "before this one was forked" in result.stdout, result
    assert (
        result.stdout.count("parent took") == 2 and "parent took 2" in result.stdout and "child took 1" in result.stdout
    )


def test_a_subscriber_never_answered_says_what_to_check(caplog: pytest.LogCaptureFixture) -> None:
    # "no word from ... reconnecting" alone: a refused CURVE key or a wrong port looked like a
    # daemon that was merely slow.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
    with Subscriber(f"tcp://127.0.0.1:{port}", heartbeat=0.1, timeout=0.3) as subscriber:
        assert subscriber.next_event(1.0) is None
    assert "is a daemon running there, is this its [subscribe] bind, and do its CURVE settings" in caplog.text


def test_a_subscriber_at_the_acknowledged_endpoint_says_what_the_daemon_answered(daemon: Daemon) -> None:
    # It took the answer for no message at all and waited, "no word from ...", for ever. (The
    # query endpoint answers only requests in a REQ's envelope: there the hint of "no word" stays.)
    with Subscriber(daemon.ack, heartbeat=0.1, timeout=0.5) as subscriber:
        started = time.monotonic()
        with pytest.raises(SubscriberError, match=r"is not a subscription endpoint; it answered: .*\[subscribe\] bind"):
            subscriber.next_event(5.0)
        assert time.monotonic() - started < 3
