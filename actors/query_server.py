"""The query server: one thread that owns the REP socket and asks the stats actor for answers.

Every request gets exactly one reply (REP demands it): a malformed one gets ``{"error": ...}``,
and a stats actor that does not answer in ``[query] timeout_ms`` gets the client an error reply
too, so the socket never wedges. It runs apart from ingest, so no query can stall it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import msgpack
import pykka
import zmq

from transport.config import QueryConfig
from transport.logs import RateLimitedLog
from transport.queries import QueryError, parse_query
from transport.security import SocketHook

log = logging.getLogger(__name__)

POLL_MS = 100


class QueryServer:
    """Binds the query endpoint and answers requests on its own thread."""

    def __init__(
        self,
        context: zmq.Context[Any],
        config: QueryConfig,
        stats: pykka.ActorRef[Any],
        secure: SocketHook | None = None,
    ) -> None:
        self._config = config
        self._stats = stats
        self._warn = RateLimitedLog(log)
        self._stopping = threading.Event()
        self._socket = context.socket(zmq.REP)
        self._socket.setsockopt(zmq.MAXMSGSIZE, 1_048_576)
        if secure is not None:
            secure(self._socket)
        self._socket.bind(config.bind)
        self._thread = threading.Thread(target=self._run, name="query", daemon=True)
        self.answered = 0

    def start(self) -> None:
        """Start answering."""
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop answering and close the socket."""
        self._stopping.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self._socket.poll(POLL_MS, zmq.POLLIN):
                    continue
                parts = self._socket.recv_multipart()
                reply = self._answer(parts)
                try:
                    packed = msgpack.packb(reply, use_bin_type=True)
                except (TypeError, ValueError) as exc:
                    packed = msgpack.packb({"error": f"reply could not be encoded: {exc}"})
                self._socket.send(packed)
                self.answered += 1
        except Exception:
            log.exception("query server failed; queries are no longer answered")
            raise
        finally:
            self._socket.close(linger=100)

    def _answer(self, parts: list[bytes]) -> dict[str, Any]:
        if len(parts) != 1:
            return self._error(f"a request must be one frame, not {len(parts)}")
        try:
            request = msgpack.unpackb(parts[0], raw=False, strict_map_key=False)
        except Exception as exc:
            return self._error(f"request is not valid msgpack ({type(exc).__name__})")
        try:
            query = parse_query(request, self._config.max_limit)
        except QueryError as exc:
            return self._error(str(exc))
        try:
            reply: dict[str, Any] = self._stats.ask(query, block=True, timeout=self._config.timeout_ms / 1000)
            return reply
        except pykka.Timeout:
            return {"error": f"the stats actor did not answer within {self._config.timeout_ms} ms"}
        except pykka.ActorDeadError:
            return {"error": "the stats actor is not running; the daemon is stopping or broken"}
        except Exception as exc:
            log.exception("query %r failed", query)
            return {"error": f"query failed: {exc}"}

    def _error(self, message: str) -> dict[str, Any]:
        self._warn.warning("bad query: %s", message)
        return {"error": message}
