"""CPU pinning (``[cpu] pin``): the daemon's threads on one CPU, its decoder process on another.

Why: CPython runs one thread of a process at a time, so the daemon's threads gain nothing from
a second CPU; when the kernel moves them between CPUs each move refills the caches, and the
objects the threads hand each other (events, batches, reference counts) bounce between the
CPUs' caches. Kept on one CPU, they used ~17 % less CPU an event and the daemon ran 10-20 %
faster on this 2-CPU machine (bench.py, interleaved runs: see the README's Performance). The
decoder process gets the next CPU, so it never competes with them.

The two CPUs are the first two of those the daemon may use when it starts, so several
daemons on one machine are kept apart the usual way: give each its own CPUs with systemd's
``CPUAffinity=`` or ``taskset``. Off by default: pinned daemons that were not kept apart would
all crowd the same two CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class PinningError(Exception):
    """``[cpu] pin`` is on, but this system cannot pin threads to CPUs."""


@dataclass(frozen=True, slots=True)
class CpuPlan:
    """Where the daemon's threads and its decoder process run; None: wherever the kernel puts them."""

    daemon: int | None = None
    decoder: int | None = None

    def describe(self) -> str:
        """The plan in words, for the log."""
        if self.daemon is None:
            return "not pinned to CPUs"
        if self.decoder is None:
            return f"threads pinned to CPU {self.daemon}"
        return f"threads pinned to CPU {self.daemon}, the decoder process to CPU {self.decoder}"


def plan_cpus(pin: bool, decoder: bool) -> CpuPlan:
    """The CPUs to pin to: the first two the process may use now (a decoder process takes the second,
    if there is one; with only one, it shares the threads' CPU)."""
    if not pin:
        return CpuPlan()
    if not hasattr(os, "sched_getaffinity"):
        raise PinningError("[cpu] pin needs Linux (os.sched_setaffinity); set it to false on this system")
    allowed = sorted(os.sched_getaffinity(0))
    return CpuPlan(allowed[0], allowed[1] if decoder and len(allowed) > 1 else None)


def pin_this_process(cpu: int) -> None:
    """Pin every thread of this process to ``cpu``; threads started later inherit it from their starter."""
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), {cpu})
        except ProcessLookupError:  # the thread ended meanwhile
            continue
