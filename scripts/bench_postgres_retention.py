#!/usr/bin/env python3
"""Benchmark: what retention costs the PostgreSQL writer, on a throwaway local cluster.

``bench_postgres_retention.py [--events N] [--runs R]`` starts a PostgreSQL cluster of its own
(tests/pg_cluster.py, needs PostgreSQL's binaries and psycopg), stores N events in 10 topics
through :class:`PostgresStore` in groups of 2 000, then measures the key lookup per key while
the events are stored, the expiry per event (``expire_oldest`` in chunks of 500: select, lock
topic rows, DELETE ... RETURNING, fingerprint, record the keys, count), and the lookup per key
once every key is kept in ``deleted_keys``. Prints the best of R runs.

``--bytes`` instead checks the byte count ``[retention] max_bytes`` budgets against what the
tables really take: it loads N events with payloads of several sizes into a fresh database and
prints, for the events and then (after expiring them all) for the kept keys, the counted bytes
beside ``pg_total_relation_size`` (heap, indexes and TOAST) of the freshly loaded table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from pg_cluster import PgCluster  # noqa: E402

from actors.postgres import PostgresStore  # noqa: E402
from actors.store import TopicDelta  # noqa: E402

PAYLOAD = b"\x83\xa1a\x01\xa1b\xa2xy\xa1c\xcb@\t!\xfbTD-\x18"  # {"a": 1, "b": "xy", "c": 3.14...}


def run(dsn: str, events: int) -> tuple[float, float, float]:
    """(lookup per stored key, expiry per event, lookup per kept key), in seconds."""
    store = PostgresStore(dsn, "bench")
    store.open()
    try:
        for start in range(0, events, 2_000):
            rows = [
                (f"t{n % 10}", f"e{n:07d}", 0, "2025-10-22T10:00:00Z", n, "bench", PAYLOAD, 0.0, 0)
                for n in range(start, min(start + 2_000, events))
            ]
            store.write(rows, {f"t{k}": TopicDelta(received=1) for k in range(10)}, {"received": len(rows)})
        keys = [(f"t{n % 10}", f"e{n:07d}") for n in range(0, events, 5)]
        started = time.perf_counter()
        store.existing_keys(keys)
        stored = (time.perf_counter() - started) / len(keys)
        if not store.try_sweep_lock():
            raise SystemExit("another process holds the sweep lock")
        started = time.perf_counter()
        deleted = 0
        while chunk := store.expire_oldest(received_before=1.0, max_rows=500):
            deleted += chunk
        expiry = (time.perf_counter() - started) / max(deleted, 1)
        store.sweep_unlock()
        started = time.perf_counter()
        found = store.existing_keys(keys)
        kept = (time.perf_counter() - started) / len(keys)
        if len(found) != len(keys):
            raise SystemExit(f"only {len(found)} of {len(keys)} kept keys found")
        return stored, expiry, kept
    finally:
        store.close()


def sizes(dsn: str, events: int) -> None:
    """Print counted bytes against the loaded tables' real size, for events and for kept keys."""
    import psycopg

    store = PostgresStore(dsn, "bench")
    store.open()
    try:
        for payload_bytes in (20, 200, 1_000):
            payload = b"\xc4" + bytes([min(payload_bytes, 255)]) + b"x" * min(payload_bytes, 255)
            payload = (
                payload if payload_bytes < 256 else b"\xc5" + payload_bytes.to_bytes(2, "big") + b"y" * payload_bytes
            )
            for start in range(0, events, 2_000):
                rows = [
                    (f"t{n % 10}", f"e-{payload_bytes}-{n:07d}", 0, "2025-10-22T10:00:00Z", n, "bench", payload, 0.0, 0)
                    for n in range(start, min(start + 2_000, events))
                ]
                store.write(rows, {f"t{k}": TopicDelta(received=1) for k in range(10)}, {"received": len(rows)})
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE events")
            (real,) = conn.execute("SELECT pg_total_relation_size('events')").fetchone() or (0,)
        counted, _ = store.stored_bytes()
        print(f"events: {3 * events} rows, counted {counted} bytes, tables {real} bytes ({counted / real:.2f}x)")
        store.try_sweep_lock()
        while store.expire_oldest(received_before=1.0, max_rows=500):
            pass
        store.sweep_unlock()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE deleted_keys")
            (real,) = conn.execute("SELECT pg_total_relation_size('deleted_keys')").fetchone() or (0,)
        counted, _ = store.stored_bytes()
        print(f"kept keys: {3 * events} records, counted {counted} bytes, tables {real} bytes ({counted / real:.2f}x)")
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bytes", action="store_true", help="check the max_bytes count against the tables' size")
    args = parser.parse_args()
    cluster = PgCluster()
    cluster.init()
    cluster.start()
    try:
        if args.bytes:
            sizes(cluster.create_database("bench_bytes"), args.events)
            return
        results = [run(cluster.create_database(f"bench_{n}"), args.events) for n in range(args.runs)]
    finally:
        cluster.destroy()
    stored, expiry, kept = (min(values) for values in zip(*results))
    print(
        f"{args.events} events, best of {args.runs}: lookup {stored * 1e6:.1f} us/key stored,"
        f" {kept * 1e6:.1f} us/key kept; expiry {expiry * 1e6:.0f} us/event"
    )


if __name__ == "__main__":
    main()
