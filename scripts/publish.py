#!/usr/bin/env python3
"""Load generator and smoke tool: send a deterministic stream of events to a daemon.

``publish.py [--endpoint URL | --config PATH] --events N --duplicates F --topics K
--processes P --batch B --seed S --id-prefix STR [--slice K/P] [--json]``

Exactly ``round(N × F)`` of the N events are re-sends of earlier events of the run; the rest
are distinct. With ``--processes P`` the stream is split into P interleaved slices, each sent by
its own OS process. ``--batch 1`` sends one event map per frame; more sends arrays.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from typing import Any

import _bootstrap  # noqa: F401
import msgpack
import zmq

from transport.client import connectable
from transport.config import ConfigError, IngestConfig, load_config
from transport.workload import plan


def send_fire_and_forget(endpoint: str, events: list[dict[str, Any]], batch: int) -> int:
    """PUSH the events in frames of ``batch``; returns how many were sent once all are flushed."""
    context: zmq.Context[Any] = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 1000)
    sock.connect(endpoint)
    try:
        for start in range(0, len(events), batch):
            chunk = events[start : start + batch]
            sock.send(msgpack.packb(chunk[0] if batch == 1 else chunk, use_bin_type=True))
    finally:
        # Queued frames are dropped unless the socket lingers and the context is terminated.
        sock.close(linger=30_000)
        context.term()
    return len(events)


def _worker(args: argparse.Namespace, endpoint: str, index: int, count: int, results: Any) -> None:
    events = plan(args.events, args.duplicates, args.topics, args.seed, args.id_prefix)[index::count]
    sent = send_fire_and_forget(endpoint, events, args.batch)
    results.put(sent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Send a deterministic stream of events to eventagg.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--endpoint", metavar="URL", help="ingest endpoint, e.g. tcp://127.0.0.1:5555")
    where.add_argument("--config", metavar="PATH", help="read the ingest endpoint from this config file")
    parser.add_argument("--events", type=int, default=1000, metavar="N", help="events to send (default 1000)")
    parser.add_argument("--duplicates", type=float, default=0.0, metavar="F", help="fraction of re-sends (default 0)")
    parser.add_argument("--topics", type=int, default=10, metavar="K", help="topics (default 10)")
    parser.add_argument("--processes", type=int, default=1, metavar="P", help="publisher processes (default 1)")
    parser.add_argument("--batch", type=int, default=100, metavar="B", help="events per frame (default 100)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument("--id-prefix", default="e", metavar="STR", help="prefix of every event_id (default 'e')")
    parser.add_argument("--slice", metavar="K/P", help="send only slice K (0-based) of P interleaved slices")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = parser.parse_args(argv)
    try:
        if args.endpoint:
            endpoint = args.endpoint
        elif args.config:
            endpoint = connectable(load_config(args.config).ingest.bind)
        else:
            endpoint = connectable(IngestConfig().bind)
    except ConfigError as exc:
        print(f"publish: {exc}", file=sys.stderr)
        return 2
    if args.batch < 1 or args.processes < 1:
        parser.error("--batch and --processes must be 1 or more")
    started = time.perf_counter()
    if args.slice:
        index, count = (int(part) for part in args.slice.split("/"))
        events = plan(args.events, args.duplicates, args.topics, args.seed, args.id_prefix)[index::count]
        sent = send_fire_and_forget(endpoint, events, args.batch)
    else:
        results: Any = multiprocessing.Queue()
        workers = [
            multiprocessing.Process(target=_worker, args=(args, endpoint, i, args.processes, results))
            for i in range(args.processes)
        ]
        for worker in workers:
            worker.start()
        sent = sum(results.get(timeout=600) for _ in workers)
        for worker in workers:
            worker.join()
    elapsed = time.perf_counter() - started
    summary = {"sent": sent, "acked_new": 0, "acked_duplicate": 0, "rejected": 0,
               "elapsed_s": round(elapsed, 3), "events_per_s": round(sent / elapsed) if elapsed else 0}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"sent {sent} events in {elapsed:.2f} s ({summary['events_per_s']:,} events/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
