"""Kernel names for the daemon's threads, so ``top -H``, ``ps -L`` and ``/proc/PID/task`` tell them apart.

Python (before 3.14) gives its threads names only Python can see; to the kernel every thread of
the daemon is ``python``. :func:`name_os_threads` copies each live thread's Python name
(``DedupActor-0``, ``OrderingActor-1``, ``ingest``, ``checkpointer``, ...) to the kernel, cut
to the 15 bytes it keeps. It is a convenience for operators and for ``scripts/bench.py``'s CPU
split by thread: where the platform has no ``pthread_setname_np`` it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading

log = logging.getLogger(__name__)

KERNEL_NAME_BYTES = 15  # Linux's TASK_COMM_LEN is 16, with the terminating NUL


def name_os_threads() -> int:
    """Give every live Python thread its Python name in the kernel; how many were named.

    Call it when no thread is ending (the supervisor does, once everything has started): the
    name is set through each thread's pthread handle, which must still be valid.
    """
    if not sys.platform.startswith("linux"):
        return 0
    try:
        setname = ctypes.CDLL(None).pthread_setname_np
    except (OSError, AttributeError):
        return 0
    setname.argtypes = [ctypes.c_ulong, ctypes.c_char_p]
    setname.restype = ctypes.c_int
    named = 0
    main = threading.main_thread()
    for thread in threading.enumerate():
        # The main thread's kernel name is the process's (what ps, pgrep and systemd show): kept.
        if thread is main or thread.ident is None:
            continue
        name = thread.name.encode("utf-8", "replace")[:KERNEL_NAME_BYTES]
        if thread.is_alive() and setname(thread.ident, name) == 0:
            named += 1
    log.debug("named %d threads for the kernel", named)
    return named
