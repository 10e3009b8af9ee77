"""Topic-affine publishing to several daemons that share one database.

``Publisher(endpoints=[...])`` makes an :class:`AffinePublisher`: one acknowledged
:class:`~transport.publisher.Publisher` per daemon, and each event goes to the daemon its topic
ranks first by rendezvous (highest-random-weight) hashing: ``hash(endpoint, topic)`` is
computed for every endpoint and the highest wins. Every publisher with the same endpoint list
sends a topic to the same daemon, and when a daemon is added or removed only the topics it
wins or won move.

A daemon that does not acknowledge (its oldest batch has waited ``failover_after`` seconds,
or its window of batches is full for that long) is passed over: the topic's events go to the
next daemon in the topic's ranking *while* that lasts, and back as soon as the first daemon
acknowledges again. One that gave its events up is passed over for a ``deadline`` (twice as
long after each give-up in a row, up to eight), then tried again. Batches already sent to the
silent daemon stay with it (its publisher keeps retrying them with the same batch ids) until
its ``deadline``; then they are sent through the other daemons. Re-sends are safe: the
daemons deduplicate through their shared database.

A daemon whose connection is down (refused: nothing listens there; cut; or its handshake
failed) is passed over at once, until a handshake with it succeeds again. Each daemon's
publisher reads its socket's monitor and hands a batch to ZeroMQ only while a handshake holds,
so what it holds for a daemon that is down never left this process: it goes at once (within a
call or two) to the daemons that are up, as does what waits for a daemon that has completed no
handshake for ``failover_after``. Neither can cause a duplicate. Only what was handed over on a
connection that was up waits for its ``deadline``, as above.

Holding a batch for a daemon that is down is no attempt: no ``ack_timeout`` runs for it, and
``totals.retries``, ``on_retry`` and ``max_attempts`` count none (only its ``deadline`` runs).
The publisher keeps its socket open meanwhile, ZeroMQ reconnecting every 0.1 to 0.2 s, so when
every daemon is down what it holds goes within that of one listening again (a socket closed for
a retry pause would find it only when the pause ended). A connection cut with batches handed
over on it is an attempt that failed (their answers cannot come: the daemon answers on the
connection a batch came by): its socket is replaced at once, and they go again, counted as
retries, as soon as the daemon is back.

A daemon that refuses this publisher's handshake (its CURVE keys) is down so, and its publisher
asks it again on a new socket every ``REFUSAL_STANDS_S`` (libzmq never connects a socket again
once its key was refused), so that it gets its topics back once its keys are put right. When
every daemon refuses, the call raises :class:`~transport.publisher.PublisherRefused` at once,
naming each, with every event held: no retry could fare better. (When some only are down, the
others' refusal is not the whole story, and the ``deadline`` decides as above.)

Order: with one database a topic's ``seq`` is its commit order. While a topic stays on one
daemon its events are ordered by that daemon's reorder window, as with a single daemon; during
a fail-over two daemons commit the topic's events in whatever order their commits land.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from transport import arguments
from transport.publisher import (
    BatchRefused,
    DeliveryFailed,
    InvalidEvent,
    Publisher,
    PublisherClosed,
    PublisherRefused,
    PublishTimeout,
    Totals,
    closed_unacknowledged,
    closes_when_asked,
)

# How long one attempt to queue an event on a daemon may wait before routing is looked at again;
# also how often a publish services the other daemons' publishers and moves events off one that is down.
_ROUTE_STEP_S = 0.05
_ORDER_CACHE = 100_000
TOTALS_FIELDS = tuple(spec.name for spec in dataclasses.fields(Totals))

log = logging.getLogger(__name__)


def rendezvous_order(topic: str, endpoints: Sequence[str]) -> list[str]:
    """The endpoints ranked for ``topic``, best first (highest-random-weight hashing)."""

    def weight(endpoint: str) -> bytes:
        return hashlib.blake2b(f"{endpoint}\0{topic}".encode(), digest_size=8).digest()

    return sorted(endpoints, key=weight, reverse=True)


# The longest a daemon that keeps giving events up is passed over, in ``deadline``s.
MAX_PASS_OVER = 8


class _DaemonPublisher(Publisher):
    """One daemon's publisher: it watches its connection, so that batches that never reached the
    daemon can go to another (see :meth:`AffinePublisher._move_unsent`), holding them while it is
    down costs no attempt, and they go as soon as it is back (see the module docstring)."""

    _watches_connection = True


@dataclasses.dataclass(slots=True)
class _GiveUps:
    """A daemon's last give-up: when, how many in a row (with no acknowledgement between), and
    its publisher's acknowledged batches then (more since means it answered again)."""

    since: float
    times: int
    batches_acked: int


class AffinePublisher(Publisher):
    """A :class:`Publisher` over several daemons, each topic affine to one (see the module docstring).

    Made by ``Publisher(endpoints=[...], **options)``; ``options`` are :class:`Publisher`'s and
    apply to each daemon's publisher. ``failover_after`` defaults to ``ack_timeout``.
    """

    def __init__(  # the base's __init__ makes one socket; this one makes one publisher per daemon
        self,
        endpoint: str | None = None,
        *,
        endpoints: Sequence[str] = (),
        failover_after: float | None = None,
        **options: Any,
    ) -> None:
        if isinstance(endpoints, str):
            raise TypeError("endpoints must be a list of endpoints, not one string")
        arguments.seconds("failover_after", failover_after, none=True, zero=False)
        listed = list(dict.fromkeys([*([endpoint] if endpoint else []), *endpoints]))
        if not listed:
            raise ValueError("endpoints must name at least one daemon")
        if options.get("acked", True) is False:
            raise ValueError("several endpoints need acknowledged mode: fail-over is decided by acknowledgements")
        self.endpoints = listed
        self.endpoint = ",".join(listed)
        self.acked = True
        self.failover_after = failover_after if failover_after is not None else float(options.get("ack_timeout", 5.0))
        self._publishers: dict[str, Publisher] = {name: _DaemonPublisher(name, **options) for name in listed}
        # When a publish next services the other daemons' publishers and moves what one that is down holds.
        self._others_at = 0.0
        self._orders: dict[str, list[str]] = {}
        self._give_ups: dict[str, _GiveUps] = {}  # endpoint -> its publisher's last give-up
        self._closed = False
        self._close_asked = False  # by on_ack or a signal handler within a call: that call closes
        self._closing = False  # inside close(): a close() asked again (flushing) leaves it to finish
        self._in_call: Any = threading.RLock()  # held by the thread inside a public call
        self._forks = next(iter(self._publishers.values()))._forks
        self.totals = Totals()
        self.results = next(iter(self._publishers.values())).results  # the first daemon's; on_ack sees all

    # -- routing ---------------------------------------------------------------------------

    def ranking(self, topic: str) -> list[str]:
        """The daemons ranked for ``topic``, best first."""
        order = self._orders.get(topic)
        if order is None:
            if len(self._orders) >= _ORDER_CACHE:
                self._orders.clear()
            order = self._orders[topic] = rendezvous_order(topic, self.endpoints)
        return order

    def acknowledging(self, endpoint: str) -> bool:
        """Whether the daemon at ``endpoint`` is answering: its connection is not down (refused,
        cut, or its handshake failed), no batch waits longer than ``failover_after``, and it is not
        being passed over after giving events up (see :meth:`_passed_over`)."""
        publisher = self._publishers[endpoint]
        return (
            publisher._connection(time.monotonic()) != "down"
            and publisher.oldest_unacked_age() < self.failover_after
            and not self._passed_over(endpoint)
        )

    def _passed_over(self, endpoint: str) -> bool:
        """Whether ``endpoint`` gave events up lately and has acknowledged nothing since.

        Once its publisher gives up, it holds nothing, so by its waiting batches alone it would
        look answering: a dead daemon would get a fresh ``failover_after`` of events every
        ``deadline``, each to wait that long before going elsewhere. So it is passed over for
        ``deadline`` seconds after giving up, twice as long after each give-up in a row (up to
        :data:`MAX_PASS_OVER` times), then tried again; an acknowledgement ends it.
        """
        give_ups = self._give_ups.get(endpoint)
        if give_ups is None or self._answered_since(endpoint, give_ups):
            return False
        passed_over_s = self._memory(endpoint) * min(1 << (give_ups.times - 1), MAX_PASS_OVER)
        return time.monotonic() - give_ups.since < passed_over_s

    def _answered_since(self, endpoint: str, give_ups: _GiveUps) -> bool:
        return self._publishers[endpoint].totals.batches_acked > give_ups.batches_acked

    def _memory(self, endpoint: str) -> float:
        """How long a give-up of ``endpoint`` counts: its ``deadline`` (else ``failover_after``)."""
        return self._publishers[endpoint].deadline or self.failover_after

    def route(self, topic: str) -> str:
        """Where ``topic``'s next event goes: the first daemon of its ranking that acknowledges."""
        ranking = self.ranking(topic)
        for endpoint in ranking:
            if self.acknowledging(endpoint):
                return endpoint
        return ranking[0]

    # -- the public calls ------------------------------------------------------------------

    @closes_when_asked
    def publish(self, event: dict[str, Any], timeout: float | None = None) -> None:
        """Queue one event on its topic's daemon (see :meth:`Publisher.publish`)."""
        self._check_open((event,))
        arguments.seconds("timeout", timeout, none=True)
        topic = event.get("topic") if isinstance(event, dict) else None
        wait = self._publishers[self.endpoints[0]].block_timeout if timeout is None else timeout
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            target = self.route(topic) if isinstance(topic, str) else self.endpoints[0]
            if isinstance(topic, str) and self._holds_unsent_before(topic, target):
                # What a daemon ranked before it holds goes first, or it would land after this event.
                self._move_unsent()
            step = _ROUTE_STEP_S if deadline is None else max(0.0, min(_ROUTE_STEP_S, deadline - time.monotonic()))
            try:
                self._publishers[target].publish(event, timeout=step)
                break
            except PublishTimeout:
                if deadline is not None and time.monotonic() >= deadline:
                    self._refresh_totals()
                    raise
                if self._close_asked:  # by on_ack or a signal handler: no more waiting
                    closed = self._closed_during_call()
                    closed.events.append(event)  # queued nowhere: handed back with the others
                    raise closed from None
                try:
                    self._service_others(target)
                except (DeliveryFailed, BatchRefused) as exc:
                    exc.events.append(event)  # queued nowhere yet: handed back with the others
                    raise
            except DeliveryFailed as exc:
                # exc.events holds this event too (queued and given up, or never queued): rerouted
                # with the rest, or handed back with them; publishing it once more would send it twice.
                self._reroute(exc, target)
                break
        now = time.monotonic()
        if now >= self._others_at:
            self._others_at = now + _ROUTE_STEP_S
            # The other daemons' publishers too: one passed over gets no event, so without this its
            # replies went unread and its retries and deadline never ran while only publish() was
            # called; a daemon back after losing a batch stayed passed over until a flush.
            self._service_others(target)
        self._refresh_totals()

    @closes_when_asked
    def publish_many(self, events: Iterable[dict[str, Any]], timeout: float | None = None) -> None:
        """Validate every event first, then queue each on its topic's daemon; one bad event queues
        none (:class:`InvalidEvent` names its position), as :meth:`Publisher.publish_many`."""
        self._check_open(events)
        arguments.seconds("timeout", timeout, none=True)
        events = list(events)
        check = self._publishers[self.endpoints[0]]._encode
        for index, event in enumerate(events):
            try:
                check(event)
            except InvalidEvent as exc:
                raise InvalidEvent(f"event {index}: {exc}") from None
        for queued, event in enumerate(events):
            if self._close_asked:  # by on_ack or a signal handler: the rest is not queued
                closed = self._closed_during_call()
                closed.events.extend(events[queued:])
                raise closed
            try:
                self.publish(event, timeout)
            except PublishTimeout as exc:
                exc.queued = queued
                raise
            except (DeliveryFailed, BatchRefused, PublisherClosed) as exc:
                exc.events.extend(events[queued + 1 :])  # never queued: handed back with the rest
                raise

    @closes_when_asked
    def flush(self, timeout: float | None = None) -> None:
        """Wait until every daemon has acknowledged everything (see :meth:`Publisher.flush`)."""
        self._check_open()
        arguments.seconds("timeout", timeout, none=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            waiting = False
            for name, publisher in self._publishers.items():
                try:
                    publisher.flush(_ROUTE_STEP_S)
                except PublishTimeout:
                    waiting = True
                except DeliveryFailed as exc:
                    self._reroute(exc, name)
                    waiting = True
            self._move_unsent()
            self._refresh_totals()
            # Each daemon's publisher waited for what it held then; an on_ack may have published
            # to one already passed in this round since, and that must be acknowledged too.
            if not waiting and not self.unacknowledged:
                return
            if self._close_asked:  # by on_ack or a signal handler: no more waiting
                raise self._closed_during_call()
            if deadline is not None and time.monotonic() >= deadline:
                raise PublishTimeout(
                    f"{self.unacknowledged} events still unacknowledged by {self.endpoint} after {timeout:g} s"
                )

    @closes_when_asked
    def poll(self, timeout: float = 0.0) -> int:
        """Do what is due on every daemon's publisher; events not yet acknowledged."""
        self._check_open()
        arguments.seconds("timeout", timeout)
        share = timeout / len(self._publishers)
        for name, publisher in self._publishers.items():
            try:
                publisher.poll(share)
            except DeliveryFailed as exc:
                self._reroute(exc, name)
        self._move_unsent()
        self._refresh_totals()
        return self.unacknowledged

    def close(self, timeout: float | None = None, flush: bool = True) -> None:
        """Flush (unless ``flush`` is False), then close every daemon's publisher.

        By default it waits ``close_timeout``, and at least long enough for what a silent daemon
        holds to reach the others: its publisher gives its batches up at their ``deadline``, and
        they get ``failover_after`` more to be acknowledged elsewhere. On a timeout the error's
        ``events`` holds every event not acknowledged. An ``on_ack`` failure, or a ``close()``
        within a call, is handled as :meth:`Publisher.close` says.
        """
        super().close(timeout, flush)

    @closes_when_asked
    def _close(self, timeout: float | None, flush: bool) -> None:
        if self._closed:
            return
        if self._forked():
            flush = False  # the parent's events, which the parent still holds and sends
        first = self._publishers[self.endpoints[0]]
        wait = first.close_timeout if timeout is None else timeout
        if timeout is None and first.deadline is not None:
            wait = max(wait, first.deadline + self.failover_after)
        self._closing = True
        for publisher in self._publishers.values():
            publisher._closing = True  # an on_ack failure does not stop the flush
        try:
            try:
                if flush:
                    self.flush(wait)
            except PublishTimeout as exc:
                raise closed_unacknowledged(self.endpoint, wait, self.held_events()) from (
                    self._first_callback_error() or exc
                )
            failure = self._first_callback_error()
            if failure is not None:
                raise failure
        finally:
            self._closing = False
            for publisher in self._publishers.values():
                publisher._closing = False
                publisher._callback_error = None
            self._close_as_asked()

    def _first_callback_error(self) -> Exception | None:
        """The first on_ack failure any daemon's publisher held aside while closing."""
        return next((p._callback_error for p in self._publishers.values() if p._callback_error is not None), None)

    def _close_as_asked(self) -> None:
        """Close every daemon's publisher at once, what they hold staying in :meth:`held_events`."""
        if self._closed:
            return
        self._closed = True
        for publisher in self._publishers.values():
            publisher.close(timeout=0, flush=False)
        self._refresh_totals()

    def held_events(self) -> list[dict[str, Any]]:
        """Every event held by the daemons' publishers (each one's in the order published)."""
        return [event for publisher in self._publishers.values() for event in publisher.held_events()]

    def __repr__(self) -> str:
        return f"Publisher(endpoints={self.endpoints!r}, unacknowledged={self.unacknowledged})"

    @property
    def unacknowledged(self) -> int:
        return sum(publisher.unacknowledged for publisher in self._publishers.values())

    @property
    def in_flight(self) -> int:
        return sum(publisher.in_flight for publisher in self._publishers.values())

    def oldest_unacked_age(self) -> float:
        return max(publisher.oldest_unacked_age() for publisher in self._publishers.values())

    # -- helpers ---------------------------------------------------------------------------

    def _service_others(self, busy: str) -> None:
        """Read acknowledgements, retry and give up when due on the other daemons (while one makes
        us wait, and every ``_ROUTE_STEP_S`` of publishing), then move what a daemon that is down holds."""
        for name, publisher in self._publishers.items():
            if name != busy:
                try:
                    publisher.poll()
                except DeliveryFailed as exc:
                    self._reroute(exc, name)
        self._move_unsent()

    def _holds_unsent_before(self, topic: str, target: str) -> bool:
        """Whether a daemon ranked before ``target`` for ``topic`` holds events it did not send
        (a partial batch, or batches held while its connection is not up): they may be the topic's."""
        for name in self.ranking(topic):
            if name == target:
                return False
            publisher = self._publishers[name]
            if publisher._pending.events or publisher._held:
                return True
        return False

    def _move_unsent(self) -> None:
        """Send through the daemons that are up what a daemon that is not holds and never sent.

        A daemon is left when its connection is down (refused, cut, or its handshake failed), or
        when it has completed no handshake and its oldest batch has waited ``failover_after``
        (a stopped process's kernel takes the connection, and nothing more happens). Only what
        never left this process moves (its publisher hands a batch to ZeroMQ only while the
        connection is up), so the daemon cannot have it: no duplicate, and nothing is lost. What
        was sent on a connection that was up stays, as with a silent daemon, until its ``deadline``.
        """
        now = time.monotonic()
        states = {name: publisher._connection(now) for name, publisher in self._publishers.items()}
        if self.unacknowledged and all(p._handshakes.refusal is not None for p in self._publishers.values()):
            raise self._refused_everywhere(now)
        up = [name for name, state in states.items() if state == "up" and self.acknowledging(name)]
        if not up:
            return
        for name, publisher in self._publishers.items():
            if states[name] == "up" or not publisher.unacknowledged:
                continue
            if states[name] == "connecting" and publisher.oldest_unacked_age() < self.failover_after:
                continue  # maybe still connecting: as a daemon that does not acknowledge, it gets failover_after
            events = publisher._take_unsent()
            if not events:
                continue
            moved: dict[str, list[dict[str, Any]]] = {}
            for event in events:
                target = next(other for other in self.ranking(str(event.get("topic", ""))) if other in up)
                moved.setdefault(target, []).append(event)
            for target, share in moved.items():
                self._publishers[target]._adopt(share)
            log.info(
                "%s %s: the %d events held for it, never sent, go to %s",
                name,
                "is down (connection refused or cut, or its handshake failed)"
                if states[name] == "down"
                else f"completed no handshake in {self.failover_after:g} s",
                len(events),
                ", ".join(moved),
            )

    def _refused_everywhere(self, now: float) -> PublisherRefused:
        """Every daemon refuses this publisher's handshake (each on a socket opened within
        ``REFUSAL_STANDS_S``): a :class:`PublisherRefused` naming each, with every event held."""
        refusals: dict[str, str] = {}
        events: list[dict[str, Any]] = []
        elapsed, attempts = 0.0, 0
        for publisher in self._publishers.values():
            refused = publisher._refused(now)
            refusals.update(refused.refusals)
            events.extend(refused.events)
            elapsed, attempts = max(elapsed, refused.elapsed), max(attempts, refused.attempts)
        self._refresh_totals()
        return PublisherRefused(refusals, elapsed, attempts, events)

    def _reroute(self, failed: DeliveryFailed, endpoint: str) -> None:
        """Send the events a daemon never acknowledged through the others (its publisher gave up).

        Raises ``failed`` (every event in it) when every other daemon gave events up too within
        its own ``deadline``: they would only go round the dead daemons for ever. An event the
        others cannot take is handed back with those after it, never dropped.
        """
        now = time.monotonic()
        last = self._give_ups.get(endpoint)
        times = 1 if last is None or self._answered_since(endpoint, last) else last.times + 1
        self._give_ups[endpoint] = _GiveUps(now, times, self._publishers[endpoint].totals.batches_acked)
        memory = self._memory(endpoint)
        others = [
            name for name in self.endpoints if name not in self._give_ups or now - self._give_ups[name].since > memory
        ]
        if not others:
            self._refresh_totals()
            raise failed
        for index, event in enumerate(failed.events):
            topic = event.get("topic", "")
            ranking = [name for name in self.ranking(str(topic)) if name in others]
            target = next((name for name in ranking if self.acknowledging(name)), ranking[0])
            try:
                self._publishers[target].publish(event)
            except (DeliveryFailed, BatchRefused) as exc:
                exc.events.extend(failed.events[index + 1 :])
                raise
            except PublishTimeout:
                failed.events = failed.events[index:]  # not queued: this one and the rest go back
                raise failed from None

    def _refresh_totals(self) -> None:
        summed = Totals()
        for publisher in self._publishers.values():
            for name in TOTALS_FIELDS:
                setattr(summed, name, getattr(summed, name) + getattr(publisher.totals, name))
        self.totals = summed
