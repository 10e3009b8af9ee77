"""Live subscriptions: consumers follow the stored stream from any cursor, backlog then live.

Theory of operation. One thread owns the ROUTER socket (``[subscribe] bind``) and a database
connection of its own, behind :class:`~actors.event_sources.EventSource` (a read-only SQLite
connection, or a PostgreSQL one). The database is the log and the buffer: every event a consumer
gets is read from the database after its cursor, through this one path, whether it is old or was
committed a moment ago. So there is no switch from backlog to live that could lose or repeat
an event, and nothing uncommitted is ever sent (the read connection sees committed
transactions only). A one-topic subscription pages on ``(topic, seq)``; an all-topics one on
the commit position the ``events`` query pages with: on SQLite the rowid (rowids grow in commit
order under the single writer, and a commit is atomic), on PostgreSQL the ``position`` column
(taken under a row lock held until COMMIT); either way a reader never sees a later position
without every earlier one.

The dedup actor calls :meth:`HeadSignal.moved` after each COMMIT that stored events: a byte
into a pipe this thread polls beside the socket. It wakes the thread, which reads on for every
subscription that has credit. The dedup actor sends nothing else and never waits for this
thread, so followers cannot slow ingest down beyond the reads themselves. On PostgreSQL other
daemons commit too: while anyone is subscribed the thread also polls the source's wake-up
descriptor (a connection LISTENing for the NOTIFY each write transaction sends) and, as a safety
net, reads the head position every ``poll_s`` (one cheap query), reading on when it moved.

Flow control is by credit: a consumer grants credit (events), the daemon sends at most that
many and then nothing until more is granted. Per subscription the daemon keeps only its
cursor, credit and timers, never events: a consumer that stops reading is simply behind, and
its backlog is read from the database when it grants credit again. All-topics followers near
the head share one window of recent events (:class:`RecentEvents`), and followers at one cursor
in one pass share a read, so ten live followers cost one query and one encoding per commit, not
ten. Events are encoded with the stored payload (already msgpack) spliced in as is.

Named consumers acknowledge positions; they are stored by the dedup actor, the daemon's writer
(:class:`SaveConsumerPositions`, asked without blocking this thread), and confirmed to the
consumer once committed; ``unsubscribe`` with ``forget`` deletes the name's stored position the
same way, answered once the deletion is committed. The wire protocol is in docs/subscribe.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pykka
import zmq

from actors.event_sources import Claim, EventSource
from actors.flow import within_bytes
from actors.messages import PositionsSaved, SaveConsumerPositions
from actors.outbox import DROPPED, GONE, SENT, Outbox
from transport.config import SubscribeConfig, wants_ipv6
from transport.logs import RateLimitedLog
from transport.queries import MAX_CURSOR
from transport.schema import (
    InvalidEvent,
    check_topic,
    msgpack_problem,
    quoted_names,
    quoted_op,
    type_name,
    unpack_from_peer,
    wire_repr,
)
from transport.security import SocketHook
from transport.subscriber import MAX_FILTER_TOPICS, name_problem
from transport.zap import REVOKED, ConnectionGate

log = logging.getLogger(__name__)
_NOT_QUERIES = (
    "this is the daemon's subscribe endpoint ([subscribe] bind), for followers; queries (stats, events,"
    " topics, health) go to its [query] bind"
)
# The fields each op after subscribe takes besides "op" (subscribe's are checked by parse_subscribe).
_OP_FIELDS: dict[str, frozenset[str]] = {
    "credit": frozenset({"credit"}),
    "ack": frozenset({"position"}),
    "heartbeat": frozenset(),
    "unsubscribe": frozenset({"forget"}),
}
_SUBSCRIBER_OPS = frozenset({"subscribe", *_OP_FIELDS})


def _is_query(frame: bytes) -> bool:
    """Whether a message is a map whose op is none of a subscriber's (a query, most likely)."""
    try:
        message = unpack_from_peer(frame)
    except Exception:
        return False
    return isinstance(message, dict) and message.get("op") not in _SUBSCRIBER_OPS


MAX_REQUEST_BYTES = 1_048_576
# An all-topics subscription with a topic filter reads at most this many positions per query,
# so one rare topic in a long backlog never holds the thread in one long scan.
FILTER_SCAN_ROWS = 50_000
IDLE_POLL_MS = 100
SHORT_POLL_MS = 10  # while an acknowledgement is being stored or a subscription waits to retry
# A peer whose send queue is full is retried after BLOCKED_RETRY_S, the wait doubling while it
# stays full up to BLOCKED_RETRY_MAX_S: each try builds a message, so a consumer that stopped
# reading would otherwise cost a message's worth of copying every 10 ms.
BLOCKED_RETRY_S = 0.01
BLOCKED_RETRY_MAX_S = 0.32
READ_RETRY_S = 1.0  # a read that failed is retried after this long
# A consumer that stops reading must cost the daemon little: each events message holds at most
# MESSAGE_BYTES of events (one event at least, which may be up to 1 MiB itself), and at most
# SNDHWM messages wait in a peer's queue; past that the send fails and is retried later.
MESSAGE_BYTES = 1024 * 1024
SNDHWM = 8
# Replies (subscribed, acked, errors) that found the peer's queue full wait here, in order, and
# go before any more events; past this many the client is not reading them and they are dropped.
MAX_UNSENT_REPLIES = 1000
# Recent all-topics events kept encoded, shared by every all-topics follower near the head:
# at most this many, and at most this many bytes of them (payloads may be up to 1 MiB each).
RECENT_EVENTS = 20_000
RECENT_BYTES = 32 * 1024 * 1024


class SubscribeError(ValueError):
    """A subscription message the daemon refuses; the text goes back as ``{"op": "error", ...}``."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code
        # The refused subscribe's own ``ref``, echoed in the error as in ``subscribed``: a consumer
        # that subscribes again on one connection can tell which subscribe was refused.
        self.ref: int | None = None


class HeadSignal:
    """ "The head moved": the dedup actor's wake-up call to the subscription thread, via a pipe.

    :meth:`moved` never blocks: when the pipe is full a wake-up is already pending. Close it only
    after the dedup actor has stopped.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._closed = False

    def moved(self) -> None:
        """Say that events were committed (called on the dedup actor's thread)."""
        if self._closed:
            return
        try:
            os.write(self._write, b"\0")
        except BlockingIOError:
            pass  # full: the reader has wake-ups pending already

    def fileno(self) -> int:
        """The end to poll for readability."""
        return self._read

    def drain(self) -> None:
        """Consume every pending wake-up."""
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Close both ends (after the dedup actor has stopped)."""
        if not self._closed:
            self._closed = True
            os.close(self._read)
            os.close(self._write)


@dataclass(frozen=True, slots=True)
class SubscribeRequest:
    """A parsed ``subscribe`` message."""

    topic: str | None
    topics: frozenset[str] | None
    after: int | None
    name: str | None
    credit: int
    ref: int | None = None


def _cursor(value: Any, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_CURSOR:
        raise SubscribeError(f"'{key}' must be an integer from 0 to {MAX_CURSOR}, not {wire_repr(value)}")
    return value


def _credit(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SubscribeError(f"'credit' must be an integer of 0 or more, not {wire_repr(value)}")
    return value


def _check_topic_name(topic: str, field: str) -> None:
    """Refuse a topic no event can have: a subscription to it would wait for ever."""
    try:
        check_topic(topic)
    except InvalidEvent as exc:
        raise SubscribeError(f"no event can have this topic in {field!r} ({exc})") from None


def _is_ref(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_CURSOR


def parse_subscribe(request: dict[Any, Any]) -> SubscribeRequest:
    """Check a ``subscribe`` map, raising :class:`SubscribeError` naming the field to fix."""
    known = {"op", "topic", "topics", "after", "name", "credit", "ref"}
    unknown = sorted(str(key) for key in request if key not in known)
    if unknown:
        raise SubscribeError(f"unknown field(s) {quoted_names(unknown)}; a subscribe has {', '.join(sorted(known))}")
    topic = request.get("topic")
    if topic is not None:
        if not isinstance(topic, str) or not topic:
            raise SubscribeError(f"'topic' must be a non-empty string, not {wire_repr(topic)}")
        _check_topic_name(topic, "topic")
    topics = request.get("topics")
    if topics is not None:
        if topic is not None:
            raise SubscribeError(
                "give 'topic' (one topic, cursor = seq) or 'topics' (a filter on all topics), not both"
            )
        if not isinstance(topics, list) or not topics or len(topics) > MAX_FILTER_TOPICS:
            raise SubscribeError(f"'topics' must be a list of 1 to {MAX_FILTER_TOPICS} topic strings")
        if not all(isinstance(item, str) and item for item in topics):
            raise SubscribeError("'topics' must hold non-empty strings only")
        for item in topics:
            _check_topic_name(item, "topics")
    after = request.get("after")
    if after is not None:
        after = _cursor(after, "after")
    name = request.get("name")
    if name is not None and (problem := name_problem(name)) is not None:
        raise SubscribeError(f"'name': {problem}")
    # nil counts as absent, as for every other optional field (and the queries' after and limit):
    # encoders with no "omit empty" send nil for a field left unset.
    credit = request.get("credit")
    credit = _credit(credit) if credit is not None else 0
    ref = request.get("ref")
    if ref is not None and not _is_ref(ref):
        raise SubscribeError(f"'ref' must be an integer from 0 to {MAX_CURSOR}, not {wire_repr(ref)}")
    return SubscribeRequest(topic, frozenset(topics) if topics is not None else None, after, name, credit, ref)


@dataclass(slots=True)
class Subscription:
    """One consumer's state: where it is, what it may be sent, when it was last heard from."""

    identity: bytes
    topic: str | None
    topics: frozenset[str] | None
    cursor: int  # the last position (all topics) or seq (one topic) sent or skipped
    name: str | None
    credit: int
    last_heard: float
    last_sent: float
    caught_up: bool = False  # the last read found fewer events than asked (until the head moves)
    retry_at: float = 0.0  # its send queue was full: try again after this
    blocked_for: float = 0.0  # the wait before retry_at; 0 once a send went through
    delivered: int = field(default=0)
    # The deleted-events count (EventSource.expired_total) at the last look for a wholly
    # expired stretch after the cursor; looked at again only once more events are deleted.
    expired_checked: int = 0
    # With a ``topics`` filter: the last seq sent of each topic, so a hole retention made in
    # a topic after the subscription saw it is told (positions of other topics hide it).
    seqs: dict[str, int] = field(default_factory=dict)
    # ... the topics of the filter with deleted events the cursor moved past untold (passing
    # other topics' events, or positions of none of the filter's): told before their next event.
    owed: set[str] = field(default_factory=set)
    # ... and each filtered topic's last deleted position (EventSource.expired_marks), as read
    # when EventSource.expired_total was ``marks_total``.
    marks: dict[str, int] = field(default_factory=dict)
    marks_total: int = 0
    key: bytes | None = None  # its CURVE client key (None while CURVE is off): revoked, it is sent nothing more


_packer = msgpack.Packer(use_bin_type=True, autoreset=True)
_pack = _packer.pack
_KEYS = {
    name: _pack(name) for name in ("topic", "event_id", "timestamp", "source", "payload", "seq", "late", "position")
}
_EVENTS_HEAD = _packer.pack_map_header(2) + _pack("op") + _pack("events") + _pack("events")


def _pack_event(row: tuple[Any, ...], with_position: bool) -> bytes:
    """One stored row as a msgpack event map, its stored payload (already msgpack) spliced in as is."""
    position, topic, event_id, timestamp, source, payload, seq, late = row
    keys = _KEYS
    parts = [
        _packer.pack_map_header(8 if with_position else 7),
        keys["topic"],
        _pack(topic),
        keys["event_id"],
        _pack(event_id),
        keys["timestamp"],
        _pack(timestamp),
        keys["source"],
        _pack(source),
        keys["payload"],
        bytes(payload),
        keys["seq"],
        _pack(seq),
        keys["late"],
        _pack(bool(late)),
    ]
    if with_position:
        parts += [keys["position"], _pack(position)]
    return b"".join(parts)


def _pack_message(message: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


def _packed_size(row: Any) -> int:
    """A row's packed event's size (the row holds it second)."""
    return len(row[1])


class RecentEvents:
    """The most recently committed events of all topics in commit order, encoded once for every
    all-topics follower near the head.

    Filled only by reading the database after its own last position, the same cursor-driven read
    as any follower's, so it holds committed events only and no gaps. It starts empty at the
    head; followers further behind read the database themselves until they reach it.
    """

    def __init__(self, size: int = RECENT_EVENTS, max_bytes: int = RECENT_BYTES) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self._positions: list[int] = []
        self._packed: list[bytes] = []
        self._bytes = 0  # of the encoded events held
        self.last: int | None = None  # every committed position up to this has been read
        self.complete = False  # the last read reached the head (until the head moves again)
        self.expired_seen = 0  # EventSource.expired_total when what is held was read

    def drop_expired(self, expired_total: int) -> None:
        """Forget what is held once retention has deleted events since it was read: some of it
        may be gone from the database, and a follower must never be sent a deleted event."""
        if expired_total != self.expired_seen:
            self.expired_seen = expired_total
            self._positions.clear()
            self._packed.clear()
            self._bytes = 0

    def extend(self, source: EventSource, limit: int, chunk: int) -> tuple[int, int]:
        """Read up to ``limit`` events after the last one held, ``chunk`` at a time, stopping once
        half of ``max_bytes`` has been read (large events: no read holds much more than that);
        how many events and bytes it read."""
        if self.last is None:
            self.last = source.head()
        read = read_bytes = 0
        while True:
            want = min(chunk, limit - read)
            rows = source.after(self.last, want)
            for row in rows:
                packed = _pack_event(row, True)
                self._positions.append(row[0])
                self._packed.append(packed)
                self._bytes += len(packed)
                read_bytes += len(packed)
            read += len(rows)
            if rows:
                self.last = rows[-1][0]
            self.complete = len(rows) < want
            if self.complete or read >= limit or read_bytes >= self.max_bytes // 2:
                break
        if len(self._positions) > self.size or self._bytes > self.max_bytes:
            self._trim()
        return read, read_bytes

    def _trim(self) -> None:
        """Keep the newest events within both bounds (half of each, so this runs now and then)."""
        kept = kept_bytes = 0
        for packed in reversed(self._packed):
            if kept == self.size // 2 or kept_bytes + len(packed) > self.max_bytes // 2:
                break
            kept += 1
            kept_bytes += len(packed)
        cut = len(self._packed) - kept
        del self._positions[:cut]
        del self._packed[:cut]
        self._bytes = kept_bytes

    def after(self, cursor: int, want: int) -> list[tuple[int, bytes]] | None:
        """Up to ``want`` held events after ``cursor``; None when the cursor is outside what is held."""
        if self.last is None or cursor > self.last:
            return None
        if cursor == self.last:
            return []
        positions = self._positions
        if not positions or cursor < positions[0] - 1:
            return None
        index = cursor + 1 - positions[0]
        if index >= len(positions) or positions[index] != cursor + 1:
            return None  # positions with a gap (events deleted by retention): read the database instead
        return list(zip(positions[index : index + want], self._packed[index : index + want]))


class SubscriptionServer:
    """Binds the subscription endpoint and serves every consumer on its own thread."""

    def __init__(
        self,
        context: zmq.Context[Any],
        config: SubscribeConfig,
        source: EventSource,
        dedup: pykka.ActorRef[Any],
        head: HeadSignal,
        secure: SocketHook | None = None,
        gate: ConnectionGate | None = None,
    ) -> None:
        self._config = config
        self._gate = gate or ConnectionGate(lambda: None)
        self._source = source
        self._dedup = dedup
        self._head = head
        self._warn = RateLimitedLog(log)
        # Routine, but any peer can send messages without a subscription: bounded as warnings are.
        self._unsubscribed_log = RateLimitedLog(log, level=logging.INFO)
        # Subscriptions starting and ending: one client could otherwise write two lines a message.
        self._told = RateLimitedLog(log, burst=50, level=logging.INFO)
        # A budget of its own: other clients' bad messages must not hide these.
        self._told_expired = RateLimitedLog(log)
        # Consumers acknowledge every ack_interval while the database is away: a line each would be
        # thousands in an outage; a few, then how many were held back, say as much.
        self._positions_failed = RateLimitedLog(log, burst=3, level=logging.ERROR)
        self._stopping = threading.Event()
        self._socket = context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full or gone peer raises, never drops silently
        self._socket.setsockopt(zmq.SNDHWM, SNDHWM)
        self._socket.setsockopt(zmq.LINGER, 0)
        # ZeroMQ's own heartbeats (ZMTP PING, answered by the peer's ZeroMQ thread): a consumer
        # whose process is stopped, or whose machine is gone without a word, has its connection
        # closed and the messages queued for it freed; its subscription ending alone kept them.
        self._socket.setsockopt(zmq.HEARTBEAT_IVL, config.heartbeat_ms)
        self._socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, config.timeout_ms)
        if secure is not None:
            secure(self._socket)
        self._socket.ipv6 = wants_ipv6(config.bind)
        self._socket.bind(config.bind)
        self._thread = threading.Thread(target=self._run, name="subscriptions", daemon=True)
        self._next_poll = 0.0
        self._polled_head = -1
        # The mean encoded size of the events read lately. It starts at 4 KiB: a first read of
        # events of 1 MiB holds a quarter of a GiB once, and the next reads two events at a time.
        self._event_bytes = 4096.0
        self._subs: dict[bytes, Subscription] = {}
        self._by_name: dict[str, bytes] = {}
        self._claims: dict[str, Claim] = {}  # name -> when its follower here took it (PostgreSQL)
        self._unsent = Outbox(self._socket, max_messages=MAX_UNSENT_REPLIES)  # replies waiting for room
        self._recent = RecentEvents()
        # name -> (topic, position) to store, or None to forget the name's stored position; and
        # the claim under which each was acknowledged (the follower may be gone when it is stored)
        self._pending_acks: dict[str, tuple[str | None, int] | None] = {}
        self._pending_claims: dict[str, Claim] = {}
        self._saving: tuple[pykka.Future[Any], SaveConsumerPositions] | None = None
        self._forgetting: dict[str, bytes] = {}  # name -> the connection waiting for its `unsubscribed`
        self._next_timers = 0.0
        self._retrying = False  # some subscription waits for its retry_at
        self.sent_events = 0

    @property
    def count(self) -> int:
        """Subscriptions open now."""
        return len(self._subs)

    @property
    def alive(self) -> bool:
        """Whether the thread is serving (health reports it as ``subscriptions``)."""
        return self._thread.is_alive()

    def start(self) -> None:
        """Start serving."""
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket and the read connection."""
        self._stopping.set()
        self._head.moved()  # wakes the thread at once, not at the end of a poll
        self._thread.join(timeout)

    # The thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._source.open()
            poller = zmq.Poller()
            poller.register(self._socket, zmq.POLLIN)
            poller.register(self._head.fileno(), zmq.POLLIN)
            notices: int | None = None  # the source's wake-up descriptor, registered while it lasts
            busy = False
            while not self._stopping.is_set():
                # Drained even with no subscriber, so the server never holds notices for this daemon.
                fd = self._source.wakeup_fd(make=bool(self._subs))
                if fd != notices:
                    if notices is not None:
                        poller.unregister(notices)
                    if fd is not None:
                        poller.register(fd, zmq.POLLIN)
                    notices = fd
                if busy:
                    timeout = 0
                elif self._saving is not None or self._pending_acks or self._retrying or self._unsent:
                    timeout = SHORT_POLL_MS
                else:
                    timeout = IDLE_POLL_MS
                if self._source.poll_s is not None and self._subs:
                    timeout = min(timeout, max(0, int((self._next_poll - time.monotonic()) * 1000) + 1))
                ready = dict(poller.poll(timeout))
                if self._head.fileno() in ready:
                    self._head.drain()
                    self._head_moved()
                if notices is not None and notices in ready:
                    for name, claim in self._source.drain_wakeups():
                        self._taken_elsewhere(name, claim)
                    self._head_moved()
                if self._socket in ready:
                    self._receive()
                self._settle_acks()
                now = time.monotonic()
                self._poll_head(now)
                if now >= self._next_timers:
                    self._timers(now)
                    self._next_timers = now + self._config.heartbeat_ms / 4000
                if self._unsent:
                    self._send_unsent()
                busy = self._pump(now)
        except Exception:
            log.exception("the subscription server failed; consumers are no longer served")
            raise
        finally:
            self._socket.close(linger=0)
            self._source.close()

    def _head_moved(self) -> None:
        """Events were committed: every subscription reads on."""
        self._recent.complete = False
        for sub in self._subs.values():
            sub.caught_up = False

    def _poll_head(self, now: float) -> None:
        """With other writers on the database (PostgreSQL), look at the head every ``poll_s`` while
        anyone is subscribed: their commits send no wake-up to this daemon."""
        poll_s = self._source.poll_s
        if poll_s is None or not self._subs or now < self._next_poll:
            return
        self._next_poll = now + poll_s
        try:
            head = self._source.head()
        except self._source.errors as exc:
            self._warn.warning("reading the head position failed (%s); retrying", exc)
            return
        if head != self._polled_head:
            self._polled_head = head
            self._head_moved()

    def _receive(self) -> None:
        """Handle what the socket holds (at most a bounded number, so sending keeps its turn)."""
        for _ in range(1000):
            try:
                parts, key, refused = self._gate.receive_keyed(self._socket)
            except zmq.Again:
                return
            identity = parts[0]
            if refused is not None:  # its key was revoked: end what it follows, and say why
                self._revoke(identity, refused)
                continue
            if len(parts) == 3 and parts[1] == b"" and _is_query(parts[2]):
                # A REQ client's envelope around a query: sent here by mistake. Answered so its REQ
                # socket takes the reply (with the empty frame), or it would wait its whole timeout.
                self._warn.warning("a query came to the subscribe endpoint; told it to use [query] bind")
                reply = {"op": "error", "code": "bad_request", "error": _NOT_QUERIES}
                self._unsent.send([identity, b"", _pack_message(reply)])
                continue
            try:
                self._handle(identity, parts[1:])
                if (sub := self._subs.get(identity)) is not None:
                    sub.key = key
            except SubscribeError as exc:
                if exc.code == "not_subscribed":
                    # Routine: a consumer's last messages after its connection was seen to close, or
                    # its first after a drop the log already gave the reason for. It is told, and
                    # subscribes again if it still wants to.
                    self._unsubscribed_log.info("a message from a connection with no subscription: %s", exc)
                elif exc.code == "bad_request":
                    self._warn.warning("bad subscription message: %s", exc)
                else:
                    self._warn.warning("refused a subscriber (%s): %s", exc.code, exc)
                error: dict[str, Any] = {"op": "error", "code": exc.code, "error": str(exc)}
                if exc.ref is not None:
                    error["ref"] = exc.ref
                self._send(identity, error)

    def _revoke(self, identity: bytes, why: str) -> None:
        """The connection's key was revoked: end what it follows, and tell it why."""
        revoked = self._subs.get(identity)
        if revoked is not None:
            self._drop(revoked, "key revoked")
        self._warn.warning("refused a subscriber: %s", why)
        self._send(identity, {"op": "error", "code": "revoked", "error": why})

    def _handle(self, identity: bytes, frames: list[bytes]) -> None:
        if len(frames) != 1:
            raise SubscribeError(f"a message must be one frame (after the DEALER's routing), not {len(frames)}")
        try:
            request = unpack_from_peer(frames[0])
        except InvalidEvent as exc:
            raise SubscribeError(f"message refused: {exc}") from None
        except Exception as exc:
            raise SubscribeError(f"message is not valid msgpack: {msgpack_problem(exc)}") from None
        if not isinstance(request, dict):
            raise SubscribeError(f"a message must be a map with an 'op', not {type_name(request)}")
        op = request.get("op")
        now = time.monotonic()
        sub = self._subs.get(identity)
        if sub is not None:
            sub.last_heard = now  # any message, even a bad one, says the consumer is alive
        if op == "subscribe":
            try:
                self._subscribe(identity, parse_subscribe(request), now)
            except SubscribeError as exc:
                ref = request.get("ref")
                exc.ref = ref if _is_ref(ref) else None
                raise
            return
        if op not in _SUBSCRIBER_OPS:  # subscribe was taken above
            raise SubscribeError(
                f"unknown op {quoted_op(op)}; known ops: subscribe, credit, ack, heartbeat, unsubscribe"
            )
        if sub is None:
            raise SubscribeError(
                "no subscription on this connection (the daemon restarted or dropped it); send subscribe again",
                code="not_subscribed",
            )
        known = _OP_FIELDS[op]
        extra = set(request) - known - {"op"}
        if extra:
            takes = f"only {', '.join(repr(field) for field in sorted(known))}" if known else "no field but 'op'"
            raise SubscribeError(f"op {op!r} takes {takes}, not {quoted_names(sorted(map(repr, extra)))}")
        if op == "credit":
            grant = _credit(request.get("credit"))
            sub.credit = min(self._config.max_credit, sub.credit + grant)
        elif op == "ack":
            self._ack(sub, request)
        elif op == "unsubscribe":
            forget = request.get("forget")
            if forget is None:  # absent, or nil as an encoder sends for a field left unset
                forget = False
            if not isinstance(forget, bool):
                raise SubscribeError(f"'forget' must be true or false, not {type_name(forget)}")
            if forget and sub.name is None:
                raise SubscribeError("'forget' is for a named subscription: this one has no stored position")
            if not forget:
                self._drop(sub, "unsubscribed")
                self._send(identity, {"op": "unsubscribed"})
                return
            # Answered once the deletion is committed (_settle_acks); an ack not yet stored is dropped.
            assert sub.name is not None
            self._pending(sub.name, None)  # while the claim is known: the drop forgets it
            self._drop(sub, "unsubscribed, its stored position to be forgotten")
            self._forgetting[sub.name] = identity

    def _subscribe(self, identity: bytes, request: SubscribeRequest, now: float) -> None:
        after = request.after
        if request.name in self._forgetting:
            raise SubscribeError(
                f"consumer {request.name!r} is being forgotten; subscribe again in a moment", code="busy"
            )
        if request.name is not None:
            try:
                stored = self._source.consumer(request.name)
            except self._source.errors as exc:
                raise SubscribeError(f"cannot read consumer {request.name!r}: {exc}", code="unavailable") from None
            if stored is not None and stored[0] != request.topic:
                form = f"topic {stored[0]!r}" if stored[0] is not None else "all topics"
                raise SubscribeError(
                    f"consumer {request.name!r} follows {form} (position {stored[1]}); "
                    "subscribe to that, or use another name"
                )
            if after is None:
                after = stored[1] if stored is not None else 0
        if after is None:
            after = 0
        self._check_not_past_head(request.topic, after)
        replaced = self._subs.get(identity)
        if replaced is None and len(self._subs) >= self._config.max_consumers:
            raise SubscribeError(
                f"the daemon serves {self._config.max_consumers} subscriptions already ([subscribe] max_consumers)",
                code="busy",
            )
        if request.name is not None:
            try:
                claim = self._source.claim(request.name)
                if request.after is None:
                    # Read again once claimed: an ack the name's old connection stored meanwhile
                    # (on another daemon) was confirmed to it, and later ones are refused.
                    stored = self._source.consumer(request.name)
                    after = stored[1] if stored is not None else 0
            except self._source.errors as exc:
                raise SubscribeError(f"cannot take consumer {request.name!r}: {exc}", code="unavailable") from None
        if replaced is not None:
            self._drop(replaced, "replaced by a new subscribe on the same connection")
        if request.name is not None:
            # A restarted consumer comes back before the daemon notices the old one is gone.
            self._end_holder(request.name, "another connection took this name")
            self._by_name[request.name] = identity
            self._claims[request.name] = claim
        sub = Subscription(
            identity=identity,
            topic=request.topic,
            topics=request.topics,
            cursor=after,
            name=request.name,
            credit=min(self._config.max_credit, request.credit),
            last_heard=now,
            last_sent=now,
        )
        self._subs[identity] = sub
        reply: dict[str, Any] = {"op": "subscribed", "topic": request.topic, "after": after, "name": request.name}
        if request.topics is not None:
            reply["topics"] = sorted(request.topics)
        reply["heartbeat_ms"] = self._config.heartbeat_ms
        reply["max_credit"] = self._config.max_credit
        if request.ref is not None:
            reply["ref"] = request.ref
        self._send(identity, reply)
        self._told.info(
            "subscription %s: topic %r after %d, name %r", identity.hex(), request.topic, after, request.name
        )

    def _taken_elsewhere(self, name: str, claim: Claim) -> None:
        """Another daemon sharing the database took consumer ``name``: end this one's follower,
        unless this one took the name later (then the other daemon ends its own). The positions
        the follower acknowledged and not yet stored are not stored: the name is the other's now."""
        own = self._claims.get(name)
        if own is not None and own > claim:
            return
        if self._pending_acks.get(name) is not None:
            del self._pending_acks[name]
            del self._pending_claims[name]
        self._end_holder(name, f"another connection took this name, on daemon {claim[1]!r}")

    def _end_holder(self, name: str, why: str) -> None:
        """End the subscription following under ``name``, if any, telling it ``replaced`` and why."""
        holder = self._by_name.get(name)
        if holder is not None and holder in self._subs:
            self._drop(self._subs[holder], f"consumer {name!r} subscribed again elsewhere")
            self._send(holder, {"op": "error", "code": "replaced", "error": why})

    def _check_not_past_head(self, topic: str | None, after: int) -> None:
        """Refuse a cursor past what was ever committed: events stored later would get cursors at
        or below it and be skipped unseen (a mistyped ``after``, or a position from another
        database)."""
        try:
            last = self._source.topic_last(topic) if topic is not None else self._source.head()
        except self._source.errors as exc:
            raise SubscribeError(f"cannot read where the stream ends: {exc}", code="unavailable") from None
        if after > last:
            where = f"the last seq of topic {topic!r}" if topic is not None else "the last commit position"
            raise SubscribeError(
                f"after {after} is past {where}, {last}: nothing was ever committed there, and later "
                f"events would be skipped; subscribe after {last} or less"
            )

    def _ack(self, sub: Subscription, request: dict[Any, Any]) -> None:
        if sub.name is None:
            raise SubscribeError("only a named subscription (subscribe with 'name') can ack")
        position = _cursor(request.get("position"), "position")
        if position > sub.cursor:
            raise SubscribeError(f"ack position {position} is beyond what was sent ({sub.cursor})")
        self._pending(sub.name, (sub.topic, position))

    def _pending(self, name: str, position: tuple[str | None, int] | None) -> None:
        """Queue ``name``'s position (None: forget it) for the writer, under its follower's claim."""
        self._pending_acks[name] = position
        self._pending_claims[name] = self._claims.get(name, (0, ""))  # (0, ""): no claim, stored nowhere

    def _settle_acks(self) -> None:
        """Confirm committed positions to their consumers, and hand the next ones to the writer."""
        if self._saving is not None:
            future, saving = self._saving
            try:
                answer: PositionsSaved = future.get(timeout=0)
            except pykka.Timeout:
                return
            except Exception as exc:  # the dedup actor died or raised
                answer = PositionsSaved(error=f"storing consumer positions failed: {exc}")
            self._saving = None
            error = answer.error
            for name, saved in saving.positions.items():
                if name in answer.refused:
                    self._refused(name, saving.claims[name], saved)
                    continue
                if saved is None:
                    self._forgotten(name, error)
                    continue
                identity = self._by_name.get(name)
                if identity is None or identity not in self._subs:
                    continue
                if error is None:
                    self._send(identity, {"op": "acked", "position": saved[1]})
                else:
                    self._send(identity, {"op": "error", "code": "ack_failed", "error": error})
            if error is not None:
                self._positions_failed.error("%s", error)
        if self._pending_acks:
            message = SaveConsumerPositions(self._pending_acks, self._pending_claims)
            self._pending_acks, self._pending_claims = {}, {}
            try:
                self._saving = (self._dedup.ask(message, block=False), message)
            except pykka.ActorDeadError:
                log.error("consumer positions not stored: the dedup actor is not running")
                for name in [name for name, saved in message.positions.items() if saved is None]:
                    self._forgotten(name, "the daemon's writer is not running")

    def _refused(self, name: str, claim: Claim, saved: tuple[str | None, int] | None) -> None:
        """The writer stored nothing for ``name`` (``saved``, None for a forget): it was claimed
        after ``claim``. Claimed again here (the consumer subscribed anew the moment it acked),
        the position is queued once more under the new claim, unless a newer one waits, and is
        confirmed to the new holder, as on SQLite. Claimed by another daemon, the follower still
        here under ``claim`` is ended (its notice may not have arrived yet), or the connection
        that asked to forget is told."""
        current = self._claims.get(name)
        if saved is not None and current is not None and current[1] == claim[1] and current > claim:
            if name not in self._pending_acks:
                self._pending(name, saved)
            return
        why = "another connection took this name, on another daemon"
        if saved is None:
            self._forgotten(name, f"{why}, which keeps its position")
        elif current == claim:
            self._end_holder(name, why)

    def _forgotten(self, name: str, error: str | None) -> None:
        """Answer the connection that asked to forget ``name``, now that it is done (or failed)."""
        identity = self._forgetting.pop(name, None)
        if identity is None:
            return
        if error is None:
            self._told.info("named consumer %r forgotten", name)
            self._send(identity, {"op": "unsubscribed", "forgotten": name})
        else:
            self._send(identity, {"op": "error", "code": "ack_failed", "error": f"{name!r} not forgotten: {error}"})

    def _timers(self, now: float) -> None:
        """Heartbeat quiet consumers; drop the ones not heard from within ``timeout_ms``, and
        those whose key a reload revoked."""
        heartbeat_s = self._config.heartbeat_ms / 1000
        timeout_s = self._config.timeout_ms / 1000
        for sub in list(self._subs.values()):
            if now - sub.last_heard > timeout_s:
                self._drop(sub, f"not heard from in {timeout_s:g} s")
            elif not self._gate.allows(sub.key):
                self._revoke(sub.identity, REVOKED)
            elif now - sub.last_sent >= heartbeat_s:
                if sub.identity not in self._unsent:  # a heartbeat never overtakes a reply
                    self._send_now(sub.identity, {"op": "heartbeat"}, sub)

    def _drop(self, sub: Subscription, why: str) -> None:
        self._subs.pop(sub.identity, None)
        if sub.name is not None and self._by_name.get(sub.name) == sub.identity:
            del self._by_name[sub.name]
            self._claims.pop(sub.name, None)
        self._told.info("subscription %s (name %r) ended: %s", sub.identity.hex(), sub.name, why)

    def _send(self, identity: bytes, message: dict[str, Any]) -> None:
        """Send a reply: at once, or once the peer's queue has room, in order, before more events."""
        outcome = self._unsent.send([identity, _pack_message(message)])
        if outcome == DROPPED:
            self._warn.warning("a client reads none of its replies; dropping one (%s)", message.get("op"))
        elif outcome == GONE:
            self._gone(identity)

    def _send_unsent(self) -> None:
        """Send the replies that waited for room, as far as each peer's queue takes them."""
        for identity in self._unsent.flush():
            self._gone(identity)

    def _send_now(self, identity: bytes, message: dict[str, Any] | bytes, sub: Subscription | None = None) -> bool:
        """Send without blocking: whether it was sent (not when the peer's queue is full, nor when
        the peer is gone: its subscription is dropped)."""
        payload = message if isinstance(message, bytes) else _pack_message(message)
        outcome = self._unsent.send_now([identity, payload])
        if outcome == GONE:
            self._gone(identity)
        elif outcome == SENT and sub is not None:
            sub.last_sent = time.monotonic()
        return outcome == SENT

    def _gone(self, identity: bytes) -> None:
        gone = self._subs.get(identity)
        if gone is not None:
            self._drop(gone, "disconnected")

    # Reading and sending events ---------------------------------------------------------------

    def _pump(self, now: float) -> bool:
        """Send each subscription with credit one batch of what follows its cursor; True if more waits."""
        more = False
        self._retrying = False
        # Shared by the followers at one cursor: (events, whether they are all committed after it).
        reads: dict[tuple[Any, ...], tuple[list[Any], bool]] = {}
        batch = self._config.batch_events
        recent = self._recent
        extended = False
        expired_total: int | None = None  # read once a pass, when first needed
        for sub in list(self._subs.values()):
            if sub.caught_up or sub.credit <= 0:
                continue
            if not self._gate.allows(sub.key):  # revoked by a reload while it only listens
                self._revoke(sub.identity, REVOKED)
                continue
            if sub.retry_at > now or sub.identity in self._unsent:  # waiting for room; its replies go first
                self._retrying = True
                continue
            want = min(sub.credit, batch)
            held = None
            rows: list[Any]  # (cursor, packed event), with a ``topics`` filter plus (topic, seq)
            try:
                if expired_total is None:
                    expired_total = self._source.expired_total()
                    recent.drop_expired(expired_total)
                if sub.topic is None and sub.topics is None:
                    if not recent.complete and not extended:
                        extended = True
                        self._observe(*recent.extend(self._source, max(batch, self._config.max_credit), self._rows()))
                    held = recent.after(sub.cursor, want)
                if held is not None:
                    rows, complete = held, recent.complete and (not held or held[-1][0] == recent.last)
                else:
                    key = (sub.topic, sub.topics, sub.cursor)
                    read = reads.get(key)
                    if read is None:
                        read = reads[key] = self._read(sub, self._rows())
                        self._observe(len(read[0]), sum(len(row[1]) for row in read[0]))
                    rows, complete = read
                if rows:
                    rows, complete = self._up_to_hole(sub, rows, complete)
                elif complete and sub.topics is None and sub.expired_checked != expired_total:
                    if self._expired_after_cursor(sub):
                        more = True
                        continue
                    sub.expired_checked = expired_total
            except self._source.errors as exc:  # I/O error, lost connection: this one waits, the thread goes on
                self._warn.warning("reading events for a subscription failed (%s); retrying", exc)
                sub.retry_at = now + READ_RETRY_S
                self._retrying = True
                continue
            taken: list[Any] = within_bytes(rows[:want], _packed_size, MESSAGE_BYTES)
            if not taken:
                if complete:
                    sub.caught_up = True
                else:
                    more = True  # a filtered scan skipped positions of other topics only
                continue
            message = _EVENTS_HEAD + _packer.pack_array_header(len(taken)) + b"".join(item[1] for item in taken)
            if not self._send_now(sub.identity, message, sub):
                sub.blocked_for = min(max(BLOCKED_RETRY_S, sub.blocked_for * 2), BLOCKED_RETRY_MAX_S)
                sub.retry_at = now + sub.blocked_for
                self._retrying = True
                continue
            sub.blocked_for = 0.0
            if sub.topics is not None:
                sub.seqs.update((row[2], row[3]) for row in taken)  # (position, packed, topic, seq)
                self._passed(sub, {row[2] for row in taken})
            sub.cursor = taken[-1][0]
            sub.credit -= len(taken)
            sub.delivered += len(taken)
            self.sent_events += len(taken)
            if complete and len(taken) == len(rows):
                sub.caught_up = True  # everything committed so far is sent; wait for the head to move
            elif sub.credit > 0:
                more = True
        return more

    def _rows(self) -> int:
        """How many events to read for one message: ``batch_events``, or fewer when events are
        large, so that a read holds about MESSAGE_BYTES (not ``batch_events`` events of 1 MiB)."""
        return max(1, min(self._config.batch_events, int(MESSAGE_BYTES // self._event_bytes) + 1))

    def _observe(self, events: int, size: int) -> None:
        """Follow the encoded size of the events read, halfway toward each read's mean."""
        if events:
            self._event_bytes = (self._event_bytes + size / events) / 2

    def _read(self, sub: Subscription, limit: int) -> tuple[list[Any], bool]:
        """Up to ``limit`` events after the cursor as (cursor, packed event) (with a ``topics``
        filter (position, packed event, topic, seq)), and whether they are all that is committed
        after it; tells the consumer of expired events before the cursor's first one.

        With a topic filter one read scans at most FILTER_SCAN_ROWS positions; when it finds
        none of the topics the cursor moves past them.
        """
        source = self._source
        if sub.topic is not None:
            rows = source.topic_after(sub.topic, sub.cursor, limit)
            return [(row[6], _pack_event(row, False)) for row in rows], len(rows) < limit
        if sub.topics is None:
            rows = source.after(sub.cursor, limit)
            return [(row[0], _pack_event(row, True)) for row in rows], len(rows) < limit
        # Read the head first: every position up to it is committed, so the scan below sees all of
        # them and may skip past the ones of other topics without missing one of these.
        head = source.head()
        if sub.cursor >= head:
            return [], True
        upper = min(head, sub.cursor + FILTER_SCAN_ROWS)
        rows = source.filtered(sub.cursor, upper, sorted(sub.topics), limit)
        if rows:
            packed = [(row[0], _pack_event(row, True), row[1], row[6]) for row in rows]
            return packed, len(rows) < limit and upper >= head
        if not self._check_expired(sub, head):
            return [], False
        if upper > sub.cursor:  # nothing of these topics up to ``upper``: skip it
            self._marks(sub)  # read after the scan, so never older than it
            self._passed(sub, set())
            sub.cursor = upper
        return [], upper >= head

    def _marks(self, sub: Subscription) -> dict[str, int]:
        """The last deleted position of each topic of ``sub``'s filter that retention deleted
        from, never older than what was read before the call (read again only once more events
        were deleted)."""
        assert sub.topics is not None
        total = self._source.expired_total()
        if total != sub.marks_total:
            marks = self._source.expired_marks(sub.topics) if total else {}
            sub.marks = {topic: position for topic, (_count, position) in marks.items()}
            sub.marks_total = total
        return sub.marks

    @staticmethod
    def _passed(sub: Subscription, sent: set[str]) -> None:
        """The cursor of a filtered subscription is about to move on, sending events of the
        topics ``sent`` only: another topic of its filter whose last deleted event lies past the
        cursor (as last read, after what moves it) may have deleted events it passes untold, so
        that topic's next event is preceded by a notice."""
        for topic, position in sub.marks.items():
            if position > sub.cursor and topic not in sent:
                sub.owed.add(topic)

    def _check_expired(self, sub: Subscription, head: int) -> bool:
        """Tell a filtered subscription of the events retention deleted from the start of commit
        order past its cursor; False if the notice could not be sent. ``head`` was read before,
        so every position up to it is committed: with nothing stored now, all were deleted."""
        first = self._source.first()
        if first is None:
            first = head + 1
        return first <= sub.cursor + 1 or self._expired(sub, first)

    def _up_to_hole(self, sub: Subscription, rows: list[Any], complete: bool) -> tuple[list[Any], bool]:
        """The events read up to the first hole retention made after the cursor, the consumer told
        of a hole just after the cursor first (rows shared by subscriptions at one cursor are
        checked for each of them).

        A topic's stored seqs run without gaps, so one topic's events can only start past the
        cursor. Commit positions are gapless once committed, so without a filter a position
        missing between the cursor and a stored event was deleted. With a ``topics`` filter,
        positions of other topics are missing too: the start of commit order is compared with
        the cursor, and a later hole is found at a topic's first event after the cursor: the
        topic's last deleted event lies past the cursor (retention deletes a topic's lowest seqs,
        so all of them precede its stored ones, and one past the cursor was never sent), or the
        cursor passed some of them untold before (:attr:`Subscription.owed`). Deleted events at
        or below the cursor that no topic owes were told by a notice already (or precede the
        subscription), whatever a topic's seqs skip. A seq that skips after another event of its
        topic in these rows is a hole too. Cut short at a hole, the rows are not all that follows
        the cursor.
        """
        first = rows[0][0]
        if sub.topics is None:  # one topic, or every topic: rows[k][0] is in the cursor's own terms
            if first > sub.cursor + 1 and not self._expired(sub, first):
                return [], False
            if sub.topic is not None or rows[-1][0] - first == len(rows) - 1:
                return rows, complete
            for index in range(1, len(rows)):
                if rows[index][0] != rows[index - 1][0] + 1:
                    return rows[:index], False
            return rows, complete
        if first > sub.cursor + 1 and not self._check_expired(sub, first - 1):
            return [], False
        seqs = dict(sub.seqs)  # as they will be once the rows before the one looked at are sent
        # Read after the rows, so never older than they are: no deletion before them is missed.
        marks = self._marks(sub)
        seen: set[str] = set()  # topics met in these rows
        for index, (position, _, topic, seq) in enumerate(rows):
            last = seqs.get(topic)
            if topic in seen:
                hole = last is not None and seq > last + 1
            else:
                seen.add(topic)
                # A seq that follows the last one sent skips nothing, whatever was deleted since.
                skips = last is None or seq > last + 1
                hole = topic in sub.owed or (skips and marks.get(topic, 0) > sub.cursor)
            seqs[topic] = seq
            if hole:
                if index:
                    return rows[:index], False
                if not self._expired(sub, position):
                    return [], False
                sub.owed.discard(topic)
        return rows, complete

    def _expired_after_cursor(self, sub: Subscription) -> bool:
        """With nothing stored after the cursor: tell the consumer if events were committed after
        it all the same (retention deleted them), and move the cursor past them. The last
        committed cursor is read first, then the events after the cursor again, so an event
        committed in between is never taken for a deleted one. True to read again: events came
        meanwhile, or the notice could not be sent yet.
        """
        source = self._source
        if sub.topic is not None:
            last = source.topic_last(sub.topic)
            if last <= sub.cursor:
                return False
            if source.topic_after(sub.topic, sub.cursor, 1):
                return True
        else:
            last = source.head()
            if last <= sub.cursor:
                return False
            if source.after(sub.cursor, 1):
                return True
        return not self._expired(sub, last + 1)

    def _expired(self, sub: Subscription, first: int) -> bool:
        """Tell the consumer that what follows its cursor up to ``first`` is no longer stored and
        move its cursor to just before ``first``; False (the cursor unmoved, the subscription
        retried shortly) when its queue is full."""
        if sub.identity in self._unsent or not self._send_now(
            sub.identity, {"op": "expired", "after": sub.cursor, "first": first}, sub
        ):
            sub.retry_at = time.monotonic() + BLOCKED_RETRY_S
            self._retrying = True
            return False
        self._told_expired.warning(  # rate-limited: a client that subscribes again and again causes one each time
            "subscription %s (name %r): events after %d expired; the first still stored is %d",
            sub.identity.hex(),
            sub.name,
            sub.cursor,
            first,
        )
        sub.cursor = first - 1
        return True
