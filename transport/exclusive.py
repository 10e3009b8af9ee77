"""One thread at a time inside a client: a call while another thread is in one raises.

A ZeroMQ socket is not thread-safe, and each client (publisher, query client, subscriber) keeps
one with state around it. Two threads in the same client at once lost a publisher's events
without a word and hung a query client past every timeout. So each public call of a client holds
the client's reentrant lock (``_in_call``), taken without waiting: a call from within a call on
the same thread (an ``on_ack`` that publishes) goes on; another thread's call gets the client's
own "in use" error at once. Taking turns from several threads is fine. In a child forked while a
thread of the parent held the lock, that thread is not there: the child takes a fresh lock, and
the call says what a client made before a fork does.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

__all__ = ["Exclusive", "one_thread_at_a_time", "take_held_lock"]


class Exclusive(Protocol):
    """A client whose public calls :func:`one_thread_at_a_time` guards."""

    _in_call: Any  # a threading.RLock

    def _forked(self) -> bool:
        """Whether this process is a child forked after the client was made."""

    def _in_use_error(self) -> Exception:
        """The client's own error for a call while another thread is inside one."""


def take_held_lock(client: Exclusive) -> None:
    """For a call that found the client's lock held: raise the client's "in use" error, or, in a
    forked child (where the holder is a thread of the parent), take a fresh lock."""
    if not client._forked():
        raise client._in_use_error()
    client._in_call = threading.RLock()
    client._in_call.acquire()


_P = ParamSpec("_P")
_R = TypeVar("_R")
_C = TypeVar("_C", bound=Exclusive)


def one_thread_at_a_time(method: Callable[Concatenate[_C, _P], _R]) -> Callable[Concatenate[_C, _P], _R]:
    """Make ``method`` raise the client's "in use" error while another thread is inside a call."""

    @functools.wraps(method)
    def guarded(self: _C, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if not self._in_call.acquire(False):
            take_held_lock(self)
        try:
            return method(self, *args, **kwargs)
        finally:
            self._in_call.release()

    return guarded
