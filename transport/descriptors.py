"""A server's file descriptors against its limit: the limit raised at start, the use watched.

Every connection a client holds costs the daemon a descriptor (a gateway's stream about three).
At the limit (``RLIMIT_NOFILE``) libzmq's ``accept()`` fails; libzmq tells only a socket monitor,
and tries again at once for as long as the connection waits: its I/O thread spins (about half a
CPU here), clients hang, and the log says nothing; the gateway resets connections. (A monitor is
no cure: one not read at once blocks that I/O thread.) So, in the daemon and the gateway alike:

- at start the soft limit is raised to the hard one, the most an unprivileged process may take
  (``LimitNOFILE=`` in the systemd unit, ``ulimit -Hn`` in a shell), as Go programs do; the
  common soft default of 1024 is low for a server of many clients;
- while running, :class:`DescriptorWatch` counts the open descriptors every few seconds; from
  :data:`NEAR_LIMIT` of the limit it logs a warning saying what happens and what to do, at most
  every :data:`REPEAT_S` while it lasts, and once when the count is back under :data:`CLEAR_BELOW`;
- a request that finds no descriptor free (:func:`out_of_descriptors`) is answered with a word
  saying so (:func:`exhausted_message`) rather than a traceback, and the warning is logged at
  once (``check(now, force=True)``) rather than at the next count.
"""

from __future__ import annotations

import errno
import logging
import os
import resource

log = logging.getLogger(__name__)

CHECK_EVERY_S = 2.0
NEAR_LIMIT = 0.9  # of the soft limit: warn from here
CLEAR_BELOW = 0.8  # of the soft limit: back to normal under this
REPEAT_S = 60.0  # the warning again, while it lasts, at most this often

_FD_DIRECTORY = "/proc/self/fd"
_EXHAUSTED = (errno.EMFILE, errno.ENFILE)  # this process's limit, the system's


def out_of_descriptors(exc: BaseException) -> bool:
    """Whether ``exc`` (an :class:`OSError`, a ``zmq.ZMQError``) failed for want of a free descriptor."""
    return getattr(exc, "errno", None) in _EXHAUSTED


def descriptors_free(count: int) -> bool:
    """Whether ``count`` more descriptors can be opened now (each is opened and closed again)."""
    opened: list[int] = []
    try:
        for _ in range(count):
            opened.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        if out_of_descriptors(exc):
            return False
        raise
    finally:
        for fd in opened:
            os.close(fd)
    return True


def exhausted_message(who: str, doing: str) -> str:
    """What a client is told when ``who`` could not ``doing`` for want of a free descriptor."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    held = "" if limit == resource.RLIM_INFINITY else f" (it may open {limit}: RLIMIT_NOFILE)"
    return (
        f"{who} is out of file descriptors{held}: it could not {doing}; try again once connections close. "
        "To stop it: raise LimitNOFILE= in its unit (ulimit -n in a shell), or close the connections and "
        "event streams that clients hold open"
    )


def raise_descriptor_limit() -> None:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit, saying so in the log."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= soft:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.debug("could not raise the file descriptor limit from %d to %d: %s", soft, hard, exc)
        return
    log.info("file descriptor limit raised from %d to %d, the hard limit", soft, hard)


def open_descriptors() -> int | None:
    """How many file descriptors this process holds (None where ``/proc`` does not say)."""
    try:
        return len(os.listdir(_FD_DIRECTORY)) - 1  # less the one listdir itself opened
    except OSError as exc:
        if exc.errno == errno.EMFILE:  # no descriptor left even to look: every one is held
            return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return None


class DescriptorWatch:
    """Warns in the log while this process's open descriptors are near its limit.

    :meth:`check` is called often (the daemon's main loop, the gateway's event loop); it counts at
    most every :data:`CHECK_EVERY_S`, which costs a listing of ``/proc/self/fd``, and reads the
    limit each time (``prlimit`` may change it while the process runs).
    """

    def __init__(self, who: str = "the daemon") -> None:
        self.who = who
        self._next_check = 0.0
        self._warned_at: float | None = None  # while near the limit: when it was last said

    def check(self, now: float, force: bool = False) -> None:
        """Count the open descriptors if a count is due (or ``force``: a descriptor could not be
        had, so say it now rather than at the next count), and say what the count calls for."""
        if now < self._next_check and not force:
            return
        self._next_check = now + CHECK_EVERY_S
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY:
            return
        count = open_descriptors()
        if count is None:
            return
        if count >= NEAR_LIMIT * limit:
            if self._warned_at is None or now - self._warned_at >= REPEAT_S:
                self._warned_at = now
                log.warning(
                    "%s holds %d of the %d file descriptors it may open (RLIMIT_NOFILE): at the limit it can "
                    "accept no connection and open no file; raise LimitNOFILE= in the unit (ulimit -n in a "
                    "shell), or find the clients that hold many connections open",
                    self.who,
                    count,
                    limit,
                )
        elif self._warned_at is not None and count < CLEAR_BELOW * limit:
            self._warned_at = None
            log.warning("%s holds %d of its %d file descriptors again: back under the limit", self.who, count, limit)
