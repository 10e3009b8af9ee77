"""The gateway's HTTP connections: uvicorn's httptools protocol with a deadline on request headers.

uvicorn closes a connection that stays idle after a response (``timeout_keep_alive``), but sets
no limit on how long a request's headers may take: a client that connects and sends nothing, or
sends half a request line and stops (slowloris), held its connection and file descriptor for
ever. Here a request's headers must all have arrived within ``header_timeout_s`` of the
connection opening (its first request) or of the request's first byte (later ones; the gap
between requests is uvicorn's keep-alive timeout). Past that the client gets a 408 with a JSON
``error`` and the connection is closed. A body is not covered: the application reads it within
its own request budget (``[http] request_timeout_ms``).

uvicorn builds the protocol by import path (so worker processes can too); the gateway sets
:attr:`HeaderDeadlineProtocol.header_timeout_s` from ``[http] header_timeout_ms`` when it makes
its application, in each process.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["IMPORT_PATH", "HeaderDeadlineProtocol"]

IMPORT_PATH = "transport.http_protocol:HeaderDeadlineProtocol"


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` that answers 408 and closes when headers are overdue."""

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._headers_due: asyncio.TimerHandle | None = None
        self._cycles: list[Any] = []  # this connection's requests whose responses are not complete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._headers_due is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        self._cycles = [cycle for cycle in self._cycles if not cycle.response_complete]
        if self.cycle is not None:
            self._cycles.append(self.cycle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
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
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a 408 now would cut into the earlier request's response
            return
        body = json.dumps(
            {
                "error": f"the request's headers did not all arrive within {self.header_timeout_s:g} s "
                "([http] header_timeout_ms); send the whole request at once"
            }
        ).encode()
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
        )
        self.transport.close()
