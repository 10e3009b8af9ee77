"""Prometheus metrics: the daemon's stats reply rendered in the text exposition format.

:func:`render` turns one ``stats`` reply (or ``None`` when the daemon did not answer) into the
body of ``GET /metrics``. Each scrape builds a fresh registry around a snapshot collector, so a
scrape costs exactly one query to the daemon (made by the caller) and the figures never mix two
answers. Counters get prometheus_client's ``_total`` suffix; ``eventagg_up`` says whether the
daemon answered, and is the only sample when it did not (Prometheus' own convention for ``up``).
Pure: no sockets, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["CONTENT_TYPE_LATEST", "COUNTERS", "GAUGES", "render"]

# stats key -> (metric family name; prometheus_client appends _total to counters), HELP text
COUNTERS: dict[str, tuple[str, str]] = {
    "received": ("eventagg_received", "Events received by the daemon (valid ones, including those still in flight)."),
    "unique_processed": ("eventagg_unique_processed", "Events stored: the first copy of each (topic, event_id)."),
    "duplicate_dropped": ("eventagg_duplicate_dropped", "Events dropped as copies of an already stored event."),
    "rejected": ("eventagg_rejected", "Events refused as invalid by the daemon's schema rules."),
    "late": ("eventagg_late", "Events stored after a later-timestamped event of their topic had left the window."),
    "conflicting_duplicates": (
        "eventagg_conflicting_duplicates",
        "Duplicates whose content differed from the stored event (also counted as duplicate_dropped).",
    ),
    "expired": ("eventagg_expired", "Stored events deleted by retention."),
    "refused": (
        "eventagg_refused",
        "Connections the daemon refused at the CURVE handshake since it started (a key not authorized, no CURVE).",
    ),
}
GAUGES: dict[str, tuple[str, str]] = {
    "in_flight": ("eventagg_in_flight", "Events admitted by the daemon and not yet committed."),
    "topic_count": ("eventagg_topics", "Topics with at least one stored event."),
    "uptime_s": ("eventagg_uptime_seconds", "Seconds since the daemon started."),
}
UP = ("eventagg_up", "1 when the daemon answered this scrape's stats query, else 0.")


class _Snapshot(Collector):
    """Yields the metrics of one stats reply, taken before the scrape."""

    def __init__(self, stats: dict[str, Any] | None) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self._stats
        yield GaugeMetricFamily(UP[0], UP[1], value=0 if stats is None else 1)
        if stats is None:
            return
        for key, (name, text) in COUNTERS.items():
            if _is_number(stats.get(key)):
                yield CounterMetricFamily(name, text, value=stats[key])
        for key, (name, text) in GAUGES.items():
            if _is_number(stats.get(key)):
                yield GaugeMetricFamily(name, text, value=stats[key])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def render(stats: dict[str, Any] | None) -> bytes:
    """The text exposition of one stats reply; ``None`` (no answer) gives ``eventagg_up 0`` alone."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(stats))
    return generate_latest(registry)
