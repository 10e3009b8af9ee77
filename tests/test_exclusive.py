"""One thread at a time inside a client (transport/exclusive.py): another thread's call raises at once.

Two threads in one QueryClient hung past every timeout (its REQ socket's state broken); in one
Subscriber they would share a socket ZeroMQ does not let two threads share. No daemon is needed:
the first thread waits for an answer that cannot come.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from harness import free_port
from test_publisher import on_alarm

from transport.client import NoAnswer, QueryClient, QueryClientClosed, QueryClientInUse
from transport.subscriber import Subscriber, SubscriberError, SubscriberInUse

pytestmark = pytest.mark.timeout(60)


def while_another_thread_waits_in(call: Callable[[], Any], then: Callable[[], None]) -> None:
    """Run ``call`` on a thread (it waits for a daemon that is not there), then ``then`` here."""
    inside = threading.Thread(target=_quietly, args=(call,))
    inside.start()
    try:
        time.sleep(0.3)  # the thread is inside, waiting
        assert inside.is_alive()
        then()
    finally:
        inside.join(30)


def _quietly(call: Callable[[], Any]) -> None:
    try:
        call()
    except Exception:  # the wait's own outcome (no answer) is not what is tested
        pass


def test_a_query_client_used_by_a_second_thread_at_once_raises_at_once() -> None:
    client = QueryClient(f"tcp://127.0.0.1:{free_port()}", timeout=3)

    def second_thread_asks() -> None:
        started = time.monotonic()
        with pytest.raises(QueryClientInUse, match="a QueryClient serves one thread at a time"):
            client.call({"op": "stats"})
        with pytest.raises(QueryClientInUse):
            client.close()
        assert time.monotonic() - started < 1

    while_another_thread_waits_in(lambda: client.call({"op": "stats"}), second_thread_asks)
    client.close()  # in turn, any thread may


def test_a_subscriber_taken_from_by_a_second_thread_at_once_raises_and_any_thread_may_close_it() -> None:
    subscriber = Subscriber(f"tcp://127.0.0.1:{free_port()}", name="reader", timeout=5)

    def second_thread_takes() -> None:
        for call in (lambda: subscriber.next_event(0), subscriber.ack, subscriber.keep_alive):
            with pytest.raises(SubscriberInUse, match="one thread takes its events"):
                call()
        subscriber.abandon()  # as close(), from any thread: the thread inside closes it within a step

    while_another_thread_waits_in(lambda: subscriber.next_event(3), second_thread_takes)
    with pytest.raises(SubscriberError, match="the subscriber is closed"):
        subscriber.next_event(0)


def test_a_client_forked_while_another_thread_was_in_a_call_works_or_says_so_in_the_child() -> None:
    """In the child the thread holding the lock is not there: close() must not raise, and each
    call says what a client made before a fork does, not that another thread is in it."""
    code = (
        "import os, sys, threading, time\n"
        "from transport.client import QueryClient, NoAnswer\n"
        "from transport.publisher import Publisher, PublisherClosed\n"
        "from transport.subscriber import Subscriber, SubscriberError\n"
        "from transport.workload import make_event\n"
        "nowhere = sys.argv[1]\n"
        "client = QueryClient(nowhere, timeout=3)\n"
        "publisher = Publisher(nowhere, deadline=10)\n"
        "publisher.publish(make_event(0, 1, 'f'))\n"
        "subscriber = Subscriber(nowhere, timeout=5)\n"
        "closing = Subscriber(nowhere, timeout=5)\n"
        "closing_publisher = Publisher(endpoints=[nowhere, sys.argv[2]], deadline=10)\n"
        "closing_publisher.publish(make_event(0, 1, 'g'))\n"
        "def quietly(call):\n"
        "    try:\n"
        "        call()\n"
        "    except Exception:\n"
        "        pass\n"
        "for call in (lambda: client.call({'op': 'stats'}), lambda: publisher.flush(3),"
        " lambda: subscriber.next_event(3), lambda: closing.next_event(3), lambda: closing_publisher.flush(3)):\n"
        "    threading.Thread(target=quietly, args=(call,), daemon=True).start()\n"
        "time.sleep(0.5)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    said = []\n"
        "    started = time.monotonic()\n"
        "    closing.close()\n"
        "    closing_publisher.close()\n"
        "    said.append('closed in %.1f s' % (time.monotonic() - started))\n"
        "    client.timeout = 0.3\n"
        "    try:\n"
        "        client.call({'op': 'stats'})\n"
        "    except NoAnswer:\n"
        "        said.append('query: no answer')\n"
        "    client.close()\n"
        "    try:\n"
        "        publisher.publish(make_event(1, 1, 'f'))\n"
        "    except PublisherClosed as exc:\n"
        "        said.append('publish: ' + str(exc)[:120])\n"
        "    publisher.close()\n"
        "    try:\n"
        "        subscriber.next_event(0)\n"
        "    except SubscriberError as exc:\n"
        "        said.append(type(exc).__name__ + ': ' + str(exc)[:120])\n"
        "    subscriber.close()\n"
        "    print('|'.join(said), flush=True)\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    said = result.stdout.strip().split("|")
    assert said[0] == "closed in 0.0 s", result.stdout + result.stderr  # not a wait for a thread not there
    assert said[1] == "query: no answer", said
    assert said[2].startswith("publish: this publisher to") and "was made before this process was forked" in said[2]
    assert said[3].startswith("SubscriberError: this subscriber to"), said
    assert "InUse" not in result.stdout + result.stderr


def test_close_from_a_signal_handler_or_give_up_during_a_query_ends_it_at_once() -> None:
    """A handler (Ctrl-C's, say) calling close() while a query waited closed the socket under its
    poll: a raw ZMQError."""
    client = QueryClient(f"tcp://127.0.0.1:{free_port()}", timeout=5)
    started = time.monotonic()
    with on_alarm(client.close, 0.3), pytest.raises(QueryClientClosed, match="closed while a request waited"):
        client.call({"op": "stats"})
    assert time.monotonic() - started < 1.5
    assert client._socket is None and client._monitor is None  # closed
    with pytest.raises(QueryClientClosed):
        client.request({"op": "stats"}, give_up=lambda: bool(client.close()))
    assert client._socket is None
    client.timeout = 0.3
    with pytest.raises(NoAnswer, match="no answer"):  # a later request opens a new socket
        client.call({"op": "stats"})
    client.close()
