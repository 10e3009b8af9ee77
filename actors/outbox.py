"""Replies a ROUTER socket could not send yet, kept per peer, in order, within a budget.

A ROUTER with ``ROUTER_MANDATORY`` raises EAGAIN when a peer's queue (``SNDHWM`` messages) is
full, and EHOSTUNREACH when the peer is gone; it never drops a message silently. A peer that
reads, but not as fast as a burst of replies is made, must still get every one in order, so
what does not fit waits here and :meth:`Outbox.flush` sends it as the queue makes room. A peer
that reads nothing must not grow the server without bound: past ``max_messages`` or
``max_bytes`` waiting for it, a reply is dropped (the caller says so).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import zmq

SENT, FULL, QUEUED, DROPPED, GONE = "sent", "full", "queued", "dropped", "gone"


class Outbox:
    """What waits to be sent on one ROUTER socket, by peer (the routing id, a message's first frame)."""

    def __init__(self, socket: zmq.Socket[Any], max_messages: int, max_bytes: int | None = None) -> None:
        self._socket = socket
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._waiting: dict[bytes, deque[list[bytes]]] = {}
        self._bytes: dict[bytes, int] = {}

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def __contains__(self, peer: bytes) -> bool:
        """Whether replies wait for ``peer`` (anything sent to it now would overtake them)."""
        return peer in self._waiting

    def send_now(self, frames: list[bytes]) -> str:
        """Send without blocking and without queueing: SENT, FULL (the peer's queue is; nothing is
        kept) or GONE."""
        try:
            self._socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            return FULL
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return GONE
            raise
        return SENT

    def send(self, frames: list[bytes]) -> str:
        """Send now, or after what already waits for the peer: SENT, QUEUED, DROPPED (over the
        budget) or GONE."""
        peer = frames[0]
        waiting = self._waiting.get(peer)
        if waiting is None:
            outcome = self.send_now(frames)
            if outcome != FULL:
                return outcome
            waiting = self._waiting[peer] = deque()
            self._bytes[peer] = 0
        size = sum(map(len, frames))
        if len(waiting) >= self._max_messages or (
            self._max_bytes is not None and waiting and self._bytes[peer] + size > self._max_bytes
        ):
            return DROPPED
        waiting.append(frames)
        self._bytes[peer] += size
        return QUEUED

    def flush(self) -> list[bytes]:
        """Send what waits, as far as each peer's queue takes it; the peers found gone (their
        replies are dropped)."""
        gone = []
        for peer in list(self._waiting):
            waiting = self._waiting[peer]
            outcome = SENT
            while waiting and (outcome := self.send_now(waiting[0])) == SENT:
                self._bytes[peer] -= sum(map(len, waiting.popleft()))
            if outcome == GONE:
                gone.append(peer)
            if not waiting or outcome == GONE:
                del self._waiting[peer], self._bytes[peer]
        return gone
