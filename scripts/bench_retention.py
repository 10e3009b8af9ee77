#!/usr/bin/env python3
"""Retention's storage costs, measured on the store alone (no daemon): bytes per kept deleted key,
writer time per expired event, and the conflict check's cost per exact re-send next to a lookup.

``bench_retention.py [--events N] [--runs R]``

Builds a database of N events (event ids ``e123456`` over 10 topics, and 36-character UUIDs over
100 topics) with ``actors.store``, then times, on the store's own connection:

* ``lookup_us_per_key``: ``existing_keys`` over 40 960 stored keys, per key (what every event costs);
* ``conflict_check_us_per_duplicate``: ``conflicting`` over the same keys re-sent with the same
  bytes, per key (what each exact re-send adds inside its commit);
* ``expire_us_per_event``: ``expire_oldest`` in chunks of 500, each its own transaction;

and reports, with SQLite's ``dbstat``, the bytes per stored event and per kept key. Times are the
best of R runs; the end-to-end effect is measured by ``bench.py --set retention.max_age=...``.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from actors.store import EventStore, Row, connect_writer

PROBE = 40_960


def _rows(count: int, uuid_ids: bool, now: float) -> list[Row]:
    topics = 100 if uuid_ids else 10
    rows: list[Row] = []
    for n in range(count):
        topic = f"sensor-{n % topics:02d}" if uuid_ids else f"t{n % topics}"
        event_id = str(uuid.UUID(int=n)) if uuid_ids else f"e{n}"
        payload = msgpack.packb({"n": n, "value": n * 0.5, "unit": "C"})
        rows.append((topic, event_id, n // topics + 1, "2025-10-22T10:00:00Z", n, "bench", payload, now - 100, 0))
    return rows


def _best(runs: int, work: Callable[[], Any]) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def measure(folder: Path, count: int, uuid_ids: bool, runs: int) -> dict[str, Any]:
    path = folder / ("uuid.db" if uuid_ids else "short.db")
    store = EventStore(connect_writer(path))
    now = time.time()
    rows = _rows(count, uuid_ids, now)
    store.begin()
    store.insert(rows)
    store.commit()
    probe = rows[: min(PROBE, count)]
    keys = [(row[0], row[1]) for row in probe]
    resends = [(row[0], row[1], row[3], row[4], row[5], bytes(row[6])) for row in probe]
    lookup = _best(runs, lambda: [store.existing_keys(keys[i : i + 4096]) for i in range(0, len(keys), 4096)])
    check = _best(runs, lambda: [store.conflicting(resends[i : i + 4096]) for i in range(0, len(keys), 4096)])
    stat = sqlite3.connect(path)
    stored_bytes = stat.execute(
        "SELECT sum(pgsize) FROM dbstat WHERE name IN ('events', 'sqlite_autoindex_events_1', 'events_by_topic_seq')"
    ).fetchone()[0]
    started = time.perf_counter()
    expired = 0
    while True:
        store.begin()
        deleted = store.expire_oldest(now, 500)
        store.commit()
        expired += deleted
        if not deleted:
            break
    expire_s = time.perf_counter() - started
    kept_bytes = stat.execute(
        "SELECT sum(pgsize) FROM dbstat WHERE name IN ('deleted_keys', 'deleted_keys_by_age')"
    ).fetchone()[0]
    stat.close()
    store.close()
    return {
        "keys": "36-character UUIDs, 100 topics" if uuid_ids else "e123456, 10 topics",
        "lookup_us_per_key": round(lookup / len(keys) * 1e6, 2),
        "conflict_check_us_per_duplicate": round(check / len(keys) * 1e6, 2),
        "expire_us_per_event": round(expire_s / max(expired, 1) * 1e6, 1),
        "bytes_per_stored_event": round(stored_bytes / count),
        "bytes_per_kept_key": round(kept_bytes / count),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, metavar="N", help="events per database (default 100000)")
    parser.add_argument("--runs", type=int, default=3, metavar="R", help="timed repetitions, best kept (default 3)")
    args = parser.parse_args()
    if args.events < 1 or args.runs < 1:
        parser.error("--events and --runs must be 1 or more")
    with tempfile.TemporaryDirectory(prefix="eventagg-retention-") as folder:
        results = [measure(Path(folder), args.events, uuid_ids, args.runs) for uuid_ids in (False, True)]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
