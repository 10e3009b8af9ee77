"""One thread at a time inside a client (transport/exclusive.py): another thread's call raises at once.

Two threads in one QueryClient hung past every timeout (its REQ socket's state broken); in one
Subscriber they would share a socket ZeroMQ does not let two threads share. No daemon is needed:
the first thread waits for an answer that cannot come.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from harness import free_port

from transport.client import QueryClient, QueryClientInUse
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
        for call in (lambda: subscriber.next_event(0), subscriber.ack, subscriber.keep_alive, subscriber.abandon):
            with pytest.raises(SubscriberInUse, match="one thread takes its events"):
                call()
        subscriber.close()  # still allowed: the thread inside closes it within a step

    while_another_thread_waits_in(lambda: subscriber.next_event(3), second_thread_takes)
    with pytest.raises(SubscriberError, match="the subscriber is closed"):
        subscriber.next_event(0)
