"""The client libraries refuse a bad argument at the call, naming it (transport/arguments.py).

Before, a NaN timeout made a wait that never ended, and other wrong values were taken as
something else (a string ``acked`` as true) or failed far away (2**64 credits inside msgpack).
"""

from __future__ import annotations

from typing import Any

import pytest
from harness import free_port

from transport.publisher import Publisher
from transport.subscriber import Subscriber

NAN = float("nan")


def nowhere() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"ack_timeout": NAN}, ValueError, "ack_timeout must be more than 0 seconds, and finite, not nan"),
        ({"deadline": NAN}, ValueError, r"deadline must be more than 0 seconds, and finite \(None for no limit\)"),
        ({"deadline": 0}, ValueError, "deadline must be more than 0 seconds"),
        ({"linger": -1}, ValueError, "linger must be 0 or more seconds"),
        ({"close_timeout": -1}, ValueError, "close_timeout must be 0 or more seconds"),
        ({"block_timeout": -1}, ValueError, "block_timeout must be 0 or more seconds"),
        ({"batch_size": 2.5}, TypeError, r"batch_size must be a whole number, not float \(2.5\)"),
        ({"window": 1.5}, TypeError, "window must be a whole number"),
        ({"max_batch_bytes": 0}, ValueError, "max_batch_bytes must be from 1"),
        ({"max_payload_bytes": -1}, ValueError, "max_payload_bytes must be from 1"),
        ({"acked": "no"}, TypeError, r"acked must be True or False, not str \('no'\)"),
    ],
)
def test_a_publisher_refuses_a_bad_option_naming_it(options: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        Publisher(nowhere(), **options)
    with pytest.raises(error, match=message):  # the fail-over publisher hands them on
        Publisher(endpoints=[nowhere(), nowhere()], **options)


def test_a_publisher_refuses_no_endpoint_and_one_string_of_endpoints() -> None:
    with pytest.raises(TypeError, match="endpoint must be a string, not NoneType"):
        Publisher(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="endpoints must be a list of endpoints, not one string"):
        Publisher(endpoints="tcp://127.0.0.1:1")


@pytest.mark.parametrize("endpoints", [1, 2], ids=["one daemon", "fail-over"])
def test_a_nan_or_negative_timeout_is_refused_at_the_call_not_waited_on_for_ever(endpoints: int) -> None:
    where: dict[str, Any] = {"endpoints": [nowhere(), nowhere()]} if endpoints > 1 else {"endpoint": nowhere()}
    publisher = Publisher(**where, deadline=None)
    event = {"topic": "t", "event_id": "1", "timestamp": "2025-10-22T10:00:00Z", "source": "s"}
    publisher.publish(event)
    try:
        for call in (
            lambda: publisher.flush(NAN),
            lambda: publisher.flush(-1),
            lambda: publisher.poll(NAN),
            lambda: publisher.publish(event, timeout=NAN),
            lambda: publisher.publish_many([event], timeout=NAN),
            lambda: publisher.close(timeout=NAN),
        ):
            with pytest.raises(ValueError, match="timeout must be"):
                call()
        assert publisher.unacknowledged == 1  # nothing was queued or dropped by the refused calls
    finally:
        publisher.close(timeout=0, flush=False)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"credit": 2**64}, ValueError, "credit must be from 1 to 2147483647"),
        ({"credit": 1.5}, TypeError, "credit must be a whole number"),
        ({"buffer_bytes": 0}, ValueError, "buffer_bytes must be from 1"),
        ({"buffer_bytes": "1MB"}, TypeError, "buffer_bytes must be a whole number"),
        ({"after": 2**64}, ValueError, "after must be from 0 to 9223372036854775807"),
        ({"after": -1}, ValueError, "after must be from 0"),
        ({"ack_interval": -1}, ValueError, "ack_interval must be 0 or more seconds"),
        ({"name": 5}, ValueError, "a consumer's name must be a string, not int"),
        ({"timeout": NAN}, ValueError, "need 0 < heartbeat"),
    ],
)
def test_a_subscriber_refuses_a_bad_option_naming_it(options: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        Subscriber(nowhere(), **options)


def test_a_subscriber_refuses_a_nan_timeout_for_the_next_event() -> None:
    subscriber = Subscriber(nowhere())
    try:
        with pytest.raises(ValueError, match="timeout must be 0 or more seconds"):
            subscriber.next_event(NAN)
        assert subscriber.next_event(0) is None  # and still works
    finally:
        subscriber.close()
