#!/usr/bin/env python3
"""Insert cost by index key: topic names in ``events``' two indexes (today) against integer topic ids.

``index_cost.py [--events N] [--topics T] [--topic-order cycle|random] [--commit C] [--runs R] [--json]``
stores the same N distinct events twice a run, each time into a new database in a temporary
folder: once in the daemon's own schema (``events`` under PRIMARY KEY (topic, event_id) and
UNIQUE (topic, seq), topics as text), once in the same table with each topic an integer id
(given in first-seen order, as a daemon would number new topics), the rest of the schema as it
is. The second table's definition is the daemon's, read back from ``sqlite_master`` with the
topic column's type changed, so it follows the schema. Rows go in as the daemon writes them
(``EventStore.insert``'s multi-row INSERTs), C rows a transaction (the default
``commit_max_events``), a passive WAL checkpoint every fifth, which is about how often the
daemon's checkpointer runs at its commit rate. Which shape goes first alternates; rows/s and
CPU-µs a row (this process: the statements run here) are given per run and as medians. It fails
unless both databases hold every row.

Events are ``bench.py``'s (``transport.workload``, rows made by its ``stored_rows``): event
``i`` is on topic ``i % T`` with id ``e<i>``. That order favours integer ids, numbered as the
topics first appear; ``--topic-order random`` draws each topic as ``bench.py`` then does,
which favours neither.
Nothing here changes the daemon: it measures what smaller index keys would give.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import stored_rows  # scripts/

from actors.store import EventStore, Row, connect_writer
from transport.workload import TOPIC_ORDERS, plan

COMMIT = 5_000
CHECKPOINT_EVERY = 5  # transactions
SHAPES = ("names", "ids")
_TOPIC_COLUMN = "topic       TEXT    NOT NULL"


def make_rows(events: int, topics: int, topic_order: str) -> list[Row]:
    """The rows the daemon would store for ``events`` distinct events of ``bench.py``'s stream."""
    return stored_rows(plan(events, topics=topics, topic_order=topic_order))


def with_topic_ids(rows: Sequence[Row]) -> list[tuple[Any, ...]]:
    """The same rows with each topic replaced by its integer id, numbered as topics first appear."""
    ids: dict[str, int] = {}
    return [(ids.setdefault(row[0], len(ids) + 1), *row[1:]) for row in rows]


def _use_topic_ids(conn: sqlite3.Connection) -> None:
    """Rebuild the (empty) ``events`` table and its indexes with an integer topic column."""
    ddl = [
        sql for (sql,) in conn.execute("SELECT sql FROM sqlite_master WHERE tbl_name = 'events' AND sql IS NOT NULL")
    ]
    table = [sql for sql in ddl if sql.startswith("CREATE TABLE")]
    if len(table) != 1 or _TOPIC_COLUMN not in table[0]:
        raise SystemExit(
            f"index_cost.py: the events table no longer has the column {_TOPIC_COLUMN!r}; update this script"
        )
    conn.execute("DROP TABLE events")  # its indexes go with it
    for sql in ddl:
        conn.execute(sql.replace(_TOPIC_COLUMN, "topic       INTEGER NOT NULL"))


def store(shape: str, rows: Sequence[Any], folder: Path, commit: int) -> dict[str, float]:
    """Insert ``rows`` into a new database of ``shape``; rows/s (wall clock) and CPU-µs a row."""
    path = folder / f"{shape}.db"
    conn = connect_writer(path)
    if shape == "ids":
        _use_topic_ids(conn)
    writer = EventStore(conn)
    started, cpu = time.perf_counter(), time.process_time()
    for number, start in enumerate(range(0, len(rows), commit), 1):
        writer.begin()
        writer.insert(rows[start : start + commit])
        writer.commit()
        if number % CHECKPOINT_EVERY == 0:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    (stored,) = conn.execute("SELECT count(*) FROM events").fetchone()
    conn.close()
    if stored != len(rows):
        raise SystemExit(f"index_cost.py: the {shape} database holds {stored} rows, not {len(rows)}")
    return {"rows_per_s": round(len(rows) / wall), "cpu_us_per_row": round(cpu / len(rows) * 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Insert cost with topic names against integer topic ids in the indexes."
    )
    parser.add_argument("--events", type=int, default=600_000, help="distinct events (default 600 000)")
    parser.add_argument("--topics", type=int, default=100_000, help="topics (default 100 000)")
    parser.add_argument(
        "--topic-order",
        choices=TOPIC_ORDERS,
        default="cycle",
        help="event i's topic: the topics in turn (i %% T, default) or drawn at random, as bench.py's",
    )
    parser.add_argument("--commit", type=int, default=COMMIT, help=f"rows a transaction (default {COMMIT})")
    parser.add_argument("--runs", type=int, default=3, help="runs, the order of the two alternating (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.events < 1 or args.topics < 1 or args.commit < 1 or args.runs < 1:
        parser.error("--events, --topics, --commit and --runs must be 1 or more")
    named = make_rows(args.events, args.topics, args.topic_order)
    by_shape = {"names": named, "ids": with_topic_ids(named)}
    runs: list[dict[str, dict[str, float]]] = []
    for run in range(args.runs):
        result: dict[str, dict[str, float]] = {}
        with tempfile.TemporaryDirectory(prefix="eventagg-index-cost-") as folder:
            for shape in SHAPES if run % 2 == 0 else SHAPES[::-1]:
                result[shape] = store(shape, by_shape[shape], Path(folder), args.commit)
        runs.append(result)
        if not args.json:
            print(
                f"run {run + 1}: "
                + ", ".join(f"{s} {r['rows_per_s']:,} rows/s {r['cpu_us_per_row']} CPU-us" for s, r in result.items())
            )
    medians: dict[str, Any] = {
        shape: {key: statistics.median(run[shape][key] for run in runs) for key in ("rows_per_s", "cpu_us_per_row")}
        for shape in SHAPES
    }
    if args.json:
        print(
            json.dumps(
                {
                    "events": args.events,
                    "topics": args.topics,
                    "topic_order": args.topic_order,
                    "runs": runs,
                    "medians": medians,
                }
            )
        )
        return
    names, ids = medians["names"], medians["ids"]
    print(
        f"medians of {args.runs}: topic names {names['rows_per_s']:,.0f} rows/s, {names['cpu_us_per_row']:.2f} "
        f"CPU-us a row; integer ids {ids['rows_per_s']:,.0f} rows/s, {ids['cpu_us_per_row']:.2f} CPU-us a row "
        f"({ids['rows_per_s'] / names['rows_per_s']:.2f} x)"
    )


if __name__ == "__main__":
    main()
