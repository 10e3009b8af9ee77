"""A query client for the daemon's REQ/REP endpoint that never hangs.

Each request waits at most ``timeout`` seconds per attempt. A REQ socket whose reply did not
come is stuck in its send/receive cycle, so it is closed with linger 0 and a fresh one opened
for the next attempt (the zguide's "Lazy Pirate" pattern).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from os import PathLike
from typing import Any

import msgpack
import zmq

from transport.config import Config, load_config, wants_ipv6
from transport.security import curve_client_from_config

MAX_TIMEOUT_S = 2_147_483  # ZeroMQ's poll takes milliseconds as a C int: about 24 days


class QueryClientError(Exception):
    """The daemon could not be asked, or answered with an error."""


class NoAnswer(QueryClientError):
    """No daemon answered within the timeout."""


class GaveUp(NoAnswer):
    """The caller's ``give_up`` ended the wait for an answer."""


GIVE_UP_POLL_S = 0.1  # how often a wait with a give_up check asks it


class QueryClient:
    """Sends query maps and returns reply maps; one instance per thread."""

    def __init__(
        self,
        endpoint: str,
        timeout: float = 5.0,
        attempts: int = 1,
        configure: Callable[[zmq.Socket[Any]], None] | None = None,
    ) -> None:
        if not 0 < timeout <= MAX_TIMEOUT_S:  # 0, a negative or NaN one would make poll() wait for ever
            raise ValueError(f"timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT_S}, not {timeout}")
        if attempts < 1:
            raise ValueError(f"attempts must be 1 or more, not {attempts}")
        self.endpoint = endpoint
        self.timeout = timeout
        self.attempts = attempts
        self._configure = configure
        # The process-wide context: one per process, as ZeroMQ advises, and never terminated
        # here, so a client dropped without close() cannot hang a garbage collection in term().
        self._context: zmq.Context[Any] = zmq.Context.instance()
        self._socket: zmq.Socket[Any] | None = None

    @classmethod
    def from_config(cls, config: Config | str | PathLike[str], timeout: float = 5.0) -> QueryClient:
        """A client for the daemon a config file (or an already loaded :class:`Config`) describes.

        Connects to ``[query] bind`` (a wildcard address made loopback), speaking CURVE when
        ``[security] client_certificate`` is set, as ``Publisher.from_config`` does. Raises
        :class:`transport.config.ConfigError` for a missing or bad file and
        :class:`transport.security.SecurityError` for a missing or unsafe key file.
        """
        loaded = config if isinstance(config, Config) else load_config(config)
        return cls(connectable(loaded.query.bind), timeout, configure=curve_client_from_config(loaded))

    def _open(self) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self._context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        if self._configure is not None:
            self._configure(sock)
        try:
            connect(sock, self.endpoint)
        except ValueError as exc:
            raise QueryClientError(str(exc)) from None
        return sock

    def request(self, query: dict[str, Any], give_up: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Send one query and return the reply map (which may hold an ``error`` key).

        ``give_up``, if given, is asked every ``GIVE_UP_POLL_S`` while the answer is awaited; when
        it says so the wait ends with :class:`GaveUp` (a server stopping answers its requests in
        progress at once rather than after their timeout).
        """
        payload = msgpack.packb(query, use_bin_type=True)
        for _ in range(self.attempts):
            if self._socket is None:
                self._socket = self._open()
            self._socket.send(payload)
            try:
                answered = self._await(self._socket, give_up)
            except BaseException:  # KeyboardInterrupt: a REQ socket between send and reply cannot send again
                self._socket.close(linger=0)
                self._socket = None
                raise
            if answered:
                reply = msgpack.unpackb(self._socket.recv(), raw=False, strict_map_key=False)
                if not isinstance(reply, dict):
                    raise QueryClientError(f"{self.endpoint} sent a reply that is not a map: {reply!r}")
                return reply
            self._socket.close(linger=0)
            self._socket = None
            if answered is None:
                raise GaveUp(f"gave up waiting for {self.endpoint}'s answer")
        raise NoAnswer(
            f"no answer from {self.endpoint} within {self.timeout:g} s"
            f"{f' ({self.attempts} attempts)' if self.attempts > 1 else ''}; is the daemon running, is this its "
            "[query] bind, and do its CURVE settings and this client's agree? (transport.handshake.probe tells which)"
        )

    def _await(self, sock: zmq.Socket[Any], give_up: Callable[[], bool] | None) -> bool | None:
        """Whether the answer came within the timeout; None if ``give_up`` ended the wait."""
        if give_up is None:
            return bool(sock.poll(int(self.timeout * 1000), zmq.POLLIN))
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if sock.poll(max(0, int(min(left, GIVE_UP_POLL_S) * 1000)), zmq.POLLIN):
                return True
            if give_up():
                return None
            if left <= GIVE_UP_POLL_S:
                return False

    def call(self, query: dict[str, Any]) -> dict[str, Any]:
        """Like :meth:`request`, but an ``error`` reply raises :class:`QueryClientError`."""
        reply = self.request(query)
        if "error" in reply:
            raise QueryClientError(f"{self.endpoint} answered: {reply['error']}")
        return reply

    def iter_events(
        self,
        topic: str | None = None,
        after: int = 0,
        page: int = 1000,
        on_expired: Callable[[int, int], None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Every stored event after ``after``, paging with the cursor until an empty page.

        ``on_expired(after, first)`` is called, in order with the events, for each stretch
        retention deleted: when a page's ``first`` still stored is past its cursor, and when
        an event's cursor (a topic's seq, or the commit position across topics, both gapless
        as committed) skips some after the one before it.
        """
        key = "seq" if topic is not None else "position"
        told = after  # the cursor up to which every event was yielded or told deleted
        while True:
            reply = self.call({"op": "events", "topic": topic, "after": after, "limit": page})
            first = reply.get("first")
            if on_expired is not None and isinstance(first, int) and first > told + 1:
                on_expired(told, first)
                told = first - 1
            events = reply["events"]
            if not events:
                return
            if on_expired is None:
                yield from events
            else:
                for event in events:
                    # A daemon older than per-event positions (before the upgrade's restart)
                    # gives none: its pages' holes are then told by ``first`` alone. Compared
                    # with the last cursor told, not the page's own first: a stretch deleted
                    # between two pages is a hole too.
                    cursor = event.get(key)
                    if isinstance(cursor, int):
                        if cursor > told + 1:
                            on_expired(told, cursor)
                        told = cursor
                    yield event
            after = reply["next"]

    def iter_topics(self, after: str = "", page: int = 10_000) -> Iterator[dict[str, Any]]:
        """Every topic named after ``after``, by name, paging with the cursor until an empty
        page, so neither side holds more than a page of them."""
        while True:
            reply = self.call({"op": "topics", "after": after, "limit": page})
            topics = reply["topics"]
            if not topics:
                return
            yield from topics
            after = reply["next"]

    def close(self) -> None:
        """Close the socket without waiting."""
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def __enter__(self) -> QueryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(sock: zmq.Socket[Any], endpoint: str) -> None:
    """Connect ``sock``, or close it and raise :class:`ValueError` saying what is wrong with ``endpoint``.

    libzmq checks an endpoint only here (``udp://`` for a REQ socket, an unknown transport, ...).
    """
    try:
        sock.ipv6 = wants_ipv6(endpoint)
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise ValueError(
            f"cannot connect to {endpoint!r}: {zmq.strerror(exc.errno or 0)}; an endpoint looks like tcp://HOST:PORT"
        ) from None


def connectable(endpoint: str) -> str:
    """Turn a bind endpoint into one a client can connect to (``*``, 0.0.0.0 and ``[::]`` become loopback)."""
    for wildcard, loopback in (("://*:", "://127.0.0.1:"), ("://0.0.0.0:", "://127.0.0.1:"), ("://[::]:", "://[::1]:")):
        endpoint = endpoint.replace(wildcard, loopback)
    return endpoint
