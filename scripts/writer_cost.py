#!/usr/bin/env python3
"""Instructions per event of the daemon's actor path, ordering and writer, without threads.

``writer_cost.py [--workload mixed|bench] [--events N] [--topics T] [--window-ms W] [--batch B]
[--commit-events C] [--callgrind]`` drives the real :class:`~actors.ordering.OrderingActor` and
the real :class:`~actors.dedup.DedupActor` on a real SQLite database in a temporary folder:
each lookup is answered by the dedup actor's own statement, writes are held and group-committed
every C events (the daemon's default ``commit_max_events``), and a WAL checkpoint runs every
0.2 s of the driver's clock, as the daemon's checkpointer does. It fails unless the database
ends up holding exactly the distinct events. Two workloads: ``mixed``, ``ordering_cost.py``'s
events and clock (20 % re-sends of any earlier event, 10 % late by up to 3 s, 500 000
events/s), and ``bench``, ``bench.py``'s stream (``transport.workload``, 20 % re-sends, split
between two publishers in frames of 100 that arrive interleaved, decoded as the daemon decodes
them) at 125 000 events/s, about the daemon's rate on it.

With ``--callgrind`` it runs itself under ``valgrind --tool=callgrind`` twice: once driving
``--warmup`` events and then N more, once driving only the warm-up events (both make all of
them), so the difference over N is the steady cost of an event, past start-up, imports and the
first compile of each statement shape, on a database that already holds the warm-up's events.
It splits that in two: the instructions inside ``sqlite3_step`` and ``sqlite3_prepare_v2``
(which the sqlite3 module runs with the GIL released, so they can overlap other threads' work)
and the rest (run holding the GIL: the share that bounds the daemon on CPython). Steady on a
noisy machine, where end-to-end rates move by ±10 %.
"""

from __future__ import annotations

import argparse
import itertools
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgpack
import zmq
from ordering_cost import (  # scripts/
    BATCH,
    BATCH_GAP_S,
    TICK_S,
    Clock,
    callgrind,
    driven_actor,
    driven_clock,
    make_events,
)

from actors.dedup import DedupActor
from actors.flow import InFlight, LiveFigures
from actors.messages import OrderingBatch, Sync, Tick
from transport.codec import decode_frame
from transport.schema import Event
from transport.workload import plan

COMMIT_EVENTS = 5_000
# Events per second of the driver's clock, by workload.
RATES = {"mixed": BATCH / BATCH_GAP_S, "bench": 125_000.0}
CHECKPOINT_S = 0.2
# The C functions the sqlite3 module calls with the GIL released: compile and run a statement.
RELEASED = ("sqlite3_step", "sqlite3_prepare_v2")


class _Inbox:
    """Stands in for an actor's reference: keeps what is told to it, for the driver to deliver."""

    def __init__(self) -> None:
        self.told: list[Any] = []

    def tell(self, message: Any) -> None:
        self.told.append(message)


def bench_events(count: int, topics: int, publishers: int = 2, frame: int = 100) -> list[Event]:
    """``bench.py``'s stream of ``count`` events: its publishers' shares, cut into frames that
    arrive one from each publisher in turn, decoded as the daemon decodes them."""
    stream = plan(count, 0.2, topics, seed=1)
    shares = [stream[index::publishers] for index in range(publishers)]
    frames = [[share[start : start + frame] for start in range(0, len(share), frame)] for share in shares]
    events: list[Event] = []
    for arriving in itertools.zip_longest(*frames):
        for body in arriving:
            if body:
                events += decode_frame(msgpack.packb(body)).events
    return events


def drive(
    events: list[Event],
    window_ms: int,
    folder: Path,
    batch: int = BATCH,
    commit_events: int = COMMIT_EVENTS,
    rate: float = RATES["mixed"],
) -> int:
    """Run every event through one ordering actor and the dedup actor, ``rate`` events a second
    of the driver's clock; how many rows are stored."""
    with driven_clock() as clock:
        return _drive(events, window_ms, clock, batch, folder / "events.db", commit_events, rate)


def open_writer(path: Path, commit_events: int, context: zmq.Context[Any]) -> DedupActor:
    """The dedup actor, started on this thread, with no checkpointer thread (the driver checkpoints)."""
    dedup = DedupActor(
        path,
        synchronous="NORMAL",
        commit_max_events=commit_events,
        commit_max_ms=10**9,  # commits by count only: the driver's clock is not the actor's
        in_flight=InFlight(10**9),
        live=LiveFigures(),
        zmq_context=context,
    )
    dedup.on_start()
    if dedup._checkpointer is not None:  # a thread would checkpoint at wall-clock times
        dedup._checkpointer.stop()
        dedup._checkpointer = None
    # A message always waiting: the actor then behaves as under load, answering each lookup as
    # it comes but committing every ``commit_events`` events, not after every message.
    dedup.actor_inbox.put(None)  # type: ignore[arg-type]  # never taken out
    return dedup


def _drive(
    events: list[Event], window_ms: int, clock: Clock, batch: int, path: Path, commit_events: int, rate: float
) -> int:
    context: zmq.Context[Any] = zmq.Context()
    dedup = open_writer(path, commit_events, context)
    to_dedup = _Inbox()
    actor = driven_actor(to_dedup, window_ms)
    answers = actor.actor_inbox  # where the dedup actor's answers land (the actor's own reference)
    checkpoints = sqlite3.connect(path, isolation_level=None)

    def settle() -> None:
        while to_dedup.told or not answers.empty():
            told, to_dedup.told = to_dedup.told, []
            for message in told:
                dedup.on_receive(message)
            while not answers.empty():
                actor.on_receive(answers.get().message)  # never blocks: not empty, one thread

    next_tick = clock.now + TICK_S
    next_checkpoint = clock.now + CHECKPOINT_S
    try:
        for start in range(0, len(events), batch):
            clock.now += batch / rate
            actor.on_receive(OrderingBatch(events[start : start + batch], clock.now))
            settle()
            if clock.now >= next_tick:
                next_tick = clock.now + TICK_S
                actor.on_receive(Tick())
                settle()
            if clock.now >= next_checkpoint:
                next_checkpoint = clock.now + CHECKPOINT_S
                checkpoints.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        clock.now += window_ms / 1000 + 1
        actor.on_receive(Tick())
        settle()
        dedup.on_receive(Sync())
        (rows,) = checkpoints.execute("SELECT count(*) FROM events").fetchone()
    finally:
        checkpoints.close()
        dedup.on_stop()
        context.term()
    return int(rows)


def per_event(case: list[str], events: int) -> tuple[float, float]:
    """(instructions per event holding the GIL, with it released) of the case given by these
    arguments, warm-up counted out."""
    total, inside = callgrind(__file__, case, RELEASED)
    base_total, base_inside = callgrind(__file__, [*case, "--warmup-only"], RELEASED)
    released, base_released = sum(inside.values()), sum(base_inside.values())
    return (total - released - (base_total - base_released)) / events, (released - base_released) / events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workload", choices=sorted(RATES), default="mixed", help="the events (default mixed)")
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--warmup", type=int, default=50_000, help="events driven first (default 50 000)")
    parser.add_argument("--topics", type=int, default=10)
    parser.add_argument("--window-ms", type=int, default=50)
    parser.add_argument("--batch", type=int, default=BATCH, help=f"events per batch (default {BATCH})")
    parser.add_argument(
        "--commit-events", type=int, default=COMMIT_EVENTS, help=f"events per group commit (default {COMMIT_EVENTS})"
    )
    parser.add_argument("--callgrind", action="store_true", help="instructions per event, GIL held and released")
    parser.add_argument("--warmup-only", action="store_true", help="make every event, drive the warm-up ones only")
    args = parser.parse_args()
    if args.callgrind:
        case = [arg for arg in sys.argv[1:] if arg != "--callgrind"]
        held, released = per_event(case, args.events)
        print(f"{held:,.0f} instructions/event holding the GIL, {released:,.0f} with it released")
        return
    make = bench_events if args.workload == "bench" else make_events
    events = make(args.warmup + args.events, args.topics)
    if args.warmup_only:
        events = events[: args.warmup]
    with tempfile.TemporaryDirectory() as folder:
        rows = drive(events, args.window_ms, Path(folder), args.batch, args.commit_events, RATES[args.workload])
    distinct = len({event.key for event in events})
    if rows != distinct:
        raise SystemExit(f"{rows} rows for {distinct} distinct events")


if __name__ == "__main__":
    main()
