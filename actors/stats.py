"""The stats actor: answers queries (stats, events, topics, health) without slowing ingest.

Counters come from memory (the dedup actor publishes them after every commit); events and
topics come from a read-only SQLite connection of its own, which WAL lets read while the dedup
actor writes. Health asks the supervisor which parts answer a ping in time.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pykka

from actors.flow import InFlight, LiveFigures
from actors.messages import EXPIRED, Freeze, Ping, QueryRequest
from actors.store import EventReader
from transport.queries import ConsumersQuery, DebugFreezeQuery, HealthQuery, Query, StatsQuery, TopicsQuery

if TYPE_CHECKING:
    from actors.reader import PackedReply

log = logging.getLogger(__name__)


class StatsActor(pykka.ThreadingActor):
    """Answers parsed queries with reply maps."""

    def __init__(
        self,
        path: Path,
        *,
        in_flight: InFlight,
        live: LiveFigures,
        liveness: Callable[[], dict[str, bool]],
        freeze: Callable[[str, float], None] | None = None,
        endpoints: dict[str, str] | None = None,
    ) -> None:
        """``freeze(actor, seconds)`` serves the ``debug_freeze`` test hook; None refuses it.
        ``endpoints`` (what the daemon binds, by kind) goes into health replies, so a client that
        knows only the query endpoint can find the others."""
        super().__init__()
        self._endpoints = dict(endpoints or {})
        self._path = path
        self._in_flight = in_flight
        self._live = live
        self._liveness = liveness
        self._freeze = freeze
        self._reader: EventReader | None = None

    def on_start(self) -> None:
        self._reader = EventReader(self._path)

    def on_stop(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Ping):
            return True
        if isinstance(message, Freeze):
            time.sleep(message.seconds)
            return None
        if isinstance(message, QueryRequest):
            answer_request(message, self.answer)
            return None
        return self.answer(message)

    def answer(self, query: Query) -> dict[str, Any] | PackedReply:
        """The reply map for one query. Pages of events are the reader actor's (on PostgreSQL a
        stats actor of its own, which packs them: :class:`actors.postgres.PostgresStatsActor`)."""
        assert self._reader is not None
        if isinstance(query, StatsQuery):
            return self.stats()
        if isinstance(query, TopicsQuery):
            if query.after is not None:
                return topics_page(self._reader.topics(query.after, query.limit), query.after)
            return {"topics": self._reader.topics()}
        if isinstance(query, HealthQuery):
            return self.health()
        if isinstance(query, ConsumersQuery):
            return {"consumers": self._reader.consumers()}
        if isinstance(query, DebugFreezeQuery) and self._freeze is not None:
            try:
                self._freeze(query.actor, query.seconds)
            except ValueError as exc:
                return {"error": str(exc)}
            return {"frozen": query.actor, "seconds": query.seconds}
        return {"error": f"unsupported query {query!r}"}

    def stats(self) -> dict[str, Any]:
        """The global counters; ``received`` includes events still in flight. ``storage_error``
        (the last commit's failure) is there only while commits are failing."""
        committed = self._live.committed
        in_flight = self._in_flight.value
        reply: dict[str, Any] = {
            "received": committed.get("received", 0) + in_flight,
            "unique_processed": committed.get("unique_processed", 0),
            "duplicate_dropped": committed.get("duplicate_dropped", 0),
            "rejected": committed.get("rejected", 0),
            "refused": self._live.refused,
            "late": committed.get("late", 0),
            "stored": committed.get("stored", 0),
            "expired": committed.get("expired", 0),
            "conflicting_duplicates": committed.get("conflicting_duplicates", 0),
            "topic_count": committed.get("topic_count", 0),
            "in_flight": in_flight,
            "in_flight_bytes": self._in_flight.bytes,
            "in_flight_peak": self._in_flight.peak,
            "buffered": sum(self._live.buffered),
            "commits": self._live.commits,
            "decoder_restarts": self._live.decoder_restarts,
            "uptime_s": round(time.monotonic() - self._live.started, 3),
        }
        if self._live.last_commit_error is not None:
            # Present only while commits fail: what is received is held, not yet stored.
            reply["storage_error"] = self._live.last_commit_error
        for key, error in (
            ("retention_error", self._live.sweep_error),
            ("checkpoint_error", self._live.checkpoint_error),
        ):
            if error is not None:  # present only while the last sweep, or checkpoint, failed
                reply[key] = error
        return reply

    def health(self) -> dict[str, Any]:
        """Which parts answer a ping in time, and whether the database takes writes."""
        alive = self._liveness()
        alive["stats"] = True  # it is answering this very query
        problems = [f"{name} is not answering" for name, ok in alive.items() if not ok]
        if self._live.fatal is not None:
            problems.append(self._live.fatal)
        if self._live.last_commit_error is not None:
            problems.append(f"the last commit failed: {self._live.last_commit_error}")
        problems += self._live.background_errors()
        if not os.access(self._path, os.W_OK):
            problems.append(f"database {self._path} is not writable")
        reply: dict[str, Any] = {
            "actors": alive,
            "database": str(self._path),
            "decoding": self._live.decoding,
            "endpoints": self._endpoints,
        }
        if problems:
            reply["error"] = "; ".join(problems)
        else:
            reply["status"] = "ok"
        return reply


def topics_page(topics: list[dict[str, Any]], after: str) -> dict[str, Any]:
    """The reply to a paged topics query: ``next`` is the last name, the ``after`` of the next page."""
    return {"topics": topics, "next": topics[-1]["topic"] if topics else after}


def answer_request(request: QueryRequest, answer: Callable[[Any], Any]) -> None:
    """Answer a :class:`QueryRequest` with ``answer(query)``, or with an error reply if that raised;
    with :data:`~actors.messages.EXPIRED`, and nothing done, once its deadline has passed."""
    if time.monotonic() >= request.deadline:
        request.done(EXPIRED)
        return
    try:
        reply = answer(request.query)
    except Exception as exc:
        log.exception("query %r failed", request.query)
        reply = {"error": f"query failed: {exc}"}
    request.done(reply)
