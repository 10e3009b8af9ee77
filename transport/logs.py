"""Logging: one line per record on stderr, journald-aware, and a rate limit for per-input warnings.

Under systemd (``$JOURNAL_STREAM`` set) each line starts with the syslog priority as ``<N>``
and has no timestamp, since journald adds its own; elsewhere lines carry a timestamp.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref

_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournaldFormatter(logging.Formatter):
    """``<priority>logger: message``, the form journald reads from a service's stderr."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        text = super().format(record).replace("\n", " | ")
        return f"<{priority}>{text}"


def setup_logging(level: str) -> None:
    """Send the daemon's logs to stderr in the form that suits where it runs."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournaldFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def set_level(level: str) -> None:
    """Change the log level at run time (SIGHUP)."""
    logging.getLogger().setLevel(level)


class RateLimitedLog:
    """Logs at most ``burst`` messages per ``interval_s``, then one line saying how many it held
    back; at ``level`` (warnings unless told), so a client that can cause a line cannot flood the log.

    The count is said with the next message after the interval, or by :func:`flush_held_back`
    (the daemon's ticker calls it) once the interval is over: a burst that nothing follows is
    counted too, not held back for ever."""

    def __init__(
        self, logger: logging.Logger, burst: int = 10, interval_s: float = 10.0, level: int = logging.WARNING
    ) -> None:
        self._logger = logger
        self._burst = burst
        self._interval_s = interval_s
        self._level = level
        self._window_start = 0.0
        self._count = 0
        self._suppressed = 0
        self._first_suppressed = self._last_suppressed = 0.0
        self._lock = threading.Lock()  # its owner's thread logs, the ticker's flushes
        with _LIVE_LOCK:
            _LIVE.add(self)

    def warning(self, message: str, *args: object) -> None:
        """Log the message (at this log's level) unless this interval's burst is spent."""
        with self._lock:
            now = time.monotonic()
            if now - self._window_start >= self._interval_s:
                self._new_window(now)
            if self._count < self._burst:
                self._count += 1
                self._logger.log(self._level, message, *args)
            else:
                if not self._suppressed:
                    self._first_suppressed = now
                self._last_suppressed = now
                self._suppressed += 1

    def flush(self) -> None:
        """Say how many were held back once their interval is over, without waiting for another."""
        with self._lock:
            now = time.monotonic()
            if self._suppressed and now - self._window_start >= self._interval_s:
                self._new_window(now)

    def _new_window(self, now: float) -> None:
        if self._suppressed:
            # Said when the next one comes, which may be long after: the line says when they
            # were held back, not "in the last interval", which would place them wrongly.
            kind = "warnings" if self._level >= logging.WARNING else "messages"
            self._logger.log(
                self._level,
                "%d similar %s suppressed between %.0f and %.0f s ago",
                self._suppressed,
                kind,
                now - self._first_suppressed,
                now - self._last_suppressed,
            )
        self._window_start = now
        self._count = 0
        self._suppressed = 0

    info = warning  # the same, named for a log made at INFO
    error = warning  # ... or at ERROR


_LIVE: weakref.WeakSet[RateLimitedLog] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def flush_held_back() -> None:
    """Have every rate-limited log whose interval is over say how many it held back."""
    with _LIVE_LOCK:
        logs = list(_LIVE)
    for limited in logs:
        limited.flush()
