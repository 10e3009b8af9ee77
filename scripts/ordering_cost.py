#!/usr/bin/env python3
"""Instructions per event of the ordering path: the real per-batch code, without threads.

``ordering_cost.py [--events N] [--topics T] [--window-ms W] [--batch B] [--callgrind | --all]`` drives one
:class:`~actors.ordering.OrderingActor` by calling its handlers in the order the actor's thread
would: each batch is admitted (copies set aside, lookup asked), answered as the dedup actor would
answer (keys seen in earlier batches are stored; unknown topics start empty), resolved through
the reorder window, and its rows built into the write the dedup actor would get, which is taken
and dropped. One in five events re-sends an earlier one, one in ten is a few seconds late. The
clock is the driver's (batches of 500 by default, at 500 000 events/s, a tick every 10 ms), so a
run does the same work whatever the machine's speed, under callgrind too. The cyclic collector
is set as the daemon sets it.

With ``--callgrind`` it runs itself under ``valgrind --tool=callgrind`` twice, making and
driving N events and only making them, and prints the difference over N: instructions per event
of the ordering path (plus the stand-in dedup's set operations, in C), steady on a
noisy machine where times are not. ``--all`` does that for the four cases of issue 21 (10 /
100 000 topics, window 0 / 50 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import operator
import os
import random
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

from actors import ordering
from actors.daemon import GC_THRESHOLDS
from actors.flow import InFlight, LiveFigures
from actors.messages import ClassifyRequest, ClassifyResult, OrderingBatch, Tick, WriteBatch
from actors.ordering import OrderingActor
from actors.store import TopicState
from transport.schema import Event

BATCH = 500
BATCH_GAP_S = 0.001
TICK_S = 0.010
BASE_NS = 1_761_127_200_000_000_000  # 2025-10-22T10:00:00Z
NEW_TOPIC = TopicState(0, 0)
# The stand-in dedup works in C (as the real one's set operations do), so that the instructions
# counted are the ordering path's.
_row_key = operator.itemgetter(0, 1)


class Clock:
    """Stands in for the ``time`` module inside actors.ordering: the driver sets ``now``."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class _Dedup:
    """Stands in for the dedup actor's reference: keeps what the ordering actor tells it."""

    def __init__(self) -> None:
        self.told: list[Any] = []

    def tell(self, message: Any) -> None:
        self.told.append(message)


def make_events(count: int, topics: int, seed: int = 1) -> list[Event]:
    """``count`` events over ``topics`` topics, in arrival order: one in five re-sends an earlier
    event, one in ten is up to 3 s late, the rest advance 1 ms an event."""
    rng = random.Random(seed)
    payload = msgpack.packb({"n": 1, "text": "x" * 20})
    events: list[Event] = []
    for n in range(count):
        if events and rng.random() < 0.2:
            events.append(events[rng.randrange(len(events))])
            continue
        ts_ns = BASE_NS + n * 1_000_000
        if rng.random() < 0.1:
            ts_ns -= rng.randrange(3_000_000_000)
        topic = f"topic-{rng.randrange(topics)}"
        events.append(Event(topic, f"e-{n}", "2025-10-22T10:00:00Z", ts_ns, "bench", payload))
    return events


@contextlib.contextmanager
def driven_clock() -> Iterator[Clock]:
    """The conditions a driver runs the actors' handlers in: actors.ordering reads the time from
    the returned clock, the cyclic collector is set as the daemon sets it, and the objects made
    beforehand are kept out of its collections (in the daemon they die once stored)."""
    real_time = ordering.time  # type: ignore[attr-defined]
    thresholds = gc.get_threshold()
    clock = Clock()
    ordering.time = clock  # type: ignore[attr-defined,assignment]
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        yield clock
    finally:
        ordering.time = real_time  # type: ignore[attr-defined]
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def drive(events: list[Event], window_ms: int, batch: int = BATCH) -> int:
    """Run every event through one ordering actor (see :func:`driven_clock`); how many rows it wrote."""
    with driven_clock() as clock:
        return _drive(events, window_ms, clock, batch)


def driven_actor(dedup: Any, window_ms: int) -> OrderingActor:
    """The ordering actor a driver calls directly, telling ``dedup`` what it would tell the
    dedup actor; its bounds are set so that only the window holds events back."""
    return OrderingActor(
        0,
        dedup,
        window_ms=window_ms,
        max_buffered=100_000,
        in_flight=InFlight(10**9),
        live=LiveFigures(),
        max_topics=1_000_000,
    )


def _drive(events: list[Event], window_ms: int, clock: Clock, batch: int) -> int:
    dedup = _Dedup()
    actor = driven_actor(dedup, window_ms)
    stored: set[tuple[str, str]] = set()
    rows = 0
    next_tick = clock.now + TICK_S

    def answer() -> None:
        nonlocal rows
        told, dedup.told = dedup.told, []
        for message in told:
            if isinstance(message, ClassifyRequest):
                existing = stored.intersection(message.keys)
                states = dict.fromkeys(message.unknown_topics, NEW_TOPIC)
                actor.on_receive(ClassifyResult(existing, states, token=message.token))
            elif isinstance(message, WriteBatch):
                stored.update(map(_row_key, message.rows))
                rows += len(message.rows)
        if dedup.told:
            answer()

    for start in range(0, len(events), batch):
        clock.now += BATCH_GAP_S * batch / BATCH
        actor.on_receive(OrderingBatch(events[start : start + batch], clock.now))
        answer()
        if clock.now >= next_tick:
            next_tick = clock.now + TICK_S
            actor.on_receive(Tick())
            answer()
    clock.now += window_ms / 1000 + 1
    actor.on_receive(Tick())
    answer()
    return rows


def callgrind(script: str, args: list[str], inclusive: tuple[str, ...] = ()) -> tuple[int, dict[str, int]]:
    """Instructions run by ``script`` with ``args`` under callgrind, and those run inside each C
    function named in ``inclusive`` (its inclusive count; 0 for one never called)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "callgrind.out"
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, script, *args],
            check=True,
            capture_output=True,
            timeout=3_600,
            # One string hash for every run, so that the order of sets and dicts of keys and topics
            # (and what their resizing costs) is the same each time.
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        found = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
        if found is None:
            raise SystemExit(f"no instruction count in {out}")
        inside: dict[str, int] = {}
        if inclusive:
            annotated = subprocess.run(
                ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(out)],
                check=True,
                capture_output=True,
                text=True,
                timeout=600,
            ).stdout
            for name in inclusive:
                # One line per function: "1,234 (5.6%)  ???:sqlite3_step [lib...]".
                line = re.search(rf"^\s*([\d,]+) \([^)]*\)\s+\S*:{name} ", annotated, re.MULTILINE)
                inside[name] = int(line.group(1).replace(",", "")) if line else 0
        return int(found.group(1)), inside


def per_event(events: int, topics: int, window_ms: int, batch: int = BATCH) -> float:
    """Instructions per event of the ordering path: start-up and making the events counted out."""
    case = ["--events", str(events), "--topics", str(topics), "--window-ms", str(window_ms), "--batch", str(batch)]
    return (callgrind(__file__, case)[0] - callgrind(__file__, [*case, "--make-only"])[0]) / events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--topics", type=int, default=10)
    parser.add_argument("--window-ms", type=int, default=0)
    parser.add_argument("--batch", type=int, default=BATCH, help=f"events per batch (default {BATCH})")
    parser.add_argument("--callgrind", action="store_true", help="instructions per event of this case")
    parser.add_argument("--all", action="store_true", help="instructions per event of the four cases")
    parser.add_argument("--make-only", action="store_true", help="make the events, do not drive them")
    args = parser.parse_args()
    if args.all:
        print("topics / window | instructions/event")
        for topics, window_ms in ((10, 0), (10, 50), (100_000, 0), (100_000, 50)):
            print(
                f"{topics} / {window_ms} ms | {per_event(args.events, topics, window_ms, args.batch):,.0f}", flush=True
            )
    elif args.callgrind:
        print(f"{per_event(args.events, args.topics, args.window_ms, args.batch):,.0f} instructions/event")
    else:
        events = make_events(args.events, args.topics)
        if args.make_only:
            return
        rows = drive(events, args.window_ms, args.batch)
        distinct = len({event.key for event in events})
        if rows != distinct:
            raise SystemExit(f"{rows} rows for {distinct} distinct events")


if __name__ == "__main__":
    main()
