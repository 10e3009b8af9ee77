"""The HTTP gateway: the original HTTP API, Prometheus metrics and a health check, in front of the daemon.

A FastAPI application (:func:`create_app`) that ``scripts/gateway.py`` serves with uvicorn. It
is a client of the daemon like any other and speaks only its public protocols:

* ``POST /publish`` checks every event with the daemon's own rules
  (:func:`transport.schema.check_fields`), then sends them through the publisher library in
  acknowledged mode and answers only once the daemon acknowledged the commit.
* ``GET /events``, ``/stats``, ``/topics``, ``/healthz`` and ``/metrics`` are one query each to
  the query endpoint (:class:`transport.client.QueryClient`).

Both use CURVE when the config's ``[security]`` gives a client certificate. Every route, these
and FastAPI's own pages, refuses a query parameter it does not declare with a 400
(:mod:`transport.gateway_query`).

Threads: route handlers run on the event loop; every call to the daemon runs on a worker thread
(``anyio.to_thread``), since the ZeroMQ clients block. A :class:`Publisher` or a
:class:`QueryClient` is used by one thread at a time: :class:`DaemonLink` keeps idle ones in
pools and lends them out, and closes a query client left unused ``QUERY_CLIENT_IDLE_S``. At
most ``[http] publishers`` publishes wait for acknowledgements at once; a request that finds
none free waits for one within its timeout.

Never hanging: a request has ``[http] request_timeout_ms`` in all. A publish that gets no
acknowledgement in time spends a short part of that budget asking the query endpoint for
stats, to tell a daemon that is away (503) from one that is up but slow (504). The publisher
that failed is dropped rather than pooled (its unacknowledged batches must not leak into the
next request's counts), so the next request starts on a fresh connection: the gateway recovers
by itself when the daemon returns. Events of a request answered 503 or 504 may or may not have
been stored; publishing them again is safe, since the daemon drops duplicates.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import ipaddress
import json
import logging
import math
import os
import queue
import re
import signal
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
import msgpack
import msgspec
import zmq
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from transport import metrics
from transport.client import (
    CONFIG_HINTS,
    GaveUp,
    HandshakeRefused,
    NoAnswer,
    QueryClient,
    QueryClientError,
    connectable,
)
from transport.config import Config, load_config
from transport.descriptors import CHECK_EVERY_S as DESCRIPTOR_CHECK_S
from transport.descriptors import DescriptorWatch, descriptors_free, exhausted_message, out_of_descriptors
from transport.gateway_query import QueryCheck, in_digits
from transport.gateway_stream import (
    STREAMS_FOLDER_ENV,
    SUBSCRIBER_BYTES,
    EventStreamResponse,
    OpenStreams,
    StreamPump,
)
from transport.handshake import probe
from transport.http_protocol import HeaderDeadlineProtocol
from transport.logs import setup_logging
from transport.publisher import (
    BatchRefused,
    BatchResult,
    DeliveryFailed,
    Publisher,
    PublisherError,
    PublisherRefused,
    PublishTimeout,
)
from transport.queries import MAX_CURSOR, MAX_TOPIC_AFTER, QueryError, check_query_topic, parse_query
from transport.replies import MapPairs
from transport.schema import (
    MAX_PAYLOAD_DEPTH,
    InvalidEvent,
    check_fields,
    pack_payload,
    too_deep,
    type_name,
)
from transport.security import (
    BindHostError,
    InsecureBindError,
    SocketHook,
    bind_is_local,
    curve_client_from_config,
)
from transport.subscriber import MAX_FILTER_TOPICS, Subscriber
from transport.zap import REVOKED

log = logging.getLogger(__name__)

HANDSHAKE_CHECK_S = 10.0  # how long the start-up check waits for the daemon's endpoints
# How long a stream the daemon did not answer in time waits to learn whether it refuses the
# gateway's handshake (a refusal comes at once; only a daemon that is away takes it all).
STREAM_PROBE_S = 1.0
# The end of a publish's 503 when the daemon refuses this gateway's key (duplicates are dropped).
AGAIN_ONCE_IT_DOES = "publishing again once it does is safe"

T = TypeVar("T")

DEFAULT_PAGE = 1000
# Part of a publish's budget kept for the health probe that tells 503 from 504.
MAX_PROBE_S = 1.0
# A publish is sent only with at least this share of its timeout left for the acknowledgement,
# beyond the probe's part: else it is refused with nothing sent (see DaemonLink.reserve_s).
MIN_PUBLISH_SHARE = 0.25
# What a batch message adds around its packed events (map header, "batch", its id, "events",
# the array header), rounded up.
BATCH_OVERHEAD_BYTES = 32
# After SIGINT or SIGTERM, a request in progress answers 503 this long after the signal at most:
# within the 10 s uvicorn then waits for it (GRACEFUL_SHUTDOWN_S in transport/commands/gateway.py)
# before cancelling it into a plain-text 500.
STOPPING_GRACE_S = 8.0
# How often a wait for the daemon looks whether the gateway is stopping.
STOP_POLL_S = 0.1
QUERY_THREADS = 16  # queries to the daemon at once per gateway process (each holds a thread)
KEEPALIVE_S = 15.0  # a comment line on an event stream this long quiet, so proxies keep it open
# Free descriptors a new publisher needs: it has a ZeroMQ context of its own, whose threads libzmq
# starts with its first socket and which aborts the whole process (an assertion in its poller)
# when one of their descriptors cannot be had. With fewer free it is not made: 503. (Measured:
# 9 for the context, the socket, its monitor's pair of sockets and its connection; with 2 to 4
# free the gateway aborted.)
NEW_PUBLISHER_DESCRIPTORS = 12
# Free descriptors a new query client needs: its REQ socket's mailbox, those of its monitor's
# pair of sockets, and the TCP connection, which libzmq's I/O thread makes after connect()
# returned: when it cannot, nothing fails, the query waits its whole timeout and is told the
# daemon did not answer. With fewer free it is not made: 503 at once. (Measured: 4; with 3 free
# the query waited. Two more for a connection accepted, or another client made, meanwhile.)
NEW_QUERY_DESCRIPTORS = 6
MAX_QUOTED_PATH = 200  # most characters of an unknown path a 404 quotes back
# A pooled query client unused this long is closed (looked for every third of it, so closed within
# 45 to 60 s). Idle, it holds its descriptors, and its monitor, read only within requests, grows
# by about 130 bytes an event while a daemon (or whatever took its port) cuts its handshakes: 7 a
# second, some 3 MB an hour, without bound on a gateway no query reached for days. The next
# query after a quiet minute makes a new one, as the first query did.
QUERY_CLIENT_IDLE_S = 45.0


class GatewayError(Exception):
    """A request that gets a non-200 answer: ``status`` and a JSON body with at least ``error``."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"error": message, **extra}


# -- what the daemon is asked --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublishOutcome:
    """The daemon's acknowledgements of one request's events, added up."""

    received: int
    new: int
    duplicates: int
    conflicting: list[int]
    rejected: list[dict[str, Any]]


class DaemonLink:
    """The gateway's connections to one daemon: pools of publishers and query clients, lent one per thread."""

    def __init__(self, config: Config) -> None:
        self.timeout = config.http.request_timeout_ms / 1000
        # Of a publish's budget: the end kept for the probe that tells 503 from 504, and the least
        # left at sending (probe included) for the daemon to have a fair chance to acknowledge.
        self.probe_s = min(MAX_PROBE_S, self.timeout / 4)
        self.reserve_s = self.probe_s + MIN_PUBLISH_SHARE * self.timeout
        self.ack_endpoint = connectable(config.ingest.ack_bind)
        self.query_endpoint = connectable(config.query.bind)
        self.subscribe_endpoint = connectable(config.subscribe.bind)
        self._secure: SocketHook | None = curve_client_from_config(config)
        self._ingest = config.ingest
        self._max_events = config.http.max_events
        self._publishers: queue.SimpleQueue[Publisher] = queue.SimpleQueue()
        self._queries = IdleQueryClients()
        self._closed = False
        # Set by stop(): the time.monotonic() by which requests in progress give up and answer 503.
        self._stop_by: float | None = None
        # endpoint -> why the daemon refused this gateway's security there, from the start-up
        # check; dropped once the endpoint answers (its key authorized since, say).
        self._refused: dict[str, str] = {}
        self.descriptors = DescriptorWatch("the gateway process")
        # Held while free descriptors are counted for a new connection to the daemon, and while a
        # new publisher's context starts (see _take_publisher).
        self._new_connection = threading.Lock()

    def exhausted(self, doing: str) -> GatewayError:
        """503 for a request that could not ``doing`` for want of a free descriptor, the warning
        logged now (the watch would say it only at its next count); no traceback: the gateway
        serves again as soon as descriptors are free."""
        self.descriptors.check(time.monotonic(), force=True)
        return GatewayError(503, exhausted_message("the gateway", doing))

    # -- stopping

    def stop(self, grace: float = STOPPING_GRACE_S) -> None:
        """The gateway is stopping: waits for the daemon end ``grace`` seconds from now at most, with
        :func:`stopping` (503); requests not yet sent are not sent. Safe to call from a signal handler."""
        if self._stop_by is None:
            self._stop_by = time.monotonic() + grace

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop_by is not None

    def stop_due(self) -> bool:
        """Whether requests in progress must give up now, the gateway stopping."""
        return self._stop_by is not None and time.monotonic() >= self._stop_by

    # -- queries

    def query(self, request: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """One query's reply map (which may hold ``error``); :class:`GatewayError` 503 if no answer came
        within ``timeout`` seconds (by default the whole ``request_timeout_ms``)."""
        wait = self.timeout if timeout is None else timeout
        if self._stop_by is not None:
            if self.stop_due():
                raise stopping(sent=False)
            wait = min(wait, self._stop_by - time.monotonic())
        if wait <= 0:
            raise GatewayError(
                503, f"no time was left to ask the daemon within {self.timeout:g} s ([http] request_timeout_ms)"
            )
        client = self._queries.take()  # a pooled one holds its descriptors: no check
        if client is None:
            if not self._descriptors_free(NEW_QUERY_DESCRIPTORS):
                raise self.exhausted(f"connect to the daemon's query endpoint {self.query_endpoint}") from None
            client = QueryClient(self.query_endpoint, timeout=wait, configure=self._secure, hints=CONFIG_HINTS)
        client.timeout = wait
        try:
            reply = client.request(request, give_up=self.stop_due)
        except zmq.ZMQError as exc:
            client.close()
            if out_of_descriptors(exc):  # its socket could not be made
                raise self.exhausted(f"connect to the daemon's query endpoint {self.query_endpoint}") from None
            raise
        except GaveUp:
            client.close()
            raise GatewayError(
                503, "the gateway is stopping; the daemon did not answer in time: ask again on a running gateway"
            ) from None
        except HandshakeRefused as exc:
            client.close()
            # Remembered as the start-up check's refusals are: a publish that gets no
            # acknowledgement then names it too (the key is the same on both endpoints).
            self._refused[self.query_endpoint] = str(exc)
            raise GatewayError(503, not_taken(str(exc))) from None
        except NoAnswer:
            client.close()
            raise GatewayError(
                503,
                self._refusal(self.query_endpoint)
                or f"the daemon's query endpoint {self.query_endpoint} did not answer within {wait:.3g} s",
            ) from None
        except (QueryClientError, ValueError, TypeError, msgpack.UnpackException) as exc:
            client.close()  # a REQ socket after a bad reply is not worth reusing
            raise GatewayError(502, f"the daemon sent a reply the gateway cannot read: {exc}") from None
        self._refused.pop(self.query_endpoint, None)
        self._return(self._queries, client)
        return reply

    def close_idle_queries(self) -> None:
        """Close the pooled query clients unused for ``QUERY_CLIENT_IDLE_S`` or longer (never one lent
        out: those are not in the pool). Blocks while libzmq stops each one's monitor: run it on a
        worker thread."""
        for client in self._queries.returned_before(time.monotonic() - QUERY_CLIENT_IDLE_S):
            try:
                client.close()
            except zmq.ZMQError:  # logged, and the rest still closed: none is left unclosed
                log.exception("closing an idle query client failed")

    # -- publishing

    def publish(self, events: list[dict[str, Any]], deadline: float) -> PublishOutcome:
        """Send checked events and wait for their acknowledgement until ``deadline`` (time.monotonic).

        Raises :class:`GatewayError`: 503 (daemon away, or less than ``reserve_s`` left before
        sending: nothing sent), 504 (daemon up, no acknowledgement in time), 502 (the daemon
        refused the batch).
        """
        if self.stopping:
            raise stopping(sent=False)
        left = deadline - time.monotonic()
        if left < self.reserve_s:  # the worker thread came late: no fair chance, so do not send
            raise out_of_time(left, self)
        try:
            publisher = self._take_publisher()
        except zmq.ZMQError as exc:
            if out_of_descriptors(exc):
                raise self.exhausted(f"connect to the daemon's {self.ack_endpoint}; nothing was sent") from None
            raise
        probe_s = self.probe_s
        sent_at = time.monotonic()
        ok = False
        try:
            publisher.results.clear()
            publisher.publish_many(events, timeout=max(0.001, deadline - probe_s - time.monotonic()))
            self._flush(publisher, deadline - probe_s)
            results = sorted(publisher.results, key=lambda result: result.batch_id)
            ok = True
        except PublisherRefused as exc:  # its handshake refused: said at once, not at the timeout
            refusal = self._refused[self.ack_endpoint] = f"{self.ack_endpoint} {exc.refusals[self.ack_endpoint]}"
            raise GatewayError(503, f"{not_taken(refusal)}; {AGAIN_ONCE_IT_DOES}") from None
        except (PublishTimeout, DeliveryFailed):
            raise self._no_acknowledgement(deadline, sent_at) from None
        except BatchRefused as exc:
            if exc.reason == REVOKED:  # refused for this gateway's key, not for these events
                raise GatewayError(503, f"{not_taken(exc.reason)}; {AGAIN_ONCE_IT_DOES}") from None
            raise GatewayError(502, f"the daemon refused the events: {exc.reason}") from None
        except InvalidEvent as exc:  # checked before, so only if the rules changed under us
            raise GatewayError(400, str(exc)) from None
        except PublisherError as exc:
            raise GatewayError(503, f"cannot publish to {self.ack_endpoint}: {exc}") from None
        except zmq.ZMQError as exc:  # a socket made again after a failed delivery, say
            if out_of_descriptors(exc):
                raise self.exhausted(
                    f"keep its connection to the daemon's {self.ack_endpoint}; the events may or may not be "
                    "stored: publishing them again is safe"
                ) from None
            raise
        finally:
            if ok:
                self._refused.pop(self.ack_endpoint, None)
                self._return(self._publishers, publisher)
            else:
                publisher.close(flush=False)
        return _add_up(results, len(events))

    def _flush(self, publisher: Publisher, until: float) -> None:
        """Wait for every acknowledgement until ``until`` (time.monotonic), in slices of
        ``STOP_POLL_S`` so that a stopping gateway answers in time: :func:`stopping` (503) then."""
        while True:
            try:
                publisher.flush(max(0.001, min(until, time.monotonic() + STOP_POLL_S) - time.monotonic()))
                return
            except PublishTimeout:
                if self.stop_due():
                    raise stopping(sent=True) from None
                if time.monotonic() >= until:
                    raise

    def _take_publisher(self) -> Publisher:
        try:
            return self._publishers.get_nowait()
        except queue.Empty:
            pass
        # One at a time, so two new publishers do not count the same free descriptors, nor a
        # query's count take them while a publisher's context starts. (A connection accepted
        # meanwhile may still take one: the margin is for that.)
        with self._new_connection:
            if not descriptors_free(NEW_PUBLISHER_DESCRIPTORS):
                raise zmq.ZMQError(errno.EMFILE)
            return self._make_publisher()

    def _descriptors_free(self, count: int) -> bool:
        """Whether ``count`` descriptors are free, counted apart from a new publisher's count and
        start (which this count, opening ``count`` descriptors for a moment, could leave short)."""
        with self._new_connection:
            return descriptors_free(count)

    def _make_publisher(self) -> Publisher:
        ingest = self._ingest
        batch_size = min(ingest.max_batch_events, self._max_events)
        return Publisher(
            self.ack_endpoint,
            acked=True,
            batch_size=batch_size,
            linger=3600.0,  # a request's events leave as whole batches, at flush()
            ack_timeout=self.timeout,  # no resend within a request: a resent batch would count as duplicates
            deadline=2 * self.timeout,
            block_timeout=self.timeout,
            close_timeout=0.0,
            max_payload_bytes=ingest.max_payload_bytes,
            max_batch_bytes=min(4 * 1024 * 1024, ingest.max_message_bytes // 2),
            configure=self._secure,
            hints=CONFIG_HINTS,
            keep_results=self._max_events + 1,  # a batch holds one event at least
        )

    def _no_acknowledgement(self, deadline: float, sent_at: float) -> GatewayError:
        """503 if the daemon does not answer a query either or says its commits are failing (its
        storage is down), else 504; each names how long the events waited for their acknowledgement
        since they were handed to the publisher.

        The probe asks for stats, which the stats actor answers from its own counters, rather
        than health, which waits for every actor's ping and so is slow exactly when the daemon is.
        """
        waited = time.monotonic() - sent_at
        probe = max(0.05, min(MAX_PROBE_S, deadline - time.monotonic()))
        try:
            stats = self.query({"op": "stats"}, timeout=probe)
        except GatewayError:
            refusal = self._refusal(self.ack_endpoint) or self._refusal(self.query_endpoint)
            if refusal is not None:
                return GatewayError(503, f"{refusal}; {AGAIN_ONCE_IT_DOES}")
            return GatewayError(
                503,
                f"the daemon is not answering: no acknowledgement from {self.ack_endpoint} in {waited:.3g} s "
                f"and no answer from {self.query_endpoint}; is it running? Publishing again later is safe",
            )
        if stats.get("error") == REVOKED:  # an open query connection, refused message by message
            return GatewayError(503, f"{not_taken(stats['error'])}; {AGAIN_ONCE_IT_DOES}")
        # A commit under way on a server that stopped answering has not failed yet: the cluster's
        # counters, read on the same server, say it first.
        storage_error = stats.get("storage_error") or stats.get("cluster_error")
        if storage_error is not None:
            return GatewayError(
                503,
                f"the daemon cannot store events now: {storage_error}; it holds these ({waited:.3g} s without an "
                f"acknowledgement) and stores them when its storage is back; publishing them again is safe, "
                f"duplicates are dropped",
            )
        return GatewayError(
            504,
            f"the daemon answers queries but did not acknowledge the events within {waited:.3g} s of their "
            f"sending (overloaded?); they may or may not be stored: publishing them again is safe, duplicates "
            f"are dropped",
        )

    # -- pools

    def _return(self, pool: queue.SimpleQueue[Any] | IdleQueryClients, item: Any) -> None:
        if self._closed:
            item.close()
        else:
            pool.put(item)

    def check_handshakes(self, timeout: float) -> list[str]:
        """What keeps the daemon from taking this gateway's connections (a refused CURVE key,
        nothing listening), one line per endpoint with a problem; empty when both shake hands.

        Both endpoints are probed at once, on a thread each, so this takes ``timeout`` at most.
        A refusal is remembered, so that requests failing on that endpoint say so.
        """
        checks = {self.ack_endpoint: zmq.DEALER, self.query_endpoint: zmq.REQ}
        found: dict[str, str | None] = {}

        def check(endpoint: str, socket_type: int) -> None:
            found[endpoint] = self._check(endpoint, socket_type, timeout)

        # Daemon threads, unlike an executor's: a gateway stopped meanwhile exits without waiting.
        threads = [
            threading.Thread(target=check, args=item, name="handshake-check", daemon=True) for item in checks.items()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return [problem for problem in (found.get(endpoint) for endpoint in checks) if problem is not None]

    def _check(self, endpoint: str, socket_type: int, timeout: float) -> str | None:
        try:
            failure = probe(endpoint, socket_type, self._secure, timeout, hints=CONFIG_HINTS)
        except ValueError as exc:
            return str(exc)
        if failure is None:
            return None
        if failure.refused:
            self._refused[endpoint] = f"{endpoint} {failure}"
        return f"{endpoint} {failure}"

    def subscribe_refusal(self, timeout: float) -> str | None:
        """Why the daemon's subscribe endpoint refuses this gateway's handshake (its CURVE key,
        or CURVE on one side only), found within ``timeout`` seconds; None if it does not, or if
        that cannot be told now (no answer at all, no descriptor free for the probe)."""
        if not self._descriptors_free(NEW_QUERY_DESCRIPTORS):
            return None
        try:
            failure = probe(self.subscribe_endpoint, zmq.DEALER, self._secure, timeout, hints=CONFIG_HINTS)
        except ValueError:
            return None
        return None if failure is None or not failure.refused else f"{self.subscribe_endpoint} {failure}"

    def _refusal(self, endpoint: str) -> str | None:
        """Why requests to ``endpoint`` fail, when the daemon is known to refuse this gateway there."""
        refusal = self._refused.get(endpoint)
        return None if refusal is None else not_taken(refusal)

    def subscriber(self, topic: str | None, after: int, topics: list[str] | None = None) -> Subscriber:
        """A subscription to the daemon's stored and live events after ``after`` (a seq with
        ``topic``; else a commit position, of every topic or only ``topics``), reading at most
        ``SUBSCRIBER_BYTES`` of them ahead of its stream."""
        return Subscriber(
            self.subscribe_endpoint,
            topic,
            topics=topics,
            after=after,
            buffer_bytes=SUBSCRIBER_BYTES,
            configure=self._secure,
            hints=CONFIG_HINTS,
        )

    def close(self) -> None:
        """Close every pooled connection (ones lent out are closed when they come back)."""
        self._closed = True
        while True:
            try:
                publisher = self._publishers.get_nowait()
            except queue.Empty:
                break
            publisher.close(flush=False)
        for client in self._queries.returned_before(math.inf):
            client.close()


class IdleQueryClients:
    """The query clients not in use, each with the time.monotonic() it came back; thread-safe.

    The one back last is lent first: clients beyond what the traffic needs stay unused, and
    :meth:`returned_before` finds them, the longest unused first.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: deque[tuple[float, QueryClient]] = deque()  # by the time each came back

    def take(self) -> QueryClient | None:
        """The client back last, now the caller's alone; None if none is idle."""
        with self._lock:
            return self._idle.pop()[1] if self._idle else None

    def put(self, client: QueryClient) -> None:
        """Hand ``client`` back, done with now."""
        with self._lock:
            self._idle.append((time.monotonic(), client))

    def returned_before(self, cutoff: float) -> list[QueryClient]:
        """Take out the clients back before ``cutoff``, now the caller's alone (to close)."""
        taken: list[QueryClient] = []
        with self._lock:
            while self._idle and self._idle[0][0] < cutoff:
                taken.append(self._idle.popleft()[1])
        return taken


def stopping(sent: bool) -> GatewayError:
    """503 for a request that the gateway's stopping ended; ``sent``: its events were sent."""
    if sent:
        return GatewayError(
            503,
            "the gateway is stopping; the events were sent but not acknowledged in time: they may or may not "
            "be stored, publishing them again to a running gateway is safe",
        )
    return GatewayError(503, "the gateway is stopping; nothing was sent or asked: try again on a running gateway")


def out_of_time(left: float, link: DaemonLink) -> GatewayError:
    """503 for a publish with ``left`` seconds of its budget, less than ``link.reserve_s``: not sent."""
    return GatewayError(
        503,
        f"the request's time budget ran out before sending: {max(0.0, left):.3g} s of its {link.timeout:g} s "
        f"([http] request_timeout_ms) were left, less than the {link.reserve_s:.3g} s kept for the daemon to "
        "acknowledge; nothing was sent: publishing again is safe",
    )


def _add_up(results: list[BatchResult], received: int) -> PublishOutcome:
    new = duplicates = 0
    conflicting: list[int] = []
    rejected: list[dict[str, Any]] = []
    offset = 0
    for result in results:
        new += result.new
        duplicates += result.duplicate
        # Positions in the request of duplicates whose content differs from the stored event,
        # when the daemon names them (a daemon that does not gives ()).
        conflicting.extend(offset + index for index in result.conflicting)
        rejected.extend({"index": offset + r.index, "error": r.reason} for r in result.rejected)
        offset += result.size
    return PublishOutcome(received, new, duplicates, conflicting, rejected)


# -- JSON in and out -------------------------------------------------------------------------------

_decoder = msgspec.json.Decoder()


def parse_events(
    body: bytes, max_events: int, max_payload_bytes: int, max_message_bytes: int | None = None
) -> list[dict[str, Any]]:
    """The events of a ``POST /publish`` body, each checked by the daemon's rules; :class:`GatewayError` if not.

    The body is one event object or ``{"events": [event, ...]}``. Only the schema's fields are
    kept: the daemon ignores any others, and dropping them here keeps what is sent small.

    ``max_message_bytes`` (``[ingest] max_message_bytes``; no check when None): an event that
    would not fit in a batch message of that size gets 413. The daemon's socket drops such a
    message without a word, so it could never be acknowledged. Several events need no check of
    their own: the publisher closes a batch at half that size, and an event alone fits.
    """
    document = _decode_json(body)
    # A payload nests one level an object or array: with fewer in the whole body than a payload
    # may nest, none needs the depth check below (which packs and reads a payload again).
    may_nest_too_deep = body.count(b"{") + body.count(b"[") > MAX_PAYLOAD_DEPTH
    if isinstance(document, dict) and "events" in document and "topic" not in document:
        events = document["events"]
        if not isinstance(events, list):
            raise GatewayError(400, f"'events' must be an array of event objects, not {_json_type(events)}")
    elif isinstance(document, dict):
        events = [document]
    else:
        raise GatewayError(
            400, f'the body must be an event object or {{"events": [...]}}, not a JSON {_json_type(document)}'
        )
    if len(events) > max_events:
        raise GatewayError(
            413, f"{len(events)} events in one request, over the limit of {max_events} ([http] max_events)"
        )
    packer = msgpack.Packer(use_bin_type=True, datetime=False)
    checked = []
    for index, event in enumerate(events):
        try:
            _check_json_types(event)
            topic, event_id, timestamp, _, source, payload = check_fields(event)
            clean: dict[str, Any] = {"topic": topic, "event_id": event_id, "timestamp": timestamp, "source": source}
            if payload is not None:
                clean["payload"] = payload
            size = len(packer.pack(clean))
            if size > max_payload_bytes:
                _check_payload_size(payload, max_payload_bytes)
            if may_nest_too_deep and size >= MAX_PAYLOAD_DEPTH:  # each level takes a byte too
                pack_payload(payload, max_payload_bytes)  # refuses a payload nested deeper than readers read
            if max_message_bytes is not None and size + BATCH_OVERHEAD_BYTES > max_message_bytes:
                raise GatewayError(
                    413,
                    f"the event is {size} bytes as msgpack, too big for a message to the daemon of at most "
                    f"{max_message_bytes} bytes ([ingest] max_message_bytes, with {BATCH_OVERHEAD_BYTES} bytes "
                    "of batch envelope); nothing was sent: make it smaller, publishing it again cannot succeed",
                    index=index,
                )
        except InvalidEvent as exc:
            raise GatewayError(400, str(exc), index=index) from None
        except (TypeError, ValueError, OverflowError) as exc:
            if str(exc).startswith("recursion limit"):  # msgpack packs 1024 levels; the daemon reads fewer
                raise GatewayError(400, str(too_deep()), index=index) from None
            raise GatewayError(
                400, f"event cannot be encoded as msgpack ({exc}); integers must fit in 64 bits", index=index
            ) from None
        checked.append(clean)
    return checked


def _ready_for_no_free_descriptor() -> None:
    """Do now, with descriptors to spare, what would otherwise first happen in a request, where at
    the descriptor limit it fails in a way no request can answer.

    anyio imports its event loop backend at its first use (a streamed response, a thread for a
    call to the daemon), which opens files: at the limit that import failed, as a 500 with a
    traceback. libzmq starts the threads of the context the query clients and the streams'
    subscribers share with its first socket, and aborts the process when it cannot have their
    descriptors; started here, a socket that cannot be had later is a plain error (EMFILE).
    """
    anyio.current_time()  # loads the backend
    zmq.Context.instance().socket(zmq.REQ).close(linger=0)


async def _close_idle_queries(link: DaemonLink) -> None:
    """Close the pooled query clients that went unused ``QUERY_CLIENT_IDLE_S``, on a worker thread
    (closing one blocks until libzmq stopped its monitor), until cancelled."""
    while True:
        await asyncio.sleep(QUERY_CLIENT_IDLE_S / 3)
        await anyio.to_thread.run_sync(link.close_idle_queries)


async def _watch_descriptors(watch: DescriptorWatch) -> None:
    """Warn in the log while this process's open descriptors are near its limit (see transport.descriptors)."""
    while True:
        watch.check(time.monotonic())
        await asyncio.sleep(DESCRIPTOR_CHECK_S)


def not_taken(why: str) -> str:
    """What a client is told when the daemon refuses this gateway's connections (``why``)."""
    return f"the daemon does not take this gateway's connections: {why}"


def _warn_when_accept_fails(watch: DescriptorWatch) -> Callable[[], None]:
    """Have the running event loop report an ``accept()`` that failed for want of a descriptor
    (EMFILE) with the watch's warning, said at once and then at most every minute while it
    lasts, rather than with a traceback a time; returns what puts the loop's handler back.

    Why: asyncio's loop (uvicorn's where uvloop is not installed) logs "socket.accept() out of
    system resource" with a traceback for each accept() that fails, up to uvicorn's backlog
    (2048) in a row, and tries again a second later while the connection waits. uvloop says
    nothing (libuv takes the connection with a descriptor kept in reserve and closes it at once,
    so the client sees it reset): there the watch's count says it, within its
    :data:`DESCRIPTOR_CHECK_S`. Neither connection can be answered: no descriptor is left to
    answer it on.
    """
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exception = context.get("exception")
        # A listening socket's accept() at this process's limit (ENFILE, the system's, is left as it was).
        if "socket" in context and isinstance(exception, OSError) and exception.errno == errno.EMFILE:
            watch.check(time.monotonic(), force=True)
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return lambda: loop.set_exception_handler(previous)


def _decode_json(body: bytes) -> Any:
    """The JSON document in ``body``, or :class:`GatewayError` 400 saying why it is not one."""
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as exc:
        reason = str(exc)
    except RecursionError:  # msgspec's decoder recurses per level of nesting, as deep as Python lets it
        raise GatewayError(
            400,
            "the body nests arrays and objects too deeply for the gateway's JSON decoder to read (under Python "
            "3.11 about 970 levels, counting the body's own object and an 'events' array, so a payload may nest "
            f"about 965; under later Pythons more); a payload may nest {MAX_PAYLOAD_DEPTH} levels at most anyway",
        ) from None
    if _has_lone_surrogate(body):  # msgspec's own words for it ("Input data was truncated") mislead
        reason = (
            "a string holds a \\u escape of a lone UTF-16 surrogate (\\uD800-\\uDFFF without its pair), "
            "which is no Unicode character"
        )
    raise GatewayError(400, f"the body is not valid JSON: {reason}")


def _has_lone_surrogate(body: bytes) -> bool:
    """Whether ``body`` is JSON but for strings holding lone surrogates, which Python's parser lets through."""

    def refuse(constant: str) -> Any:
        raise ValueError(constant)  # NaN and Infinity: Python takes them, JSON does not

    try:
        document = json.loads(body, parse_constant=refuse)
    except (ValueError, RecursionError):
        return False
    strings = [document]
    while strings:
        value = strings.pop()
        if isinstance(value, dict):
            strings.extend(value)
            strings.extend(value.values())
        elif isinstance(value, list):
            strings.extend(value)
        elif isinstance(value, str) and any(0xD800 <= ord(char) <= 0xDFFF for char in value):
            return True
    return False


def _check_payload_size(payload: dict[Any, Any] | None, limit: int) -> None:
    """Refuse a payload over ``limit`` packed bytes, naming the config key that sets the limit."""
    try:
        pack_payload(payload, limit)
    except InvalidEvent as exc:
        raise InvalidEvent(f"{exc} ([ingest] max_payload_bytes)") from None


def _check_json_types(event: Any) -> None:
    """Refuse an event whose fields have the wrong JSON types, in JSON's words.

    :func:`transport.schema.check_fields` would refuse it too, but names msgpack's types
    (map, nil, int), which are not what a JSON client sent.
    """
    if not isinstance(event, dict):
        raise InvalidEvent(f"an event must be an object, not {_json_type(event)}")
    for field in ("topic", "event_id", "timestamp", "source"):
        if field in event and not isinstance(event[field], str):
            raise InvalidEvent(f"{field} must be a string, not {_json_type(event[field])}")
    payload = event.get("payload")
    if payload is not None and not isinstance(payload, dict):  # null counts as none, as nil does
        raise InvalidEvent(f"payload must be an object, not {_json_type(payload)}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), type_name(value))


def _enc_hook(value: Any) -> Any:
    """What msgspec cannot encode by itself, as stored payloads may hold it: msgpack timestamps."""
    if isinstance(value, msgpack.Timestamp):
        return _timestamp_json(value)
    raise NotImplementedError(f"{type(value).__name__} has no JSON form")


def _timestamp_json(value: msgpack.Timestamp) -> Any:
    """RFC 3339 in UTC with every nanosecond the timestamp holds (``...T22:13:20.000000005Z``);
    ``{"seconds", "nanoseconds"}`` for one outside the years 1-9999, which that cannot write."""
    try:
        moment = _EPOCH + timedelta(seconds=value.seconds)
    except OverflowError:
        return {"seconds": value.seconds, "nanoseconds": value.nanoseconds}
    text = moment.replace(tzinfo=None).isoformat()
    return f"{text}.{value.nanoseconds:09d}Z" if value.nanoseconds else f"{text}Z"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _jsonable(value: Any) -> Any:
    """``value`` as JSON can hold it, losing nothing msgpack held that JSON can write.

    Bytes become base64 strings, non-finite floats null, timestamps RFC 3339 strings, extension
    types ``{"ext_type", "data"}`` (base64). Map keys become strings (a non-string key as its
    JSON text), unless two would then be the same (``1`` and ``"1"``): such a map becomes an
    array of ``[key, value]`` pairs, since an object with a repeated key is not valid JSON.

    Works through a stack of (item, container, slot) rather than by recursion: each container
    is made with its slots empty, and its items are converted into them as they come off the
    stack. A stored payload may nest as deep as msgpack allows (about a thousand levels), past
    Python's recursion limit.
    """
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any]] = [(value, root, 0)]
    while stack:
        item, container, slot = stack.pop()
        container[slot] = _jsonable_shell(item, stack)
    return root[0]


def _jsonable_shell(value: Any, stack: list[tuple[Any, Any, Any]]) -> Any:
    """The JSON form of ``value`` alone; for a container, one with empty slots, whose items are
    pushed on ``stack`` to be converted into them."""
    if isinstance(value, (dict, MapPairs)):  # MapPairs: keys a dict would merge, such as 1 and true
        entries = value.items()
        if isinstance(value, dict) and all(isinstance(key, str) for key in value):
            keys = list(value)
        else:
            keys = [_key(key) for key, _ in entries]
        if len(set(keys)) == len(keys):
            shell: dict[str, Any] = dict.fromkeys(keys)
            stack.extend((item, shell, key) for key, (_, item) in zip(keys, entries, strict=True))
            return shell
        pairs = [[None, None] for _ in entries]
        for pair, (key, item) in zip(pairs, entries, strict=True):
            stack.append((key, pair, 0))
            stack.append((item, pair, 1))
        return pairs
    if isinstance(value, msgpack.ExtType):  # before tuple: an ExtType is a named tuple
        return {"ext_type": value.code, "data": base64.b64encode(value.data).decode()}
    if isinstance(value, (list, tuple)):
        items: list[Any] = [None] * len(value)
        stack.extend((item, items, index) for index, item in enumerate(value))
        return items
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, msgpack.Timestamp):
        return _timestamp_json(value)
    return value


def _encode_deep(document: Any) -> bytes:
    """The JSON text of a document already made JSON-safe by :func:`_jsonable`, however deep.

    msgspec's encoder recurses and gives up near Python's recursion limit, so this writes
    containers through a stack: text to write as is (bytes) and values still to write. Only
    scalars and keys go to msgspec.
    """
    parts: list[bytes] = []
    stack: list[Any] = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, bytes):  # never a value: _jsonable made every bytes value a string
            parts.append(item)
        elif isinstance(item, dict):
            parts.append(b"{")
            stack.append(b"}")
            entries = list(item.items())
            for index in range(len(entries) - 1, -1, -1):
                key, value = entries[index]
                stack.append(value)
                stack.append((b"," if index else b"") + msgspec.json.encode(key) + b":")
        elif isinstance(item, list):
            parts.append(b"[")
            stack.append(b"]")
            for index in range(len(item) - 1, -1, -1):
                stack.append(item[index])
                if index:
                    stack.append(b",")
        else:
            parts.append(msgspec.json.encode(item))
    return b"".join(parts)


def _key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, (bytes, bytearray)):
        return base64.b64encode(bytes(key)).decode()
    return _encode_deep(_jsonable(key)).decode()


def _json_bytes(document: Any) -> bytes:
    """``document`` as compact JSON text on one line, made JSON-safe as ``GET /events`` makes it."""
    safe = _jsonable(document)
    try:
        return msgspec.json.encode(safe)
    except RecursionError:  # a stored payload nested deeper than msgspec's encoder goes
        return _encode_deep(safe)


def _last_event_id(value: str) -> int:
    """The cursor a reconnecting client's ``Last-Event-ID`` names, or :class:`GatewayError` 400."""
    text = value.strip()
    if not (in_digits(text) and int(text) <= MAX_CURSOR):
        raise GatewayError(
            400,
            f"Last-Event-ID must be an id this stream sent (a cursor from 0 to {MAX_CURSOR}), "
            f"not {_header_text(value)[:40]!r}; "
            "reconnect without it, with after= the last cursor you processed",
        )
    return int(text)


def _header_text(value: str) -> str:
    """A header's value as its sender wrote it: the server hands it over decoded as Latin-1 (HTTP's
    old default), which garbles the UTF-8 every client sends; bytes that are no UTF-8 become U+FFFD."""
    try:
        return value.encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return value


def json_response(document: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON response made with msgspec (fast, and it writes bytes as base64); anything odd is cleaned first."""
    try:
        content = msgspec.json.encode(document, enc_hook=_enc_hook)
    except (TypeError, ValueError, NotImplementedError, msgspec.EncodeError, RecursionError):
        # RecursionError: a stored payload nested deeper than msgspec's encoder goes.
        content = _encode_deep(_jsonable(document))
    return Response(content, status_code=status, media_type="application/json", headers=headers)


# -- the OpenAPI document's models (the routes answer with json_response) ------------------------------


class Error(BaseModel):
    """A refused or failed request."""

    error: str = Field(description="What went wrong and what to do about it.")
    index: int | None = Field(None, description="POST /publish: the position of the first invalid event.")


class PublishReply(BaseModel):
    """The daemon's acknowledgement of a POST /publish, after its commit."""

    status: str = Field(description='Always "ok".')
    received: int = Field(description="Events in the request.")
    added_to_queue: int = Field(description="Events stored for the first time.")
    duplicates: int = Field(description="Events already stored (same topic and event_id), dropped.")
    conflicting: list[int] = Field(
        description="Positions in the request of duplicates whose content differs from the stored event "
        "(when the daemon reports them; else [])."
    )
    rejected: list[dict[str, Any]] = Field(description="Events the daemon refused after all: {index, error}.")


class StoredEvent(BaseModel):
    topic: str
    event_id: str
    timestamp: str
    source: str
    payload: dict[str, Any] | list[list[Any]] = Field(
        description="The payload as an object; as an array of [key, value] pairs when its map has keys "
        'that are the same as strings (1 and "1"), which only msgpack publishers can store.'
    )
    seq: int
    late: bool


class EventsPage(BaseModel):
    """A page of stored events and the cursor to pass as ``after`` for the next page."""

    events: list[StoredEvent]
    count: int
    next: int
    first: int | None = Field(
        None,
        description="The lowest seq (with topic) or commit position (without) still stored, as the daemon's"
        " events reply gives it: after below first - 1 means events retention deleted were skipped.",
    )


_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["topic", "event_id", "timestamp", "source"],
    "properties": {
        "topic": {"type": "string", "description": "1-255 characters, no whitespace or control characters"},
        "event_id": {"type": "string", "description": "1-255 characters; (topic, event_id) is stored once"},
        "timestamp": {"type": "string", "description": "ISO-8601 with a timezone, e.g. 2025-10-22T10:00:00Z"},
        "source": {"type": "string", "description": "at most 255 characters"},
        "payload": {"type": "object", "description": "any JSON object; stored as a msgpack map"},
    },
}
_PUBLISH_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    _EVENT_SCHEMA,
                    {
                        "type": "object",
                        "required": ["events"],
                        "properties": {"events": {"type": "array", "items": _EVENT_SCHEMA}},
                    },
                ]
            }
        }
    },
}
# What a query route answers when the daemon does not give a usable answer.
_QUERY_ERRORS: dict[int | str, dict[str, Any]] = {
    502: {"model": Error, "description": "The daemon sent a reply the gateway cannot read."},
    503: {"model": Error, "description": "The daemon did not answer in time, or answered with an error."},
}
_PUBLISH_ERRORS: dict[int | str, dict[str, Any]] = {
    502: {"model": Error, "description": "The daemon refused the batch as a whole, or sent an unreadable reply."},
    503: {
        "model": Error,
        "description": "Every publisher stayed busy (nothing was sent), the daemon answers nothing, "
        "or its storage is down (the daemon holds the events).",
    },
    504: {"model": Error, "description": "The daemon answered queries but did not acknowledge in time."},
}


TopicParam = Annotated[str | None, Query(description="Only this topic; every topic when absent.")]
TopicsParam = Annotated[
    list[str] | None,
    Query(description="Only these topics, in commit order (give it once per topic); not with `topic`."),
]
AfterParam = Annotated[int, Query(ge=0, le=MAX_CURSOR, description="The cursor: the `next` of the page before.")]
LimitParam = Annotated[
    int, Query(ge=1, description="Most events in the page (capped at the daemon's [query] max_limit).")
]
TopicAfterParam = Annotated[
    str | None,
    Query(max_length=MAX_TOPIC_AFTER, description="A page of topics named after this: the `next` of the page before."),
]
TopicsLimitParam = Annotated[
    int | None,
    Query(ge=1, description="A page of at most this many topics (capped at the daemon's [query] max_limit)."),
]


# -- the application ---------------------------------------------------------------------------------


CONFIG_ENV = "EVENTAGG_GATEWAY_CONFIG"


def app_from_environment() -> FastAPI:
    """The application for the config file named by ``$EVENTAGG_GATEWAY_CONFIG``.

    The factory each uvicorn worker process calls when ``[http] workers`` is above 1 (workers
    import the application by name, so the config path travels in the environment). A worker is
    a fresh process, so it sets up logging itself, as ``eventagg gateway`` does for one process.
    """
    # A SIGHUP to the whole process group (a closing terminal, kill -HUP -PGID) reaches the
    # workers too: the supervisor says it ignores it, and a worker must not die of it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = load_config(os.environ[CONFIG_ENV])
    setup_logging(config.log.level)
    folder = os.environ.get(STREAMS_FOLDER_ENV)
    return create_app(config, OpenStreams(Path(folder) if folder else None))


def check_bind(config: Config) -> None:
    """Refuse an ``[http] bind`` beyond loopback unless ``[security] allow_insecure`` accepts the risk.

    The daemon's rule for its own endpoints (:class:`transport.security.ServerSecurity`), and more
    so here: the gateway has no authentication, CURVE or not, so whoever reaches its port can
    publish and read events. Raises :class:`transport.security.InsecureBindError`; logs a warning
    when ``allow_insecure`` lets such a bind through.
    """
    http = config.http
    host = f"[{http.host}]" if ":" in http.host else http.host
    try:
        # A host name is as local as every address it stands for, as for the daemon's endpoints.
        if bind_is_local("[http] bind", f"tcp://{host}:{http.port}"):
            return
    except BindHostError:
        return  # listening fails on it anyway, with a message that says why
    if not config.security.allow_insecure:
        raise InsecureBindError(
            f"refusing to listen beyond loopback ([http] bind = {http.bind}): the gateway has no "
            "authentication and no TLS, so anyone who can reach that port could publish and read events. "
            "Bind it to 127.0.0.1 and put a reverse proxy with authentication and TLS in front of it, or "
            "set [security] allow_insecure = true to accept the risk"
        )
    log.warning(
        "the gateway listens beyond loopback WITHOUT authentication ([http] bind = %s, [security] "
        "allow_insecure = true): anyone who can reach it can publish and read events",
        http.bind,
    )


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def answered_hosts(config: Config) -> frozenset[str] | None:
    """The names a request's ``Host`` may give (any, None, for a gateway bound beyond loopback
    with no ``[http] allowed_hosts``, or with ``"*"`` among them).

    A gateway on loopback is reachable from the web browser of anyone on the machine, and a
    page whose name its author points at 127.0.0.1 (DNS rebinding) is then on the gateway's own
    origin: its requests need no CORS preflight, and carry the page's name as their ``Host``.
    Answering only the names the gateway is known by leaves such a page nothing to talk to.
    """
    http = config.http
    if "*" in http.allowed_hosts:
        return None
    host = f"[{http.host}]" if ":" in http.host else http.host
    try:
        local = bind_is_local("[http] bind", f"tcp://{host}:{http.port}")
    except BindHostError:
        local = True
    if not local and not http.allowed_hosts:
        return None  # reached by whatever names point at it: the operator accepted that risk
    # Written as a Host header would give them ("name:8080", "[v6]"), they are compared as names.
    return LOOPBACK_NAMES | {host_name(http.host), *map(host_name, http.allowed_hosts)}


def allowed_origins(config: Config) -> frozenset[str] | None:
    """The web origins besides the gateway's own whose pages may open event streams, as compared
    (:func:`origin_key`); None when ``[http] allowed_origins`` holds ``"*"``: any may."""
    listed = config.http.allowed_origins
    return None if "*" in listed else frozenset(map(origin_key, listed))


def origin_key(origin: str) -> str:
    """A web origin as compared: in lower case, without its scheme's default port."""
    origin = origin.strip().lower()
    scheme, _, authority = origin.partition("://")
    name, colon, port = authority.rpartition(":")
    if colon and name and port == {"http": "80", "https": "443"}.get(scheme):
        return f"{scheme}://{name}"
    return origin


def foreign_origin(origin: str | None, host: str | None, allowed: frozenset[str] | None) -> str | None:
    """Why a ``GET /events/stream`` whose ``Origin`` is ``origin`` is refused, or None.

    A browser sends ``Origin`` with a cross-origin request, an ``EventSource``'s included. The
    gateway sends no CORS headers, so a page of another origin cannot read a stream; but each
    one it opens holds one of the gateway's ``[http] max_streams``, and any page a user opens
    could open them all on a gateway on the user's loopback. Answered without ``Origin`` (not a
    browser), from the gateway's own origin (``Host`` with http, or https for a TLS proxy in
    front), or from one of ``allowed``; ``Origin: null`` (a sandboxed frame, a file:// page: any
    page can make itself one) never.
    """
    if origin is None or allowed is None:
        return None
    key = origin_key(origin)
    own = set() if host is None else {origin_key(f"{scheme}://{host}") for scheme in ("http", "https")}
    if key in own or key in allowed:
        return None
    if key == "null":
        return (
            "this gateway does not stream to a page of no origin (Origin: null: a sandboxed frame, a file:// "
            "page, which any web page can make itself); serve the page from the gateway's own origin or one "
            "listed in [http] allowed_origins"
        )
    shown = _header_text(origin)[:100]
    others = f" and {', '.join(sorted(allowed))}" if allowed else ""
    return (
        f"this gateway does not stream to pages of the origin {shown!r}: it streams to its own origin{others}; "
        "a page of another origin cannot read a stream (the gateway sends no CORS headers) but would hold one "
        "of [http] max_streams; add the origin to [http] allowed_origins to let its pages open streams"
    )


def create_app(config: Config, streams: OpenStreams | None = None) -> FastAPI:
    """The gateway's FastAPI application for the daemon that ``config`` describes; ``streams``
    counts its event streams (one process's alone when not given).

    Raises :class:`transport.security.InsecureBindError` for an ``[http] bind`` beyond loopback
    that ``[security] allow_insecure`` does not allow (see :func:`check_bind`).
    """
    check_bind(config)
    http = config.http
    link = DaemonLink(config)
    origins = allowed_origins(config)
    started = time.monotonic()
    publish_slots = anyio.CapacityLimiter(http.publishers)
    publish_threads = anyio.CapacityLimiter(http.publishers)
    # A slot is taken within the request's timeout; its thread then never waits for a token.
    query_slots = anyio.CapacityLimiter(QUERY_THREADS)
    query_threads = anyio.CapacityLimiter(QUERY_THREADS)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        log.info(
            "eventagg gateway on http://%s publishing to %s, querying %s",
            http.bind,
            link.ack_endpoint,
            link.query_endpoint,
        )
        # In the background: the gateway serves at once, and a daemon started later is fine.
        threading.Thread(target=_warn_unreachable, args=(link,), name="handshake-check", daemon=True).start()
        restore = _on_stop_signals(link.stop)
        _ready_for_no_free_descriptor()
        watching = asyncio.create_task(_watch_descriptors(link.descriptors))
        pruning = asyncio.create_task(_close_idle_queries(link))
        unwatch_accept = _warn_when_accept_fails(link.descriptors)
        try:
            yield
        finally:
            unwatch_accept()
            watching.cancel()
            pruning.cancel()
            restore()
            link.close()

    HeaderDeadlineProtocol.header_timeout_s = http.header_timeout_ms / 1000
    HeaderDeadlineProtocol.write_timeout_s = http.write_timeout_ms / 1000
    app = FastAPI(
        title="eventagg HTTP gateway",
        version="1.0",
        description="The original HTTP API of eventagg's publishers and readers, Prometheus metrics and a "
        "health check, in front of the eventagg daemon. See docs/gateway.md.",
        lifespan=lifespan,
        # Starlette answers a path with a trailing slash (GET /events/) with a bodiless 307 to the
        # path without it: a JSON client gets no JSON, and a POST's client may not follow. A 404
        # naming the route (http_error) says what to fix.
        redirect_slashes=False,
        # Swagger UI's page for OAuth2 logins: the gateway has none, and the page's query is the
        # login provider's (code, state), which no route may take unchecked (transport/gateway_query.py).
        swagger_ui_oauth2_redirect_url=None,
        responses={
            400: {
                "model": Error,
                "description": "A query parameter the route does not take (most take none), or one given twice; "
                "more than one Host header, or HTTP/1.1 without one (RFC 9112).",
            },
            421: {"model": Error, "description": "The request's Host is not a name this gateway answers to."},
        },
    )

    fastapi_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's document without the 422 it lists for every route with parameters: the
        gateway answers invalid parameters 400 (see validation_error), never 422."""
        if app.openapi_schema is None:
            document = fastapi_openapi()
            for operations in document.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = document.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    async def ask(request: dict[str, Any]) -> dict[str, Any]:
        """One query within ``request_timeout_ms`` in all, the wait for a free query slot included.

        Checked first by the daemon's own rules: a query they refuse was built from the client's
        parameters (a topics page ``after`` holding a NUL, say), so it is the client's 400, not a
        503 saying the daemon could not answer.
        """
        try:
            parse_query(request, config.query.max_limit)
        except QueryError as exc:
            raise GatewayError(400, f"bad query parameter: {exc}") from None
        deadline = time.monotonic() + link.timeout
        if not await _acquire(query_slots, deadline, link):
            if link.stopping:
                raise stopping(sent=False)
            raise GatewayError(
                503,
                f"no answer within {link.timeout:g} s ([http] request_timeout_ms): all {QUERY_THREADS} of the "
                "gateway's query slots stayed busy with earlier requests (the daemon is slow or away)",
            )
        try:
            return await _on_thread(link.query, request, deadline - time.monotonic(), limiter=query_threads)
        finally:
            query_slots.release()

    @app.exception_handler(GatewayError)
    async def gateway_error(_request: Request, exc: GatewayError) -> Response:
        return json_response(exc.body, exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        problems = []
        for error in exc.errors():
            where = " ".join(str(part) for part in error.get("loc", ()))
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        return json_response({"error": "; ".join(problems) or "invalid request"}, 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:
            # Starlette names the methods of the first route on the path alone (/healthz's HEAD
            # route without its GET), and not the HEAD that HeadAsGet answers; RFC 9110 wants all.
            path = request.url.path
            allowed = {
                method
                for route in app.router.routes
                if isinstance(route, Route) and route.path_regex.match(path)  # /openapi.json, /docs too
                for method in route.methods or ()
            }
            if path in HEAD_AS_GET_PATHS:
                allowed.add("HEAD")
            methods = ", ".join(sorted(allowed))
            error = f"{request.method} is not allowed on {path}: it takes {methods}"
            return json_response({"error": error}, 405, headers={"Allow": methods})
        if exc.status_code == 404:
            return json_response({"error": no_route(request.url.path)}, 404, headers=exc.headers)
        return json_response({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)

    def no_route(path: str) -> str:
        """What a 404 says: the path meant, when it is a route but for a trailing slash."""
        meant = path.rstrip("/")
        if meant != path and any(
            isinstance(route, Route) and route.path_regex.match(meant) for route in app.router.routes
        ):
            return f"no route {path}: did you mean {meant}? (without the trailing slash)"
        # The path quoted back at most this long: a client may send tens of KB of it.
        shown = path if len(path) <= MAX_QUOTED_PATH else f"{path[:MAX_QUOTED_PATH]}... ({len(path)} characters)"
        return f"no route {shown}: the routes are listed in /openapi.json"

    @app.post(
        "/publish",
        response_model=PublishReply,
        summary="Publish one event or a batch; answers after the daemon committed them",
        responses={
            400: {
                "model": Error,
                "description": "Invalid JSON or an invalid event (index names it), or a query parameter (it takes "
                "none); nothing sent.",
            },
            413: {
                "model": Error,
                "description": "Body or event count over the limit, or an event too big for a message to the "
                "daemon ([ingest] max_message_bytes); nothing sent.",
            },
            415: {
                "model": Error,
                "description": "The body is not sent as Content-Type: application/json in UTF-8, or is sent "
                "with a Content-Encoding (none is decoded).",
            },
            **_PUBLISH_ERRORS,
        },
        openapi_extra={"requestBody": _PUBLISH_BODY},
    )
    async def publish(request: Request) -> Response:
        deadline = time.monotonic() + link.timeout
        _check_content_type(_one_header(request, "Content-Type"))
        _check_content_encoding(request.headers.getlist("content-encoding"))
        body = await _read_body(request, http.max_body_bytes, deadline)
        ingest = config.ingest
        events = parse_events(body, http.max_events, ingest.max_payload_bytes, ingest.max_message_bytes)
        if not events:
            outcome = PublishOutcome(0, 0, 0, [], [])
        else:
            outcome = await _publish(events, deadline)
        return json_response(
            {
                "status": "ok",
                "received": outcome.received,
                "added_to_queue": outcome.new,
                "duplicates": outcome.duplicates,
                "conflicting": outcome.conflicting,
                "rejected": outcome.rejected,
            }
        )

    async def _publish(events: list[dict[str, Any]], deadline: float) -> PublishOutcome:
        # Events sent so late that the daemon could hardly acknowledge them in the time left are
        # not sent: an honest 503 with nothing sent beats a 504 for events barely sent. So a
        # publisher is waited for only until reserve_s before the deadline.
        left = deadline - time.monotonic()
        if left < link.reserve_s:
            raise out_of_time(left, link)
        asked = time.monotonic()
        if not await _acquire(publish_slots, deadline - link.reserve_s, link):
            if link.stopping:
                raise stopping(sent=False)
            raise busy(time.monotonic() - asked)
        try:
            return await _on_thread(link.publish, events, deadline, limiter=publish_threads)
        finally:
            publish_slots.release()

    def busy(waited: float) -> GatewayError:
        return GatewayError(
            503,
            f"all {http.publishers} publishers were busy for {waited:.3g} s, until less than the "
            f"{link.reserve_s:.3g} s kept for the daemon to acknowledge was left of the request's "
            f"{link.timeout:g} s ([http] publishers, request_timeout_ms); nothing was sent: publishing again is safe",
        )

    @app.get(
        "/events",
        response_model=EventsPage,
        summary="A page of stored events: one topic in seq (timestamp) order, or every topic in commit order",
        responses={400: {"model": Error, "description": "A bad query parameter."}, **_QUERY_ERRORS},
    )
    async def events(
        topic: TopicParam = None,
        after: AfterParam = 0,
        limit: LimitParam = DEFAULT_PAGE,
    ) -> Response:
        _check_topic(topic)
        # The daemon caps the page at its max_limit; capping here too keeps a huge limit packable.
        limit = min(limit, config.query.max_limit)
        reply = _answered(await ask({"op": "events", "topic": topic, "after": after, "limit": limit}))
        # Made JSON-safe item by item: msgspec alone would write an ExtType as an array and a map
        # with keys 1 and "1" as an object with a repeated key.
        page = _jsonable(reply.get("events", []))
        answer = {"events": page, "count": len(page), "next": reply.get("next", after)}
        if isinstance(reply.get("first"), int):
            answer["first"] = reply["first"]
        return json_response(answer)

    streams = streams if streams is not None else OpenStreams()

    @app.get(
        "/events/stream",
        summary="The stored events after a cursor, then live ones as they commit, as Server-Sent Events",
        response_class=StreamingResponse,  # for the document; the route answers an EventStreamResponse
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "An endless stream: `id:` the cursor (the seq with `topic`, else the commit "
                "position), `event: event`, `data:` the event as one line of JSON; `event: expired` when "
                "retention deleted events after the cursor. Resume with `Last-Event-ID`.",
            },
            400: {
                "model": Error,
                "description": "A bad query parameter or Last-Event-ID, or a cursor past the head.",
            },
            403: {
                "model": Error,
                "description": "The request's Origin (a web page's) is neither the gateway's own nor in "
                "[http] allowed_origins.",
            },
            503: {"model": Error, "description": "[http] max_streams streams are open, or the gateway is stopping."},
        },
    )
    async def event_stream(
        request: Request, topic: TopicParam = None, topics: TopicsParam = None, after: AfterParam = 0
    ) -> Response:
        # First of the route's own checks: a page that may not hold a stream gets nothing more of
        # the gateway's (its parameters were checked before the route ran, which takes nothing).
        refused = foreign_origin(_one_header(request, "Origin"), request.headers.get("host"), origins)
        if refused is not None:
            raise GatewayError(403, refused)
        _check_topic(topic)
        if topics is not None:
            if topic is not None:
                raise GatewayError(400, "give topic (one topic, by seq) or topics (several, by position), not both")
            if len(topics) > MAX_FILTER_TOPICS:
                raise GatewayError(400, f"topics may be given at most {MAX_FILTER_TOPICS} times, not {len(topics)}")
            for one in topics:
                _check_topic(one)
        resume = _one_header(request, "Last-Event-ID")
        if resume is not None:
            after = _last_event_id(resume)
        if link.stopping:
            raise stopping(sent=False)
        if streams.here >= http.max_streams:
            raise GatewayError(
                503, f"all {http.max_streams} event streams of this gateway process are open ([http] max_streams)"
            )
        streams.opened()
        cursor = "seq" if topic is not None else "position"  # what each event's id is

        def encode(event: dict[str, Any]) -> bytes:  # one event as the stream's text, on the stream's thread
            return b"id: %d\nevent: event\ndata: %s\n\n" % (event[cursor], _json_bytes(event))

        pump = StreamPump(lambda: link.subscriber(topic, after, topics), asyncio.get_running_loop(), encode, cursor)

        def closed() -> None:  # however the response ends, also before its body began
            pump.stop()
            streams.closed()

        try:
            pump.start()
            # A refusal answers the request itself: an EventSource reconnects after a stream that
            # ends, but gives up on an error status. A daemon that does not answer in time is
            # waited for within the stream, as across a restart.
            refusal = await pump.answer(link.timeout)
            if refusal is None and not pump.answered:
                # No answer in time. A daemon that refuses this gateway's handshake (its CURVE key
                # revoked, say) never will: say so now, as /stats does, rather than keep a
                # stream open and silent for ever. A daemon that is away is waited for, as before.
                handshake = await asyncio.to_thread(link.subscribe_refusal, STREAM_PROBE_S)
                if handshake is not None:
                    closed()
                    raise GatewayError(503, not_taken(handshake))
        except BaseException:
            closed()
            raise
        if refusal is not None:
            closed()
            if pump.exhausted:
                raise link.exhausted("open a subscription to the daemon for the stream")
            if pump.handshake_refused:  # this gateway's key, not the stream asked for
                raise GatewayError(503, not_taken(refusal))
            raise GatewayError(400, f"the daemon refused the stream: {refusal}")

        async def body() -> AsyncIterator[bytes]:
            try:
                quiet_since = time.monotonic()
                while not link.stopping:
                    # Asked at each item: with many streams busy sending a backlog, the response's
                    # own watch for the client leaving was not heard, and a stream whose client had
                    # gone sent its whole backlog to nobody (uvicorn drops writes once it has gone).
                    if await request.is_disconnected():
                        return
                    item = await pump.get(STOP_POLL_S * 5)
                    if item is None:
                        if time.monotonic() - quiet_since >= KEEPALIVE_S:
                            quiet_since = time.monotonic()
                            yield b": keep-alive\n\n"
                        continue
                    quiet_since = time.monotonic()
                    kind, value = item
                    if kind == "events":
                        yield value  # the events' text, written by the stream's thread
                    elif kind == "expired":
                        yield b"event: expired\ndata: %s\n\n" % _json_bytes(value)
                    elif kind == "error":
                        yield b"event: error\ndata: %s\n\n" % _json_bytes({"error": value})
                        return
                    else:  # "end"
                        return
            finally:
                pump.stop()

        return EventStreamResponse(body(), on_close=closed)

    @app.get(
        "/stats",
        summary="The daemon's counters, with the original service's total_topics and uptime",
        responses=_QUERY_ERRORS,
    )
    async def stats() -> Response:
        reply = _answered(await ask({"op": "stats"}))
        # How many topics there are: on PostgreSQL topic_count is only those this daemon stored
        # first, so while the cluster's count cannot be had (cluster_error says why) it is null.
        cluster = reply.get("cluster")
        if isinstance(cluster, dict):
            reply["total_topics"] = cluster.get("topic_count", 0)
        else:
            reply["total_topics"] = None if "cluster_error" in reply else reply.get("topic_count", 0)
        reply["uptime"] = f"{float(reply.get('uptime_s', 0.0)):.2f}s"
        reply["gateway_uptime_s"] = round(time.monotonic() - started, 3)
        return json_response(reply)

    @app.get(
        "/topics",
        summary="Every topic with its stored count, last seq and counters, by name; with `after` or `limit`, a page",
        responses={400: {"model": Error, "description": "A bad query parameter."}, **_QUERY_ERRORS},
    )
    async def topics(after: TopicAfterParam = None, limit: TopicsLimitParam = None) -> Response:
        if after is None and limit is None:
            return json_response(_answered(await ask({"op": "topics"})))
        page = min(limit or DEFAULT_PAGE, config.query.max_limit)
        return json_response(_answered(await ask({"op": "topics", "after": after or "", "limit": page})))

    @app.get(
        "/healthz",
        summary="200 when the daemon answers its health query healthy, else 503 with the reason",
        responses={503: {"description": "The daemon is away or unhealthy; `reason` says why."}},
    )
    @app.head(  # a load balancer's check that wants the status alone; the server drops the body
        "/healthz",
        summary="The status of GET /healthz, without a body",
        responses={503: {"description": "The daemon is away or unhealthy."}},
        operation_id="healthz_head",
    )
    async def healthz() -> Response:
        try:
            reply = await ask({"op": "health"})
        except GatewayError as exc:
            return json_response({"status": "unavailable", "reason": str(exc)}, 503)
        if "error" in reply:
            return json_response({**reply, "status": "unhealthy", "reason": str(reply["error"])}, 503)
        return json_response(reply)

    @app.get(
        "/metrics",
        summary="Prometheus text exposition of the daemon's counters and consumers' lag (two queries a scrape)",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def metrics_page() -> Response:
        try:
            reply: dict[str, Any] | None = await ask({"op": "stats"})
        except GatewayError:
            reply = None
        if reply is not None and "error" in reply:
            reply = None
        consumers = None
        if reply is not None:  # a daemon that did not answer stats would make the scrape wait twice
            try:
                consumers = (await ask({"op": "consumers"})).get("consumers")
            except GatewayError:
                pass  # the lag samples are left out; the rest of the scrape stands
        return Response(
            metrics.render(
                reply,
                consumers if isinstance(consumers, list) else None,
                {"open_streams": streams.everywhere(), "max_streams": http.max_streams * http.workers},
            ),
            media_type=metrics.CONTENT_TYPE_LATEST,
        )

    # Innermost: a HEAD answered as GET is checked as the GET (transport/gateway_query.py).
    app.add_middleware(QueryCheck, routes=app.router.routes, refuse=lambda error: json_response({"error": error}, 400))
    app.add_middleware(HeadAsGet, paths=HEAD_AS_GET_PATHS)
    app.add_middleware(HostCheck, names=answered_hosts(config))
    return app


# RFC 3986's uri-host (an IP literal in brackets, or a registered name or IPv4 address) and an
# optional port: the value RFC 9112 §3.2 has a server refuse with 400 otherwise.
_HOST_VALUE = re.compile(rb"(?:\[[0-9A-Za-z:._~!$&'()*+,;=%-]*\]|[0-9A-Za-z._~!$&'()*+,;=%-]*)(?::[0-9]*)?")


class HostCheck:
    """ASGI middleware: answer **421** to a request whose ``Host`` is not one of ``names`` (None:
    every name is). A request without ``Host`` is answered if it is HTTP/1.0 (no browser sends
    one so); as RFC 9112 has it, one with more than one ``Host``, or HTTP/1.1 without one, or
    whose value is no host (a space in it, say), is a 400.
    (An absolute-form target's host stands for the ``Host``: see :mod:`transport.http_protocol`.)"""

    def __init__(self, app: ASGIApp, names: frozenset[str] | None) -> None:
        self.app = app
        self.names = names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hosts = [value for key, value in scope["headers"] if key == b"host"]
        if len(hosts) > 1 or (not hosts and scope["http_version"] == "1.1"):
            problem = "more than one Host header" if hosts else "an HTTP/1.1 request without a Host header"
            await json_response({"error": f"{problem}: send exactly one Host header"}, 400)(scope, receive, send)
            return
        if hosts and _HOST_VALUE.fullmatch(hosts[0]) is None:
            shown = hosts[0].decode("latin-1")[:100]
            message = f"the Host header {shown!r} is not a host name or address, with an optional :port"
            await json_response({"error": message}, 400)(scope, receive, send)
            return
        if self.names is None:
            await self.app(scope, receive, send)
            return
        raw = hosts[0] if hosts else None
        name = None if raw is None else host_name(raw.decode("latin-1"))
        if name is None or name in self.names or _is_loopback_address(name):
            await self.app(scope, receive, send)
            return
        shown = raw.decode("latin-1")[:100] if raw is not None else ""
        response = json_response(
            {
                "error": f"this gateway does not answer to the name {shown!r}: it answers to"
                f" {', '.join(sorted(self.names))}; add the name to [http] allowed_hosts to reach it so"
            },
            421,
        )
        await response(scope, receive, send)


def _is_loopback_address(name: str) -> bool:
    """Whether ``name`` is a loopback address however written (``0:0:0:0:0:0:0:1``,
    ``::ffff:127.0.0.1``, ``127.1.2.3``), which no web page can make its own name."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def host_name(host: str) -> str:
    """A ``Host`` header's name, without its port or an IPv6 address's brackets, in lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0].rstrip(".") if host.count(":") == 1 else host.rstrip(".")


HEAD_AS_GET_PATHS = frozenset({"/events", "/stats", "/topics", "/metrics"})


class HeadAsGet:
    """ASGI middleware: ``HEAD`` on one of ``paths`` answers what ``GET`` would, without the body
    (RFC 9110 has every server take HEAD where it takes GET; FastAPI routes take only the methods
    they list). ``/healthz`` lists its HEAD itself, to document it."""

    def __init__(self, app: ASGIApp, paths: frozenset[str]) -> None:
        self.app = app
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


def _answered(reply: dict[str, Any]) -> dict[str, Any]:
    """A query reply, or :class:`GatewayError` 503 when the daemon answered with an error."""
    if "error" in reply:
        raise GatewayError(503, f"the daemon could not answer: {reply['error']}")
    return reply


def _warn_unreachable(link: DaemonLink) -> None:
    """Log, once at start, why the daemon does not take the gateway's connections, if it does not."""
    for problem in link.check_handshakes(HANDSHAKE_CHECK_S):
        log.warning("cannot reach the daemon: %s", problem)


async def _acquire(limiter: anyio.CapacityLimiter, deadline: float, link: DaemonLink) -> bool:
    """Take a token of ``limiter`` before ``deadline`` (time.monotonic); False, holding none, if none
    came or the gateway is stopping (``link.stopping``, looked at every ``STOP_POLL_S``).

    A free token is taken at once, however little time is left: a timed acquire checkpoints
    first, so with its deadline (nearly) past it would fail and blame busy holders that are not.
    """
    if link.stopping:
        return False
    try:
        limiter.acquire_nowait()
        return True
    except anyio.WouldBlock:
        pass
    while not link.stopping:
        left = deadline - time.monotonic()
        with anyio.move_on_after(max(0.0, min(left, STOP_POLL_S))):
            await limiter.acquire()
            return True  # no await between acquire and this line, so a timeout cannot fall between
        if left <= STOP_POLL_S:
            return False
    return False


def _on_stop_signals(stop: Callable[[], None]) -> Callable[[], None]:
    """Make SIGINT and SIGTERM call ``stop`` before the handler they had (uvicorn's, which begins its
    graceful shutdown); returns what puts that handler back.

    Why: uvicorn waits for requests in progress, then cancels them into plain-text 500s, and a
    worker thread waiting for the daemon holds the process until its own timeout. ``stop`` makes
    those waits end in time with a JSON 503. Signals can only be handled on the main thread, and
    only a handler that is a function can be chained; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if not callable(handler):
            continue

        def chained(number: int, frame: Any, handler: Callable[[int, Any], Any] = handler) -> None:
            stop()
            handler(number, frame)

        previous[signum] = handler
        signal.signal(signum, chained)

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


async def _on_thread(function: Callable[..., T], *args: Any, limiter: anyio.CapacityLimiter) -> T:
    return await anyio.to_thread.run_sync(function, *args, limiter=limiter)


def _check_topic(topic: str | None) -> None:
    """400 for a ``topic`` parameter no event can have (empty, with whitespace, too long)."""
    if topic is not None:
        try:
            check_query_topic(topic)
        except QueryError as exc:
            raise GatewayError(400, str(exc)) from None


def _one_header(request: Request, name: str) -> str | None:
    """The value of a header that holds one (None if absent), or :class:`GatewayError` 400 when it
    is given more than once: the first would win silently."""
    values = request.headers.getlist(name)
    if len(values) > 1:
        given = ", ".join(repr(_header_text(value)) for value in values)
        raise GatewayError(400, f"{name} given {len(values)} times ({given}): give it once")
    return values[0] if values else None


def _check_content_type(value: str | None) -> None:
    """Refuse with 415 a ``POST /publish`` body not declared ``application/json``, or declared in a
    charset other than UTF-8 (other parameters are ignored).

    Why: a web page on any origin can make a browser send a text/plain or form POST without asking
    first (no CORS preflight), so a gateway taking those would let any page a user opens publish
    through a gateway on that user's loopback. A JSON POST from another origin needs a preflight,
    which the gateway does not answer.
    """
    value = _header_text(value) if value else value  # quoted back as the client wrote it
    media_type, _, parameters = (value or "").partition(";")
    if media_type.strip().lower() != "application/json":
        given = f"Content-Type {value}" if value else "no Content-Type"
        raise GatewayError(415, f"the body must be sent as Content-Type: application/json, not with {given}")
    # JSON is UTF-8 (RFC 8259); a body declared in another charset would be misread, not refused.
    for parameter in parameters.split(";"):
        name, _, charset = parameter.partition("=")
        charset = charset.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset.replace("-", "").replace("_", "") != "utf8":
            raise GatewayError(
                415,
                f"the body is declared as charset {charset!r}: JSON is read as UTF-8 only; send it as UTF-8",
            )


def _check_content_encoding(values: list[str]) -> None:
    """Refuse with 415 a ``POST /publish`` body in a content coding (gzip, say): the gateway
    decodes none, and would read the compressed bytes as JSON and refuse them in its words."""
    codings = [token.strip().lower() for value in values for token in value.split(",")]
    encoded = [coding for coding in codings if coding not in ("", "identity")]
    if encoded:
        raise GatewayError(
            415,
            f"the body is sent with Content-Encoding {_header_text(', '.join(encoded))[:60]}, which the gateway "
            "does not decode: send the JSON uncompressed",
        )


async def _read_body(request: Request, limit: int, send_by: float) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (before reading it all),
    and with 503 if it has not all arrived by ``send_by`` (monotonic): a client that stalls mid-body
    must not hold a connection for ever. A client gone mid-body gets a 400 nobody reads, logged
    as one line rather than a traceback."""
    declared = request.headers.get("content-length")
    if declared is not None and in_digits(declared) and int(declared) > limit:
        raise GatewayError(413, f"the body is {declared} bytes, over the limit of {limit} ([http] max_body_bytes)")
    chunks = []
    size = 0
    try:
        with anyio.fail_after(max(0.0, send_by - time.monotonic())):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise GatewayError(413, f"the body is over the limit of {limit} bytes ([http] max_body_bytes)")
                chunks.append(chunk)
    except TimeoutError:
        raise GatewayError(
            503,
            f"the request's time budget ran out before sending: the body had not all arrived ({size} bytes came) "
            "within [http] request_timeout_ms; nothing was sent: send the whole body at once",
        ) from None
    except ClientDisconnect:
        log.info("a client closed its connection before sending the whole body (%d bytes came); nothing was sent", size)
        raise GatewayError(400, "the client closed the connection before the body ended; nothing was sent") from None
    return b"".join(chunks)
