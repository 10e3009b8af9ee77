"""The daemon's ZAP handler: who may connect, and which routing id each connection gets.

Theory of operation. libzmq asks a ZAP handler (RFC 27, an inproc socket at
``inproc://zeromq.zap.01`` in the same context) about every new connection to a server socket
that has ``ZMQ_ZAP_DOMAIN`` set, for the NULL mechanism too, and for every CURVE connection.
This handler answers three things:

* **Allowed?** NULL: yes (whether NULL may be used at all is decided by the bind checks in
  :mod:`transport.security`). CURVE: only a client key in the current authorized set.
* **User-Id**: the client's public key in Z85 (empty for NULL). libzmq attaches it to every
  message frame of that connection (``Frame.get("User-Id")``), so the servers can refuse the
  messages of a key revoked after the connection was made (:class:`ConnectionGate`).
* **Routing id**: a fresh ``0x01`` + 15 random bytes, as the ZAP metadata property
  ``Identity``. libzmq parses ZAP metadata like the peer's own handshake metadata, so the value
  it read last becomes the routing id a ROUTER files the connection under. That matters because
  a ROUTER aborts the whole process (``Assertion failed: ok (src/socket_base.cpp:2113)`` in
  libzmq 4.3.5) when it auto-assigns a routing id (``0x00`` + a 32-bit counter started from
  libc ``rand()``) that a peer has already claimed with ``ZMQ_ROUTING_ID``. Peer-claimed ids that
  are taken are refused, auto ids never checked. An id given here is never ``0x00``-prefixed, so
  it cannot meet an auto id, and never equals a claimed one that is live (2^120 values).

  With CURVE the peer's metadata (in INITIATE) is always read *before* the ZAP reply, so the
  ZAP id always wins. With NULL the peer's READY may come after the reply and then its claimed
  (or empty, hence auto) id stands; libzmq clients send READY at once, so holding NULL replies
  for :data:`NULL_REPLY_DELAY_S` lets the ZAP id win for them. What is left, a hand-written
  ZMTP peer that delays its READY on purpose, meets auto ids whose counter starts at an
  unpredictable value: :func:`seed_libc_rand` seeds libc ``rand()`` from ``os.urandom`` before
  any ROUTER is made (libzmq never seeds it, so unseeded ids are the same in every process).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils import z85

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"eventagg"
NULL_REPLY_DELAY_S = 0.005
POLL_MS = 100
ROUTING_ID_PREFIX = b"\x01"  # anything but 0x00, which libzmq keeps for the ids it makes up
REVOKED = "this client's key is no longer authorized (revoked on the server); ask its operator to authorize it again"


def seed_libc_rand() -> None:
    """Seed libc ``rand()`` from ``os.urandom``, so ROUTERs made after this start at unpredictable ids."""
    try:
        libc = ctypes.CDLL(None)
        libc.srand(ctypes.c_uint(int.from_bytes(os.urandom(4), "big")))
    except (OSError, AttributeError) as exc:  # no libc symbols (an unusual platform): keep going
        log.warning("could not seed libc rand() (%s); ZeroMQ's automatic routing ids stay predictable", exc)


def new_routing_id() -> bytes:
    """A routing id that no auto-assigned one can equal and no claimed one is likely to."""
    return ROUTING_ID_PREFIX + os.urandom(15)


def zmtp_property(name: bytes, value: bytes) -> bytes:
    """One ZMTP metadata property: name length (1 byte), name, value length (4 bytes), value."""
    return bytes([len(name)]) + name + len(value).to_bytes(4, "big") + value


class ZapHandler:
    """A thread answering libzmq's ZAP requests for one context; see the module docstring.

    ``authorized`` returns the current set of Z85 client keys (None when CURVE is off); it is
    read per request, so a reload takes effect for the next connection.
    """

    def __init__(self, context: zmq.Context[Any], authorized: Callable[[], frozenset[bytes] | None]) -> None:
        self._authorized = authorized
        # Bound here, on the caller's thread, so it is in place before any server socket binds.
        self._socket: zmq.Socket[Any] = context.socket(zmq.ROUTER)
        self._socket.linger = 0
        self._socket.bind(ZAP_ENDPOINT)
        self._held: deque[tuple[float, list[bytes]]] = deque()  # NULL replies waiting out the delay
        self._stopping = threading.Event()
        self._wake_read, self._wake_write = os.pipe()  # stop() writes a byte: the poll ends at once
        self._thread = threading.Thread(target=self._run, name="zap", daemon=True)

    def start(self) -> None:
        """Start answering."""
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (which closes the socket); call before the context is terminated."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        os.write(self._wake_write, b"\0")
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _run(self) -> None:
        sock = self._socket
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                wait_ms = POLL_MS
                if self._held:
                    wait_ms = max(0, min(POLL_MS, int((self._held[0][0] - time.monotonic()) * 1000) + 1))
                if sock in dict(poller.poll(wait_ms)):
                    while True:
                        try:
                            request = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._answer(request)
                now = time.monotonic()
                while self._held and self._held[0][0] <= now:
                    sock.send_multipart(self._held.popleft()[1])
        except Exception:
            log.exception("the ZAP handler failed; new connections can no longer be authenticated")
        finally:
            sock.close(linger=0)

    def _answer(self, request: list[bytes]) -> None:
        # ROUTER framing: the requesting pipe's id, the empty delimiter, then the ZAP frames.
        if len(request) < 8 or request[1] != b"":
            log.error("malformed ZAP request (%d frames) ignored", len(request))
            return
        envelope, (version, request_id, _domain, _address, _identity, mechanism, *credentials) = (
            request[:2],
            request[2:],
        )
        head = [*envelope, version, request_id]
        identity = zmtp_property(b"Identity", new_routing_id())
        if version != b"1.0":
            self._socket.send_multipart([*head, b"400", b"bad ZAP version", b"", b""])
        elif mechanism == b"NULL":
            reply = [*head, b"200", b"OK", b"", identity]
            self._held.append((time.monotonic() + NULL_REPLY_DELAY_S, reply))
        elif mechanism == b"CURVE" and len(credentials) == 1 and len(credentials[0]) == 32:
            key = z85.encode(credentials[0])
            allowed = self._authorized()
            if allowed is not None and key in allowed:
                self._socket.send_multipart([*head, b"200", b"OK", key, identity])
            else:
                self._socket.send_multipart([*head, b"400", b"key not authorized", b"", b""])
        else:
            self._socket.send_multipart([*head, b"400", b"mechanism not allowed", b"", b""])


class ConnectionGate:
    """Per-message check that a CURVE connection's key is still authorized (revocation of live ones).

    ``authorized`` is the same callable the :class:`ZapHandler` uses; None (CURVE off) lets all in.
    """

    def __init__(self, authorized: Callable[[], frozenset[bytes] | None]) -> None:
        self._authorized = authorized

    def receive(self, sock: zmq.Socket[Any]) -> tuple[list[bytes], str | None]:
        """One multipart message without waiting (raises ``zmq.Again``), and None or why it is refused."""
        parts, _key, refused = self.receive_keyed(sock)
        return parts, refused

    def receive_keyed(self, sock: zmq.Socket[Any]) -> tuple[list[bytes], bytes | None, str | None]:
        """Like :meth:`receive`, with the sender's client key (None while CURVE is off), for a
        server that keeps sending to the connection unasked (see :meth:`allows`)."""
        allowed = self._authorized()
        if allowed is None:
            return sock.recv_multipart(zmq.NOBLOCK), None, None
        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        try:
            user = str(frames[-1].get("User-Id")).encode()
        except zmq.ZMQError:  # no User-Id: a connection our ZAP handler did not let in
            user = b""
        return [frame.bytes for frame in frames], user, None if user in allowed else REVOKED

    def allows(self, key: bytes | None) -> bool:
        """Whether a connection with this client key may still be served: always while CURVE is
        off; with it, while the key is among the authorized ones (a reload may revoke it)."""
        allowed = self._authorized()
        return allowed is None or key in allowed
