#!/usr/bin/env python3
"""The writer's key lookups with and without the key filter, in CPU µs per key asked.

Builds a real SQLite database of ``--events`` events (as the daemon writes them), then asks
batches of ``--batch`` keys, ``--duplicates`` of them stored (chosen at random) and the rest
new, the way the dedup actor does: ``EventStore.existing_keys`` on every key, or on the keys the
filter lets through. Runs alternate (``--runs`` of each), and the medians are printed. One
thread, no daemon: this is the lookup's own cost, not the GIL hand-offs around it.

    python3 scripts/lookup_cost.py --ids uuid
    python3 scripts/lookup_cost.py --ids counter   # bench.py's ids: prefix + counter
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from actors.key_filter import FilterBuild, KeyFilter
from actors.store import EventStore, Row, connect_writer

Key = tuple[str, str]


def make_keys(count: int, ids: str, topics: int, rng: random.Random, start: int = 0) -> list[Key]:
    if ids == "uuid":
        return [(f"topic-{i % topics}", str(uuid.UUID(int=rng.getrandbits(128), version=4))) for i in range(count)]
    return [(f"topic-{i % topics}", f"e{start + i}") for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=800_000, help="events stored first (default 800000)")
    parser.add_argument("--ids", choices=("uuid", "counter"), default="uuid", help="event ids (default uuid)")
    parser.add_argument("--topics", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100, help="keys per lookup (default 100)")
    parser.add_argument("--batches", type=int, default=2000, help="lookups per run (default 2000)")
    parser.add_argument("--duplicates", type=float, default=0.2, help="share of stored keys asked (default 0.2)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each, alternating (default 3)")
    args = parser.parse_args(argv)

    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as workdir:
        store = EventStore(connect_writer(Path(workdir) / "events.db"))
        stored = make_keys(args.events, args.ids, args.topics, rng)
        payload = bytearray(rng.randbytes(60))
        store.begin()
        for start in range(0, len(stored), 2048):
            rows: list[Row] = [
                (topic, event_id, start + i, "2025-10-22T10:00:00.000Z", start + i, "lookup_cost", payload, 1.0, 0)
                for i, (topic, event_id) in enumerate(stored[start : start + 2048])
            ]
            store.insert(rows)
        store.commit()
        key_filter = KeyFilter(len(stored), 64 << 20)
        build = FilterBuild(store, key_filter)
        started = time.process_time()
        while build.step():
            pass
        build_s = time.process_time() - started
        assert key_filter.may_hold(stored) == stored

        old_per_batch = round(args.batch * args.duplicates)
        batches = []
        for number in range(args.batches):
            new = make_keys(args.batch - old_per_batch, args.ids, args.topics, rng, args.events + number * args.batch)
            asked = new + rng.sample(stored, old_per_batch)
            rng.shuffle(asked)
            batches.append(asked)

        results: dict[str, list[float]] = {"database": [], "filter": []}
        for _ in range(args.runs):
            for mode in results:
                found = 0
                started = time.process_time()
                for asked in batches:
                    found += len(store.existing_keys(key_filter.may_hold(asked) if mode == "filter" else asked))
                took = time.process_time() - started
                assert found == old_per_batch * args.batches, (mode, found)
                results[mode].append(took / (args.batches * args.batch) * 1e6)
        store.close()
    passed = sum(len(key_filter.may_hold(asked)) for asked in batches) / (args.batches * args.batch)
    print(f"{args.events} events stored, ids {args.ids}, {args.batch} keys a lookup, {args.duplicates:.0%} stored")
    for mode, values in results.items():
        runs = " ".join(f"{value:.2f}" for value in values)
        print(f"  {mode:9} median {statistics.median(values):.2f} CPU-µs per key asked  (runs: {runs})")
    print(f"  keys the filter let through to the database: {passed:.1%}")
    print(f"  building the filter from the database: {build_s / args.events * 1e6:.2f} CPU-µs per stored key")
    return 0


if __name__ == "__main__":
    sys.exit(main())
