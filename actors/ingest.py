"""The ingest loop: one thread that owns the PULL and ROUTER ingest sockets.

It has every message decoded and validated (by the decoder process, :mod:`actors.decoder`,
or on this thread when there is none), counts and logs refusals at a bounded rate, coalesces
the decoded messages it has into one batch, in the order they arrived, and tells the router. It
reads only while the in-flight credit has room and few messages wait to be handed on, and hands
a decoded message on only while the credit has room, so in flight stays within
``max_in_flight`` plus one message, and a flood waits in ZeroMQ's high-water marks and in the
publishers, not in the daemon's memory. A message that the decoder process died (or hung) on
is tried once more in a new process, never on this thread; if it ends that one too, it is
refused. It also forwards the dedup actor's acknowledgements (from an inproc socket) to the ROUTER, since
only this thread may use it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import msgpack
import pykka
import zmq

from actors.decoder import (
    ACKNOWLEDGED,
    FAILED,
    FIRE_AND_FORGET,
    REFUSED,
    Decoded,
    DecoderProcess,
    DecoderUnavailable,
    decode_message,
)
from actors.dedup import ACK_ENDPOINT
from actors.flow import InFlight, LiveFigures, PipelineDepth, events_bytes
from actors.messages import AckTicket, AddRejected, IngestBatch
from transport.codec import Limits, batch_id_of
from transport.config import IngestConfig, wants_ipv6
from transport.logs import RateLimitedLog
from transport.schema import Event
from transport.security import SocketHook
from transport.zap import ConnectionGate

log = logging.getLogger(__name__)

POLL_MS = 50
# While there is no credit or the actors are behind, how long to wait before looking again.
HOLD_POLL_MS = 1
# Once the daemon stops reading: short, so that close() ends the thread soon (the daemon waits).
STOPPING_POLL_MS = 5
COALESCE_EVENTS = 2_000
REJECTED_FLUSH_S = 0.1
SHUTDOWN_DRAIN_FRAMES = 100_000
# Messages read and not yet handed on (and the bytes of those out at the decoder process) at
# most: enough to keep the decoder busy, few enough to hold while the in-flight credit is spent.
MAX_AT_DECODER = 32
MAX_AT_DECODER_BYTES = 8 * 1024 * 1024
# A decoder process that has answered nothing for this long while messages wait is taken for stuck.
DECODER_STALL_S = 5.0
# A turn of the ingest loop this much longer than its wait means the daemon itself did not run.
FREEZE_S = 1.0
# More restarts than this within DECODER_RESTART_WINDOW_S: decoding moves to the ingest thread for good.
DECODER_RESTARTS = 5
DECODER_RESTART_WINDOW_S = 600.0
DRAIN_SETTLE_S = 5.0
DRAIN_CREDIT_S = 30.0  # on shutdown, how long decoded messages may wait for in-flight credit
# Every reply echoes its request's envelope and waits in ZeroMQ (up to its default high-water
# mark, 1000 a connection) for a publisher that does not read it, so the envelope is bounded. A
# REQ adds one frame, each proxy on the way one more. (A lower mark drops replies of one commit
# that acknowledges many batches of one connection at once: ZeroMQ counts a reply as read only
# when its I/O thread says so.)
MAX_ENVELOPE_FRAMES = 16
MAX_ENVELOPE_BYTES = 4096


class _Message:
    """One ingest message on its way through the loop: where it came from, then what it decoded to."""

    __slots__ = ("kind", "envelope", "body", "decoded", "sent_at", "suspect")

    def __init__(self, kind: bytes, envelope: list[bytes], body: bytes) -> None:
        self.kind = kind
        self.envelope = envelope
        self.body = body
        self.decoded: Decoded | None = None
        self.sent_at = 0.0
        self.suspect = False  # a decoder process ended while decoding it


def rejection_reasons(rejected: list[tuple[int, str]], shown: int = 3) -> str:
    """The reasons for a message's refused events, each once with how many events it refused and
    the index of the first: a log line under a count must not give one event's reason for all."""
    by_reason: dict[str, list[int]] = {}
    for index, reason in rejected:
        by_reason.setdefault(reason, []).append(index)
    if len(by_reason) == 1:
        return rejected[0][1]
    parts = [
        f"{len(indexes)} at index {indexes[0]}{'' if len(indexes) == 1 else ' and after'}: {reason}"
        for reason, indexes in list(by_reason.items())[:shown]
    ]
    rest = list(by_reason.values())[shown:]
    if rest:
        parts.append(f"{sum(len(indexes) for indexes in rest)} more for {len(rest)} other reason(s)")
    return "; ".join(parts)


def _envelope_problem(parts: list[bytes]) -> str | None:
    """Why an acknowledged message's envelope (the sender's frames before its last) is refused, or None."""
    frames, size = len(parts) - 2, sum(map(len, parts[1:-1]))
    if frames <= MAX_ENVELOPE_FRAMES and size <= MAX_ENVELOPE_BYTES:
        return None
    return (
        f"an acknowledged request's envelope (the frames before its last) is {frames} frames of {size} bytes, "
        f"over the limit of {MAX_ENVELOPE_FRAMES} frames and {MAX_ENVELOPE_BYTES} bytes; "
        "send the request as one frame from a DEALER"
    )


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
        live: LiveFigures | None = None,
        gate: ConnectionGate | None = None,
        nul_in_text: bool = True,
    ) -> None:
        """``nul_in_text`` False (PostgreSQL storage) refuses events with a NUL in event_id or source."""
        self._config = config
        self._gate = gate or ConnectionGate(lambda: None)
        self._context = context
        self._router = router
        self._dedup = dedup
        self._in_flight = in_flight
        self._depth = depth
        self._live = live
        self._limits = Limits(config.max_batch_events, config.max_payload_bytes, nul_in_text)
        self._warn = RateLimitedLog(log)
        self._accepting = threading.Event()
        self._accepting.set()
        self._drained = threading.Event()
        self._closing = threading.Event()
        self._rejected_pending = 0
        self._rejected_replies: list[list[bytes]] = []
        self._rejected_flushed_at = time.monotonic()
        self._decoder: DecoderProcess | None = None
        self._pending: deque[_Message] = deque()  # every message not yet handed on, in arrival order
        self._at_decoder: deque[_Message] = deque()  # those of them sent to the decoder, in order
        self._at_decoder_bytes = 0
        self._decoder_restarts = 0
        self._recent_restarts: deque[float] = deque()  # when, for the budget of DECODER_RESTARTS
        self._decoder_answered_at = 0.0
        self._last_turn = time.monotonic()  # when the loop last came back from its wait
        self._decoder_refused = False  # it could not take a message: is it still there?

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
        self._pull.ipv6 = wants_ipv6(config.bind)
        self._pull.bind(config.bind)
        self._ack_router.ipv6 = wants_ipv6(config.ack_bind)
        self._ack_router.bind(config.ack_bind)
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)

    def start(self) -> None:
        """Start the decoder process (if configured) and the ingest thread."""
        if self._config.decode_process:
            decoder = DecoderProcess(self._context, self._limits)
            try:
                decoder.start()
            except DecoderUnavailable as exc:
                log.warning("%s; frames are decoded on the ingest thread", exc)
                decoder.stop()
            else:
                self._decoder = decoder
        self._report_decoding()
        self._thread.start()

    def _report_decoding(self) -> None:
        """Tell the stats (``health``: ``decoding``; ``stats``: ``decoder_restarts``) where frames are decoded."""
        if self._live is None:
            return
        decoder = self._decoder
        self._live.decoding = f"decoder process, pid {decoder.pid}" if decoder is not None else "ingest thread"
        self._live.decoder_restarts = self._decoder_restarts

    def stop_accepting(self) -> None:
        """Read what is already queued in the ingest sockets, then stop admitting events."""
        self._accepting.clear()

    def wait_drained(self, timeout: float) -> bool:
        """After :meth:`stop_accepting`: wait until what was queued has been handed on."""
        return self._drained.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Forward the last acknowledgements, close the sockets and end the thread."""
        self._closing.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the ingest thread is running."""
        return self._thread.is_alive()

    def _pollers(self) -> tuple[zmq.Poller, zmq.Poller]:
        """One poller for everything, one for all but the ingest sockets (while not reading)."""
        everything, held = zmq.Poller(), zmq.Poller()
        for sock in (self._acks, self._pull, self._ack_router):
            everything.register(sock, zmq.POLLIN)
        held.register(self._acks, zmq.POLLIN)
        if self._decoder is not None:
            assert self._decoder.results is not None
            for poller in (everything, held):
                poller.register(self._decoder.results, zmq.POLLIN)
        return everything, held

    def _run(self) -> None:
        everything, held = self._pollers()
        try:
            while not self._closing.is_set():
                accepting = self._accepting.is_set()
                if not accepting and not self._drained.is_set():
                    self._drain_on_stop()
                    self._drained.set()
                if not accepting:
                    poller, wait_ms = held, STOPPING_POLL_MS
                elif (
                    not self._in_flight.has_room()
                    or (self._depth is not None and self._depth.busy())
                    or self._decoder_full()
                ):
                    poller, wait_ms = held, HOLD_POLL_MS
                else:
                    poller, wait_ms = everything, POLL_MS
                ready = dict(poller.poll(wait_ms))
                self._note_freeze(wait_ms)
                if self._acks in ready:
                    self._forward_acks()
                if self._decoder is not None and self._decoder.results in ready:
                    self._take_results()
                if accepting and (self._pull in ready or self._ack_router in ready):
                    self._read_messages()
                self._hand_on()
                if self._decoder is not None and (not ready or self._decoder_refused or self._decoder_stalled()):
                    self._decoder_refused = False
                    if self._check_decoder():  # restarted on new sockets, or given up
                        everything, held = self._pollers()
                        self._report_decoding()
                self._flush_rejected(force=not ready)
            self._forward_acks()
            self._flush_rejected(force=True)
        except zmq.ContextTerminated:
            # The daemon stopped waiting for the drain (it logged why, e.g. commits failing and
            # holding the credit) and ended the sockets' context: an end, not a failure.
            log.debug("ingest stopped while still draining: the daemon ended its wait")
        except Exception:
            log.exception("ingest loop failed; the daemon stops reading events")
            raise
        finally:
            self._pull.close(linger=0)
            self._ack_router.close(linger=1000)
            self._acks.close(linger=0)
            if self._decoder is not None:
                self._decoder.stop()

    def _read_messages(self) -> int:
        """Read messages without waiting and start decoding them; return how many were read.

        The two sockets take turns, a message each: a fire-and-forget flood that always has
        more queued than one round's budget must not keep acknowledged batches unread.
        """
        readable = [(self._pull, FIRE_AND_FORGET), (self._ack_router, ACKNOWLEDGED)]
        frames = decoded_events = 0
        while readable:
            for turn in tuple(readable):
                if decoded_events >= COALESCE_EVENTS or self._decoder_full():
                    return frames
                sock, kind = turn
                try:
                    parts, refused = self._gate.receive(sock)
                except zmq.Again:
                    readable.remove(turn)
                    continue
                frames += 1
                decoded_events += self._take_message(kind, parts, refused)
        return frames

    def _take_message(self, kind: bytes, parts: list[bytes], refused: str | None) -> int:
        """Refuse one message read, or start decoding it; how many events it decoded here (0 if sent on)."""
        if refused is not None:
            self._refuse_revoked(kind, parts, refused)
            return 0
        if kind is FIRE_AND_FORGET and len(parts) != 1:
            self._reject(1, f"a fire-and-forget message must be one frame, not {len(parts)}")
            return 0
        problem = _envelope_problem(parts) if kind is ACKNOWLEDGED else None
        if problem is not None:
            self._reject(1, problem)
            # parts[0] is the routing id the ROUTER adds (not the sender's), all a DEALER's answer needs.
            self._answer_refused([parts[0], msgpack.packb({"batch": batch_id_of(parts[-1]), "error": problem})])
            return 0
        message = _Message(kind, parts[:-1], parts[-1])
        self._pending.append(message)
        decoder = self._decoder
        if decoder is not None and decoder.send(kind, message.body):
            message.sent_at = time.monotonic()
            self._at_decoder.append(message)
            self._at_decoder_bytes += len(message.body)
            return 0
        self._decoder_refused = decoder is not None
        message.decoded = decode_message(kind, message.body, self._limits)
        return len(message.decoded.events)

    def _refuse_revoked(self, kind: bytes, parts: list[bytes], reason: str) -> None:
        """Count a message from a connection whose key was revoked, and tell an acked one why."""
        self._reject(1, reason)
        if kind is ACKNOWLEDGED:
            self._answer_refused([*parts[:-1], msgpack.packb({"batch": batch_id_of(parts[-1]), "error": reason})])

    def _decoder_full(self) -> bool:
        """Whether enough waits to be decoded or handed on that reading should wait (one message always may)."""
        return bool(self._pending) and (
            len(self._pending) >= MAX_AT_DECODER or self._at_decoder_bytes >= MAX_AT_DECODER_BYTES
        )

    def _take_results(self) -> None:
        """Take the decoder's results that have come; they answer the messages sent, in order."""
        assert self._decoder is not None
        at_decoder = self._at_decoder
        while at_decoder:
            decoded = self._decoder.receive()
            if decoded is None:
                return
            self._answer_oldest(decoded)

    def _answer_oldest(self, decoded: Decoded) -> None:
        """The oldest message out at the decoder is decoded (there, or here): take it off the count."""
        message = self._at_decoder.popleft()
        message.decoded = decoded
        self._decoder_answered_at = time.monotonic()
        self._at_decoder_bytes -= len(message.body)
        message.body = b""  # decoded: the frame is no longer needed

    def _hand_on(self) -> None:
        """Tell the router the decoded messages at the head of the queue, in batches of about ``COALESCE_EVENTS``.

        Only while the in-flight credit has room: the last message taken may pass the limit by
        its own events, no more (the messages after it wait here, decoded, for credit).
        """
        pending = self._pending
        in_flight = self._in_flight
        while pending and pending[0].decoded is not None and in_flight.has_room():
            events: list[Event] = []
            nbytes = 0
            tickets: list[AckTicket | None] | None = None
            while (
                pending
                and pending[0].decoded is not None
                and len(events) < COALESCE_EVENTS
                and in_flight.has_room(len(events), nbytes)
            ):
                message = pending.popleft()
                assert message.decoded is not None
                nbytes += events_bytes(message.decoded.events)
                tickets = self._admit(message, events, tickets)
            if events:
                in_flight.add(len(events), nbytes)
                self._router.tell(IngestBatch(events, time.time(), tickets))

    def _admit(
        self, message: _Message, events: list[Event], tickets: list[AckTicket | None] | None
    ) -> list[AckTicket | None] | None:
        """Add one decoded message's events (and acked tickets) to the batch; answer or count what it refused."""
        decoded = message.decoded
        assert decoded is not None
        if decoded.status == FAILED:
            self._reject(1, decoded.error)
            return tickets
        if decoded.status == REFUSED:
            self._reject(1, decoded.error)
            if message.kind is ACKNOWLEDGED:
                reply = {"batch": decoded.batch_id, "error": decoded.error}
                self._answer_refused([*message.envelope, msgpack.packb(reply)])
            return tickets
        if decoded.rejected:
            self._reject(len(decoded.rejected), rejection_reasons(decoded.rejected))
            if message.kind is ACKNOWLEDGED and decoded.events:
                # Counted before the events are handed on, so in the commit that answers them.
                self._flush_rejected(force=True)
        if message.kind is FIRE_AND_FORGET:
            events.extend(decoded.events)
            if tickets is not None:
                tickets.extend([None] * len(decoded.events))
            return tickets
        assert decoded.batch_id is not None
        ticket = AckTicket(
            message.envelope, decoded.batch_id, len(decoded.events), decoded.rejected, events=decoded.events
        )
        if not decoded.events:
            self._answer_refused([*message.envelope, msgpack.packb(ticket.reply())])
            return tickets
        if tickets is None:
            tickets = [None] * len(events)
        events.extend(decoded.events)
        tickets.extend([ticket] * len(decoded.events))
        return tickets

    def _note_freeze(self, wait_ms: int) -> None:
        """After a turn of the loop far longer than its wait (the daemon was stopped, or its
        machine paused), give the decoder a fresh ``DECODER_STALL_S``: its answers could not be
        taken meanwhile, and judging it by that time restarted a healthy decoder."""
        now = time.monotonic()
        if now - self._last_turn > wait_ms / 1000 + FREEZE_S:
            self._decoder_answered_at = now
        self._last_turn = now

    def _decoder_stalled(self) -> bool:
        """Whether messages wait and the decoder has answered none for ``DECODER_STALL_S`` (a queue of
        slow but answered messages is progress, however long the last of them has waited)."""
        if not self._at_decoder:
            return False
        since = max(self._at_decoder[0].sent_at, self._decoder_answered_at)
        return time.monotonic() - since > DECODER_STALL_S

    def _check_decoder(self) -> bool:
        """If the decoder died or is stuck, decode its waiting messages here and start a new one.

        True when the decoder's sockets changed (a new process, or none), so the pollers must too.
        """
        decoder = self._decoder
        assert decoder is not None
        stuck = self._decoder_stalled()
        if decoder.alive() and not stuck:
            return False
        what = "stopped answering" if decoder.alive() else "died"
        decoder.kill()
        self._take_results()  # what it sent before it ended still answers its messages
        log.error("the decoder process %s with %d messages waiting", what, len(self._at_decoder))
        if self._at_decoder:
            # The oldest is the one it was decoding: the outside (an operator, the OOM killer) may
            # have ended it, so it gets one more try in a new process; if it ends that one too,
            # it is what ends them, and it is refused rather than tried on this thread.
            oldest = self._at_decoder[0]
            if oldest.suspect:
                self._refuse_oldest(what)
            else:
                oldest.suspect = True
        now = time.monotonic()
        recent = self._recent_restarts
        while recent and recent[0] < now - DECODER_RESTART_WINDOW_S:
            recent.popleft()
        if len(recent) >= DECODER_RESTARTS:
            log.error(
                "the decoder process failed %d times in %.0f s; frames are decoded on the ingest thread from now on",
                len(recent) + 1,
                now - recent[0],
            )
        else:
            recent.append(now)
            try:
                decoder.start()  # on new sockets: a late result of the old process is never read
                self._decoder_restarts += 1  # counted once it did: `decoder_restarts` is processes replaced
                log.info("a new decoder process (pid %s) took over", decoder.pid)
                self._resend()
                return True
            except DecoderUnavailable as exc:
                log.error("%s; frames are decoded on the ingest thread from now on", exc)
        if self._at_decoder and self._at_decoder[0].suspect:
            self._refuse_oldest(what)
        log.error("decoding %d waiting messages on the ingest thread", len(self._at_decoder))
        self._decode_here()
        decoder.stop()
        self._decoder = None
        return True

    def _refuse_oldest(self, what: str) -> None:
        """Refuse the oldest message out at the decoder: decoder processes ended while decoding it."""
        body = self._at_decoder[0].body
        reason = (
            f"message of {len(body)} bytes refused: the decoder process {what} twice while decoding it; "
            "send it in smaller batches"
        )
        self._answer_oldest(Decoded(REFUSED, batch_id_of(body), reason, [], []))

    def _resend(self) -> None:
        """Hand the messages still waiting at the old decoder process to the new one, in order."""
        decoder = self._decoder
        assert decoder is not None
        now = time.monotonic()
        for message in self._at_decoder:
            if not decoder.send(message.kind, message.body):
                self._decode_here()  # cannot happen with no high-water mark; decoded here if it does
                return
            message.sent_at = now

    def _decode_here(self) -> None:
        """Decode on this thread every message still waiting at the decoder."""
        while self._at_decoder:
            oldest = self._at_decoder[0]
            self._answer_oldest(decode_message(oldest.kind, oldest.body, self._limits))

    def _reject(self, count: int, reason: str) -> None:
        self._rejected_pending += count
        self._warn.warning("rejected %d: %s", count, reason)

    def _answer_refused(self, reply: list[bytes]) -> None:
        """Answer an acknowledged message that holds nothing to store, once its refusals are committed."""
        self._rejected_replies.append(reply)
        self._flush_rejected(force=True)

    def _flush_rejected(self, force: bool) -> None:
        if not self._rejected_pending:
            return
        now = time.monotonic()
        if force or now - self._rejected_flushed_at >= REJECTED_FLUSH_S:
            self._dedup.tell(AddRejected(self._rejected_pending, tuple(self._rejected_replies)))
            self._rejected_pending = 0
            self._rejected_replies = []
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
        """On shutdown, take what the ingest sockets already hold, so nothing received is left behind."""
        for _ in range(SHUTDOWN_DRAIN_FRAMES):
            read = self._read_messages()
            self._settle(DRAIN_SETTLE_S)
            self._hand_on()
            # What waits for credit gets it as the actors commit what is in flight, unless the
            # daemon stops waiting first (commits failing: close() then ends the drain here).
            deadline = time.monotonic() + DRAIN_CREDIT_S
            while self._pending and time.monotonic() < deadline and not self._closing.is_set():
                self._forward_acks()
                time.sleep(HOLD_POLL_MS / 1000)
                self._hand_on()
            if (not read and not self._pending) or self._closing.is_set():
                break

    def _settle(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the decoder's results; decode here whatever has not come by then."""
        deadline = time.monotonic() + timeout
        while self._at_decoder and self._decoder is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._decoder.alive() or self._decoder.results is None:
                break
            if self._decoder.results.poll(int(min(remaining, 0.1) * 1000) + 1):
                self._take_results()
        self._decode_here()
