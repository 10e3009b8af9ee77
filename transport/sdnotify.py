"""sd_notify on the standard library: tell systemd we are ready, how we are, that we are alive.

systemd passes ``$NOTIFY_SOCKET`` to a ``Type=notify`` service: the path of an ``AF_UNIX``
datagram socket, or an abstract-namespace name written with a leading ``@``. Each
notification is one datagram of newline-separated ``KEY=value`` assignments (``READY=1``,
``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``). ``$WATCHDOG_USEC`` (and optionally
``$WATCHDOG_PID``) say how often systemd expects ``WATCHDOG=1``.

Without ``$NOTIFY_SOCKET`` a :class:`Notifier` is disabled: every method returns at once and
no socket is ever opened. A notification that cannot be delivered is logged (once) and
dropped, never raised: systemd's bookkeeping must not be able to stop the daemon.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)

__all__ = ["Notifier", "NotifyError", "notify_address", "watchdog_interval"]


class NotifyError(ValueError):
    """``$NOTIFY_SOCKET`` or ``$WATCHDOG_USEC`` holds a value this module cannot use."""


def notify_address(value: str) -> str | bytes:
    """The ``AF_UNIX`` address for a ``$NOTIFY_SOCKET`` value: a path, or bytes for an abstract name.

    Raises :class:`NotifyError` for anything else (for example systemd's ``vsock:`` addresses,
    which this daemon does not support: run it without ``$NOTIFY_SOCKET`` or on a local socket).
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Linux abstract namespace: the name starts with a NUL byte instead of the "@".
        return b"\0" + value[1:].encode()
    raise NotifyError(
        f"$NOTIFY_SOCKET={value!r} is neither an absolute path nor an @abstract name; "
        "unset it or point it at a local AF_UNIX datagram socket"
    )


MIN_WATCHDOG_USEC = 1_000_000
"""The shortest watchdog taken: below it the pings of every actor would run back to back."""


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` notifications (half of ``$WATCHDOG_USEC``), or None if off.

    The watchdog is off when ``$WATCHDOG_USEC`` is unset or 0, or when ``$WATCHDOG_PID`` names
    another process (the variables were inherited, not meant for us). Raises
    :class:`NotifyError` when ``$WATCHDOG_USEC`` is not a whole number of microseconds.
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC", "").strip()
    if not raw:
        return None
    watchdog_pid = env.get("WATCHDOG_PID", "").strip()
    if watchdog_pid and watchdog_pid != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(raw)
    except ValueError:
        raise NotifyError(
            f"$WATCHDOG_USEC={raw!r} is not a number of microseconds; fix WatchdogSec= in the unit"
        ) from None
    if usec < 0:
        raise NotifyError(f"$WATCHDOG_USEC={raw!r} is negative; fix WatchdogSec= in the unit")
    if usec == 0:
        return None
    if usec < MIN_WATCHDOG_USEC:
        raise NotifyError(
            f"$WATCHDOG_USEC={raw!r} is under {MIN_WATCHDOG_USEC // 1_000_000} s, less than a liveness ping of "
            "every actor may take; set WatchdogSec= in the unit to 10s or more (the unit ships 30s)"
        )
    return usec / 2_000_000


class Notifier:
    """Sends notifications to systemd's ``$NOTIFY_SOCKET``; a no-op when there is none.

    Thread-safe: the watchdog thread and the main thread share one socket.
    """

    def __init__(self, address: str | None) -> None:
        """``address`` is a ``$NOTIFY_SOCKET`` value, or None for a disabled notifier.

        Raises :class:`NotifyError` for an address that is neither a path nor an ``@`` name.
        """
        self._address = notify_address(address) if address else None
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed = False
        self.sent = 0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET``; disabled (with a warning) if its value is unusable."""
        env = os.environ if environ is None else environ
        try:
            return cls(env.get("NOTIFY_SOCKET") or None)
        except NotifyError as exc:
            log.warning("systemd notifications are off: %s", exc)
            return cls(None)

    @property
    def enabled(self) -> bool:
        """Whether notifications go anywhere."""
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one datagram; True if it was delivered."""
        if self._address is None:
            return False
        payload = "\n".join(assignments).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    # Never let a full receive queue block the daemon: drop the notification instead.
                    self._socket.setblocking(False)
                self._socket.sendto(payload, self._address)
            except OSError as exc:
                if not self._failed:
                    log.warning("cannot notify systemd at $NOTIFY_SOCKET (%s); further failures are not logged", exc)
                    self._failed = True
                return False
            self.sent += 1
            return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up is complete and the service is answering."""
        return self.notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        """``STATUS=``: a one-line description shown by ``systemctl status``."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the service is healthy; systemd restarts its watchdog timer."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun (systemd stops expecting watchdog pings)."""
        return self.notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def close(self) -> None:
        """Close the socket (a later notification reopens it)."""
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None


def _one_line(text: str) -> str:
    return " ".join(text.split())
