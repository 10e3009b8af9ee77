#!/usr/bin/env python3
"""The performance issue's peers, measured here: Redis 7 and NATS JetStream 2.9 on bench.py's workload.

The issue quotes their rates from another hour of this class of machine; this machine's speed
moves by half from hour to hour, so a comparison means something only when measured in the
same hour, next to ``bench.py``. Each peer runs as a real server on loopback, in a temporary
folder, started and stopped here, and gets the very events ``bench.py`` sends (the same
``transport.workload.plan``), with duplicates dropped the peer's own way:

* **Redis** (``redis-server``): one Lua call per batch of ``--batch`` events doing, for each
  event, ``SET seen:<topic>:<event_id> 1 NX`` and, when that set it, ``XADD events:<topic>`` of
  its fields (the payload as the msgpack bytes eventagg stores); AOF on, fsync every second.
  One client, each call awaited before the next.
* **NATS JetStream** (``nats-server -js``): one message per event on ``events.<topic>`` with a
  ``Nats-Msg-Id`` header of ``<topic>/<event_id>``, into a file stream whose duplicate window
  covers the run, from nats-py: *pipelined* (``publish_async``, acknowledgements awaited at
  the end) and *awaited* (each publish waits for its acknowledgement; on fewer events, as it is
  slow).

Events/s is from the first request sent to the last answer; ``new`` and ``duplicates`` are what
the peer reported, checked against the workload. ``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack

from transport.workload import IDS, TOPIC_ORDERS, distinct_count, plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from harness import free_port

START_TIMEOUT_S = 15.0
NATS_DUPLICATE_WINDOW_S = 3600.0
PEERS = ("redis", "nats-pipelined", "nats-awaited")

# For each event of the batch (ARGV holds five strings per event): keep it if its key is new.
_REDIS_BATCH = """
local new = 0
for i = 1, #ARGV, 5 do
    local topic, event_id = ARGV[i], ARGV[i + 1]
    if redis.call('SET', 'seen:' .. topic .. ':' .. event_id, 1, 'NX') then
        redis.call('XADD', 'events:' .. topic, '*', 'event_id', event_id,
                   'timestamp', ARGV[i + 2], 'source', ARGV[i + 3], 'payload', ARGV[i + 4])
        new = new + 1
    end
end
return new
"""


class PeerError(Exception):
    """A peer's server or client library is missing, or its server did not start."""


@contextmanager
def server(name: str, command: Callable[[Path, int], list[str]]) -> Iterator[int]:
    """Run the server program ``name`` as ``command(folder, port)`` in a temporary folder.

    Yields its port once it accepts.
    """
    if shutil.which(name) is None:
        raise PeerError(f"{name} is not installed; on Debian: apt-get install {name}")
    folder = Path(tempfile.mkdtemp(prefix=f"eventagg-peer-{name}-"))
    port = free_port()
    log = folder / "server.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command(folder, port), stdout=output, stderr=output, cwd=folder)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    said = log.read_text(errors="replace")[-500:]
                    raise PeerError(f"{name} did not start on port {port}: {said}") from None
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def _redis_command(folder: Path, port: int) -> list[str]:
    return [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(folder),
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
    ]


def _nats_command(folder: Path, port: int) -> list[str]:
    return ["nats-server", "-js", "-sd", str(folder), "-a", "127.0.0.1", "-p", str(port)]


def measure_redis(events: Sequence[dict[str, Any]], batch: int) -> dict[str, float]:
    """SET NX + XADD, one Lua call per batch, on a fresh redis-server."""
    try:
        import redis
    except ImportError:
        raise PeerError("the redis package is missing: pip install redis") from None
    args = [[e["topic"], e["event_id"], e["timestamp"], e["source"], msgpack.packb(e["payload"])] for e in events]
    calls = [
        [value for event in args[start : start + batch] for value in event] for start in range(0, len(args), batch)
    ]
    with server("redis-server", _redis_command) as port:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30)
        try:
            keep_new = client.register_script(_REDIS_BATCH)
            started = time.perf_counter()
            new = sum(int(keep_new(args=call)) for call in calls)
            elapsed = time.perf_counter() - started
        finally:
            client.close()
    return _result(len(events), new, elapsed)


def measure_nats(events: Sequence[dict[str, Any]], pipelined: bool) -> dict[str, float]:
    """One JetStream message per event with a Nats-Msg-Id, pipelined or each publish awaited."""
    try:
        import nats
    except ImportError:
        raise PeerError("the nats-py package is missing: pip install nats-py") from None
    messages = [
        (f"events.{e['topic']}", msgpack.packb(e), {"Nats-Msg-Id": f"{e['topic']}/{e['event_id']}"}) for e in events
    ]

    async def run(port: int) -> tuple[int, float]:
        connection = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=5)
        try:
            stream = connection.jetstream(timeout=30)
            await stream.add_stream(name="EVENTS", subjects=["events.>"], duplicate_window=NATS_DUPLICATE_WINDOW_S)
            started = time.perf_counter()
            if pipelined:
                futures = [
                    await stream.publish_async(subject, body, headers=headers) for subject, body, headers in messages
                ]
                acks = await asyncio.wait_for(asyncio.gather(*futures), timeout=300)
            else:
                acks = [await stream.publish(subject, body, headers=headers) for subject, body, headers in messages]
            elapsed = time.perf_counter() - started
            return sum(1 for ack in acks if not ack.duplicate), elapsed
        finally:
            await connection.close()

    with server("nats-server", _nats_command) as port:
        new, elapsed = asyncio.run(run(port))
    return _result(len(events), new, elapsed)


def _result(sent: int, new: int, elapsed: float) -> dict[str, float]:
    return {
        "events": sent,
        "new": new,
        "duplicates": sent - new,
        "elapsed_s": round(elapsed, 3),
        "events_per_s": round(sent / elapsed),
    }


def measure(peer: str, args: argparse.Namespace) -> dict[str, float]:
    """One run of one peer, checked: every distinct event new once, every re-send a duplicate."""
    events = args.awaited_events if peer == "nats-awaited" else args.events
    workload = plan(events, args.duplicates, args.topics, seed=1, ids=args.ids, topic_order=args.topic_order)
    if peer == "redis":
        result = measure_redis(workload, args.batch)
    else:
        result = measure_nats(workload, pipelined=peer == "nats-pipelined")
    expected = distinct_count(events, args.duplicates)
    result["correct"] = result["new"] == expected
    if not result["correct"]:
        print(f"peers: {peer} kept {result['new']} events, not the {expected} distinct ones", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure Redis and NATS JetStream on bench.py's workload.")
    parser.add_argument("--events", type=int, default=200_000, metavar="N", help="events per run (default 200000)")
    parser.add_argument(
        "--awaited-events",
        type=int,
        default=20_000,
        metavar="N",
        help="events per run of nats-awaited, which is slow (default 20000)",
    )
    parser.add_argument("--duplicates", type=float, default=0.2, metavar="F", help="fraction of re-sends (default 0.2)")
    parser.add_argument("--topics", type=int, default=10, metavar="K", help="topics (default 10)")
    parser.add_argument(
        "--ids", choices=IDS, default="counter", help="event ids: prefix + counter, or random-looking UUIDs"
    )
    parser.add_argument(
        "--topic-order",
        choices=TOPIC_ORDERS,
        default="cycle",
        help="event i's topic: the topics in turn (i %% K, default) or drawn at random",
    )
    parser.add_argument("--batch", type=int, default=100, metavar="B", help="events per Redis call (default 100)")
    parser.add_argument("--runs", type=int, default=1, metavar="R", help="repeat and report medians (default 1)")
    parser.add_argument("--peer", action="append", choices=PEERS, help="measure only this peer (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if min(args.events, args.awaited_events, args.topics, args.batch, args.runs) < 1:
        parser.error("--events, --awaited-events, --topics, --batch and --runs must be 1 or more")
    if not 0 <= args.duplicates < 1:
        parser.error("--duplicates must be a fraction from 0 up to (not including) 1")
    runs: dict[str, list[dict[str, float]]] = {peer: [] for peer in args.peer or PEERS}
    try:
        for run in range(1, args.runs + 1):
            for peer, results in runs.items():
                results.append(measure(peer, args))
                if not args.json:
                    print(f"run {run}/{args.runs} {peer}: {results[-1]['events_per_s']:,} events/s", file=sys.stderr)
    except PeerError as exc:
        print(f"peers: {exc}", file=sys.stderr)
        return 2
    medians = {
        peer: {
            "events_per_s": statistics.median(r["events_per_s"] for r in results),
            "correct": all(r["correct"] for r in results),
        }
        for peer, results in runs.items()
    }
    if args.json:
        print(json.dumps({"runs": runs, "median": medians}))
    else:
        for peer, median in medians.items():
            print(
                f"{peer:16s} {median['events_per_s']:>10,.0f} events/s{'' if median['correct'] else '  (WRONG COUNTS)'}"
            )
    return 0 if all(m["correct"] for m in medians.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
