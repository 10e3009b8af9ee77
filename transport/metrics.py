"""Prometheus metrics: the daemon's stats and consumers replies in the text exposition format.

:func:`render` turns one ``stats`` reply (or ``None`` when the daemon did not answer) and one
``consumers`` reply into the body of ``GET /metrics``. Each scrape builds a fresh registry
around a snapshot collector, so a scrape costs the caller's two queries to the daemon and the
figures never mix two scrapes' answers. Counters get prometheus_client's ``_total`` suffix;
``eventagg_up`` says whether the daemon answered, and is the only figure of the daemon's when it
did not (Prometheus' own convention for ``up``).

The ``eventagg_*`` figures are the connected daemon's own. On PostgreSQL, where several daemons
share one database, the stats reply also carries ``cluster`` (every daemon's committed counters,
summed): those become ``eventagg_cluster_*``, and ``eventagg_cluster_up`` says whether the database
answered for them. Each named consumer gives ``eventagg_consumer_lag`` and
``eventagg_consumer_position``, labelled with its ``consumer`` name and ``topic`` (empty for
every topic). The gateway adds its own figures (``eventagg_gateway_*``: its open event streams
and their limit, over all its worker processes), given whether or not the daemon answered.
Pure: no sockets, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = [
    "CLUSTER_COUNTERS",
    "CLUSTER_GAUGES",
    "CONSUMER_GAUGES",
    "CONTENT_TYPE_LATEST",
    "COUNTERS",
    "GATEWAY_GAUGES",
    "GAUGES",
    "render",
]

# stats key -> (metric family name; prometheus_client appends _total to counters), HELP text
COUNTERS: dict[str, tuple[str, str]] = {
    # The committed part of the stats' ``received`` (see _Snapshot.collect): a counter must never
    # go back, and events in flight when a daemon is killed are not counted.
    "received": (
        "eventagg_received",
        "Valid events this daemon received, counted once committed (those in flight are eventagg_in_flight).",
    ),
    "unique_processed": (
        "eventagg_unique_processed",
        "Events this daemon stored: the first copy of each (topic, event_id).",
    ),
    "duplicate_dropped": (
        "eventagg_duplicate_dropped",
        "Events this daemon dropped as copies of an already stored event.",
    ),
    # Counts rejections, not events: a batch over max_batch_events is one, however many it held.
    "rejected": (
        "eventagg_rejected",
        "Rejections by this daemon: each invalid event counts one, and so does each message refused whole "
        "(not msgpack, empty, over the batch limit), however many events it held.",
    ),
    "late": (
        "eventagg_late",
        "Events this daemon stored after a later-timestamped event of their topic had left the window.",
    ),
    "conflicting_duplicates": (
        "eventagg_conflicting_duplicates",
        "Duplicates this daemon found to differ from the stored event (also counted as duplicate_dropped).",
    ),
    "expired": ("eventagg_expired", "Stored events this daemon's retention sweeps deleted."),
    "refused": (
        "eventagg_refused",
        "Connections this daemon refused at the CURVE handshake since it started (a key not authorized, no CURVE).",
    ),
}
GAUGES: dict[str, tuple[str, str]] = {
    "in_flight": ("eventagg_in_flight", "Events this daemon admitted and has not yet committed."),
    "stored": ("eventagg_stored", "Events this daemon stored minus those its retention sweeps deleted."),
    "topic_count": (
        "eventagg_topics",
        "Topics whose first event this daemon stored (on SQLite every topic ever stored, including those "
        "whose events retention has since deleted; eventagg_cluster_topics on PostgreSQL).",
    ),
    "uptime_s": ("eventagg_uptime_seconds", "Seconds since the daemon started."),
}
UP = ("eventagg_up", "1 when the daemon answered this scrape's stats query, else 0.")

# The stats reply's ``cluster`` map (PostgreSQL only): committed counters summed over every daemon.
CLUSTER_COUNTERS: dict[str, tuple[str, str]] = {
    "received": ("eventagg_cluster_received", "Events received by every daemon of the cluster, committed."),
    "unique_processed": (
        "eventagg_cluster_unique_processed",
        "Events stored by the cluster: each (topic, event_id) once.",
    ),
    "duplicate_dropped": (
        "eventagg_cluster_duplicate_dropped",
        "Events the cluster dropped as copies of a stored event.",
    ),
    "rejected": ("eventagg_cluster_rejected", "Events the cluster's daemons refused as invalid."),
    "late": ("eventagg_cluster_late", "Events the cluster stored after their topic's window had moved past them."),
    "conflicting_duplicates": (
        "eventagg_cluster_conflicting_duplicates",
        "Duplicates whose content differed from the stored event, over the cluster.",
    ),
    "expired": ("eventagg_cluster_expired", "Stored events the cluster's retention sweeps deleted."),
}
CLUSTER_GAUGES: dict[str, tuple[str, str]] = {
    "stored": ("eventagg_cluster_stored", "Events in the shared database now: stored minus expired, over the cluster."),
    "topic_count": (
        "eventagg_cluster_topics",
        "Topics ever stored over the cluster, including those whose events retention has since deleted.",
    ),
}
CONSUMER_GAUGES: dict[str, tuple[str, str]] = {
    "lag": (
        "eventagg_consumer_lag",
        "How far the head is past the named consumer's acknowledged position (seqs of its topic, or "
        "commit positions for every topic); negative when the position is past the head.",
    ),
    "position": ("eventagg_consumer_position", "The named consumer's acknowledged position."),
}
# The gateway's own figures (over all its worker processes), given to render() by the gateway.
GATEWAY_GAUGES: dict[str, tuple[str, str]] = {
    "open_streams": (
        "eventagg_gateway_open_streams",
        "GET /events/stream connections this gateway has open, over all its worker processes.",
    ),
    "max_streams": (
        "eventagg_gateway_max_streams",
        "[http] max_streams times [http] workers: the most event streams this gateway opens (each "
        "process refuses its own connections past max_streams with 503).",
    ),
}
CLUSTER_UP = (
    "eventagg_cluster_up",
    "1 when the shared database answered for this scrape's cluster counters, else 0 (PostgreSQL only).",
)


class _Snapshot(Collector):
    """Yields the metrics of one stats reply, taken before the scrape."""

    def __init__(
        self, stats: dict[str, Any] | None, consumers: list[Any] | None, gateway: Mapping[str, float] | None
    ) -> None:
        self._stats = stats
        self._consumers = consumers or []
        self._gateway = gateway or {}

    def collect(self) -> Iterable[Metric]:
        stats = self._stats
        yield from _families(dict(self._gateway), {}, GATEWAY_GAUGES)
        yield GaugeMetricFamily(UP[0], UP[1], value=0 if stats is None else 1)
        if stats is None:
            return
        figures = dict(stats)
        if _is_number(stats.get("received")) and _is_number(stats.get("in_flight")):
            figures["received"] = stats["received"] - stats["in_flight"]
        yield from _families(figures, COUNTERS, GAUGES)
        yield from self._consumer_families()
        if "cluster" not in stats and "cluster_error" not in stats:
            return  # SQLite: the daemon is the whole of it
        cluster = stats.get("cluster")
        if not isinstance(cluster, dict):
            yield GaugeMetricFamily(CLUSTER_UP[0], CLUSTER_UP[1], value=0)
            return
        yield GaugeMetricFamily(CLUSTER_UP[0], CLUSTER_UP[1], value=1)
        yield from _families(cluster, CLUSTER_COUNTERS, CLUSTER_GAUGES)

    def _consumer_families(self) -> Iterable[Metric]:
        named = [c for c in self._consumers if isinstance(c, dict) and isinstance(c.get("name"), str)]
        for key, (name, text) in CONSUMER_GAUGES.items():
            family = GaugeMetricFamily(name, text, labels=["consumer", "topic"])
            for consumer in named:
                if _is_number(consumer.get(key)):
                    topic = consumer.get("topic")
                    family.add_metric([consumer["name"], topic if isinstance(topic, str) else ""], consumer[key])
            if family.samples:
                yield family


def _families(
    figures: dict[str, Any], counters: dict[str, tuple[str, str]], gauges: dict[str, tuple[str, str]]
) -> Iterable[Metric]:
    for key, (name, text) in counters.items():
        if _is_number(figures.get(key)):
            yield CounterMetricFamily(name, text, value=figures[key])
    for key, (name, text) in gauges.items():
        if _is_number(figures.get(key)):
            yield GaugeMetricFamily(name, text, value=figures[key])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def render(
    stats: dict[str, Any] | None, consumers: list[Any] | None = None, gateway: Mapping[str, float] | None = None
) -> bytes:
    """The text exposition of one stats reply, the ``consumers`` list of one consumers reply
    (``None``: not answered) and the gateway's own figures (keys of :data:`GATEWAY_GAUGES`);
    stats ``None`` (no answer) gives ``eventagg_up 0`` and no other figure of the daemon's."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(stats, consumers, gateway))
    return generate_latest(registry)
