"""The dedup actor's expiry: its transactions end on any exception, not only SQLite's, and no
sweep runs when the store could not be opened."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import zmq

from actors.dedup import DedupActor
from actors.flow import InFlight, LiveFigures
from actors.messages import Ping
from actors.store import DatabaseLock, EventStore, StorageError
from transport.config import RetentionConfig

pytestmark = pytest.mark.timeout(60)


def settings(context: zmq.Context[Any]) -> dict[str, Any]:
    """The dedup actor settings both tests start one with."""
    return {
        "synchronous": "NORMAL",
        "commit_max_events": 5000,
        "commit_max_ms": 50,
        "lookup_group": 1,
        "in_flight": InFlight(1000),
        "live": LiveFigures(),
        "zmq_context": context,
    }


def overflow(store: EventStore, *args: Any) -> int:
    raise OverflowError("Python int too large to convert to SQLite INTEGER")


def test_an_expiry_chunk_failing_with_any_exception_leaves_no_transaction_open(tmp_path: Path) -> None:
    context: zmq.Context[Any] = zmq.Context()
    # The actor's object on this thread: its store is the real one, opened by on_start.
    actor = DedupActor(tmp_path / "events.db", **settings(context))
    actor.on_start()
    try:
        with pytest.raises(OverflowError):
            actor._expire(overflow)
        with pytest.raises(OverflowError):
            actor._forget(1e30)  # far beyond SQLite's 64-bit INTEGER once made nanoseconds
        store = actor._store
        assert store is not None
        store.begin()  # "cannot start a transaction within a transaction" when one was left open
        store.rollback()
    finally:
        actor.on_stop()
        context.destroy(linger=0)


def test_a_dedup_actor_that_could_not_start_answers_ping_with_the_reason_and_no_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    context: zmq.Context[Any] = zmq.Context()
    holder = DatabaseLock(tmp_path / "events.db")
    holder.acquire()  # another daemon has this database
    ref = DedupActor.start(
        tmp_path / "events.db",
        **settings(context),
        retention=RetentionConfig(max_age="1h", sweep_interval="1s"),
    )
    try:
        reason = ref.ask(Ping(), timeout=10)
        assert isinstance(reason, StorageError)
        assert ref.is_alive()  # a sweep on the missing store would have raised and killed it
        assert "Traceback" not in caplog.text and "AssertionError" not in caplog.text
    finally:
        if ref.is_alive():
            ref.stop(timeout=10)
        holder.release()
        context.destroy(linger=0)
