"""Whether a daemon's endpoint completes a ZeroMQ handshake with this client, and if not, why.

A fire-and-forget PUSH socket queues frames for a peer that may not exist, so a publisher
pointed at the wrong port, or at a CURVE daemon that refuses its key, would report every event
sent. :func:`probe` connects a socket of the same type and security, watches its monitor for
the ZMTP handshake, and says what went wrong: nothing accepted the connection, the security
mechanisms differ, or the daemon refused the client's key. It sends nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from transport.client import (
    FLAG_HINTS,
    HANDSHAKE_EVENTS,
    HandshakeVerdict,
    KeyHints,
    connect,
    handshake_refusal,
    monitor_address,
)
from transport.security import SocketHook

NOTICE_AFTER_S = 1.0


@dataclass(frozen=True, slots=True)
class HandshakeFailure:
    """Why no handshake completed; ``str()`` gives the sentence, phrased to follow the endpoint.

    ``refused`` is True when the daemon turned this client's security down (its key, or CURVE on
    one side only): waiting longer cannot help, where a daemon not yet listening may still come.
    """

    message: str
    refused: bool

    def __str__(self) -> str:
        return self.message


def probe(
    endpoint: str,
    socket_type: int,
    configure: SocketHook | None,
    timeout: float,
    waiting: Callable[[], None] | None = None,
    hints: KeyHints = FLAG_HINTS,
) -> HandshakeFailure | None:
    """None once a handshake with ``endpoint`` succeeds; otherwise, after at most ``timeout``
    seconds, what went wrong. ``waiting`` is called once if there is no answer yet after
    :data:`NOTICE_AFTER_S`, to say what is being waited for; ``hints`` says where the user
    sets this client's keys.

    Raises :class:`ValueError` for an endpoint libzmq cannot connect to at all.
    """
    # A context of its own, ended here: `eventagg publish` forks its workers right after, and a
    # ZeroMQ context must not be alive across a fork.
    context: zmq.Context[Any] = zmq.Context()
    try:
        sock: zmq.Socket[Any] = context.socket(socket_type)
        sock.setsockopt(zmq.LINGER, 0)
        if configure is not None:
            configure(sock)
        # Attached before connect: a handshake done before the monitor would go unseen.
        monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS, monitor_address())
        try:
            connect(sock, endpoint)
            return _watch(monitor, timeout, waiting, hints)
        finally:
            monitor.close(linger=0)
            sock.close(linger=0)
    finally:
        context.term()


def unreachable(
    endpoint: str,
    socket_type: int,
    configure: SocketHook | None,
    timeout: float,
    waiting: Callable[[], None] | None = None,
    hints: KeyHints = FLAG_HINTS,
) -> str | None:
    """Why ``endpoint`` completes no handshake with this client, as a sentence naming it (an
    endpoint libzmq cannot connect to included); None when it does. See :func:`probe`."""
    try:
        failure = probe(endpoint, socket_type, configure, timeout, waiting, hints)
    except ValueError as exc:
        return str(exc)
    return None if failure is None else f"{endpoint} {failure}"


def _watch(
    monitor: zmq.Socket[Any], timeout: float, waiting: Callable[[], None] | None, hints: KeyHints
) -> HandshakeFailure | None:
    start = time.monotonic()
    deadline = start + timeout
    notice_at = start + NOTICE_AFTER_S if waiting is not None else math.inf
    verdict = HandshakeVerdict()
    while (now := time.monotonic()) < deadline:
        if now >= notice_at and waiting is not None:
            waiting()
            notice_at = math.inf
        if not monitor.poll(max(1, math.ceil((min(deadline, notice_at) - now) * 1000))):
            continue
        event = recv_monitor_message(monitor)
        kind = int(event["event"])
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return None
        if not verdict.refused(kind):
            continue  # connected, or cut off without a reason: ZeroMQ connects again by itself
        return HandshakeFailure(handshake_refusal(kind, event["value"], hints), refused=True)
    if verdict.connected:
        # As a stopped (SIGSTOP), hung or swamped daemon does: the kernel takes the connection for it.
        return HandshakeFailure(
            f"took the connection but completed no handshake within {timeout:g} s: the process there is not"
            " answering (stopped, hung or overloaded: see its log, and whether it runs) or speaks no ZeroMQ",
            refused=False,
        )
    return HandshakeFailure(
        f"accepted no connection within {timeout:g} s: is the daemon running, and is this its endpoint?", refused=False
    )
