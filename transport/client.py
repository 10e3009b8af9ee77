"""A query client for the daemon's REQ/REP endpoint that never hangs.

Each request waits at most ``timeout`` seconds per attempt. A REQ socket whose reply did not
come is stuck in its send/receive cycle, so it is closed with linger 0 and a fresh one opened
for the next attempt (the zguide's "Lazy Pirate" pattern). Meanwhile the socket's monitor is
watched: a daemon that refuses this client's security handshake will never answer, so that
ends the wait at once (:class:`HandshakeRefused`) instead of at the timeout.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from os import PathLike
from typing import Any

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from transport.config import Config, load_config, wants_ipv6
from transport.exclusive import one_thread_at_a_time
from transport.interfaces import interface_ipv4
from transport.replies import unpack_reply
from transport.security import curve_client_from_config

MAX_TIMEOUT_S = 2_147_483  # ZeroMQ's poll takes milliseconds as a C int: about 24 days


class QueryClientError(Exception):
    """The daemon could not be asked, or answered with an error."""


class NoAnswer(QueryClientError):
    """No daemon answered within the timeout."""


class GaveUp(NoAnswer):
    """The caller's ``give_up`` ended the wait for an answer."""


class QueryClientClosed(GaveUp):
    """:meth:`QueryClient.close` was called on the thread waiting for an answer (by a signal
    handler, or ``give_up``): the wait ended there, and the socket is closed."""


class QueryClientInUse(QueryClientError):
    """Another thread is inside a call to this client: one client serves one thread at a time."""


class HandshakeRefused(NoAnswer):
    """The daemon refused this client's security handshake, so no answer can come."""


GIVE_UP_POLL_S = 0.1  # how often a wait with a give_up check asks it
_MONITORS = itertools.count()

HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
# The monitor events that tell whether a daemon takes this client's handshake.
HANDSHAKE_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILED
# A handshake cut off without a reason: a client without CURVE at a CURVE daemon (or the wrong
# kind of port) sees this every time, a daemon killed or restarting mid-handshake once.
UNEXPLAINED_FAILURES = 3


@dataclass(frozen=True, slots=True)
class KeyHints:
    """Where this client's CURVE keys are set, as a failure's sentence tells the user to change them.

    The command-line tools take flags; the gateway and ``from_config`` clients read a config
    file's ``[security]``; a program builds its own socket hook.
    """

    authorized_key: str  # completes "... send SIGHUP, or ..."
    own_keys: str  # completes "must agree on CURVE (the daemon's [security] section; ...)"


FLAG_HINTS = KeyHints(
    authorized_key="use an authorized --client-cert",
    own_keys="--server-key and --client-cert here",
)
LIBRARY_HINTS = KeyHints(
    authorized_key="give this client an authorized certificate (configure=transport.security.curve_client(...))",
    own_keys="this client's configure=transport.security.curve_client(server key, client certificate)",
)
CONFIG_HINTS = KeyHints(
    authorized_key="point [security] client_certificate at an authorized certificate",
    own_keys="[security] server_public_key and client_certificate in this client's config",
)


def handshake_refusal(kind: int, value: int, hints: KeyHints) -> str:
    """What a refused handshake (monitor event ``kind``, its ``value``) means, as a sentence to
    follow the endpoint, ``hints`` saying where the user sets this client's keys."""
    if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (
            f"refused this client's CURVE key (ZAP status {value}): add its public certificate to "
            f"the daemon's authorized folder ([security] authorized_keys) and send SIGHUP, or {hints.authorized_key}"
        )
    # No retry would fare better: the keys, or the port, decide. The client sees the same
    # failure when the two sides' sockets are of kinds that cannot talk (a query client at
    # the ingest port), so both causes are named.
    return (
        "took the connection but the security handshake failed: the daemon and this client must agree "
        f"on CURVE (the daemon's [security] section; {hints.own_keys}), and the server key must be the "
        "daemon's; or this is another of the daemon's ports (queries go to its [query] bind, events to "
        "[ingest] bind, acknowledged ones to ack_bind, followers to [subscribe] bind)"
    )


class HandshakeVerdict:
    """Reads a socket's monitor events (:data:`HANDSHAKE_EVENTS`) in order and says when they
    show the daemon refusing this client: a refused key or mechanism at once, a handshake cut off
    without a reason at the :data:`UNEXPLAINED_FAILURES`-th in a row (ZeroMQ reconnects by itself
    after each, and one alone may be a daemon stopping)."""

    def __init__(self) -> None:
        self.unexplained = 0
        self.connected = False

    def refused(self, kind: int) -> bool:
        """Whether, after this event, the daemon has refused this client's handshake."""
        self.connected = self.connected or kind == zmq.EVENT_CONNECTED
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.unexplained = 0
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self.unexplained += 1
            return self.unexplained >= UNEXPLAINED_FAILURES
        return bool(kind & HANDSHAKE_FAILED)


# What a long-lived client reads from its socket's monitor to tell that the daemon refuses it.
REFUSAL_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILED


class HandshakeWatch:
    """The daemon's standing verdict on a long-lived client's handshakes, read from its sockets'
    monitors event by event (at least :data:`REFUSAL_EVENTS`; others are ignored).

    ``refusal`` says why the daemon refuses this client (a sentence to follow the endpoint, see
    :func:`handshake_refusal`) from the event that showed it until a handshake succeeds again;
    None meanwhile. Handshakes cut off without a reason count across sockets, for a client that
    replaces its socket sooner than :data:`UNEXPLAINED_FAILURES` of them come on one.
    """

    def __init__(self, hints: KeyHints) -> None:
        self.hints = hints
        self.refusal: str | None = None
        self._verdict = HandshakeVerdict()

    def see(self, kind: int, value: int) -> None:
        """Take one monitor event: its ``kind`` and ``value``."""
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.refusal = None
        if self._verdict.refused(kind):
            self.refusal = handshake_refusal(kind, value, self.hints)

    def read(self, monitor: zmq.Socket[Any]) -> str | None:
        """Take every event waiting on ``monitor``, without waiting; then :attr:`refusal`. All of
        them: what counts is the last verdict, not one a later handshake overturned."""
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return self.refusal
            self.see(int(event["event"]), int(event["value"]))

    def forget(self) -> None:
        """A new socket: no handshake of its own was refused yet."""
        self.refusal = None


def unbounded_monitor(sock: zmq.Socket[Any], events: int) -> zmq.Socket[Any]:
    """A monitor of ``sock`` for ``events`` (attach it before connecting), whose queue has no limit.

    libzmq's I/O thread blocks on a monitor whose queue is full (about 2 000 events: a daemon
    cutting every handshake adds one each 0.1 to 0.2 s), which stops every socket of the context
    until someone reads it. A client on the process-wide context whose monitor is read only
    within its calls (a :class:`transport.subscriber.Subscriber` whose application is busy, a
    :class:`QueryClient` idle between requests) then holds about 130 bytes an event instead. Its
    own address (see :func:`monitor_address`): pyzmq's default names it by the socket's file
    descriptor, which a socket opened just after one closed takes over while libzmq may still
    hold the old name.

    When the monitor cannot be made (no descriptor free for it, say), ``sock`` is closed and the
    ``ZMQError`` raised: a socket whose refusals would go unseen is not to be used.
    """
    address = monitor_address()
    try:
        sock.monitor(address, events)
        try:
            monitor: zmq.Socket[Any] = sock.context.socket(zmq.PAIR)
        except zmq.ZMQError:  # no monitor left with nobody reading it
            sock.disable_monitor()
            raise
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
    monitor.setsockopt(zmq.RCVHWM, 0)  # with the sender's limit, 0 makes libzmq's inproc pipe unbounded
    monitor.setsockopt(zmq.LINGER, 0)
    monitor.connect(address)
    return monitor


def close_monitored(sock: zmq.Socket[Any], monitor: zmq.Socket[Any]) -> None:
    """Close ``sock`` and the reader of its ``monitor``, without waiting (linger 0).

    The monitor is stopped first. libzmq's I/O thread sends each event with a blocking send, and
    the socket's connection goes on for a moment after ``close()`` (until libzmq has torn it
    down): an event then, to a reader already closed, blocks that thread for good, and with it
    every socket of the context. Three threads closing clients while a port cut their handshakes
    each millisecond did it within a few dozen clients each.

    The monitor must not be full (an :func:`unbounded_monitor`, or one just read): stopping it
    waits for the I/O thread, which a full one holds until it is read, so this would wait for ever.
    """
    sock.disable_monitor()
    sock.close(linger=0)
    monitor.close(linger=0)


class QueryClient:
    """Sends query maps and returns reply maps; one thread at a time (another's call raises
    :class:`QueryClientInUse`)."""

    def __init__(
        self,
        endpoint: str,
        timeout: float = 5.0,
        attempts: int = 1,
        configure: Callable[[zmq.Socket[Any]], None] | None = None,
        hints: KeyHints = LIBRARY_HINTS,
    ) -> None:
        if not 0 < timeout <= MAX_TIMEOUT_S:  # 0, a negative or NaN one would make poll() wait for ever
            raise ValueError(f"timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT_S}, not {timeout}")
        if attempts < 1:
            raise ValueError(f"attempts must be 1 or more, not {attempts}")
        self.endpoint = endpoint
        self.timeout = timeout
        self.attempts = attempts
        self._configure = configure
        self._hints = hints  # where a refused handshake's message says this client's keys are set
        # The process-wide context: one per process, as ZeroMQ advises, and never terminated
        # here, so a client dropped without close() cannot hang a garbage collection in term().
        self._context: zmq.Context[Any] = zmq.Context.instance()
        self._pid = os.getpid()
        self._socket: zmq.Socket[Any] | None = None
        self._monitor: zmq.Socket[Any] | None = None
        # Held by the thread inside a call (see transport.exclusive); Any: typeshed lacks RLock._is_owned.
        self._in_call: Any = threading.RLock()
        # close() asked on the thread of a request in progress (a signal handler): the request
        # closes at its next step, for closing here would pull the socket from under its wait.
        self._close_asked = False

    def _forked(self) -> bool:
        return self._pid != os.getpid()

    def _in_use_error(self) -> Exception:
        return QueryClientInUse(
            f"another thread is inside a call to this query client of {self.endpoint}: a QueryClient serves one "
            "thread at a time; make one per thread, or hold a lock around its calls"
        )

    @classmethod
    def from_config(cls, config: Config | str | PathLike[str], timeout: float = 5.0) -> QueryClient:
        """A client for the daemon a config file (or an already loaded :class:`Config`) describes.

        Connects to ``[query] bind`` (a wildcard address made loopback), speaking CURVE when
        ``[security] client_certificate`` is set, as ``Publisher.from_config`` does. Raises
        :class:`transport.config.ConfigError` for a missing or bad file and
        :class:`transport.security.SecurityError` for a missing or unsafe key file.
        """
        loaded = config if isinstance(config, Config) else load_config(config)
        return cls(
            connectable(loaded.query.bind), timeout, configure=curve_client_from_config(loaded), hints=CONFIG_HINTS
        )

    def _open(self) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self._context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        if self._configure is not None:
            self._configure(sock)
        # Attached before connect: a handshake refused before the monitor would go unseen.
        # Unbounded: it is read only within requests, and a client idle between them (as the
        # gateway pools them) while a daemon cut every handshake filled it in a few minutes,
        # which stopped every socket of the process-wide context. Only the events read (no
        # EVENT_CONNECTED), so that an idle one holds half as many.
        monitor = unbounded_monitor(sock, REFUSAL_EVENTS)
        try:
            connect(sock, self.endpoint)
        except ValueError as exc:
            monitor.close(linger=0)
            raise QueryClientError(str(exc)) from None
        self._monitor = monitor
        return sock

    def _drop_socket(self) -> None:
        if self._forked():
            # Made before a fork: the sockets and the context are the parent's, which a child
            # must neither use nor close. A new process gets the process-wide context anew.
            self._socket = self._monitor = None
            self._context = zmq.Context.instance()
            self._pid = os.getpid()
            return
        if self._socket is not None and self._monitor is not None:  # opened together (see _open)
            close_monitored(self._socket, self._monitor)
            self._socket = self._monitor = None

    @one_thread_at_a_time
    def request(self, query: dict[str, Any], give_up: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Send one query and return the reply map (which may hold an ``error`` key).

        ``give_up``, if given, is asked every ``GIVE_UP_POLL_S`` while the answer is awaited; when
        it says so the wait ends with :class:`GaveUp` (a server stopping answers its requests in
        progress at once rather than after their timeout).
        """
        try:
            return self._request(query, give_up)
        finally:
            if self._close_asked:  # a close() asked meanwhile, carried out once the answer was in
                self._close_asked = False
                self._drop_socket()

    def _request(self, query: dict[str, Any], give_up: Callable[[], bool] | None) -> dict[str, Any]:
        payload = msgpack.packb(query, use_bin_type=True)
        if self._forked():
            self._drop_socket()
        for _ in range(self.attempts):
            if self._close_asked:
                raise self._closed_during_request()
            if self._socket is not None and not self._last_handshake_succeeded():
                self._drop_socket()
            if self._socket is None:
                self._socket = self._open()
            deadline = time.monotonic() + self.timeout
            verdict = HandshakeVerdict()
            try:
                # A send waits within the timeout too: on a socket left with no connection a
                # plain send blocks for ever.
                answered = self._await(self._socket, zmq.POLLOUT, deadline, verdict, give_up)
                if answered:
                    self._socket.send(payload, zmq.NOBLOCK)
                    answered = self._await(self._socket, zmq.POLLIN, deadline, verdict, give_up)
            except BaseException:  # KeyboardInterrupt: a REQ socket between send and reply cannot send again
                self._drop_socket()
                raise
            if answered:
                reply = unpack_reply(self._socket.recv())
                if not isinstance(reply, dict):
                    raise QueryClientError(f"{self.endpoint} sent a reply that is not a map: {reply!r}")
                return reply
            self._drop_socket()
            if answered is None:
                raise GaveUp(f"gave up waiting for {self.endpoint}'s answer")
        raise NoAnswer(
            f"no answer from {self.endpoint} within {self.timeout:g} s"
            f"{f' ({self.attempts} attempts)' if self.attempts > 1 else ''}; is the daemon running, is this its "
            "[query] bind, and do its CURVE settings and this client's agree? (transport.handshake.probe tells which)"
        )

    def _last_handshake_succeeded(self) -> bool:
        """Whether the open socket's last handshake, of those its monitor saw while it sat idle
        between requests, succeeded (or there was none). Read so, what happened meanwhile is not
        judged again as this request's: a daemon restarted for a while with other keys, then
        back, takes the socket. But after a refused handshake libzmq may leave the socket
        without a connection for good, so one whose last handshake failed is replaced."""
        monitor = self._monitor
        succeeded = True
        while monitor is not None and monitor.poll(0):
            kind = int(recv_monitor_message(monitor)["event"])
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                succeeded = True
            elif kind & HANDSHAKE_FAILED:
                succeeded = False
        return succeeded

    def _await(
        self,
        sock: zmq.Socket[Any],
        flag: int,
        deadline: float,
        verdict: HandshakeVerdict,
        give_up: Callable[[], bool] | None,
    ) -> bool | None:
        """Whether ``sock`` became ready for ``flag`` (POLLOUT: room to send; POLLIN: the answer)
        before ``deadline``; None if ``give_up`` ended the wait. Raises :class:`HandshakeRefused` as
        soon as the monitor shows the daemon refusing us."""
        monitor = self._monitor
        poller = zmq.Poller()
        poller.register(sock, flag)
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        while True:
            left = deadline - time.monotonic()
            # In steps: a close() from a signal handler, which only asks, is seen within one.
            wait = min(left, GIVE_UP_POLL_S)
            ready = dict(poller.poll(max(0, int(wait * 1000))))
            if sock in ready:
                return True
            if self._close_asked:
                raise self._closed_during_request()
            if monitor is not None and monitor in ready:
                event = recv_monitor_message(monitor)
                if verdict.refused(int(event["event"])):
                    self._drop_socket()
                    sentence = handshake_refusal(int(event["event"]), event["value"], self._hints)
                    raise HandshakeRefused(f"{self.endpoint} {sentence}")
                continue
            if give_up is not None and give_up():
                return None
            if self._close_asked:  # by give_up
                raise self._closed_during_request()
            if left <= GIVE_UP_POLL_S:
                return False

    def _closed_during_request(self) -> QueryClientClosed:
        return QueryClientClosed(
            f"this query client of {self.endpoint} was closed while a request waited for its answer (close() from "
            "a signal handler or give_up on the waiting thread); a later request opens a new socket"
        )

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
        """Close the socket without waiting.

        Called on the thread of a request in progress (a signal handler, or ``give_up``), it
        only asks: the request ends within a step with :class:`QueryClientClosed` (or returns
        the answer, if it had come) and closes the socket then.
        """
        if self._in_call._is_owned():
            self._close_asked = True
            return
        self._close()

    @one_thread_at_a_time
    def _close(self) -> None:
        self._drop_socket()

    def __enter__(self) -> QueryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def monitor_address() -> str:
    """An inproc address for a socket monitor, unique in this process."""
    return f"inproc://eventagg-monitor-{os.getpid()}-{next(_MONITORS)}"


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
    """Turn a bind endpoint into one a client can connect to (``*``, 0.0.0.0 and ``[::]`` become
    loopback; an interface's name, as ``tcp://eth0:5555``, its IPv4 address)."""
    for wildcard, loopback in (("://*:", "://127.0.0.1:"), ("://0.0.0.0:", "://127.0.0.1:"), ("://[::]:", "://[::1]:")):
        endpoint = endpoint.replace(wildcard, loopback)
    scheme, _, rest = endpoint.partition("://")
    host, colon, port = rest.rpartition(":")
    if scheme == "tcp" and colon and host and not host.startswith("["):
        address = interface_ipv4(host)
        if address is not None:
            return f"tcp://{address}:{port}"
    return endpoint
