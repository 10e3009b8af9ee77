"""Keeping systemd informed: a live ``STATUS=`` line, and ``WATCHDOG=1`` only while every part answers.

The :class:`ServiceMonitor` thread wakes every half watchdog interval (``$WATCHDOG_USEC / 2``),
pings every actor and the ingest thread through the supervisor's ``liveness`` check, and sends
``WATCHDOG=1`` only if all of them answered. A stuck or dead actor therefore stops the pings
and systemd restarts the service after ``WatchdogSec=``. The check runs on its own thread, so a
ping that waits for a busy actor never delays the supervisor's ticker.

A ping is allowed most of the interval (up to :data:`PING_TIMEOUT_MAX_S`) to come back: an
actor working through a long queue is busy, not stuck. The pings are scheduled at a fixed
rate, so a slow answer delays one notification but never shifts the ones after it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from actors.flow import LiveFigures
from transport.sdnotify import Notifier

log = logging.getLogger(__name__)

STATUS_INTERVAL_S = 2.0
PING_TIMEOUT_MAX_S = 10.0

Liveness = Callable[[float], dict[str, bool]]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Committed counters at one moment, for rates."""

    at: float
    received: int
    unique: int
    duplicates: int
    rejected: int
    topics: int

    @classmethod
    def take(cls, live: LiveFigures, now: float | None = None) -> Snapshot:
        """The counters of the latest commit (the dict is replaced whole, so one read is consistent)."""
        committed = live.committed
        return cls(
            at=time.monotonic() if now is None else now,
            received=committed.get("received", 0),
            unique=committed.get("unique_processed", 0),
            duplicates=committed.get("duplicate_dropped", 0),
            rejected=committed.get("rejected", 0),
            topics=committed.get("topic_count", 0),
        )


def status_line(
    current: Snapshot,
    previous: Snapshot | None = None,
    unhealthy: list[str] | None = None,
    storage_error: str | None = None,
    background_errors: list[str] | None = None,
) -> str:
    """The one-line ``STATUS=`` text: rate since ``previous``, totals, any part not answering, a
    storage failure (the daemon waits for its database and retries: not stuck, so still watchdog-fed),
    and failures of the writer's background work (retention, checkpoints)."""
    rate = 0.0
    if previous is not None and current.at > previous.at:
        rate = max(0, current.received - previous.received) / (current.at - previous.at)
    # Below 10 events/s two significant digits: a trickle of one event per 2 s status interval
    # rounded to "0 events/s" as if nothing came.
    shown = f"{rate:.2g}" if 0 < rate < 10 else f"{rate:,.0f}"
    text = (
        f"{shown} events/s; {current.unique:,} unique, {current.duplicates:,} duplicates, "
        f"{current.rejected:,} rejected; {current.topics:,} topics"
    )
    if background_errors:
        text = f"FAILING: {'; '.join(background_errors)}; {text}"
    if unhealthy:
        text = f"UNHEALTHY, not answering: {', '.join(unhealthy)}; {text}"
    if storage_error:
        text = f"WAITING FOR STORAGE, nothing new is acknowledged: {storage_error}; {text}"
    return text


def ping_timeout(interval: float) -> float:
    """How long a liveness ping may take when checks run every ``interval`` seconds."""
    return min(PING_TIMEOUT_MAX_S, 0.8 * interval)


class ServiceMonitor:
    """The thread that sends ``STATUS=`` every few seconds and ``WATCHDOG=1`` while all is well."""

    def __init__(
        self,
        notifier: Notifier,
        liveness: Liveness,
        live: LiveFigures,
        *,
        watchdog_s: float | None,
        status_s: float = STATUS_INTERVAL_S,
    ) -> None:
        """``watchdog_s`` is the time between watchdog checks (None: no watchdog, status only)."""
        self._notifier = notifier
        self._liveness = liveness
        self._live = live
        self._watchdog_s = watchdog_s
        self._status_s = status_s
        self._stopped = threading.Event()
        # Held while sending, so nothing is sent once stop() has returned (STOPPING=1 comes last).
        self._send_lock = threading.Lock()
        self._previous: Snapshot | None = Snapshot.take(live)
        self._unhealthy: list[str] = []
        self._thread = threading.Thread(target=self._run, name="service-monitor", daemon=True)
        self.watchdogs_sent = 0

    def status_text(self) -> str:
        """The current status line (rate over the time since the last one)."""
        return status_line(
            Snapshot.take(self._live),
            self._previous,
            self._unhealthy,
            self._live.last_commit_error,
            self._live.background_errors(),
        )

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sending; returns at once (a ping in progress is abandoned, not awaited)."""
        with self._send_lock:
            self._stopped.set()

    def join(self, timeout: float) -> None:
        """Wait for the thread to end after :meth:`stop`."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    def check(self) -> bool:
        """Ping every part once; send ``WATCHDOG=1`` if all answered. True when healthy."""
        assert self._watchdog_s is not None
        alive = self._liveness(ping_timeout(self._watchdog_s))
        silent = sorted(name for name, ok in alive.items() if not ok)
        if silent and silent != self._unhealthy:
            log.error(
                "not answering a liveness ping: %s; watchdog notifications withheld, so systemd restarts "
                "the service if this lasts WatchdogSec",
                ", ".join(silent),
            )
        elif not silent and self._unhealthy:
            log.warning("every part answers again; watchdog notifications resume")
        self._unhealthy = silent
        if not silent:
            with self._send_lock:
                if not self._stopped.is_set() and self._notifier.watchdog():
                    self.watchdogs_sent += 1
        return not silent

    def send_status(self) -> None:
        """Send the status line and start a new rate period."""
        current = Snapshot.take(self._live)
        text = status_line(
            current, self._previous, self._unhealthy, self._live.last_commit_error, self._live.background_errors()
        )
        self._previous = current
        with self._send_lock:
            if not self._stopped.is_set():
                self._notifier.status(text)

    def _run(self) -> None:
        now = time.monotonic()
        next_check = now if self._watchdog_s is not None else float("inf")
        next_status = now + self._status_s
        try:
            while not self._stopped.is_set():
                now = time.monotonic()
                if now >= next_check:
                    self.check()
                    assert self._watchdog_s is not None
                    next_check += self._watchdog_s
                    # After a check slower than the interval, the schedule restarts from now.
                    next_check = max(next_check, time.monotonic())
                if now >= next_status:
                    self.send_status()
                    next_status = now + self._status_s
                self._stopped.wait(max(0.0, min(next_check, next_status) - time.monotonic()))
        except Exception:
            # Without this thread systemd gets no more watchdog pings and restarts us: say why.
            log.exception("the service monitor failed; watchdog notifications stop")
