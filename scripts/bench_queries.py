#!/usr/bin/env python3
"""Benchmark the read side: ``bench_queries.py [--topics N] [--fat N] [--runs R]``.

Makes a database with N topics (one stored event each) and ``--fat`` topics' worth of 1 MB
payloads made of a million empty lists (the worst case for unpacking), starts the daemon on it,
and measures, as medians over R runs:

* the round trip of ``{"op": "topics"}`` and the size of its reply;
* a whole page of the fat topic (``limit`` 10 000) and its size;
* the slowest ``stats`` round trip while each of those is being answered (a stats query must
  never wait behind them), next to an idle one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq

from actors.store import EventStore, TopicDelta, connect_writer

HERE = Path(__file__).resolve().parent


def make_database(path: Path, topics: int, fat: int) -> None:
    store = EventStore(connect_writer(path))
    store.begin()
    rows: list[Any] = [
        (f"topic-{i:06d}", "e", 1, "2025-10-22T10:00:00Z", 0, "bench", msgpack.packb({"i": i}), 0.0, 0)
        for i in range(topics)
    ]
    payload = msgpack.packb({"a": [[]] * 1_048_000})
    rows += [("fat", f"f{i}", i + 1, "2025-10-22T10:00:00Z", i, "bench", payload, 0.0, 0) for i in range(fat)]
    store.insert(rows)
    deltas = {f"topic-{i:06d}": TopicDelta(1, 0, 1) for i in range(topics)}
    if fat:
        deltas["fat"] = TopicDelta(fat, fat - 1, fat)
    store.add_counts(deltas, {"received": len(rows), "unique_processed": len(rows)})
    store.commit()
    store.close()


def request(endpoint: str, query: dict[str, Any], timeout_s: float = 120) -> tuple[float, int]:
    context: zmq.Context[Any] = zmq.Context.instance()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        started = time.perf_counter()
        sock.send(msgpack.packb(query))
        if not sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no answer to {query}")
        reply = sock.recv()
        return time.perf_counter() - started, len(reply)
    finally:
        sock.close()


def while_stats(endpoint: str, query: dict[str, Any]) -> tuple[float, int, float]:
    """(round trip, reply bytes, slowest stats round trip meanwhile)."""
    result: list[tuple[float, int]] = []
    reading = threading.Thread(target=lambda: result.append(request(endpoint, query)))
    reading.start()
    slowest = 0.0
    while reading.is_alive():
        slowest = max(slowest, request(endpoint, {"op": "stats"})[0])
    reading.join()
    return result[0][0], result[0][1], slowest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure topics and events queries and stats beside them.")
    parser.add_argument("--topics", type=int, default=100_000)
    parser.add_argument("--fat", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--port", type=int, default=25_556)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        make_database(work / "events.db", args.topics, args.fat)
        endpoint = f"tcp://127.0.0.1:{args.port}"
        (work / "config.toml").write_text(
            f'[ingest]\nbind = "tcp://127.0.0.1:{args.port + 1}"\nack_bind = "tcp://127.0.0.1:{args.port + 2}"\n'
            f'[query]\nbind = "{endpoint}"\n[storage]\npath = "events.db"\n'
        )
        daemon = subprocess.Popen(
            [sys.executable, str(HERE / "aggregatord.py"), "--config", str(work / "config.toml")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    request(endpoint, {"op": "health"}, timeout_s=1)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise
            idle = statistics.median(request(endpoint, {"op": "stats"})[0] for _ in range(20))
            figures: dict[str, Any] = {"topics": args.topics, "fat_events": args.fat, "stats_idle_ms": idle * 1000}
            for name, query in (
                ("topics", {"op": "topics"}),
                ("fat_page", {"op": "events", "topic": "fat", "limit": 10_000}),
            ):
                runs = [while_stats(endpoint, query) for _ in range(args.runs)]
                figures[f"{name}_ms"] = round(statistics.median(r[0] for r in runs) * 1000, 1)
                figures[f"{name}_bytes"] = runs[0][1]
                figures[f"stats_during_{name}_max_ms"] = round(statistics.median(r[2] for r in runs) * 1000, 1)
            figures["stats_idle_ms"] = round(figures["stats_idle_ms"], 2)
            print(json.dumps(figures))
        finally:
            daemon.terminate()
            daemon.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
