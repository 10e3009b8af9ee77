"""The publisher library: what applications import to send events to eventagg.

::

    from transport.publisher import Publisher

    with Publisher("tcp://127.0.0.1:5557") as publisher:      # acknowledged mode
        publisher.publish({"topic": "orders", "event_id": "o-1",
                           "timestamp": "2025-10-22T10:00:00Z", "source": "shop"})
    # leaving the block flushed: every event was acknowledged, or an exception said otherwise

Theory of operation
-------------------
Every event is checked with the daemon's own rules (:func:`transport.schema.check_fields`)
and encoded to msgpack the moment it is published, so a bad event raises
:class:`InvalidEvent` at once and later changes to the caller's dict cannot leak into the batch.
Encoded events gather in a *pending* batch, which is sent when it holds ``batch_size`` events
(or ``max_batch_bytes``), when a call finds it older than ``linger``, or on :meth:`flush`.

There is no background thread: the publisher works only inside its caller's calls (publish,
flush, poll, close). An application that publishes a few events and then idles should call
:meth:`Publisher.poll` now and then, or :meth:`Publisher.flush` when it needs them delivered.

*Fire-and-forget* mode PUSHes each batch as one frame to ``[ingest] bind``. It is the fastest
path and has no acknowledgement: frames queued in either process when the daemon dies are lost.

*Acknowledged* mode sends each batch over a DEALER socket to ``[ingest] ack_bind`` as
``{"batch": id, "events": [...]}`` and keeps its events until the daemon answers, which it does
only after the batch is committed. At most ``window`` batches are in flight; a publish that
needs a slot waits (back-pressure), so memory stays bounded by ``window × batch_size`` events.
When the oldest batch handed to the socket goes ``ack_timeout`` without an answer, the publisher
runs the zguide's "Lazy Pirate" recovery: close the socket with linger 0, pause (exponential
backoff with full jitter), open a new socket and resend every unacknowledged batch with its same
id. Replies meant for the old socket can never arrive on the new one, so each batch is settled by
exactly one reply. A resend whose first copy was committed comes back as duplicates: retries are
safe because the daemon deduplicates by (topic, event_id). When the oldest batch has gone
``deadline`` seconds without an answer, or ``max_attempts`` attempts for it got none,
:class:`DeliveryFailed` is raised, carrying every unacknowledged event so the application may
keep or resend them.

An attempt is a batch handed to a socket (to ZeroMQ), and a retry one handed over again: that is
what ``totals.retries``, ``on_retry`` and ``max_attempts`` count. A publisher to one daemon hands
every batch over at once (ZeroMQ holds it until a connection takes it). The daemons' publishers
of :mod:`transport.affinity` watch their connection and hand a batch over only while a handshake
holds: one held while the daemon is down makes no attempt, and no ``ack_timeout`` runs for it.
Their socket stays open meanwhile (ZeroMQ reconnects every 0.1 to 0.2 s), so what they hold
goes as soon as the daemon is back; and when a connection that carried batches is cut, no answer
can come for them on it, so the socket is replaced at once, without a pause, and they go again
on the new one as soon as its handshake succeeds. The Lazy Pirate pause is for a daemon that
took a batch and went silent, its connection up.

A daemon that refuses the publisher's security handshake could never answer, so that is not
waited out: the socket's monitor shows it, and :class:`PublisherRefused` (a DeliveryFailed,
carrying the events likewise) is raised at once.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from transport import arguments
from transport.backoff import Backoff, RetryBudget
from transport.client import (
    CONFIG_HINTS,
    HANDSHAKE_FAILED,
    LIBRARY_HINTS,
    REFUSAL_EVENTS,
    HandshakeWatch,
    KeyHints,
    close_monitored,
    connect,
    connectable,
    monitor_address,
    unbounded_monitor,
)
from transport.config import load_config
from transport.exclusive import take_held_lock
from transport.schema import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    MAP_KEYS,
    MAX_PAYLOAD_DEPTH,
    InvalidEvent,
    check_fields,
    pack_payload,
    unpack_from_peer,
)
from transport.security import SocketHook, curve_client_from_config

__all__ = [
    "BatchRefused",
    "BatchResult",
    "DeliveryFailed",
    "InvalidEvent",
    "Publisher",
    "PublisherClosed",
    "PublisherError",
    "PublisherInUse",
    "PublisherRefused",
    "PublishTimeout",
    "Rejection",
    "Totals",
]

# Batches in flight: the daemon acknowledges a batch only after its 50 ms reorder window (by
# default) and a commit, so 8 batches of 100 capped one publisher at ~12 000 events/s; 32 give
# ~34 000 (publish.py --acked, 100 000 events, fresh daemon each) for ~3 200 events held.
DEFAULT_WINDOW = 32

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_BYTES = 4 * 1024 * 1024
DEFAULT_BACKOFF = Backoff()

# What a publisher that watches its connection reads from the socket's monitor: a completed
# handshake (the connection is up), or a connection refused, cut or refused its handshake (down).
LINK_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED
# How often the monitor is read while the connection is up and nothing waits for it (per event
# published, reading it would cost more than a time check); a disconnection is seen this late.
WATCH_EVERY_S = 0.01
# How long a refusal seen on a socket stands, for a publisher that watches its connection: a socket
# older than this is replaced, and the daemon judged afresh. libzmq never connects a socket again
# once the daemon refused its key, so without this a daemon whose keys were put right stayed down.
REFUSAL_STANDS_S = 1.0
Connection = Literal["up", "connecting", "down"]


class PublisherError(Exception):
    """The root of the publisher's own errors (a bad event raises :class:`InvalidEvent` instead)."""


class DeliveryFailed(PublisherError):
    """No acknowledgement came in time, through every retry: the daemon is down or unreachable.

    ``events`` holds every event the publisher had not got acknowledged (sent or still pending),
    including those of the call that raised, in the order published; the publisher no longer
    holds them. Publishing them again is safe: duplicates are dropped.
    """

    def __init__(self, endpoint: str, elapsed: float, attempts: int, events: list[dict[str, Any]]) -> None:
        self.endpoint = endpoint
        self.elapsed = elapsed
        self.attempts = attempts
        self.events = events
        super().__init__(endpoint, elapsed, attempts, events)  # the arguments again, so it pickles

    @property
    def reason(self) -> str:
        """What went wrong and what to check, without what the exception holds (for a command's user)."""
        # No attempt: a publisher that watches its connection found it down all along.
        tries = f"{self.attempts} attempts" if self.attempts else "never sent: no connection to it was up"
        return (
            f"no acknowledgement from {self.endpoint} for {self.elapsed:.1f} s ({tries}): is the "
            "daemon running, is this its acknowledged endpoint ([ingest] ack_bind), do its CURVE settings and "
            "this publisher's agree, and can it commit (a full disk or a storage outage holds every acknowledgement: "
            "`eventagg health` says)?"
        )

    def __str__(self) -> str:
        # Counted when read: the call that raises adds the events it had not queued.
        return (
            f"{self.reason} {len(self.events)} unacknowledged events are in this exception's .events; "
            "publishing them again is safe"
        )


class PublisherRefused(DeliveryFailed):
    """The daemon refused this publisher's security handshake: its CURVE key is not in the daemon's
    authorized folder, the server key is not the daemon's, CURVE is on at one end only, or the
    endpoint is another of the daemon's ports. Raised as soon as the socket's monitor shows it
    (a key refused at once; handshakes cut off without a reason at the third in a row), not at the
    ``deadline``: no retry can fare better until the keys change.

    A :class:`DeliveryFailed`, so ``events`` holds every event not acknowledged, as there (the
    publisher holds none of them any more, and can be used again). ``refusals`` maps each endpoint
    that refused to why, in words that say what to change: one endpoint, or every daemon of a
    publisher to several (:mod:`transport.affinity`).
    """

    def __init__(self, refusals: dict[str, str], elapsed: float, attempts: int, events: list[dict[str, Any]]) -> None:
        super().__init__(",".join(refusals), elapsed, attempts, events)
        self.refusals = refusals
        self.args = (refusals, elapsed, attempts, events)  # so it pickles

    @property
    def reason(self) -> str:
        # Daemons refused for the same reason (the same keys everywhere) are named together.
        said: dict[str, list[str]] = {}
        for endpoint, why in self.refusals.items():
            said.setdefault(why, []).append(endpoint)
        parts = [f"{' and '.join(endpoints)} {why}" for why, endpoints in said.items()]
        if len(self.refusals) == 1:
            return f"{parts[0]}."
        return f"every daemon refused this publisher's handshake: {'; '.join(parts)}."


class PublishTimeout(PublisherError):
    """A call waited its timeout for room (back-pressure) or for acknowledgements.

    The event being published was not queued (for :meth:`Publisher.publish_many`: only the
    first ``queued`` events were). Nothing queued earlier is lost: the publisher still holds
    it and keeps retrying on the next call. Raised by ``close()`` (the publisher then holds
    nothing), ``events`` has every event not acknowledged, in the order published: publishing
    them again is safe.
    """

    def __init__(self, message: str, events: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.queued = 0
        self.events: list[dict[str, Any]] = events if events is not None else []


def closed_unacknowledged(endpoint: str, waited: float, events: list[dict[str, Any]]) -> PublishTimeout:
    """The error ``close()`` raises when acknowledgements did not all come in time."""
    return PublishTimeout(
        f"closed with {len(events)} events not acknowledged by {endpoint} within {waited:g} s; "
        f"they are in this error's .events, and publishing them again is safe",
        events,
    )


class BatchRefused(PublisherError):
    """The daemon refused a whole batch (e.g. more events than its ``max_batch_events``).

    ``events`` holds the batch's events, which the publisher no longer holds, then those of the
    call that raised which it did not queue (as :class:`DeliveryFailed`); raised by ``close()``,
    every other event not acknowledged too. Lower ``batch_size`` (or use
    :meth:`Publisher.from_config`, which reads the daemon's limits).
    """

    def __init__(self, endpoint: str, batch_id: int, reason: str, events: list[dict[str, Any]]) -> None:
        self.batch_id = batch_id
        self.reason = reason
        self.events = events
        super().__init__(f"{endpoint} refused batch {batch_id} of {len(events)} events: {reason}")


class PublisherClosed(PublisherError):
    """The publisher was used after :meth:`Publisher.close`, or closed during the call that raises.

    ``close()`` called on the thread of a call in progress (by ``on_ack``, or a signal handler
    such as one for Ctrl-C) is carried out by that call as soon as it gets back to its loop: it
    stops waiting, frees the socket, and raises this error when events are left unacknowledged
    (``events`` holds them, in the order published, as :meth:`Publisher.held_events` still
    does; publishing them again is safe), or returns normally when none is.
    """

    def __init__(self, message: str, events: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.events: list[dict[str, Any]] = events if events is not None else []


class PublisherInUse(PublisherError):
    """Another thread is inside a call to this publisher: one publisher serves one thread at a time."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """One event of an acknowledged batch that the daemon refused, and why."""

    index: int
    reason: str
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The daemon's answer to one acknowledged batch, after it was committed.

    ``conflicting`` holds the positions in the batch of duplicates whose content differs from
    the stored event, when the daemon names them (its ack's ``conflicting`` list), else ().
    """

    batch_id: int
    size: int
    new: int
    duplicate: int
    rejected: tuple[Rejection, ...]
    attempts: int
    conflicting: tuple[int, ...] = ()


@dataclass(slots=True)
class Totals:
    """Running counts of one publisher: in events, but ``batches_acked`` and ``retries``, in batches.

    ``retries`` counts the batches sent again after a send whose answer did not come (each time
    one is handed to a socket after the first). A batch held while its daemon is down is not
    retried until it is sent: a publisher to one daemon hands every batch to ZeroMQ at once, one
    to several only while the connection is up (see :mod:`transport.affinity`).
    """

    sent: int = 0
    acked_new: int = 0
    acked_duplicate: int = 0
    rejected: int = 0
    batches_acked: int = 0
    retries: int = 0
    abandoned: int = 0

    @property
    def acked(self) -> int:
        """Events the daemon has answered for: new, duplicate or rejected."""
        return self.acked_new + self.acked_duplicate + self.rejected


@dataclass(slots=True)
class _Batch:
    """A batch waiting for its acknowledgement.

    ``first_sent``: when it was made (its ``deadline`` counts from then). ``sent_at``: when it was
    last handed to a socket (its ``ack_timeout`` counts from then). ``attempts``: how many times
    it was handed to a socket (to ZeroMQ); a publisher that watches its connection hands a batch
    over only while a handshake with the daemon holds (see :attr:`Publisher._watches_connection`),
    so a batch held while the daemon is down makes no attempt. ``queued``: handed to the current
    socket (the batches queued are always the oldest ones, in order).
    """

    batch_id: int
    events: list[dict[str, Any]]
    frame: bytes
    first_sent: float
    sent_at: float
    attempts: int = 0
    queued: bool = False

    @property
    def left(self) -> bool:
        """Handed to ZeroMQ at least once, so the daemon may have it; one that never left can go to
        another daemon without a duplicate."""
        return self.attempts > 0


_P = ParamSpec("_P")
_R = TypeVar("_R")
_Client = TypeVar("_Client", bound="Publisher")


def closes_when_asked(method: Callable[Concatenate[_Client, _P], _R]) -> Callable[Concatenate[_Client, _P], _R]:
    """:func:`transport.exclusive.one_thread_at_a_time`, and the outermost call on the thread
    carries out a ``close()`` asked within it (by ``on_ack`` or a signal handler): it frees the
    socket once the call ends, and raises :class:`PublisherClosed` if events are left
    unacknowledged (a call that stopped waiting for them raised it already)."""

    @functools.wraps(method)
    def guarded(self: _Client, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if not self._in_call.acquire(False):
            take_held_lock(self)
        try:
            try:
                result = method(self, *args, **kwargs)
            except BaseException:
                if self._close_asked and self._in_call._recursion_count() == 1:
                    self._close_as_asked()
                raise
            if self._close_asked and self._in_call._recursion_count() == 1:
                self._close_as_asked()
                if self.unacknowledged:
                    raise self._closed_during_call()
            return result
        finally:
            self._in_call.release()

    return guarded


# How many forks led to this process. A publisher notes it when made: one made before a fork
# belongs to the parent (its ZeroMQ context cannot be used, or even terminated, in the child).
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


@dataclass(slots=True)
class _Resources:
    """The context and current socket, held apart from the publisher so cleanup has a fixed order.

    A publisher dropped without :meth:`Publisher.close` inside a reference cycle would otherwise
    let pyzmq's ``Context.__del__`` run ``term()`` while the socket is still open (the garbage
    collector clears the context's weak references to its sockets first), which blocks for ever.
    A ``weakref.finalize`` holding this object closes the socket first, then terminates.
    """

    context: zmq.Context[Any]
    socket: zmq.Socket[Any] | None = None
    linger_ms: int = 0
    forks: int = 0  # _forks when made
    monitor: zmq.Socket[Any] | None = None  # fire-and-forget: tells when a daemon took the connection
    # A fire-and-forget publisher dropped without close(): where it sent, and its counts.
    endpoint: str = ""
    totals: Totals | None = None

    def release(self) -> None:
        if self.forks != _forks:
            return  # the parent's: only it may close them
        if self.monitor is not None:
            if self.totals is not None and self.totals.sent:
                self._say_if_never_taken()
            self.monitor.close(linger=0)
            self.monitor = None
        if self.socket is not None:
            self.socket.close(linger=self.linger_ms)
            self.socket = None
        self.context.term()

    def handshake_seen(self, timeout: float) -> bool:
        """Whether a daemon has completed a handshake with the fire-and-forget socket, waiting up
        to ``timeout`` seconds for one (a PUSH socket queues frames for a peer that may never come)."""
        if self.monitor is None:
            return True
        return bool(self.monitor.poll(math.ceil(max(0.0, timeout) * 1000), zmq.POLLIN))

    def _say_if_never_taken(self) -> None:
        """A fire-and-forget publisher dropped without close(): wait for a daemon to take the
        connection as close() would, within the linger, and say what was lost if none did (close()
        raises; nobody could catch that here)."""
        assert self.totals is not None
        started = time.monotonic()
        if self.handshake_seen(self.linger_ms / 1000):
            self.linger_ms = max(0, self.linger_ms - int((time.monotonic() - started) * 1000))
            return
        self.linger_ms = 0
        log.warning(
            "a fire-and-forget publisher to %s was dropped without close(), and no daemon took its connection "
            "in its close_timeout: the %d events it sent are lost; is the daemon running there? (close() "
            "raises PublishTimeout for this)",
            self.endpoint,
            self.totals.sent,
        )


@dataclass(slots=True)
class _Pending:
    """Events gathered for the next batch, already validated and encoded."""

    events: list[dict[str, Any]] = field(default_factory=list)
    packed: list[bytes] = field(default_factory=list)
    size: int = 0
    since: float = 0.0

    def clear(self) -> None:
        self.events = []
        self.packed = []
        self.size = 0


# How a strictly typed msgpack packer gets, from a subclass of a type it packs, the value a
# plain packer would pack (str(), int() and the like may be overridden: these read the data).
_PLAIN_VALUES: tuple[tuple[type, Callable[[Any], Any]], ...] = (
    (dict, dict.copy),
    (list, list.copy),
    (str, str.__str__),
    (bytes, bytes.__bytes__),
    (int, int.__int__),
    (float, float.__float__),
)


class _TupleSpotter:
    """The ``default`` of a publisher's packer (``strict_types``): packs what a plain packer
    packs, byte for byte, and notes whether a tuple was packed.

    A tuple packs as an array, and as a map key that is an array the daemon refuses the event
    (no Python dict can hold a list as a key). Only a tuple can make one, so the packed event is
    read back for its keys only when it held a tuple: that costs ~0.7 us an event, twice what
    packing it does.
    """

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, value: Any) -> Any:
        if isinstance(value, tuple):
            self.seen = True
            return list(value)
        for kind, plain in _PLAIN_VALUES:
            if isinstance(value, kind):
                return plain(value)
        raise TypeError(f"can not serialize {type(value).__name__!r} object")


def _check_map_keys(packed: bytes) -> None:
    """Refuse a packed event holding a map key that is an array, a map or a msgpack Timestamp, as the daemon would."""
    try:
        unpack_from_peer(packed)
    except TypeError:  # unhashable: a list or a dict as a key
        raise InvalidEvent(
            f"event holds a map whose key is an array or a map (a tuple packs as an array); {MAP_KEYS}"
        ) from None


class Publisher:
    """Validates, batches and sends events to one daemon endpoint; one thread at a time (another's
    call raises :class:`PublisherInUse`).

    Args:
        endpoint: where to connect: the daemon's ``[ingest] ack_bind`` in acknowledged mode,
            its ``[ingest] bind`` in fire-and-forget mode.
        acked: acknowledged mode (True) or fire-and-forget (False).
        batch_size: most events per batch.
        linger: seconds a partial batch may wait for more events before a call sends it.
        window: most acknowledged batches in flight at once (back-pressure beyond it).
        ack_timeout: seconds to wait for the acknowledgement of a batch handed to the socket
            before the Lazy Pirate retry.
        deadline: give up (:class:`DeliveryFailed`) when the oldest batch has gone this many
            seconds unacknowledged (from its making, sent or not); None for no time limit.
        max_attempts: give up when this many attempts for the oldest batch got no answer (an
            attempt: a send that reached a socket; see the module docstring); None for no limit.
        backoff: the pauses between retries.
        block_timeout: the default timeout of :meth:`publish` when it waits for room; None
            waits as long as retries go on.
        close_timeout: how long :meth:`close` waits for acknowledgements (acknowledged mode) or
            for queued frames to leave (fire-and-forget).
        max_payload_bytes: the payload limit checked before sending (the daemon's own limit).
        max_batch_bytes: a batch is sent once its encoded events reach this many bytes.
        configure: called with every socket the publisher opens, before it connects (e.g. to set
            CURVE keys).
        hints: where this publisher's keys are set, as :class:`PublisherRefused` names them
            (``from_config`` names the config file's ``[security]`` keys).
        on_ack: called with each :class:`BatchResult`.
        on_retry: called when an attempt got no answer (its ``ack_timeout`` passed, or, watching
            the connection, the connection was cut), before the pause, with (the number of
            failed attempts, the pause in seconds: 0 after a cut, when what was sent goes again
            as soon as the connection is back). A batch never sent makes no attempt.
        keep_results: how many recent :class:`BatchResult` to keep in :attr:`results`.
        endpoints: several daemons sharing one database instead of ``endpoint``: each topic goes
            to one of them by rendezvous hashing (see :mod:`transport.affinity`).
    """

    # True for the daemons' publishers of transport.affinity: read the socket's monitor, and hand
    # a batch to ZeroMQ only while a handshake with the daemon holds. A batch that never left can
    # then go to another daemon when this one is down, with no copy left behind to arrive later
    # (ZeroMQ would deliver what it queued once the daemon came back), and a daemon down costs no
    # attempt. A lone publisher has nowhere else to send, so it queues at once (its monitor tells
    # only of refused handshakes): an attempt for it is a batch handed to ZeroMQ, which may hold
    # it until the daemon comes; its Lazy Pirate pauses find that daemon again.
    _watches_connection = False

    def __new__(cls, *args: Any, endpoints: Sequence[str] | None = None, **options: Any) -> Publisher:
        """``Publisher(endpoints=[...])`` publishes to several daemons, each topic to one
        (a :class:`transport.affinity.AffinePublisher`); otherwise to the one ``endpoint``."""
        if endpoints is not None and cls is Publisher:
            from transport.affinity import AffinePublisher

            return super().__new__(AffinePublisher)
        return super().__new__(cls)

    def __init__(
        self,
        endpoint: str,
        *,
        acked: bool = True,
        batch_size: int = 100,
        linger: float = 0.005,
        window: int = DEFAULT_WINDOW,
        ack_timeout: float = 5.0,
        deadline: float | None = 60.0,
        max_attempts: int | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        block_timeout: float | None = None,
        close_timeout: float = 30.0,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        configure: SocketHook | None = None,
        hints: KeyHints = LIBRARY_HINTS,
        on_ack: Callable[[BatchResult], None] | None = None,
        on_retry: Callable[[int, float], None] | None = None,
        keep_results: int = 1000,
        endpoints: Sequence[str] | None = None,
    ) -> None:
        # ``endpoints`` is taken by __new__, which makes an AffinePublisher of such a call.
        arguments.text("endpoint", endpoint)
        arguments.flag("acked", acked)
        for name, value in (("batch_size", batch_size), ("window", window), ("keep_results", keep_results)):
            arguments.count(name, value)
        arguments.count("max_payload_bytes", max_payload_bytes)
        arguments.count("max_batch_bytes", max_batch_bytes)
        arguments.seconds("linger", linger)
        arguments.seconds("ack_timeout", ack_timeout, zero=False)
        arguments.seconds("deadline", deadline, none=True, zero=False)
        arguments.seconds("block_timeout", block_timeout, none=True)
        arguments.seconds("close_timeout", close_timeout)
        self.endpoint = endpoint
        self.acked = acked
        self.batch_size = batch_size
        self.linger = linger
        self.window = window
        self.ack_timeout = ack_timeout
        self.block_timeout = block_timeout
        self.close_timeout = close_timeout
        self.deadline = deadline
        self.max_payload_bytes = max_payload_bytes
        self.max_batch_bytes = max_batch_bytes
        self.totals = Totals()
        self.results: deque[BatchResult] = deque(maxlen=keep_results)
        self._configure = configure
        self._on_ack = on_ack
        self._on_retry = on_retry
        self._budget = RetryBudget(backoff, deadline, max_attempts)
        self._budget_batch: int | None = None  # the oldest batch, whose trouble the budget counts
        self._pending = _Pending()
        self._in_flight: dict[int, _Batch] = {}
        self._next_id = 1
        self._retry_at: float | None = None  # set while the socket is closed between retries
        # The connection as the monitor last told (watching publishers; others take it as up):
        # up after a handshake, down after a refusal, a cut or a failed handshake until the next.
        self._up = not self._watches_connection
        self._down = False
        self._watch_at = 0.0  # when the monitor is next read while nothing waits for it
        self._held = False  # some batch in flight is not queued on the socket (see _release_held)
        self._poller: zmq.Poller | None = None  # the socket and its monitor, for acknowledged waits
        # Whether the daemon refuses this publisher's handshake (acknowledged mode), and since when
        # the socket that shows it was open.
        self._handshakes = HandshakeWatch(hints)
        self._opened_at = 0.0
        self._tuples = _TupleSpotter()
        self._packer = msgpack.Packer(use_bin_type=True, datetime=False, strict_types=True, default=self._tuples)
        self._closed = False
        # close() asked by on_ack or a signal handler within a call on this thread: that call
        # stops waiting and closes (see closes_when_asked), for closing here would pull its
        # socket from under it.
        self._close_asked = False
        self._closing = False  # inside close(): an on_ack failure does not stop it
        self._callback_error: Exception | None = None  # the first on_ack failure while closing
        # Held by the thread inside a public call (see transport.exclusive); Any: typeshed lacks
        # RLock._is_owned and _recursion_count.
        self._in_call: Any = threading.RLock()
        # A context of its own, so close() can terminate it (which is what makes a PUSH socket's
        # linger actually deliver queued frames) without touching the application's sockets.
        self._forks = _forks
        self._resources = _Resources(
            zmq.Context(),
            linger_ms=0 if acked else int(close_timeout * 1000),
            forks=_forks,
            endpoint=endpoint,
            totals=None if acked else self.totals,
        )
        self._finalizer = weakref.finalize(self, self._resources.release)
        self._socket = self._open()

    @classmethod
    def from_config(cls, path: str | PathLike[str], *, acked: bool = True, **options: Any) -> Publisher:
        """A publisher for the daemon described by a config file.

        Connects to ``[ingest] ack_bind`` (acknowledged) or ``[ingest] bind`` (fire-and-forget),
        with a wildcard address made loopback, and checks events against the daemon's limits.
        When ``[security] client_certificate`` is set, every socket speaks CURVE with it (unless
        ``configure`` is given). ``options`` are the keyword arguments of :class:`Publisher`.
        Raises :class:`transport.config.ConfigError` for a missing or bad file and
        :class:`transport.security.SecurityError` for a missing or unsafe key file.
        """
        config = load_config(path)
        ingest = config.ingest
        endpoint = connectable(ingest.ack_bind if acked else ingest.bind)
        if options.get("configure") is None:
            options["configure"] = curve_client_from_config(config)
            options.setdefault("hints", CONFIG_HINTS)
        options.setdefault("max_payload_bytes", ingest.max_payload_bytes)
        options["batch_size"] = min(options.get("batch_size", 100), ingest.max_batch_events)
        # Half the message limit leaves room for the batch envelope and the msgpack headers.
        options["max_batch_bytes"] = min(
            options.get("max_batch_bytes", DEFAULT_MAX_BATCH_BYTES), ingest.max_message_bytes // 2
        )
        return cls(endpoint, acked=acked, **options)

    # -- the public calls ------------------------------------------------------------------

    def publish(self, event: dict[str, Any], timeout: float | None = None) -> None:
        """Validate one event and queue it for sending.

        Raises :class:`InvalidEvent` (nothing queued) for an event the daemon would refuse.
        When the pending batch is full and cannot be sent (acknowledged mode: the window of
        batches in flight is full; fire-and-forget: the socket's queue is full), waits up to
        ``timeout`` seconds (default ``block_timeout``), then raises :class:`PublishTimeout`
        without queueing the event. Raises :class:`DeliveryFailed` when retries are exhausted
        and :class:`BatchRefused` when the daemon refused a whole batch.
        """
        # What closes_when_asked does, written out: this is the call made per event.
        if not self._in_call.acquire(False):
            take_held_lock(self)
        try:
            try:
                self._check_open((event,) if self._close_asked else None)
                arguments.seconds("timeout", timeout, none=True)
                packed = self._encode(event)
                self._add(event, packed, timeout)
            except BaseException:
                if self._close_asked and self._in_call._recursion_count() == 1:
                    self._close_as_asked()
                raise
            if self._close_asked and self._in_call._recursion_count() == 1:
                self._close_as_asked()
                if self.unacknowledged:
                    raise self._closed_during_call()
        finally:
            self._in_call.release()

    @closes_when_asked
    def publish_many(self, events: Iterable[dict[str, Any]], timeout: float | None = None) -> None:
        """Validate every event first, then queue them all; one bad event queues none.

        :class:`InvalidEvent` names the bad event's position. Otherwise as :meth:`publish`.
        """
        self._check_open(events)
        arguments.seconds("timeout", timeout, none=True)
        checked: list[tuple[dict[str, Any], bytes]] = []
        for index, event in enumerate(events):
            try:
                checked.append((event, self._encode(event)))
            except InvalidEvent as exc:
                raise InvalidEvent(f"event {index}: {exc}") from None
        for queued, (event, packed) in enumerate(checked):
            try:
                self._add(event, packed, timeout, service=False)
            except PublishTimeout as exc:
                exc.queued = queued
                raise
            except (DeliveryFailed, BatchRefused, PublisherClosed) as exc:
                exc.events.extend(event for event, _ in checked[queued + 1 :])
                raise
        # Once for the lot, not per event: reading the socket for replies costs more than
        # queueing an event (~7 of ~13 µs), and a full batch was sent as it filled anyway.
        self._service()

    @closes_when_asked
    def flush(self, timeout: float | None = None) -> None:
        """Send the pending batch and, in acknowledged mode, wait until every batch is acknowledged.

        Raises :class:`PublishTimeout` after ``timeout`` seconds (None: as long as retries go
        on; the events are kept), :class:`DeliveryFailed` when retries are exhausted. In
        fire-and-forget mode there is nothing to wait for: the frames are queued, not confirmed.
        """
        self._check_open()
        arguments.seconds("timeout", timeout, none=True)
        if not self.acked:
            if self._pending.events:
                self._send_pending(timeout)
            return

        def settled() -> bool:
            if self._pending.events:
                self._try_send()
            return not self._pending.events and not self._in_flight

        if not self._wait_until(settled, timeout):
            raise PublishTimeout(
                f"{self.unacknowledged} events still unacknowledged by {self.endpoint} after {timeout:g} s; "
                f"the publisher keeps them and retries: call flush() again, or close()"
            )

    @closes_when_asked
    def poll(self, timeout: float = 0.0) -> int:
        """Do the work that is due (read acks, retry, send a batch whose linger ended).

        Waits up to ``timeout`` seconds for acknowledgements. Returns how many events are not yet
        acknowledged (in fire-and-forget mode: not yet sent). Call it from an idle loop.
        """
        self._check_open()
        arguments.seconds("timeout", timeout)
        if timeout > 0 and self.acked:
            self._wait_until(lambda: not self._in_flight and not self._pending.events, timeout)
        else:
            self._service()
        return self.unacknowledged

    def close(self, timeout: float | None = None, flush: bool = True) -> None:
        """Flush (unless ``flush`` is False), then close the socket and the context.

        Waits up to ``timeout`` seconds (default ``close_timeout``); errors of the flush
        propagate, but the socket and context are closed in any case. A fire-and-forget
        publisher lingers up to that long for queued frames to leave, and raises
        :class:`PublishTimeout` if no daemon ever took its connection (what it sent is then
        lost: ZeroMQ held it for a peer that never came). Closing twice is harmless.

        An exception raised by ``on_ack`` meanwhile does not stop it: the flush goes on (and
        calls ``on_ack`` for the other batches), the socket is freed, and then the first such
        exception is raised; should events be left unacknowledged too, :class:`PublishTimeout`
        is raised as above, from it. Called on the thread of a call in progress (by ``on_ack``,
        or a signal handler), it returns at once and that call closes the publisher as soon as
        it gets back to its loop, without waiting further (see :class:`PublisherClosed`); but
        from within ``close()`` itself (its ``on_ack``), a ``close()`` that flushes changes
        nothing: the close in progress goes on flushing, as both asked.
        """
        if self._closed:
            return
        arguments.seconds("timeout", timeout, none=True)
        if self._in_call._is_owned():
            if self._closing and flush:
                # Asked again from within close() (its on_ack): the close in progress already
                # flushes, as asked; stopping its wait would hand back what the daemon is about to take.
                return
            # Closing here would pull the socket from under the call in progress on this thread
            # (a raw AttributeError or ZMQError there): that call closes instead.
            self._close_asked = True
            return
        self._close(timeout, flush)

    @closes_when_asked
    def _close(self, timeout: float | None, flush: bool) -> None:
        if self._closed:
            return
        if self._forked():
            flush = False  # the parent's events, which the parent still holds and sends
        wait = self.close_timeout if timeout is None else timeout
        self._closing = True
        try:
            if not self.acked:
                self._close_fire_and_forget(wait, flush)
                return
            try:
                if flush:
                    self.flush(wait)
            except PublishTimeout as exc:
                raise closed_unacknowledged(self.endpoint, wait, self.held_events()) from (self._callback_error or exc)
            except BatchRefused as exc:
                exc.events.extend(self.held_events())  # closed now: nothing else holds them
                raise
            if self._callback_error is not None:
                raise self._callback_error
        finally:
            self._closing = False
            self._callback_error = None
            self._release()

    def _release(self) -> None:
        """Mark the publisher closed and free its socket and context (the finalizer runs once)."""
        self._closed = True
        self._resources.totals = None  # what became of the events is settled by the caller
        if self.acked:  # its batches were settled (or are held, or handed back): nothing queued matters
            self._resources.linger_ms = 0
        self._finalizer()

    def _close_as_asked(self) -> None:
        """Carry out a close() asked within the call now ending: without waiting any further,
        what is not acknowledged staying in :meth:`held_events`."""
        if self._closed:
            return
        if not self.acked and not self._forked() and not self._resources.handshake_seen(0):
            self._resources.linger_ms = 0  # no daemon took the connection: nothing queued would leave
        self._release()

    def _closed_during_call(self) -> PublisherClosed:
        events = self.held_events()
        return PublisherClosed(
            f"this publisher to {self.endpoint} was closed during this call (close() from on_ack or a signal "
            f"handler on its thread), with {len(events)} events not acknowledged: they are in this error's "
            ".events and in held_events(), and publishing them again is safe",
            events,
        )

    def _close_fire_and_forget(self, wait: float, flush: bool) -> None:
        """Queue the pending batch and see that a daemon took the connection, within ``wait``
        seconds in all; queued frames then linger for what is left of it (no daemon: not at all)."""
        deadline = time.monotonic() + wait
        self._resources.linger_ms = 0
        unqueued: list[dict[str, Any]] = []
        try:
            if flush:
                self.flush(wait)
        except PublishTimeout:
            unqueued = self.held_events()  # ZeroMQ's queue stayed full for the whole wait
        if self.totals.sent and not self._forked() and not self._resources.handshake_seen(deadline - time.monotonic()):
            also = f"; the {len(unqueued)} not yet sent are in this error's .events" if unqueued else ""
            raise PublishTimeout(
                f"no daemon at {self.endpoint} took a connection within {wait:g} s of closing: the "
                f"{self.totals.sent} events sent are dropped with the socket{also}; is the daemon running, "
                "is this its [ingest] bind, and do its CURVE settings and this publisher's agree?",
                unqueued,
            )
        self._resources.linger_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
        if unqueued:
            raise PublishTimeout(
                f"{len(unqueued)} events could not be queued for {self.endpoint} within {wait:g} s of closing "
                "(ZeroMQ's queue stayed full: the daemon reads slowly, or not at all); they are in this error's "
                f".events; the {self.totals.sent} sent before them are dropped if not delivered by then",
                unqueued,
            )

    def _forked(self) -> bool:
        return self._forks != _forks

    def _in_use_error(self) -> Exception:
        return PublisherInUse(
            f"another thread is inside a call to this publisher to {self.endpoint}: a Publisher serves one "
            "thread at a time; make one per thread, or hold a lock around its calls"
        )

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """Close. Left by an exception, the publisher still delivers what was published before it
        (waiting ``close_timeout`` at most, or not at all for Ctrl-C), but a failure to is logged,
        not put in the place of that exception, which goes on."""
        if exc_type is None:
            self.close()
            return
        try:
            self.close(0.0 if issubclass(exc_type, KeyboardInterrupt) else None)
        except Exception as failure:  # PublisherError, or the one on_ack raised while closing
            # Nobody can take the failure's .events: say what became of them instead.
            lost = len(getattr(failure, "events", None) or ())
            log.error(
                "leaving by %s, the publisher to %s dropped %d events not acknowledged (%s); publishing them "
                "again is safe",
                exc_type.__name__,
                self.endpoint,
                lost,
                str(failure).split(";")[0],
            )

    def __repr__(self) -> str:
        mode = "acked" if self.acked else "fire-and-forget"
        return f"Publisher({self.endpoint!r}, {mode}, unacknowledged={self.unacknowledged})"

    def held_events(self) -> list[dict[str, Any]]:
        """Every event held (sent and not yet acknowledged, then pending), in the order published."""
        events = [event for batch in self._in_flight.values() for event in batch.events]
        events.extend(self._pending.events)
        return events

    @property
    def unacknowledged(self) -> int:
        """Events held: pending, plus (acknowledged mode) sent and not yet answered."""
        return len(self._pending.events) + sum(len(batch.events) for batch in self._in_flight.values())

    @property
    def in_flight(self) -> int:
        """Batches sent and not yet acknowledged."""
        return len(self._in_flight)

    def oldest_unacked_age(self) -> float:
        """Seconds the oldest unacknowledged batch has waited since first sent (0 when none waits)."""
        if not self._in_flight:
            return 0.0
        oldest = next(iter(self._in_flight.values()))
        return max(0.0, time.monotonic() - oldest.first_sent)

    # -- batching --------------------------------------------------------------------------

    def _encode(self, event: dict[str, Any]) -> bytes:
        try:
            *_, payload = check_fields(event)
            self._tuples.seen = False
            packed: bytes = self._packer.pack(event)
            if self._tuples.seen or 255 in packed:  # a tuple, or maybe a Timestamp (ext type -1), as a key
                _check_map_keys(packed)
            # Else the payload, a part of it, is within the size limit, and (each level taking a
            # byte) too short to nest too deep: a payload deep enough for the daemon to refuse
            # it would, past the frame's own limit, take its whole fire-and-forget frame down.
            if len(packed) > self.max_payload_bytes or len(packed) >= MAX_PAYLOAD_DEPTH:
                pack_payload(payload, self.max_payload_bytes)
            return packed
        except InvalidEvent:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidEvent(
                f"event cannot be encoded as msgpack ({exc}); use maps, arrays, strings, numbers, "
                f"booleans, nil and bytes"
            ) from None

    def _add(self, event: dict[str, Any], packed: bytes, timeout: float | None, service: bool = True) -> None:
        pending = self._pending
        if pending.events and self._batch_full(len(pending.events), pending.size, len(packed)):
            # The batch is full and could not leave earlier: wait for it here, before queueing
            # this event, so the pending batch never outgrows batch_size.
            try:
                self._send_pending(self.block_timeout if timeout is None else timeout)
            except (DeliveryFailed, BatchRefused, PublisherClosed) as exc:
                exc.events.append(event)  # not queued, so hand it back with the others
                raise
        if not pending.events:
            pending.since = time.monotonic()
        pending.events.append(event)
        pending.packed.append(packed)
        pending.size += len(packed)
        if len(pending.events) >= self.batch_size or pending.size >= self.max_batch_bytes:
            self._try_send()
        elif service:
            self._service()

    def _batch_full(self, count: int, size: int, more: int) -> bool:
        """Whether a batch of ``count`` events and ``size`` bytes must leave before one of ``more`` bytes joins it."""
        return count >= self.batch_size or size + more > self.max_batch_bytes

    def _try_send(self) -> bool:
        """Send the pending batch if that needs no waiting; returns whether it went."""
        pending = self._pending
        if self.acked:
            if len(self._in_flight) >= self.window:
                return False
            self._send_batch(pending.events, pending.packed)
        elif not self._push(pending.packed, 0):
            return False
        self.totals.sent += len(pending.events)
        pending.clear()
        return True

    def _send_pending(self, timeout: float | None) -> None:
        """Send the pending batch, waiting up to ``timeout`` for room; raises :class:`PublishTimeout`."""
        if self._try_send():
            return
        if self.acked:
            if not self._wait_until(lambda: not self._pending.events or self._try_send(), timeout):
                raise PublishTimeout(
                    f"{self.window} batches sent to {self.endpoint} are still unacknowledged after "
                    f"{timeout:g} s, so there is no room for more; what was queued is kept: publish or "
                    f"flush again later, or raise the timeout"
                )
            return
        # Fire-and-forget: no timeout would block for ever on a daemon that never comes; the
        # retry deadline bounds it instead.
        limit = timeout if timeout is not None else self._budget.deadline
        if not self._push(self._pending.packed, limit):
            raise PublishTimeout(
                f"{self.endpoint} took no frame for {limit:g} s (its queue is full or it is not running); "
                f"what was queued is kept: publish or flush again later"
            )
        self.totals.sent += len(self._pending.events)
        self._pending.clear()

    def _send_batch(self, events: list[dict[str, Any]], packed: list[bytes]) -> None:
        batch_id = self._next_id
        self._next_id += 1
        pack = self._packer
        frame = b"".join(
            [
                pack.pack_map_header(2),
                pack.pack("batch"),
                pack.pack(batch_id),
                pack.pack("events"),
                pack.pack_array_header(len(packed)),
                *packed,
            ]
        )
        now = time.monotonic()
        if not self._in_flight and self._socket is not None and not self._watches_connection:
            # The first batch after a quiet spell. A refusal seen meanwhile may be past (the keys
            # put right since), and a socket whose key was refused never connects again: the
            # daemon is asked afresh, on a new socket, what it says of this batch's handshake.
            self._watch(now)
            if self._handshakes.refusal is not None:
                self._replace_socket()
        batch = self._in_flight[batch_id] = _Batch(batch_id, events, frame, now, now)
        if self._held:  # those waiting go first, in order (this one is the last of them)
            self._release_held(now)
        else:
            self._transmit(batch, now)

    def _push(self, packed: list[bytes], timeout: float | None) -> bool:
        """PUSH one frame, waiting up to ``timeout`` (None: no limit); returns whether it was queued."""
        assert self._socket is not None
        frame = packed[0] if len(packed) == 1 else self._packer.pack_array_header(len(packed)) + b"".join(packed)
        try:
            if timeout is not None and timeout <= 0:
                self._socket.send(frame, zmq.NOBLOCK)
            else:
                self._socket.setsockopt(zmq.SNDTIMEO, -1 if timeout is None else int(timeout * 1000))
                self._socket.send(frame)
        except zmq.Again:
            return False
        return True

    # -- acknowledged mode: sockets, replies, retries ------------------------------------------

    @property
    def _socket(self) -> zmq.Socket[Any] | None:
        return self._resources.socket

    @_socket.setter
    def _socket(self, sock: zmq.Socket[Any] | None) -> None:
        self._resources.socket = sock

    def _open(self) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self._resources.context.socket(zmq.DEALER if self.acked else zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        if self.acked:
            sock.setsockopt(zmq.SNDHWM, max(1000, 2 * self.window))
        if self._configure is not None:
            self._configure(sock)
        # Attached before connecting, or a quick handshake would go unseen.
        if not self.acked:
            # Unbounded: nothing reads it before close() (see handshake_seen), and each
            # reconnection adds an event; at about 2 000 (a daemon restarted that often, a network
            # that cuts idle connections) libzmq's I/O thread blocked on it, which stopped this
            # publisher's context: its frames queued, then each publish waited for ever.
            self._resources.monitor = unbounded_monitor(sock, zmq.EVENT_HANDSHAKE_SUCCEEDED)
        else:
            # Every acknowledged publisher reads whether the daemon refuses its handshake (see
            # PublisherRefused); one that watches its connection, whether it is up, too. (The
            # context is the publisher's own: a monitor left unread while the daemon keeps cutting
            # handshakes, which blocks the context's I/O thread once full, blocks only this socket.)
            events = LINK_EVENTS if self._watches_connection else REFUSAL_EVENTS
            try:
                monitor = self._resources.monitor = sock.get_monitor_socket(events, monitor_address())
            except zmq.ZMQError:  # no descriptor free for it, say
                sock.close(linger=0)
                raise
            self._handshakes.forget()
            self._opened_at = time.monotonic()
            # A new socket: a watching publisher's is up once its handshake is seen; down stays until then.
            self._up = not self._watches_connection
            self._poller = zmq.Poller()
            self._poller.register(sock, zmq.POLLIN)
            self._poller.register(monitor, zmq.POLLIN)
        try:
            connect(sock, self.endpoint)
        except ValueError as exc:
            self._drop_monitor()
            raise PublisherError(str(exc)) from None
        return sock

    def _drop_socket(self) -> None:
        """Close the socket (linger 0) and, in acknowledged mode, its monitor."""
        assert self._socket is not None
        # Read first: libzmq blocks the context's I/O thread on a monitor whose queue is full
        # (about 2 000 events: minutes of reconnecting to a port that refuses, with no call to
        # read them), and the monitor could not be stopped (see close_monitored) until it is read.
        self._watch(time.monotonic())
        if self.acked and self._resources.monitor is not None:
            # The monitor stopped before the socket closes: an event after, to its reader
            # closed, would stop this publisher's context (every later socket of it) for good.
            close_monitored(self._socket, self._resources.monitor)
            self._resources.monitor = None
        else:
            self._socket.close(linger=0)
        self._socket = None
        if self.acked:
            self._drop_monitor()

    def _drop_monitor(self) -> None:
        if self._resources.monitor is not None:
            self._resources.monitor.close(linger=0)
            self._resources.monitor = None
        self._poller = None
        self._up = not self._watches_connection

    def _watch(self, now: float) -> None:
        """Read what the monitor told of the handshakes (and, watching publishers, of the
        connection) since last time; acknowledged mode."""
        monitor = self._resources.monitor
        if monitor is None or not self.acked:
            return
        self._watch_at = now + WATCH_EVERY_S
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = int(event["event"])
            self._handshakes.see(kind, int(event["value"]))
            if self._watches_connection:
                self._up = kind == zmq.EVENT_HANDSHAKE_SUCCEEDED
                self._down = not self._up

    def _connection(self, now: float) -> Connection:
        """The connection to the daemon, read from the monitor at most :data:`WATCH_EVERY_S` ago:
        up (a handshake holds), down (refused, cut or its handshake failed since the last one
        held), or connecting (neither yet: the first attempt pending, or taken by a process that
        completes no handshake, as a stopped daemon's kernel does). Watching publishers only.

        A socket that the daemon refused, opened more than :data:`REFUSAL_STANDS_S` ago, is
        replaced here (its batches held for the new one), so that the daemon is asked again:
        down it stays until the new socket's handshake succeeds."""
        if now >= self._watch_at:
            self._watch(now)
        if self._handshakes.refusal is not None and self._socket is not None:
            if now - self._opened_at >= REFUSAL_STANDS_S:
                self._replace_socket()
        if self._up:
            return "up"
        return "down" if self._down else "connecting"

    def _replace_socket(self) -> None:
        """A new socket in the place of one the daemon refused; every batch in flight waits for it."""
        self._drop_socket()
        self._socket = self._open()
        for batch in self._in_flight.values():
            batch.queued = False
        self._held = bool(self._in_flight)

    def _transmit(self, batch: _Batch, now: float) -> None:
        """Queue the batch on the socket, or hold it until the connection is up (watching
        publishers) or the socket reopens; :meth:`_release_held` sends what is held.

        A batch handed to a socket once before is a retry (its answer did not come): counted here,
        when it is sent again, not when the socket closed or reopened (a daemon that is down may
        never get it again, and holding it for the daemon is no attempt)."""
        if self._socket is None or not self._up:
            self._held = True
            return
        try:
            self._socket.send(batch.frame, zmq.NOBLOCK)
        except zmq.Again:
            self._held = True  # not queued (the queue is full): tried again on the next call
            return
        if batch.attempts:
            self.totals.retries += 1
        batch.attempts += 1
        batch.queued = True
        batch.sent_at = now

    def _release_held(self, now: float) -> None:
        """Queue every batch in flight not yet queued on the socket, in order, if it can take them."""
        if self._socket is None or not self._up:
            return
        self._held = False
        for batch in self._in_flight.values():
            if not batch.queued:
                self._transmit(batch, now)
                if not batch.queued:
                    return  # the queue is full: the rest wait too, keeping their order

    def _take_unsent(self) -> list[dict[str, Any]]:
        """Remove every batch that never left this process (see :class:`_Batch`), and the pending
        one, and return their events in the order published, for another daemon's publisher.

        They no longer count as ``sent`` here: they were not, and they are counted where they go."""
        taken = [batch for batch in self._in_flight.values() if not batch.left]
        for batch in taken:
            del self._in_flight[batch.batch_id]
        events = [event for batch in taken for event in batch.events]
        self.totals.sent -= len(events)
        events.extend(self._pending.events)
        self._pending.clear()
        return events

    def _adopt(self, events: list[dict[str, Any]]) -> None:
        """Send ``events``, taken from another daemon's publisher, in batches of their own at once,
        past the window if need be (they were within that publisher's)."""
        batch: list[dict[str, Any]] = []
        packed: list[bytes] = []
        size = 0
        for event in events:
            data = self._encode(event)
            if batch and self._batch_full(len(batch), size, len(data)):
                self._send_batch(batch, packed)
                self.totals.sent += len(batch)
                batch, packed, size = [], [], 0
            batch.append(event)
            packed.append(data)
            size += len(data)
        if batch:
            self._send_batch(batch, packed)
            self.totals.sent += len(batch)

    def _service(self) -> None:
        """Read replies, run the Lazy Pirate retry when due, send a batch whose linger ended."""
        if not self.acked:
            if self._pending.events and time.monotonic() - self._pending.since >= self.linger:
                self._try_send()
            return
        now = time.monotonic()
        if self._socket is not None:
            if self._poller is not None and (self._held or now >= self._watch_at):
                self._watch(now)
            if self._held:
                self._release_held(now)
            self._read_replies()
            if self._handshakes.refusal is not None and self._in_flight and not self._watches_connection:
                # No acknowledgement can come on this socket: say so now, not at the deadline.
                # (A publisher to several daemons sends elsewhere instead: see transport.affinity.)
                raise self._refused(now)
        oldest = next(iter(self._in_flight.values())) if self._in_flight else None
        if oldest is not None and self.deadline is not None and now - oldest.first_sent >= self.deadline:
            # At the deadline itself, not at the end of the last attempt's ack_timeout (up to
            # ack_timeout later), and whether or not a retry's pause is running.
            self._count_against_budget(oldest)
            if self._socket is not None:
                if oldest.queued:  # an attempt was waiting for its answer: it failed too
                    self._budget.fail()
                self._drop_socket()
            raise self._abandon()
        if self._socket is None:
            if self._retry_at is not None and now >= self._retry_at:
                self._reopen(now)
        elif oldest is not None and oldest.queued:
            # Only a batch handed to this socket waits for an answer on it (those queued are the
            # oldest): one held while the connection is down waits for the connection, which
            # ZeroMQ tries again every 0.1 to 0.2 s. Closing the socket for a retry pause would
            # only make a daemon back wait for the pause's end.
            if not self._up:
                self._resend_when_back(oldest, now)
            elif now - oldest.sent_at >= self.ack_timeout:
                self._give_up_or_pause(oldest, now)
        if self._pending.events and (
            now - self._pending.since >= self.linger or len(self._pending.events) >= self.batch_size
        ):
            self._try_send()

    def _read_replies(self) -> None:
        assert self._socket is not None
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = msgpack.unpackb(frames[-1], raw=False, strict_map_key=False)
            except (ValueError, TypeError, msgpack.UnpackException):
                log.warning("%s sent a reply that is not msgpack; ignored", self.endpoint)
                continue
            if not isinstance(reply, dict) or not isinstance(reply.get("batch"), int):
                log.warning("%s sent a reply that names no batch of ours: %r", self.endpoint, reply)
                continue
            batch = self._in_flight.pop(reply["batch"], None)
            if batch is None:
                continue  # an answer to a batch already settled
            if "error" in reply:
                self.totals.abandoned += len(batch.events)
                raise BatchRefused(self.endpoint, batch.batch_id, str(reply["error"]), batch.events)
            self._settle(batch, reply)

    def _settle(self, batch: _Batch, reply: dict[str, Any]) -> None:
        rejected = tuple(
            Rejection(index, str(reason), batch.events[index])
            for index, reason in reply.get("rejected", [])
            if isinstance(index, int) and 0 <= index < len(batch.events)
        )
        conflicting = reply.get("conflicting")
        result = BatchResult(
            batch.batch_id,
            len(batch.events),
            int(reply.get("new", 0)),
            int(reply.get("duplicate", 0)),
            rejected,
            batch.attempts,
            tuple(
                index
                for index in (conflicting if isinstance(conflicting, list) else ())
                if isinstance(index, int) and 0 <= index < len(batch.events)
            ),
        )
        if result.new + result.duplicate + len(rejected) != result.size:
            log.warning(
                "%s acknowledged batch %d of %d events with %d new, %d duplicate, %d rejected",
                self.endpoint,
                batch.batch_id,
                result.size,
                result.new,
                result.duplicate,
                len(rejected),
            )
        totals = self.totals
        totals.acked_new += result.new
        totals.acked_duplicate += result.duplicate
        totals.rejected += len(rejected)
        totals.batches_acked += 1
        self.results.append(result)
        if self._on_ack is None:
            return
        if not self._closing:
            self._on_ack(result)
            return
        try:
            self._on_ack(result)
        except Exception as exc:  # close() goes on settling and freeing, then raises it
            if self._callback_error is None:
                self._callback_error = exc

    def _give_up_or_pause(self, oldest: _Batch, now: float) -> None:
        """The oldest batch timed out: close the socket and pause before resending, or give up."""
        self._drop_socket()
        self._count_against_budget(oldest)
        pause = self._budget.fail()
        if pause is None:
            raise self._abandon()
        log.info(
            "no acknowledgement from %s for %.1f s; resending %d batches in %.2f s",
            self.endpoint,
            now - oldest.first_sent,
            len(self._in_flight),
            pause,
        )
        if self._on_retry is not None:
            self._on_retry(self._budget.failures, pause)
        self._retry_at = now + pause

    def _count_against_budget(self, oldest: _Batch) -> None:
        """Make the retry budget the oldest batch's (from its first send), unless it is already."""
        if self._budget_batch != oldest.batch_id:
            # A new oldest batch means progress since the last failure: start a fresh budget.
            self._budget.reset()
            self._budget.start(at=oldest.first_sent)
            self._budget_batch = oldest.batch_id

    def _resend_when_back(self, oldest: _Batch, now: float) -> None:
        """The connection that carried the batches queued (a watching publisher's) was cut: no answer
        can come for them, as the daemon answers on the connection a batch came by, and a new
        connection is a new peer to it. That attempt failed: the socket is replaced at once, with
        no pause (what ZeroMQ still held for the old connection goes with it, or it would be
        delivered as well), and they go again as soon as a handshake on the new one succeeds."""
        self._drop_socket()
        self._count_against_budget(oldest)
        if self._budget.fail() is None:
            raise self._abandon()
        log.info(
            "the connection to %s was cut with %d batches unanswered; they go again as soon as it is back",
            self.endpoint,
            sum(batch.queued for batch in self._in_flight.values()),
        )
        if self._on_retry is not None:
            self._on_retry(self._budget.failures, 0.0)
        self._reopen(now)

    def _reopen(self, now: float) -> None:
        """A new socket; every batch in flight waits for it (sent at once, or, watching, once it is up)."""
        self._socket = self._open()
        self._retry_at = None
        for batch in self._in_flight.values():
            batch.queued = False
        self._held = bool(self._in_flight)
        self._release_held(now)

    def _abandon(self) -> DeliveryFailed:
        """Drop every unacknowledged event into a :class:`DeliveryFailed` and start afresh (the
        socket was closed)."""
        attempts = self._budget.failures
        elapsed = self._budget.elapsed()
        events = self._hand_back()
        self._socket = self._open()
        return DeliveryFailed(self.endpoint, elapsed, attempts, events)

    def _refused(self, now: float) -> PublisherRefused:
        """Drop every unacknowledged event into a :class:`PublisherRefused` (the daemon refuses this
        publisher's handshake) and start afresh, on a new socket."""
        refusal = self._handshakes.refusal
        assert refusal is not None
        oldest = next(iter(self._in_flight.values()), None)
        elapsed = 0.0 if oldest is None else now - oldest.first_sent
        attempts = 0 if oldest is None else oldest.attempts
        if self._socket is not None:
            self._drop_socket()
        events = self._hand_back()
        self._socket = self._open()
        return PublisherRefused({self.endpoint: refusal}, elapsed, attempts, events)

    def _hand_back(self) -> list[dict[str, Any]]:
        """Every event held, in the order published, which the publisher no longer holds (counted
        abandoned): for the exception that hands them back. Retries start afresh."""
        events = self.held_events()
        self.totals.abandoned += len(events)
        self._in_flight.clear()
        self._pending.clear()
        self._budget.reset()
        self._budget_batch = None
        self._retry_at = None
        self._held = False
        return events

    def _wait_until(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """Service the socket until ``done()`` or ``timeout`` seconds pass; every wait is bounded."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            self._service()
            if done():
                return True
            if self._close_asked:  # by on_ack or a signal handler: no more waiting
                raise self._closed_during_call()
            now = time.monotonic()
            if end is not None and now >= end:
                return False
            wake = now + 0.5
            oldest = next(iter(self._in_flight.values()), None)
            if self._retry_at is not None:
                wake = min(wake, self._retry_at)
            elif oldest is not None and oldest.queued:  # (one held waits for the monitor's news)
                wake = min(wake, oldest.sent_at + self.ack_timeout)
            if oldest is not None and self.deadline is not None:
                wake = min(wake, oldest.first_sent + self.deadline)
            if self._pending.events and not (self.acked and len(self._in_flight) >= self.window):
                # (With the window full, a pending batch cannot leave before an ack comes, which
                # the poll below wakes for; waking for its linger would only spin.)
                wake = min(wake, self._pending.since + self.linger)
            if end is not None:
                wake = min(wake, end)
            wait_s = max(0.0, wake - now)
            if self._poller is not None:  # a reply, or news of the connection
                if self._resources.monitor in dict(self._poller.poll(math.ceil(wait_s * 1000))):
                    self._watch_at = 0.0  # read it now
            elif self._socket is not None:
                self._socket.poll(math.ceil(wait_s * 1000), zmq.POLLIN)
            else:
                time.sleep(wait_s)

    def _check_open(self, unqueued: Iterable[dict[str, Any]] | None = None) -> None:
        """Raise :class:`PublisherClosed` if closed, or if a close was asked within the call on
        this thread (by on_ack or a signal handler), as that call would: with the events held,
        then ``unqueued`` (the events of the call refused here, handed back too)."""
        if self._close_asked and not self._closed:
            closed = self._closed_during_call()
            closed.events.extend(unqueued or ())
            raise closed
        if self._closed:
            raise PublisherClosed(f"this publisher to {self.endpoint} is closed; make a new one")
        if self._forked():
            raise PublisherClosed(
                f"this publisher to {self.endpoint} was made before this process was forked: its socket "
                "belongs to the parent (which still holds and sends its events); make a new Publisher here"
            )
