"""A consumer of the daemon's subscription endpoint: stored events after a cursor, then live ones.

Theory of operation. A DEALER socket sends ``subscribe`` (the topic or filter, the cursor to
start after, an optional consumer name and the first credit) and then reads ``events``
messages. Credit is the flow control: the daemon sends at most as many events as granted, and
this side grants more only as the application takes events (when what is granted but not yet
taken falls to half the window), so a consumer that stops iterating stops the daemon sending
and holds at most one window in memory. The daemon caps the credit it holds at its
``[subscribe] max_credit``; this side mirrors that cap (the one the ``subscribed`` reply
reports, else the default), so it never believes it holds credit the daemon dropped. A daemon
that does not report its cap may have capped lower: with one, when this side waits with an
empty buffer and nothing came for a heartbeat while it believes credit is outstanding, it
grants again, so a capped grant never stalls. (With a reported cap it never re-grants: at the
head each re-grant only added to what the daemon held, up to its cap, far past the window.)
Both sides send heartbeats, also while the application works through the buffer; when nothing
has come from the daemon for ``timeout`` seconds, or three of its announced heartbeats if that
is longer (or it says it has no subscription for this connection, as after a restart), the
socket is replaced and the subscription made again after the cursor of the last event handed
to the application, with backoff between attempts. So the application sees every stored event
once, in order, across daemon restarts. A daemon that refuses this side's security handshake
(its CURVE key, the server key, CURVE at one end only) will never answer, so that is not waited
out: the socket's monitor shows it, and :class:`SubscriberRefused` is raised at once.

A named subscription (``name=``) acknowledges positions: the cursor of the events the
application has finished with (taken before the next one is asked for), at most every
``ack_interval`` seconds and at :meth:`Subscriber.close`, which waits briefly for the daemon to
confirm it has stored it (subscribing again and re-sending it if the daemon had dropped the
subscription) and logs an error if it could not. Only events taken in this session are
acknowledged: a cursor given as ``after`` is not a position processed. An ``expired`` notice
told (once the events before it are taken) counts as events taken up to just before its
``first``: they are gone, so the position moves past them and the next run is not told again.
Leaving a ``with`` block by an exception acknowledges up to the event before the one being
handled. A later subscription with the same name and no ``after`` resumes from there. The wire
protocol is in docs/subscribe.md.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

import msgpack
import zmq

from transport import arguments
from transport.backoff import Backoff
from transport.client import (
    LIBRARY_HINTS,
    REFUSAL_EVENTS,
    HandshakeWatch,
    KeyHints,
    close_monitored,
    connect,
    unbounded_monitor,
)
from transport.exclusive import take_held_lock
from transport.queries import MAX_CURSOR
from transport.replies import unpack_reply

log = logging.getLogger(__name__)

DEFAULT_CREDIT = 1000
RECONNECT_BACKOFF = Backoff(base=0.1, factor=2.0, cap=5.0, jitter=0.5)
CLOSE_ACK_WAIT_S = 2.0
RESUBSCRIBE_CODES = {"not_subscribed", "busy", "unavailable"}
# [subscribe] max_credit's default: the most credit the daemon holds when its reply does not say.
DAEMON_MAX_CREDIT = 10000
# The silence that means a dead daemon, in its announced heartbeats (when longer than ``timeout``).
SILENT_HEARTBEATS = 3
# A named consumer's name, as the daemon takes it (the subscribe protocol's limit).
MAX_NAME_CHARS = 200
IF_NEVER_ANSWERED = (
    " (is a daemon running there, is this its [subscribe] bind, and do its CURVE settings and this subscriber's agree?)"
)
# Most topics in a subscription's ``topics`` filter (the subscribe protocol's limit).
MAX_FILTER_TOPICS = 1000
# The daemon's messages ZeroMQ may queue for a subscriber with ``buffer_bytes`` (each at most
# about 1 MiB, or one event): the rest wait in the daemon, which a consumer not reading costs little.
BOUNDED_RCVHWM = 2


def name_problem(name: object) -> str | None:
    """Why the daemon would refuse ``name`` as a named consumer's, or None."""
    if not isinstance(name, str):
        return f"a consumer's name must be a string, not {type(name).__name__}"
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        return f"a consumer's name must be 1 to {MAX_NAME_CHARS} characters, not {len(name)}"
    if "\x00" in name:
        # PostgreSQL's text cannot hold one, and a name must work on either backend.
        return "a consumer's name must not hold a NUL character"
    return None


class SubscriberError(Exception):
    """The daemon refused the subscription (the message says why), or the subscriber is closed.

    ``reason`` is the daemon's own words for a refusal (the message names the endpoint too).
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = message if reason is None else reason


class SubscriberRefused(SubscriberError):
    """The daemon refused this subscriber's security handshake (its CURVE key not authorized, the
    wrong server key, CURVE at one end only, or not the subscription port): raised as soon as the
    socket's monitor shows it, where the subscriber used to reconnect for ever. The message names
    the endpoint and what to change; ``reason`` is the same without the endpoint.

    The subscriber is not closed: a later call (iterating again, :meth:`Subscriber.next_event`)
    connects again after a pause, resuming after the last event taken, and raises this again while
    the daemon still refuses.
    """


class SubscriberInUse(SubscriberError):
    """Another thread is inside a call to this subscriber: one thread iterates it (any may close it)."""


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _unless_closing(
    method: Callable[Concatenate[Subscriber, _P], _R],
) -> Callable[Concatenate[Subscriber, _P], _R | None]:
    """:func:`transport.exclusive.one_thread_at_a_time`, but a call that finds another thread
    closing the subscriber waits for the close to end and returns None: an iteration on one thread
    ends quietly when another closes the subscriber, as documented."""

    @functools.wraps(method)
    def guarded(self: Subscriber, /, *args: _P.args, **kwargs: _P.kwargs) -> _R | None:
        if not self._in_call.acquire(False):
            if self._close_asked and not self._forked():
                self._closed_event.wait(CLOSE_ACK_WAIT_S + 1.0)
                return None
            take_held_lock(self)
        try:
            return method(self, *args, **kwargs)
        finally:
            self._in_call.release()

    return guarded


class Subscriber:
    """Iterate the events of one subscription; reconnects and resumes by itself.

    ``topic``: one topic, the cursor is its seq; without it every topic in commit order (or only
    ``topics``), the cursor is the commit ``position``. ``after``: start after this cursor (None:
    the named consumer's acknowledged position, or the beginning). ``credit``: the window, the
    most events the daemon may have sent ahead of the application. ``buffer_bytes``: bound in
    bytes too what waits in this process, whatever the events' sizes: the subscriber then reads
    at most about this many bytes of the daemon's messages into its buffer at a time (more only
    once the application took them all) and lets ZeroMQ queue only ``BOUNDED_RCVHWM`` messages,
    so the rest of the window waits in the daemon (None: only the window bounds it, in events).
    ``reconnects`` counts the times the subscription was made again: on a new connection, or
    when the daemon had dropped it. A daemon that refuses this subscriber's handshake raises
    :class:`SubscriberRefused`, its words naming where this subscriber's keys are set as ``hints``
    says (``configure=``, by default).
    """

    def __init__(
        self,
        endpoint: str,
        topic: str | None = None,
        *,
        topics: list[str] | None = None,
        after: int | None = None,
        name: str | None = None,
        credit: int = DEFAULT_CREDIT,
        buffer_bytes: int | None = None,
        heartbeat: float = 1.0,
        timeout: float = 5.0,
        ack_interval: float = 0.5,
        configure: Callable[[zmq.Socket[Any]], None] | None = None,
        backoff: Backoff = RECONNECT_BACKOFF,
        hints: KeyHints = LIBRARY_HINTS,
    ) -> None:
        arguments.text("endpoint", endpoint)
        if topic is not None:
            arguments.text("topic", topic)
        arguments.count("credit", credit)
        if buffer_bytes is not None:
            arguments.count("buffer_bytes", buffer_bytes)
        if after is not None:
            arguments.count("after", after, minimum=0, maximum=MAX_CURSOR)
        arguments.seconds("ack_interval", ack_interval)
        problem = None if name is None else name_problem(name)
        if problem is not None:
            raise ValueError(problem)  # here, not as a refusal the daemon sends back
        if not 0 < heartbeat < timeout < math.inf:
            raise ValueError(f"need 0 < heartbeat ({heartbeat}) < timeout ({timeout}) seconds")
        self.endpoint = endpoint
        self.topic = topic
        self.topics = topics
        self.name = name
        self.window = credit
        self.buffer_bytes = buffer_bytes
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.ack_interval = ack_interval
        self._configure = configure
        self._backoff = backoff
        self._after = after  # where the first subscription starts; then the last cursor handed out
        self.cursor: int | None = after
        self.expired: list[tuple[int, int]] = []  # (after, first still stored) the daemon reported
        self.acked: int | None = None  # the last position the daemon confirmed storing
        self.reconnects = 0
        self._context: zmq.Context[Any] = zmq.Context.instance()
        self._socket: zmq.Socket[Any] | None = None
        # The socket's monitor, and the daemon's verdict on this subscriber's handshakes it told.
        self._monitor: zmq.Socket[Any] | None = None
        self._poller: zmq.Poller | None = None
        self._handshakes = HandshakeWatch(hints)
        self._buffer: collections.deque[dict[str, Any]] = collections.deque()
        self._buffered_bytes = 0  # the size of the messages read since the buffer was last empty
        # The daemon's expired notices, each told once the events that came before it are taken
        # (so a note never runs ahead of the events printed): (events arrived before it, after, first).
        self._notices: collections.deque[tuple[int, int, int]] = collections.deque()
        self._arrived = self._taken_count = 0  # events put in the buffer, and taken from it
        self._granted = 0  # credit the daemon holds, as far as this side can tell
        self._max_credit = DAEMON_MAX_CREDIT  # the most credit the daemon holds at once
        self._cap_reported = False  # the daemon's subscribed reply said its cap (then never re-grant)
        self._silence = timeout  # nothing heard for this long: the daemon is gone
        # Nothing sent for this long: send a heartbeat. The daemon's announced heartbeat_ms when
        # shorter, as its timeout_ms (a few of them) may be below this side's own heartbeat.
        self._send_every = heartbeat
        self._last_event_at = 0.0
        self._regranted = False  # granted again after a quiet spell; once until events come
        self._roomy = False  # the daemon sent more than counted: its cap is no stall, no re-grants
        self._subscribed = False
        self._ref = 0  # the latest subscribe's ref: what comes before its answer is an older one's
        self._last_heard = 0.0
        self._last_sent = 0.0
        self._failures = 0
        self._retry_at = 0.0
        self._ack_sent: int | None = None
        self._ack_sent_at = 0.0
        self._taken: dict[str, Any] | None = None  # handed out; finished once the next is asked for
        # The cursor of the last event taken in this session (or just before the ``first`` of an
        # expired notice told since), and of the one taken before it (finished).
        self._taken_cursor: int | None = None
        self._finished_cursor: int | None = None
        self._busy_told = False
        self._closed = False
        # close() asked: a call in progress (its socket is its thread's) closes within a step and
        # sets _closed_event; a call that finds another thread closing ends quietly.
        self._close_asked = False
        self._abandon_asked = False  # the close asked is an abandon(): the last event taken not acknowledged
        self._closed_event = threading.Event()
        self._pid = os.getpid()  # the socket and its context belong to this process
        # Held by the thread inside a call (see transport.exclusive); Any: typeshed lacks RLock._is_owned.
        self._in_call: Any = threading.RLock()

    # Public API -------------------------------------------------------------------------------

    @property
    def subscribed(self) -> bool:
        """Whether the daemon has confirmed the current subscription."""
        return self._subscribed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Every event, for ever (until :meth:`close`, from any thread, or an error); blocks while none comes."""
        while not self._closed:
            try:
                event = self.next_event(timeout=1.0)
            except SubscriberError:
                if self._close_asked and self._closed:
                    return  # closed by close() (a signal handler) just before the call: the end
                raise
            if event is not None:
                yield event

    @_unless_closing
    def next_event(self, timeout: float | None) -> dict[str, Any] | None:
        """The next event, or None when none came within ``timeout`` seconds (None: wait for ever)."""
        self._check_open()
        arguments.seconds("timeout", timeout, none=True)
        self._finish_taken()
        if self._close_asked:  # before any event waiting in the buffer: close() means now
            self._close(self._taken_cursor)
            return None
        self._keep_alive()
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        looked = False  # a timeout of 0 still reads what has arrived, once
        while not self._buffer:
            self._tell_due_notices()
            now = time.monotonic()
            if self._close_asked:
                self._close(self._taken_cursor)  # the last event taken is finished: it asked again
                return None
            if now >= deadline and looked:
                return None
            looked = True
            self._step(max(0.0, min(deadline, now + 0.25, self._heartbeat_due(now)) - now))
        self._tell_due_notices()
        event = self._buffer.popleft()
        if not self._buffer:
            self._buffered_bytes = 0
        self._taken_count += 1
        self.cursor = event["seq"] if self.topic is not None else event["position"]
        self._finished_cursor = self._taken_cursor
        self._taken_cursor = self.cursor
        self._taken = event
        self._grant()
        return event

    @_unless_closing
    def ack(self, position: int | None = None) -> None:
        """Acknowledge ``position`` (default: the cursor of the last event taken) now.

        Nothing is sent when no event was taken in this session and no ``position`` is given, nor
        while the subscription is being made again (the daemon restarting, say): then the last
        event taken is acknowledged once it is made, as at every ``ack_interval``.
        """
        if self.name is None:
            raise SubscriberError("only a named subscriber (name=...) can acknowledge")
        self._check_open()
        if position is not None and (
            not isinstance(position, int) or isinstance(position, bool) or not 0 <= position <= (self.cursor or 0)
        ):
            raise ValueError(
                f"ack position must be a cursor from 0 to the last one taken ({self.cursor}), not {position!r}"
            )
        position = self._taken_cursor if position is None else position
        if position is None or self._socket is None or not self._subscribed:
            return
        if self._send({"op": "ack", "position": position}):
            self._ack_sent = position
            self._ack_sent_at = time.monotonic()

    def close(self) -> None:
        """Acknowledge what was taken (named subscriber), say goodbye and close the socket.

        Waits up to ``CLOSE_ACK_WAIT_S`` for the daemon to confirm; should the daemon have
        dropped the subscription meanwhile (a handler slower than its ``timeout_ms``), the
        answer ``not_subscribed`` makes this side subscribe again and the ack goes out once
        more. An acknowledgement not confirmed in time is logged as an error (``acked`` keeps
        the last confirmed position).
        """
        self._shut(abandon=False)

    def _shut(self, abandon: bool) -> None:
        """Close (or abandon) from any thread, a signal handler included: here when no call is in
        progress, else by the call in progress, which closes within a step."""
        self._close_asked = True  # a call that finds the lock held by this close ends quietly
        self._abandon_asked = self._abandon_asked or abandon
        if self._in_call._is_owned():
            return  # a signal handler (or callback) within a call on this thread: that call closes
        if not self._in_call.acquire(False):
            if not self._forked():
                # Another thread is inside a call (its socket is that thread's): it closes within a step.
                if not self._closed_event.wait(CLOSE_ACK_WAIT_S + 1.0):
                    log.warning("the thread iterating this subscriber did not close it in time; it will")
                return
            take_held_lock(self)  # held by a thread of the parent, which is not in this child
        try:
            self._close(self._finished_cursor if self._abandon_asked else self._taken_cursor)
        finally:
            self._in_call.release()

    def _close(self, position: int | None) -> None:
        """Close, acknowledging ``position`` first (None: nothing) for a named subscriber."""
        if self._closed:
            return
        if self._forked():  # the parent's sockets: neither used nor closed here
            self._socket = self._monitor = None
            self._poller = None
            self._closed = True
            self._closed_event.set()
            return
        try:
            if self.name is not None and position is not None and self.acked != position:
                try:
                    self._store_position(position)
                except SubscriberError as exc:  # e.g. another connection took the name meanwhile
                    log.error("consumer %r: position %s not stored: %s", self.name, position, exc)
            if self._socket is not None and self._subscribed:
                self._send({"op": "unsubscribe"})
        finally:
            self._closed = True
            self._drop_socket()
            self._closed_event.set()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """Close; leaving by an exception is :meth:`abandon`."""
        self._shut(abandon=exc_type is not None)

    def abandon(self) -> None:
        """Close, acknowledging only the events finished before the one taken last, whose
        handling may have been cut short (a named consumer gets it again next time)."""
        self._shut(abandon=True)

    # Internals --------------------------------------------------------------------------------

    def _forked(self) -> bool:
        return self._pid != os.getpid()

    def _in_use_error(self) -> Exception:
        return SubscriberInUse(
            f"another thread is inside a call to this subscriber to {self.endpoint}: one thread takes its "
            "events (any thread may close or abandon it); make one Subscriber per thread"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise SubscriberError("the subscriber is closed")
        if self._forked():
            # Its socket is the parent's: a child that used it waited for ever on a poll that
            # no message could end. (The parent's own subscription goes on.)
            raise SubscriberError(
                f"this subscriber to {self.endpoint} was made in another process, before this one was"
                " forked; make a new Subscriber in this process"
            )

    def _store_position(self, position: int) -> None:
        """Ack ``position`` and wait for the daemon's ``acked``, sending it again on each new subscription."""
        deadline = time.monotonic() + CLOSE_ACK_WAIT_S
        while self.acked != position and time.monotonic() < deadline and not self._closed:
            if self._subscribed and self._ack_sent != position:
                self.ack(position)
            self._step(0.05, receive_only=True)
        if self.acked != position:
            log.error(
                "consumer %r: position %s not stored (the daemon did not confirm it within %g s); "
                "the next run resumes after %s",
                self.name,
                position,
                CLOSE_ACK_WAIT_S,
                "the last stored position" if self.acked is None else self.acked,
            )

    def _heartbeat_due(self, now: float) -> float:
        """When the next heartbeat is due (at least a millisecond away: what is due is sent by the
        step that waits for it), so a wait never outlasts it."""
        if not self._subscribed:
            return math.inf
        return max(now + 0.001, self._last_sent + self._send_every)

    @_unless_closing
    def keep_alive(self) -> None:
        """Send a heartbeat if one is due, taking nothing: for a caller that holds events it cannot
        pass on yet for longer than the daemon's ``[subscribe] timeout_ms``, after which the daemon
        drops a consumer it has not heard from (the gateway's stream to a client that reads slowly)."""
        self._check_open()
        self._keep_alive()

    def _keep_alive(self) -> None:
        """A heartbeat when nothing went out for ``heartbeat``: the application may take a while
        over a full buffer, and the daemon drops a consumer it does not hear from."""
        if self._socket is not None and self._subscribed and time.monotonic() - self._last_sent >= self._send_every:
            self._send({"op": "heartbeat"})

    def _finish_taken(self) -> None:
        """The event handed out before is processed: a named subscriber may acknowledge it."""
        if self._taken is None:
            return
        self._taken = None
        self._finished_cursor = self._taken_cursor  # so an exception from here on (Ctrl-C) keeps it
        if self.name is not None and self._subscribed and self._taken_cursor != self._ack_sent:
            if time.monotonic() - self._ack_sent_at >= self.ack_interval:
                self.ack()

    def _step(self, wait: float, receive_only: bool = False) -> None:
        """Connect if need be, then handle what arrives within ``wait`` seconds and keep time."""
        now = time.monotonic()
        if self._socket is None:
            if now < self._retry_at:
                time.sleep(min(wait, self._retry_at - now))
                return
            self._connect()
        assert self._socket is not None and self._monitor is not None and self._poller is not None
        ready = dict(self._poller.poll(max(0, int(wait * 1000))))
        if self._monitor in ready and self._handshakes.read(self._monitor) is not None:
            # Refused: no answer can come (and after a refused key libzmq never connects the
            # socket again), so the user is told now rather than left with silence for ever.
            refusal = self._handshakes.refusal
            self._reconnect_later()
            raise SubscriberRefused(f"{self.endpoint} {refusal}", refusal)
        if self._socket in ready:
            for _ in range(100):
                try:
                    frame = self._socket.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._last_heard = time.monotonic()
                self._on_message(frame)
                if self._socket is None:
                    return
                if self.buffer_bytes is not None and self._buffered_bytes >= self.buffer_bytes:
                    break  # the rest stays in the socket, and past BOUNDED_RCVHWM in the daemon
        now = time.monotonic()
        if now - self._last_heard > self._silence:
            # Never answered on this connection: nothing there, or a handshake it refused.
            hint = "" if self._subscribed else IF_NEVER_ANSWERED
            log.warning("no word from %s in %.1f s; reconnecting%s", self.endpoint, self._silence, hint)
            self._reconnect_later()
            return
        if not receive_only and self._subscribed:
            self._regrant_when_quiet(now)
            self._grant()  # again, should a grant not have gone out
            if now - self._last_sent >= self._send_every:
                self._send({"op": "heartbeat"})
        if self.name is not None and self._subscribed and self._taken_cursor not in (None, self._ack_sent):
            if now - self._ack_sent_at >= self.ack_interval and self._taken is None:
                self.ack()

    def _connect(self) -> None:
        sock: zmq.Socket[Any] = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.buffer_bytes is not None:
            sock.setsockopt(zmq.RCVHWM, BOUNDED_RCVHWM)
        if self._configure is not None:
            self._configure(sock)
        # Attached before connecting, or a quick refusal would go unseen. Unbounded: it is read
        # only within calls, and a full one would stop every socket of the process-wide context.
        monitor = unbounded_monitor(sock, REFUSAL_EVENTS)
        try:
            connect(sock, self.endpoint)
        except ValueError as exc:
            monitor.close(linger=0)
            raise SubscriberError(str(exc)) from None
        self._socket = sock
        self._monitor = monitor
        self._handshakes.forget()
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(monitor, zmq.POLLIN)
        self._subscribed = False
        self._roomy = False  # perhaps another daemon, or the same one with another max_credit
        self._drop_untaken()
        self._subscribe()

    def _subscribe(self) -> None:
        self._ref += 1
        request: dict[str, Any] = {"op": "subscribe", "credit": self.window, "ref": self._ref}
        if self.topic is not None:
            request["topic"] = self.topic
        if self.topics is not None:
            request["topics"] = self.topics
        if self.cursor is not None:
            request["after"] = self.cursor
        if self.name is not None:
            request["name"] = self.name
        self._drop_untaken()
        self._granted = min(self.window, self._max_credit)
        self._subscribed = False
        self._ack_sent = None  # an ack sent on the replaced subscription may never have been stored
        self._last_heard = self._last_event_at = time.monotonic()
        self._regranted = False
        self._send(request)

    def _send(self, message: dict[str, Any]) -> bool:
        """Send without blocking; False when the socket's queue is full (the daemon is not reading)."""
        assert self._socket is not None
        try:
            self._socket.send(msgpack.packb(message, use_bin_type=True), zmq.NOBLOCK)
        except zmq.Again:
            return False  # tried again later; a daemon that stays silent is replaced after the timeout
        self._last_sent = time.monotonic()
        return True

    def _grant(self) -> None:
        """Top the credit up to the window once half of it has been taken by the application.

        The daemon adds a grant to what it holds and caps the sum at its ``max_credit``; the
        same sum and cap here keep ``_granted`` no higher than what the daemon holds.
        """
        if not self._subscribed or self._socket is None:
            return
        in_hand = self._granted + len(self._buffer)  # granted and unsent, or sent and not yet taken
        if in_hand <= self.window // 2:
            grant = self.window - in_hand
            if self._send({"op": "credit", "credit": grant}):
                self._granted = min(self._max_credit, self._granted + grant)

    def _regrant_when_quiet(self, now: float) -> None:
        """Grant afresh when the application waits on an empty buffer, credit seems outstanding and
        no event came for a heartbeat: the daemon's cap may be lower than the one assumed, and
        then it holds none. Once per quiet spell, and never again once the daemon has sent more
        than counted (its cap is then above the window); until then, at the head, it only adds
        to the credit the daemon holds, which its ``max_credit`` still bounds."""
        if self._cap_reported:
            return  # this side's count then mirrors the daemon's exactly: a re-grant would only add to it
        quiet = now - self._last_event_at >= self.heartbeat
        if quiet and not self._roomy and not self._buffer and self._granted > 0 and not self._regranted:
            self._regranted = True
            self._granted = 0
            self._grant()

    def _on_message(self, frame: bytes) -> None:
        try:
            message = unpack_reply(frame)
        except Exception:
            log.error("the daemon sent a message that is not msgpack; reconnecting")
            self._reconnect_later()
            return
        op = message.get("op") if isinstance(message, dict) else None
        if op is None and isinstance(message, dict) and isinstance(message.get("error"), str):
            # Not a subscription endpoint (each of its messages names its op): the daemon's
            # acknowledged-ingest or query endpoint, whose answer says where subscriptions go.
            self._closed = True
            self._drop_socket()
            reason = str(message["error"])
            raise SubscriberError(f"{self.endpoint} is not a subscription endpoint; it answered: {reason}", reason)
        if op == "events":
            if not self._subscribed:
                return  # sent for a subscription this one replaced
            events = message["events"]
            self._granted -= len(events)
            # More than counted came: the daemon held more than this side believed, so its cap
            # is above what this side grants, and a quiet spell means only the head is reached.
            self._roomy = self._roomy or self._granted < 0
            self._buffer.extend(events)
            self._buffered_bytes += len(frame)
            self._arrived += len(events)
            self._last_event_at = time.monotonic()
            self._regranted = False
        elif op == "subscribed":
            if message.get("ref") != self._ref:
                return
            self._subscribed = True
            self._failures = 0
            self._busy_told = False
            if self.cursor is None:
                self.cursor = message["after"]
            self._heed_limits(message)
        elif op == "acked":
            self.acked = message["position"]
        elif op == "expired":
            self._notices.append((self._arrived, message["after"], message["first"]))
        elif op == "error":
            code = message.get("code")
            if code == "ack_failed":
                # The daemon could not store the position (its database away a moment): the
                # subscription goes on, and the position is sent again at the next ack interval.
                log.warning(
                    "%s could not store the acknowledged position: %s; sending it again",
                    self.endpoint,
                    message.get("error"),
                )
                self._ack_sent = None
                return
            if code == "not_subscribed" and not self._subscribed:
                return  # an answer to a message sent before the subscribe now under way
            if code == "bad_request" and self._subscribed:
                # A message refused while subscribed changed nothing: the subscription goes on.
                log.error("%s refused a message: %s", self.endpoint, message.get("error"))
                return
            if code in RESUBSCRIBE_CODES:
                if code == "busy" and not self._busy_told:
                    self._busy_told = True  # once until subscribed: the retries are not news
                    log.warning("%s is busy: %s; retrying until it has room", self.endpoint, message.get("error"))
                else:
                    log.info("the daemon said: %s; subscribing again", message.get("error"))
                if code != "not_subscribed":  # busy or unavailable: back off first
                    self._reconnect_later()
                else:
                    self.reconnects += 1
                    self._subscribe()
                return
            self._closed = True
            self._drop_socket()
            reason = str(message.get("error"))
            raise SubscriberError(f"{self.endpoint} refused: {reason}", reason=reason)
        # "heartbeat" and "unsubscribed" need nothing beyond the time they were heard

    def _heed_limits(self, subscribed: dict[str, Any]) -> None:
        """Take the daemon's heartbeat (and credit cap, if it says) from its ``subscribed`` reply."""
        heartbeat_ms = subscribed.get("heartbeat_ms")
        if isinstance(heartbeat_ms, int) and heartbeat_ms > 0:
            self._silence = max(self.timeout, SILENT_HEARTBEATS * heartbeat_ms / 1000)
            self._send_every = min(self.heartbeat, heartbeat_ms / 1000)
        max_credit = subscribed.get("max_credit")
        self._cap_reported = isinstance(max_credit, int) and max_credit > 0
        if isinstance(max_credit, int) and self._cap_reported and max_credit != self._max_credit:
            self._max_credit = max_credit
            self._granted = min(self._granted, max_credit)

    def _reconnect_later(self) -> None:
        self._drop_socket()
        self._retry_at = time.monotonic() + self._backoff.delay(self._failures)
        self._failures += 1
        self.reconnects += 1

    def _drop_socket(self) -> None:
        if self._socket is not None and self._monitor is not None:  # opened together (see _connect)
            close_monitored(self._socket, self._monitor)
            self._socket = self._monitor = None
        self._poller = None
        self._subscribed = False
        self._drop_untaken()

    def _drop_untaken(self) -> None:
        """Forget the events not yet taken, and the notices not yet told: the daemon sends both
        again to the subscription made after the cursor."""
        self._buffer.clear()
        self._buffered_bytes = 0
        self._notices.clear()
        self._arrived = self._taken_count

    def _tell_due_notices(self) -> None:
        """Record and log each expired notice whose preceding events have all been taken, and move
        past it: the cursor and the position to acknowledge become ``first - 1`` (as the daemon's
        cursor did when it sent the notice), as if the application had taken and finished events
        up to there. Else a named consumer with no event after the notice could never acknowledge
        past the deleted ones: its stored position would stay behind (its lag high) for ever, and
        each subscription would be told of them again."""
        while self._notices and self._notices[0][0] <= self._taken_count:
            _, after, first = self._notices.popleft()
            self.expired.append((after, first))
            log.warning(
                "events after %s are no longer stored; continuing from %s, the first still stored", after, first
            )
            passed = first - 1
            if self.cursor is None or passed > self.cursor:
                self.cursor = passed
            # Nothing of the hole is being handled: it counts as finished (abandon() acknowledges it too).
            if self._taken_cursor is None or passed > self._taken_cursor:
                self._taken_cursor = self._finished_cursor = passed


def follow(
    endpoint: str,
    topic: str | None = None,
    *,
    after: int | None = None,
    name: str | None = None,
    configure: Callable[[zmq.Socket[Any]], None] | None = None,
    **options: Any,
) -> Generator[dict[str, Any], None, None]:
    """The stored events after ``after``, then live ones, until SIGINT (which ends it quietly).

    Reconnects by itself when the daemon restarts. A SIGINT while it waits for the next event
    closes the subscriber, acknowledging every event taken (for a named consumer). Closing the
    generator, or leaving a loop over it, acknowledges the events before the last one yielded:
    this side cannot tell a ``break`` after that event was handled from an exception (Ctrl-C)
    in the middle of handling it, so it is delivered again next time. To acknowledge it on a
    normal exit, iterate a :class:`Subscriber` in a ``with`` block instead.
    """
    subscriber = Subscriber(endpoint, topic, after=after, name=name, configure=configure, **options)
    try:
        yield from subscriber
    except KeyboardInterrupt:
        return
    except GeneratorExit:
        subscriber.abandon()
        raise
    finally:
        subscriber.close()
