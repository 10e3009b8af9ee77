"""The gateway's HTTP connections: uvicorn's httptools protocol with deadlines on request headers
and on a client that reads nothing of its response.

uvicorn closes a connection that stays idle after a response (``timeout_keep_alive``), but sets
no limit on how long a request's headers may take: a client that connects and sends nothing, or
sends half a request line and stops (slowloris), held its connection and file descriptor for
ever. Here a request's headers must all have arrived within ``header_timeout_s`` of the
connection opening (its first request) or of the request's first byte (later ones; the gap
between requests is uvicorn's keep-alive timeout). Past that the client gets a 408 with a JSON
``error`` and the connection is closed; and the request line and headers may take
``MAX_HEAD_BYTES`` in all (httptools sets no bound), past which the client gets a 431. A body
is read by the application within its own request budget (``[http] request_timeout_ms``); a
response that goes out before its request's body has all come closes the connection, or the
rest of the body would be read and dropped, for as long as the client sent it a byte at a time.
An HTTP/1.0 client's response of no stated length (an event stream) goes out unchunked, ended by
the close: HTTP/1.0 has no chunked encoding, which uvicorn would use.

Nor did uvicorn bound how long a response may wait for a client that reads none of it: each
such client held its whole response (a page of events is up to 4 MiB) in the gateway for as long
as it kept the connection open. Here, once the socket's buffer is full (the transport pauses
writing), the client must take some of it within every ``write_timeout_s``, or the connection is
dropped, with what was waiting for it. A slow reader that keeps taking some is never cut off.

uvicorn builds the protocol by import path (so worker processes can too); the gateway sets
:attr:`HeaderDeadlineProtocol.header_timeout_s` from ``[http] header_timeout_ms`` and
:attr:`HeaderDeadlineProtocol.write_timeout_s` from ``[http] write_timeout_ms`` when it makes its
application, in each process.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import struct
import sys
import termios
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["IMPORT_PATH", "HeaderDeadlineProtocol"]

IMPORT_PATH = "transport.http_protocol:HeaderDeadlineProtocol"
# The most a request line and its headers may take: httptools sets no bound, so a client could
# make the gateway hold as much as it sent in the header timeout (30 MB headers: 418 MB RSS).
MAX_HEAD_BYTES = 1 << 20


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` that answers 408 and closes when headers are overdue, drops a
    connection whose client has taken nothing of its response for ``write_timeout_s``, and closes
    one whose response went out before its request's body had all come."""

    header_timeout_s: float = 10.0
    write_timeout_s: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._headers_due: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # of the request whose headers are awaited
        self._unread_due: asyncio.TimerHandle | None = None
        self._unread_bytes = 0  # what the client had not taken when the clock last started
        self._cycles: list[Any] = []  # this connection's requests whose responses are not complete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._headers_due is not None and not self.transport.is_closing():
            # Awaiting headers: this read is head up to the blank line that ends them, if it has one.
            end = data.find(b"\r\n\r\n")
            if self._head_bytes + (len(data) if end < 0 else end + 4) > MAX_HEAD_BYTES:
                self._head_too_large()
                return
            self._head_bytes += len(data)  # reset as the headers complete, in the parse below
            super().data_received(data)
            return
        super().data_received(data)
        if self._headers_due is not None and not self.transport.is_closing():
            # A request began in this read, after the end of the one before it: at most this much head.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._head_too_large()

    def _head_too_large(self) -> None:
        self._disarm()
        self._refuse(
            b"431 Request Header Fields Too Large",
            f"the request line and headers passed {MAX_HEAD_BYTES} bytes; send shorter ones",
        )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._headers_due is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._head_bytes = 0
        authority = _authority_of(self.url)
        hosts = sum(name == b"host" for name, _ in self.headers)
        if authority is not None and (hosts == 1 or (hosts == 0 and self.parser.get_http_version() == "1.0")):
            # RFC 9112 3.2.2: a request whose target names its host (absolute-form, as sent to a
            # proxy) is for that host, whatever its Host says; so that is the Host checked. Two
            # Hosts, or HTTP/1.1 without one, are left for the gateway's 400 (RFC 9112 3.2).
            self.headers[:] = [(name, value) for name, value in self.headers if name != b"host"]
            self.headers.append((b"host", authority))
        earlier = self.cycle
        super().on_headers_complete()
        self._cycles = [cycle for cycle in self._cycles if not cycle.response_complete]
        if self.cycle is not None and self.cycle is not earlier:
            self._cycles.append(self.cycle)
            _close_when_answered_early(self.cycle)
            if self.scope.get("http_version") == "1.0":
                _close_delimited(self.cycle)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._unread_due is None:
            self._start_unread_clock()

    def _start_unread_clock(self) -> None:
        self._unread_bytes = self._unsent()
        self._unread_due = self.loop.call_later(self.write_timeout_s, self._unread_overdue)

    def _unsent(self) -> int:
        """Bytes not yet taken by the client: the transport's buffer and the kernel's send queue.

        The kernel's counts too: with a large send buffer the socket becomes writable again only
        once a third of it is free, so a slow reader's progress shows there long before here.
        """
        size = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                size += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            except (OSError, ValueError):
                pass
        return size

    def resume_writing(self) -> None:
        self._stop_unread_clock()
        super().resume_writing()

    def _stop_unread_clock(self) -> None:
        if self._unread_due is not None:
            self._unread_due.cancel()
            self._unread_due = None

    def _unread_overdue(self) -> None:
        self._unread_due = None
        if self._unsent() < self._unread_bytes:
            # The client took some (the transport resumes writing only once most is taken).
            self._start_unread_clock()
            return
        # abort, not close: close would keep the unread response until it could be sent.
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._stop_unread_clock()
        super().connection_lost(exc)
        # uvicorn tells only the connection's latest request that the client left: a request
        # pipelined behind an endless response (an event stream) would leave that response
        # writing to nobody, its slot and subscription held, until a write failed.
        for cycle in self._cycles:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self._cycles = []

    def _arm(self) -> None:
        self._headers_due = self.loop.call_later(self.header_timeout_s, self._headers_overdue)

    def _disarm(self) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None

    def _headers_overdue(self) -> None:
        self._headers_due = None
        if self.transport.is_closing():
            return
        self._refuse(
            b"408 Request Timeout",
            f"the request's headers did not all arrive within {self.header_timeout_s:g} s "
            "([http] header_timeout_ms); send the whole request at once",
        )

    def send_400_response(self, msg: str) -> None:
        # uvicorn's refusal of what httptools cannot parse, as JSON like every other refusal.
        self._refuse(
            b"400 Bad Request",
            f"{msg.rstrip('.')}: not a well-formed HTTP/1.1 request (its request line, a header, or its"
            " framing, such as Content-Length with Transfer-Encoding, or a request target over 64 KiB)",
        )

    def _refuse(self, status: bytes, error: str) -> None:
        """Answer ``status`` with a JSON error, as the gateway's own refusals are, and close."""
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # an answer now would cut into an earlier request's response
            return
        body = json.dumps({"error": error}).encode()
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
        )
        self.transport.close()


def _close_when_answered_early(cycle: Any) -> None:
    """Make a response that starts before its request's body has all come (a refusal, a body too
    slow, a GET declaring one) say ``connection: close`` and close the connection once sent.

    Kept open, the rest of the body was read and dropped for as long as the client chose to send
    it, a byte now and then holding the connection for ever (each byte put off the keep-alive
    timeout). Said in the response, so a client does not send its next request down a connection
    about to close.
    """
    send = cycle.send

    async def send_closing_early(message: Any) -> None:
        if message["type"] == "http.response.start" and cycle.more_body:
            cycle.keep_alive = False  # uvicorn adds the header, and closes once the response is sent
        await send(message)

    cycle.send = send_closing_early


def _close_delimited(cycle: Any) -> None:
    """Send an HTTP/1.0 request's response of no stated length (an event stream) as it is, ended
    by closing the connection (RFC 9112 6.3), not in chunks.

    HTTP/1.0 has no chunked encoding, and uvicorn chunks whatever has no Content-Length: an
    HTTP/1.0 client (``curl -0``, or nginx's ``proxy_pass`` by default) took the chunk sizes for
    part of the stream. uvicorn already closes every HTTP/1.0 connection after its response.
    """
    send = cycle.send
    unbounded = False

    async def send_close_delimited(message: Any) -> None:
        nonlocal unbounded
        if message["type"] == "http.response.start":
            names = {name.lower() for name, _ in message.get("headers", [])}
            unbounded = (
                not names & {b"content-length", b"transfer-encoding"}
                and cycle.scope["method"] != "HEAD"
                and message["status"] not in (204, 304)
            )
            if unbounded:
                cycle.chunked_encoding = False
                cycle.expected_content_length = sys.maxsize  # uvicorn counts a plain body down
        elif unbounded and not message.get("more_body", False):
            cycle.expected_content_length = len(message.get("body", b""))  # this is the end
        await send(message)

    cycle.send = send_close_delimited


def _authority_of(target: bytes) -> bytes | None:
    """The ``host[:port]`` of an absolute-form request target (``http://host:port/path``); None
    for the usual origin-form (``/path``) and for a target that does not parse."""
    if target.startswith(b"/") or b"://" not in target:  # origin-form, or "*" (OPTIONS)
        return None
    try:
        parsed = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        return None
    if not parsed.host:
        return None
    host = b"[" + parsed.host + b"]" if b":" in parsed.host else parsed.host
    return host if parsed.port is None else host + b":" + str(parsed.port).encode()
