"""The query server: one thread that owns the query socket and hands each request to an actor.

It speaks REQ/REP to clients through a ROUTER socket, so that it can have many requests out at
once and answer each as soon as its actor has: ``stats`` and ``health`` go to the stats actor,
``events``, ``topics`` and ``consumers`` (the listings) to the reader actor, and a slow page never
holds up a ``stats`` behind it (a REP socket answers strictly in turn), nor the watchdog's pings
of the stats actor. Actors answer by calling back (a
:class:`~actors.messages.QueryRequest`), which queues the reply and wakes this thread through a
pipe; only this thread touches the socket.

Every request gets exactly one reply: a malformed one gets ``{"error": ...}`` at once, one that
no actor answers within ``[query] timeout_ms`` gets an error reply then (a late answer is
dropped), and beyond :data:`MAX_PENDING` requests in an actor's hands a new one for it is refused
as busy. A request counts until its actor has called back, not only until its client was told it
timed out: the actor skips one whose deadline passed, but it still holds it in its inbox. So
clients that ask and leave can neither grow the actors' inboxes without bound nor bury the
stats actor, which answers the watchdog's pings, under work nobody waits for. A client that
pipelines requests gets every reply in order (what its ZeroMQ queue of :data:`REPLIES_QUEUED`
does not take waits in an :class:`~actors.outbox.Outbox`), as long as it reads them about as
fast as it asks: one that lets :data:`UNSENT_BYTES` or :data:`UNSENT_REPLIES` wait for it (a
page is up to 4 MiB) has the next ones dropped.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from typing import Any

import msgpack
import pykka
import zmq

from actors.messages import EXPIRED, QueryRequest
from actors.outbox import DROPPED, Outbox
from transport.config import QueryConfig, wants_ipv6
from transport.logs import RateLimitedLog
from transport.queries import ConsumersQuery, EventsQuery, QueryError, TopicsQuery, parse_query
from transport.schema import InvalidEvent, msgpack_problem, unpack_from_peer
from transport.security import SocketHook
from transport.zap import ConnectionGate

log = logging.getLogger(__name__)

POLL_MS = 100
MAX_PENDING = 1024  # requests in one actor's hands at once
REPLIES_QUEUED = 8  # replies ZeroMQ queues for one client that does not read them
UNSENT_BYTES = 8 * 1024 * 1024  # and what waits for it here, past that
UNSENT_REPLIES = 16_384  # however small they are (a stats reply is about 600 bytes)
UNSENT_POLL_MS = 10  # how often replies that wait are tried again
CLIENT_HEARTBEAT_MS = 2_000  # a ZMTP PING to each client this often
CLIENT_SILENCE_MS = 10_000  # and a connection that answers nothing for this long is closed
_RECEIVE_BURST = 64  # requests taken per wake-up before replies are sent again


class QueryServer:
    """Binds the query endpoint and answers requests on its own thread."""

    def __init__(
        self,
        context: zmq.Context[Any],
        config: QueryConfig,
        stats: pykka.ActorRef[Any],
        secure: SocketHook | None = None,
        reader: pykka.ActorRef[Any] | None = None,
        gate: ConnectionGate | None = None,
    ) -> None:
        """``reader`` answers events and topics (None: the stats actor answers everything).

        ``gate`` refuses requests from connections whose CURVE key was revoked since they connected.
        """
        self._config = config
        self._gate = gate or ConnectionGate(lambda: None)
        self._stats = stats
        self._reader = reader if reader is not None else stats
        self._warn = RateLimitedLog(log)
        self._stopping = threading.Event()
        self._socket = context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.MAXMSGSIZE, 1_048_576)
        self._socket.setsockopt(zmq.LINGER, 100)
        self._socket.setsockopt(zmq.SNDHWM, REPLIES_QUEUED)
        # A client whose queue is full raises EAGAIN (its reply waits in the outbox), never
        # dropped silently; one that is gone raises EHOSTUNREACH.
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # ZeroMQ's own heartbeats (ZMTP PING, answered by the client's ZeroMQ thread, even while it
        # waits for an answer): a client whose process is stopped, or whose machine is gone without
        # a word, has its connection closed and the replies queued for it freed (they were kept
        # until TCP gave up, hours later). A live client that reads nothing keeps its few.
        self._socket.setsockopt(zmq.HEARTBEAT_IVL, CLIENT_HEARTBEAT_MS)
        self._socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, CLIENT_SILENCE_MS)
        self._outbox = Outbox(self._socket, max_messages=UNSENT_REPLIES, max_bytes=UNSENT_BYTES)
        if secure is not None:
            secure(self._socket)
        self._socket.ipv6 = wants_ipv6(config.bind)
        self._socket.bind(config.bind)
        self._replies: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        # Held to write to the pipe or close it: a late answer must never write to a closed
        # descriptor, whose number the process may already have given to another file.
        self._wake_lock = threading.Lock()
        self._wake_closed = False
        self._tokens = itertools.count()
        # token -> (envelope, deadline) of every request handed to an actor and not answered yet
        self._pending: dict[int, tuple[list[bytes], float]] = {}
        # token -> actor of every request an actor has not called back for yet, answered or not
        self._in_hands: dict[int, pykka.ActorRef[Any]] = {}
        self._load: dict[pykka.ActorRef[Any], int] = {self._stats: 0, self._reader: 0}
        self._thread = threading.Thread(target=self._run, name="query", daemon=True)
        self.answered = 0

    def start(self) -> None:
        """Start answering."""
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop answering and close the socket."""
        self._stopping.set()
        self._wake()  # at once, not at the end of a poll: a stopping daemon waits for this thread
        self._thread.join(timeout)
        if not self._thread.is_alive():
            with self._wake_lock:
                if self._wake_closed:
                    return
                self._wake_closed = True
                os.close(self._wake_read)
                os.close(self._wake_write)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                wait_ms = UNSENT_POLL_MS if self._outbox else POLL_MS
                if self._pending:
                    first_deadline = min(deadline for _, deadline in self._pending.values())
                    wait_ms = max(0, min(POLL_MS, int((first_deadline - time.monotonic()) * 1000) + 1))
                ready = dict(poller.poll(wait_ms))
                if ready.get(self._wake_read):
                    self._drain_wake_pipe()
                self._outbox.flush()
                self._send_replies()
                if ready.get(self._socket):
                    for _ in range(_RECEIVE_BURST):
                        try:
                            parts, refused = self._gate.receive(self._socket)
                        except zmq.Again:
                            break
                        self._receive(parts, refused)
                self._expire()
        except Exception:
            log.exception("query server failed; queries are no longer answered")
            raise
        finally:
            self._socket.close(linger=100)

    def _receive(self, parts: list[bytes], refused: str | None = None) -> None:
        # A REQ client's message is its routing id, an empty delimiter, then the request.
        try:
            split = parts.index(b"", 1)
        except ValueError:
            self._warn.warning("bad query: a message without a REQ envelope was dropped")
            return
        envelope, body = parts[: split + 1], parts[split + 1 :]
        if refused is not None:
            self._send(envelope, self._error(refused))
            return
        if len(body) != 1:
            self._send(envelope, self._error(f"a request must be one frame, not {len(body)}"))
            return
        try:
            request = unpack_from_peer(body[0])
        except InvalidEvent as exc:
            self._send(envelope, self._error(f"request refused: {exc}"))
            return
        except Exception as exc:
            self._send(envelope, self._error(f"request is not valid msgpack: {msgpack_problem(exc)}"))
            return
        try:
            query = parse_query(request, self._config.max_limit)
        except QueryError as exc:
            self._send(envelope, self._error(str(exc)))
            return
        actor = self._reader if isinstance(query, (EventsQuery, TopicsQuery, ConsumersQuery)) else self._stats
        if self._load[actor] >= MAX_PENDING:
            self._send(envelope, {"error": f"busy: {MAX_PENDING} queries are being answered; retry shortly"})
            return
        token = next(self._tokens)
        deadline = time.monotonic() + self._config.timeout_ms / 1000
        try:
            actor.tell(QueryRequest(query, lambda reply: self._answered(token, reply), deadline))
        except pykka.ActorDeadError:
            self._send(envelope, {"error": "the query actors are not running; the daemon is stopping or broken"})
            return
        self._pending[token] = (envelope, deadline)
        self._in_hands[token] = actor
        self._load[actor] += 1

    def _answered(self, token: int, reply: Any) -> None:
        """Called on an actor's thread: queue the reply and wake the query thread."""
        self._replies.put((token, reply))
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_closed:
                return
            try:
                os.write(self._wake_write, b"\0")
            except BlockingIOError:
                pass  # the pipe is full: the thread will wake anyway

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def _send_replies(self) -> None:
        while True:
            try:
                token, reply = self._replies.get_nowait()
            except queue.Empty:
                return
            self._load[self._in_hands.pop(token)] -= 1
            pending = self._pending.pop(token, None)
            if pending is None:  # it timed out and was answered with an error already
                continue
            if reply is EXPIRED:  # the actor came to it just past its deadline
                self._send(pending[0], self._too_late())
            else:
                self._send(pending[0], reply)

    def _expire(self) -> None:
        now = time.monotonic()
        expired = [token for token, (_, deadline) in self._pending.items() if deadline <= now]
        for token in expired:
            envelope, _ = self._pending.pop(token)
            self._send(envelope, self._too_late())

    def _too_late(self) -> dict[str, Any]:
        return {"error": f"the daemon did not answer within {self._config.timeout_ms} ms"}

    def _send(self, envelope: list[bytes], reply: Any) -> None:
        if isinstance(reply, bytes):  # packed by the actor already (a page of events)
            packed = reply
        else:
            try:
                packed = msgpack.packb(reply, use_bin_type=True)
            except (TypeError, ValueError) as exc:
                packed = msgpack.packb({"error": f"reply could not be encoded: {exc}"})
        # A client that left before its reply (GONE) has nobody to tell.
        if self._outbox.send([*envelope, packed]) == DROPPED:
            self._warn.warning(
                "a query reply was dropped: the client asks faster than it reads its replies"
                " (%d MiB, or %d replies, wait for it)",
                UNSENT_BYTES // 1048576,
                UNSENT_REPLIES,
            )
            return
        self.answered += 1

    def _error(self, message: str) -> dict[str, Any]:
        self._warn.warning("bad query: %s", message)
        return {"error": message}
