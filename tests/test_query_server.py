"""Query clients that ask and leave, or ask and never read: the query server stays bounded.

A real daemon, real REQ/DEALER sockets. Clients that give up on their queries must not leave the
actors working through them for minutes (nor bury the stats actor, which answers the watchdog's
pings), and one that never reads its replies must not grow the daemon by a page a request.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import zmq
from harness import Daemon, eventually, publish
from test_flood import rss_mb
from test_subscribe import established

from actors.query_server import REPLIES_QUEUED
from transport.client import QueryClient
from transport.publisher import Publisher

pytestmark = pytest.mark.e2e

HOOKS = {**os.environ, "EVENTAGG_TEST_HOOKS": "1"}


def ask_and_leave(endpoint: str, request: dict[str, Any], clients: int) -> None:
    """``clients`` REQ sockets each send ``request`` and close without reading the reply."""
    context = zmq.Context()
    sockets = []
    for _ in range(clients):
        sock = context.socket(zmq.REQ)
        sock.linger = 1000  # the request leaves before the socket closes
        sock.connect(endpoint)
        sock.send(msgpack.packb(request))
        sockets.append(sock)
    for sock in sockets:
        sock.close()
    context.term()


@pytest.mark.timeout(180)
def test_queries_their_clients_gave_up_on_are_not_worked_through(daemon_factory: Callable[..., Daemon]) -> None:
    """600 ``topics`` queries of 20 000 topics each, asked while the reader was busy and then
    abandoned: the reader ran every one after its client had gone (about a minute), and every
    other listing timed out meanwhile."""
    daemon = daemon_factory(query={"timeout_ms": 1000}).start(env=HOOKS)
    publish(daemon.ack, "--acked", "--events", "20000", "--topics", "20000")
    daemon.wait_stats(unique_processed=20000, timeout=60)
    started = time.monotonic()
    assert "topics" in daemon.request({"op": "topics"}, timeout=30)
    one = time.monotonic() - started
    assert "error" not in daemon.request({"op": "debug_freeze", "actor": "reader", "seconds": 4})
    thawed = time.monotonic() + 4
    ask_and_leave(daemon.query, {"op": "topics"}, 600)
    # The listings wait behind the frozen reader; stats and health do not.
    assert "unique_processed" in daemon.request({"op": "stats"}, timeout=1)
    said = daemon.request({"op": "consumers"}, timeout=5)
    assert "did not answer within 1000 ms" in said["error"], said
    assert time.monotonic() < thawed, "the test was too slow to ask while the reader was frozen"
    time.sleep(thawed - time.monotonic())  # the reader is back, its 600 requests all past their deadline
    started = time.monotonic()
    page = daemon.request({"op": "events", "limit": 1}, timeout=30)
    waited = time.monotonic() - started
    assert "events" in page, page
    assert waited < max(3.0, 20 * one), f"an events query waited {waited:.1f} s (one topics query takes {one:.2f} s)"


def test_a_client_that_never_reads_its_replies_is_sent_only_a_few(daemon_factory: Callable[..., Daemon]) -> None:
    """100 pages of 4 MiB asked by a DEALER that reads none: the daemon queued every one, 4 MB a request."""
    daemon = daemon_factory().start()
    with Publisher(daemon.ack, acked=True) as publisher:
        for n in range(2000):
            publisher.publish(
                {
                    "topic": "t",
                    "event_id": f"e{n}",
                    "timestamp": "2025-01-01T00:00:00Z",
                    "source": "s",
                    "payload": {"x": "x" * 4000},
                }
            )
    daemon.wait_stats(unique_processed=2000)
    assert daemon.proc is not None
    before = rss_mb(daemon.proc.pid)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.linger = 0
    sock.connect(daemon.query)
    try:
        for _ in range(100):
            sock.send_multipart([b"", msgpack.packb({"op": "events", "after": 0, "limit": 10000})])
        time.sleep(5)
        grown = rss_mb(daemon.proc.pid) - before
        assert "a query reply was dropped" in daemon.log()
        assert "unique_processed" in daemon.request({"op": "stats"})
    finally:
        sock.close()
        context.term()
    # A page is 4 MiB: the few queued, the one being sent and the allocator's slack.
    assert grown < (REPLIES_QUEUED + 12) * 4.2, f"the daemon grew by {grown:.0f} MB"


def test_a_client_pipelining_queries_gets_every_reply_in_order(daemon_factory: Callable[..., Daemon]) -> None:
    """60 requests sent at once on one DEALER by a client that reads all along: the replies came
    faster than ZeroMQ's queue of 8 took them, and all but 8 were dropped."""
    daemon = daemon_factory().start()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(daemon.query)
    try:
        for n in range(60):
            sock.send_multipart([b"", msgpack.packb({"op": "events", "after": n, "limit": 1})])
        got = []
        while len(got) < 60 and sock.poll(5000):
            got.append(msgpack.unpackb(sock.recv_multipart()[-1], raw=False))
    finally:
        sock.close()
        context.term()
    assert [reply["next"] for reply in got] == list(range(60)), got[-1:]  # nothing stored: next is after
    assert "a query reply was dropped" not in daemon.log()


def test_a_pipelining_client_matches_replies_to_requests_by_frames_before_the_empty_one(daemon: Daemon) -> None:
    """stats and events go to different actors, so their replies may pass each other: a client
    tags each request with frames of its own before the empty frame, and gets them back."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(daemon.query)
    ops = ["events", "stats", "topics", "health", "events", "stats"] * 5
    try:
        for n, op in enumerate(ops):
            sock.send_multipart([b"tag", str(n).encode(), b"", msgpack.packb({"op": op})])
        replies = {}
        while len(replies) < len(ops) and sock.poll(5000):
            tag, number, empty, body = sock.recv_multipart()
            assert (tag, empty) == (b"tag", b"")
            replies[int(number)] = msgpack.unpackb(body, raw=False)
    finally:
        sock.close()
        context.term()
    expected = {"events": "next", "stats": "uptime_s", "topics": "topics", "health": "actors"}
    assert sorted(replies) == list(range(len(ops)))
    assert all(expected[op] in replies[n] for n, op in enumerate(ops)), replies


def test_a_client_pipelining_thousands_of_queries_while_reading_gets_every_reply(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """3 000 stats requests, the replies read between sends: past 1 024 waiting replies (600
    KB of them) the rest were dropped, against the 8 MiB the docs promised."""
    daemon = daemon_factory().start()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndhwm = sock.rcvhwm = 0
    sock.connect(daemon.query)
    got = 0
    try:
        for _ in range(3000):
            sock.send_multipart([b"", msgpack.packb({"op": "stats"})])
            while sock.poll(0):
                sock.recv_multipart()
                got += 1
        while got < 3000 and sock.poll(10_000):
            sock.recv_multipart()
            got += 1
    finally:
        sock.close()
        context.term()
    assert got == 3000
    assert "a query reply was dropped" not in daemon.log()


def test_a_query_socket_monitor_has_an_address_no_other_socket_takes(daemon_factory: Callable[..., Daemon]) -> None:
    """Each query socket has a monitor (to see a refused handshake at once). pyzmq names a monitor
    by its socket's file descriptor unless told otherwise, and libzmq may still hold that name for
    a moment after the socket closes: a query opened just then, or alongside an application's
    own monitors named so in the process-wide context, failed with ``Address already in use``
    (seen once in CI). Here every such name is taken first."""
    daemon = daemon_factory().start()
    squatter = zmq.Context.instance().socket(zmq.PAIR)
    try:
        for descriptor in range(4096):
            squatter.bind(f"inproc://monitor.s-{descriptor}")
        for _ in range(3):
            with QueryClient(daemon.query, timeout=5) as client:
                assert "error" not in client.request({"op": "health"})
    finally:
        squatter.close(linger=0)
    assert daemon.terminate() == 0


def test_a_query_client_made_before_a_fork_is_answered_in_the_child_and_the_parent(daemon: Daemon) -> None:
    """The child's copy of the parent's socket and context cannot be used: a request there got no
    answer (NoAnswer after its whole timeout). The client opens its own in the new process."""
    code = (
        "import os, sys\n"
        "from transport.client import QueryClient\n"
        f"client = QueryClient({daemon.query!r}, timeout=10)\n"
        "print('parent', client.request({'op': 'health'})['status'], flush=True)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    print('child', client.request({'op': 'health'})['status'], flush=True)\n"
        "    client.close()\n"
        "    os._exit(0)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print('child exit', os.waitstatus_to_exitcode(status))\n"
        "print('parent again', client.request({'op': 'health'})['status'])\n"
        "client.close()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["parent ok", "child ok", "child exit 0", "parent again ok"], result


STOPPED_CLIENT = """
import sys, time, msgpack, zmq
sock = zmq.Context().socket(zmq.DEALER)
sock.setsockopt(zmq.RCVBUF, 4096)
sock.connect(sys.argv[1])
for _ in range(30):
    sock.send_multipart([b"", msgpack.packb({"op": "events", "after": 0, "limit": 10000})])
print("asked", flush=True)
time.sleep(120)
"""


def test_a_stopped_client_s_connection_is_closed_and_its_replies_freed(daemon_factory: Callable[..., Daemon]) -> None:
    """A client that asked for pages of 4 MiB and then stopped (SIGSTOP, a frozen machine) kept
    what was queued for it, about 40 MB, for as long as its connection stayed open: for ever."""
    daemon = daemon_factory().start(env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    with Publisher(daemon.ack, acked=True) as publisher:
        for n in range(2000):
            publisher.publish(
                {"topic": "t", "event_id": f"e{n}", "timestamp": "2025-01-01T00:00:00Z", "source": "s",
                 "payload": {"x": "x" * 4000}}
            )  # fmt: skip
    daemon.wait_stats(unique_processed=2000)
    assert daemon.proc is not None
    before = rss_mb(daemon.proc.pid)
    port = int(daemon.query.rpartition(":")[2])
    others = established(port)
    client = subprocess.Popen([sys.executable, "-c", STOPPED_CLIENT, daemon.query], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdout.readline() == "asked\n"
        time.sleep(2)
        client.send_signal(signal.SIGSTOP)
        eventually(lambda: established(port) <= others or None, 40, "the daemon to close the connection")
        eventually(lambda: rss_mb(daemon.proc.pid) - before < 20 or None, 10, "the queued replies to be freed")
    finally:
        client.kill()
        client.send_signal(signal.SIGCONT)
        client.wait(10)
