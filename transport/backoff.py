"""Exponential backoff with full jitter, and a retry budget bounded by attempts and a deadline.

Pure: no sockets, no threads, no sleeping. The clock and the random source are passed in, so
tests are exact. The publisher asks :class:`RetryBudget` for the pause before each retry and
gives up when it answers None.

The pause before retry ``n`` (0-based) is drawn from ``[c × (1 - jitter), c]`` where
``c = min(cap, base × factor**n)``. ``jitter = 1`` is "full jitter" (uniform over ``[0, c]``):
many publishers that lost the same daemon at the same moment spread their retries out instead
of all arriving together when it comes back.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long to pause before each retry: exponential growth, capped, with jitter.

    ``base`` is the first ceiling in seconds, ``factor`` the growth per retry, ``cap`` the
    largest ceiling, ``jitter`` the fraction of the ceiling that is randomised (0 = none,
    1 = full jitter).
    """

    base: float = 0.1
    factor: float = 2.0
    cap: float = 5.0
    jitter: float = 1.0

    def __post_init__(self) -> None:
        if not (self.base > 0 and math.isfinite(self.base)):
            raise ValueError(f"backoff base must be a positive number of seconds, not {self.base}")
        if not (self.factor >= 1 and math.isfinite(self.factor)):
            raise ValueError(f"backoff factor must be 1 or more, not {self.factor}")
        if not self.cap >= self.base:
            raise ValueError(f"backoff cap ({self.cap}) must be at least its base ({self.base})")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"backoff jitter must be a fraction from 0 to 1, not {self.jitter}")

    def ceiling(self, attempt: int) -> float:
        """The largest pause before retry ``attempt`` (0-based): ``min(cap, base × factor**attempt)``."""
        if attempt < 0:
            raise ValueError(f"attempt must be 0 or more, not {attempt}")
        # Compare exponents rather than computing factor**attempt, which overflows for big attempts.
        if self.factor > 1 and attempt * math.log(self.factor) >= math.log(self.cap / self.base):
            return self.cap
        return min(self.cap, self.base * self.factor**attempt)

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """The pause before retry ``attempt``: uniform over ``[ceiling × (1 - jitter), ceiling]``.

        ``rand`` returns a float in ``[0, 1)``, like :func:`random.random` (the default).
        """
        ceiling = self.ceiling(attempt)
        return ceiling * (1.0 - self.jitter * rand())


class RetryBudget:
    """Counts the failed attempts of one delivery and says how long to pause, or to give up.

    The budget is spent when ``max_attempts`` attempts have failed or ``deadline`` seconds have
    passed since :meth:`start` (either may be None for no limit). A pause never reaches past
    the deadline, so the last attempt happens before it. :meth:`reset` starts over, e.g. when
    the peer answered.
    """

    def __init__(
        self,
        backoff: Backoff,
        deadline: float | None = None,
        max_attempts: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if deadline is not None and deadline < 0:
            raise ValueError(f"deadline must be 0 or more seconds, or None, not {deadline}")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts must be 1 or more, or None, not {max_attempts}")
        self.backoff = backoff
        self.deadline = deadline
        self.max_attempts = max_attempts
        self._clock = clock
        self._rand = rand
        self.started: float | None = None
        self.failures = 0

    def start(self, at: float | None = None) -> None:
        """Begin counting (from ``at``, a reading of the clock, or now), unless already counting."""
        if self.started is None:
            self.started = self._clock() if at is None else at

    @property
    def active(self) -> bool:
        """Whether a delivery is being retried (started and not reset since)."""
        return self.started is not None

    def elapsed(self) -> float:
        """Seconds since :meth:`start` (0 if not started)."""
        return 0.0 if self.started is None else self._clock() - self.started

    def fail(self) -> float | None:
        """Record one failed attempt; return the pause before the next, or None to give up."""
        self.start()
        self.failures += 1
        if self.max_attempts is not None and self.failures >= self.max_attempts:
            return None
        pause = self.backoff.delay(self.failures - 1, self._rand)
        if self.deadline is not None:
            left = self.deadline - self.elapsed()
            if left <= 0:
                return None
            pause = min(pause, left)
        return pause

    def reset(self) -> None:
        """Forget the failures: the next failure starts a fresh budget."""
        self.started = None
        self.failures = 0
