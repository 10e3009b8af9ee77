"""The ingest loop: one thread that owns the PULL and ROUTER ingest sockets.

It decodes and validates every frame (refusals are counted and logged at a bounded rate),
coalesces what it can read without waiting into one batch, and tells the router. It admits
events only while the in-flight credit has room, so a flood waits in ZeroMQ's high-water marks
and in the publishers, not in the daemon's memory. It also forwards the dedup actor's
acknowledgements (from an inproc socket) to the ROUTER, since only this thread may use it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import msgpack
import pykka
import zmq

from actors.dedup import ACK_ENDPOINT
from actors.flow import InFlight, PipelineDepth, events_bytes
from actors.messages import AckTicket, AddRejected, IngestBatch
from transport.codec import (
    FrameError,
    Limits,
    batch_id_of,
    decode_ack_request,
    decode_frame,
)
from transport.config import IngestConfig
from transport.logs import RateLimitedLog
from transport.schema import Event
from transport.security import SocketHook

log = logging.getLogger(__name__)

POLL_MS = 50
# While there is no credit or the actors are behind, how long to wait before looking again.
HOLD_POLL_MS = 1
COALESCE_EVENTS = 2_000
REJECTED_FLUSH_S = 0.1
SHUTDOWN_DRAIN_FRAMES = 100_000



class IngestServer:
    """Binds the ingest sockets and runs the ingest loop on its own thread."""

    def __init__(
        self,
        context: zmq.Context[Any],
        config: IngestConfig,
        router: pykka.ActorRef[Any],
        dedup: pykka.ActorRef[Any],
        in_flight: InFlight,
        secure: SocketHook | None = None,
        depth: PipelineDepth | None = None,
    ) -> None:
        self._config = config
        self._router = router
        self._dedup = dedup
        self._in_flight = in_flight
        self._depth = depth
        self._limits = Limits(config.max_batch_events, config.max_payload_bytes)
        self._warn = RateLimitedLog(log)
        self._accepting = threading.Event()
        self._accepting.set()
        self._closing = threading.Event()
        self._rejected_pending = 0
        self._rejected_flushed_at = time.monotonic()
        self.frames = 0

        # Sockets are made and bound here, on the caller's thread, so a bad endpoint fails the
        # start; from start() on only the ingest thread touches them.
        self._acks = context.socket(zmq.PULL)
        self._acks.bind(ACK_ENDPOINT)
        self._pull = context.socket(zmq.PULL)
        self._ack_router = context.socket(zmq.ROUTER)
        for sock in (self._pull, self._ack_router):
            sock.setsockopt(zmq.RCVHWM, config.rcvhwm)
            sock.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes)
            if secure is not None:
                secure(sock)
        self._ack_router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._pull.bind(config.bind)
        self._ack_router.bind(config.ack_bind)
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)

    def start(self) -> None:
        """Start reading."""
        self._thread.start()

    def stop_accepting(self) -> None:
        """Read what is already queued in the PULL socket, then stop admitting events."""
        self._accepting.clear()

    def close(self, timeout: float = 10.0) -> None:
        """Forward the last acknowledgements, close the sockets and end the thread."""
        self._closing.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the ingest thread is running."""
        return self._thread.is_alive()

    def _run(self) -> None:
        everything = zmq.Poller()
        for sock in (self._acks, self._pull, self._ack_router):
            everything.register(sock, zmq.POLLIN)
        acks_only = zmq.Poller()
        acks_only.register(self._acks, zmq.POLLIN)
        drained_on_stop = False
        try:
            while not self._closing.is_set():
                accepting = self._accepting.is_set()
                if not accepting and not drained_on_stop:
                    self._drain_on_stop()
                    drained_on_stop = True
                if not accepting:
                    poller, wait_ms = acks_only, POLL_MS
                elif not self._in_flight.has_room() or (self._depth is not None and self._depth.busy()):
                    poller, wait_ms = acks_only, HOLD_POLL_MS
                else:
                    poller, wait_ms = everything, POLL_MS
                ready = dict(poller.poll(wait_ms))
                if self._acks in ready:
                    self._forward_acks()
                if accepting and (self._pull in ready or self._ack_router in ready):
                    self._read_batch()
                self._flush_rejected(force=not ready)
            self._forward_acks()
            self._flush_rejected(force=True)
        except Exception:
            log.exception("ingest loop failed; the daemon stops reading events")
            raise
        finally:
            self._pull.close(linger=0)
            self._ack_router.close(linger=1000)
            self._acks.close(linger=0)

    def _read_batch(self, limit: int = COALESCE_EVENTS) -> int:
        """Read frames without waiting until ``limit`` events are gathered; hand them on as one batch."""
        events: list[Event] = []
        tickets: list[AckTicket | None] | None = None
        frames = 0
        for sock in (self._pull, self._ack_router):
            while len(events) < limit:
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                frames += 1
                try:
                    if sock is self._pull:
                        tickets = self._take_frame(parts, events, tickets)
                    else:
                        tickets = self._take_ack_request(parts, events, tickets)
                except Exception as exc:  # noqa: BLE001 - a decoder bug must not stop ingest for good
                    # Decoding finishes before anything is added to the batch, so the batch is whole.
                    self._reject(1, f"message could not be decoded ({type(exc).__name__}: {exc}); this is a bug")
        self.frames += frames
        if events:
            self._in_flight.add(len(events), events_bytes(events))
            self._router.tell(IngestBatch(events, time.time(), tickets))
        return frames

    def _take_frame(
        self, parts: list[bytes], events: list[Event], tickets: list[AckTicket | None] | None
    ) -> list[AckTicket | None] | None:
        if len(parts) != 1:
            self._reject(1, f"a fire-and-forget message must be one frame, not {len(parts)}")
            return tickets
        try:
            decoded = decode_frame(parts[0], self._limits)
        except FrameError as exc:
            self._reject(1, str(exc))
            return tickets
        if decoded.rejected:
            self._reject(len(decoded.rejected), decoded.rejected[0][1])
        events.extend(decoded.events)
        if tickets is not None:
            tickets.extend([None] * len(decoded.events))
        return tickets

    def _take_ack_request(
        self, parts: list[bytes], events: list[Event], tickets: list[AckTicket | None] | None
    ) -> list[AckTicket | None] | None:
        envelope, body = parts[:-1], parts[-1]
        try:
            batch_id, decoded = decode_ack_request(body, self._limits)
        except FrameError as exc:
            self._reject(1, str(exc))
            self._ack_router.send_multipart([*envelope, msgpack.packb({"batch": batch_id_of(body), "error": str(exc)})])
            return tickets
        if decoded.rejected:
            self._reject(len(decoded.rejected), decoded.rejected[0][1])
        ticket = AckTicket(envelope, batch_id, len(decoded.events), decoded.rejected)
        if not decoded.events:
            self._ack_router.send_multipart([*envelope, msgpack.packb(ticket.reply())])
            return tickets
        if tickets is None:
            tickets = [None] * len(events)
        events.extend(decoded.events)
        tickets.extend([ticket] * len(decoded.events))
        return tickets

    def _reject(self, count: int, reason: str) -> None:
        self._rejected_pending += count
        self._warn.warning("rejected %d: %s", count, reason)

    def _flush_rejected(self, force: bool) -> None:
        if not self._rejected_pending:
            return
        now = time.monotonic()
        if force or now - self._rejected_flushed_at >= REJECTED_FLUSH_S:
            self._dedup.tell(AddRejected(self._rejected_pending))
            self._rejected_pending = 0
            self._rejected_flushed_at = now

    def _forward_acks(self) -> None:
        while True:
            try:
                parts = self._acks.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._ack_router.send_multipart(parts, zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # the publisher is gone or its pipe is full: it will resend
                log.debug("could not deliver an acknowledgement: %s", exc)

    def _drain_on_stop(self) -> None:
        """On shutdown, take what the PULL socket already holds, so nothing received is left behind."""
        for _ in range(SHUTDOWN_DRAIN_FRAMES):
            if not self._read_batch():
                break
