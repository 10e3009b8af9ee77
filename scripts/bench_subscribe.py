#!/usr/bin/env python3
"""Benchmark live subscriptions: ingest rate with followers, ack→delivered latency, catch-up rate.

``bench_subscribe.py [--events N] [--followers 0,1,10] [--runs R] [--backlog N] [--light] [--json]``

Every measurement starts a daemon of its own on a temporary database (default config, but its
own ports). Followers are separate processes using ``transport.subscriber.Subscriber`` (all
topics, credit 5 000), so they compete with the daemon for the CPUs as real consumers would.

* **ingest events/s with F followers**: ``publish.py --acked`` sends N events over 100 topics
  in batches of 500 and reports its rate (first send to last acknowledgement, so every event is
  committed); F followers are subscribed before it starts. The followers' own end (all N
  delivered) is reported too. With ``--light`` the followers speak the raw protocol and count
  events from each message's header without decoding them, so on a small machine their own
  CPU does not crowd the daemon out and the figure shows what serving them costs the daemon.
* **ack→delivered latency**: one follower records when each event arrives; this script sends
  acknowledged batches of 10 events over DEALER, paced at half the rate measured with one
  follower, and records when each acknowledgement arrives. An event's latency is its arrival
  at the follower minus its batch's acknowledgement (CLOCK_MONOTONIC is one clock for every
  process); both follow the same COMMIT, so it can be negative.
* **catch-up events/s**: ``--backlog`` events are stored first (acked publishing), then one
  follower subscribes after 0 and the time until it has received all of them is measured.

``--runs R`` repeats each measurement and reports medians. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgpack
import zmq

from transport.subscriber import Subscriber
from transport.workload import make_event

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from harness import Daemon  # noqa: E402

WAIT_S = 300.0


def _follower(endpoint: str, count: int, record: bool, report: Connection) -> None:
    """A follower process: subscribe, say so, then receive ``count`` events and report."""
    subscriber = Subscriber(endpoint, after=None, credit=5000)
    arrivals: dict[str, float] = {}
    received = 0
    started = 0.0
    said = False
    deadline = time.monotonic() + WAIT_S
    while received < count and time.monotonic() < deadline:
        event = subscriber.next_event(0.05)
        if not said and subscriber.subscribed:
            report.send("subscribed")
            said = True
        if event is None:
            continue
        if received == 0:
            started = time.monotonic()
        received += 1
        if record:
            arrivals[event["event_id"]] = time.monotonic()
    report.send({"received": received, "first": started, "done": time.monotonic(), "arrivals": arrivals})
    subscriber.close()


_EVENTS_HEAD = b"\x82" + msgpack.packb("op") + msgpack.packb("events") + msgpack.packb("events")


def _count_events(frame: bytes) -> int | None:
    """How many events an ``events`` message holds, from its array header alone (None: another op)."""
    if not frame.startswith(_EVENTS_HEAD):
        return None
    at = len(_EVENTS_HEAD)
    kind = frame[at]
    if 0x90 <= kind <= 0x9F:
        return kind - 0x90
    if kind == 0xDC:
        return int.from_bytes(frame[at + 1 : at + 3], "big")
    return int.from_bytes(frame[at + 1 : at + 5], "big")


def _light_follower(endpoint: str, count: int, record: bool, report: Connection) -> None:
    """A follower that costs its CPU almost nothing: raw protocol, counts events from the header."""
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    window = 5000
    sock.send(msgpack.packb({"op": "subscribe", "credit": window}))
    received = 0
    ungranted = 0
    started = 0.0
    last_sent = time.monotonic()
    deadline = time.monotonic() + WAIT_S
    while received < count and time.monotonic() < deadline:
        if time.monotonic() - last_sent > 0.5:
            sock.send(msgpack.packb({"op": "heartbeat"}))
            last_sent = time.monotonic()
        if not sock.poll(200):
            continue
        frame = sock.recv()
        counted = _count_events(frame)
        if counted is None:
            if msgpack.unpackb(frame).get("op") == "subscribed":
                report.send("subscribed")
            continue
        if received == 0:
            started = time.monotonic()
        received += counted
        ungranted += counted
        if ungranted >= window // 2:
            sock.send(msgpack.packb({"op": "credit", "credit": ungranted}))
            ungranted = 0
            last_sent = time.monotonic()
    report.send({"received": received, "first": started, "done": time.monotonic(), "arrivals": {}})
    sock.close(linger=0)


def start_followers(daemon: Daemon, count: int, events: int, record: bool = False, light: bool = False) -> list[Any]:
    context = multiprocessing.get_context("spawn")
    started = []
    target = _light_follower if light else _follower
    for _ in range(count):
        mine, theirs = context.Pipe()
        proc = context.Process(target=target, args=(daemon.subscribe, events, record, theirs), daemon=True)
        proc.start()
        started.append((proc, mine))
    for _, pipe in started:
        if not pipe.poll(60) or pipe.recv() != "subscribed":
            raise RuntimeError("a follower did not subscribe within 60 s")
    return started


def finish_followers(followers: list[Any]) -> list[dict[str, Any]]:
    results = []
    for proc, pipe in followers:
        if not pipe.poll(WAIT_S):
            raise RuntimeError("a follower did not finish")
        results.append(pipe.recv())
        proc.join(10)
    return results


def publish(daemon: Daemon, events: int, prefix: str) -> float:
    """Acked publishing of ``events`` over 100 topics; its events/s."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/publish.py"), "--endpoint", daemon.ack, "--acked"]
        + ["--events", str(events), "--topics", "100", "--batch", "500", "--id-prefix", prefix, "--json"],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    if result.returncode != 0:
        raise RuntimeError(f"publish.py failed: {result.stdout} {result.stderr}")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return float(summary["events_per_s"])


def fresh_daemon(root: Path, name: str) -> Daemon:
    return Daemon(root / name).start()


def ingest_with_followers(root: Path, followers: int, events: int, run: int, light: bool) -> dict[str, float]:
    daemon = fresh_daemon(root, f"ingest-{followers}-{run}")
    try:
        started = start_followers(daemon, followers, events, light=light)
        began = time.monotonic()
        rate = publish(daemon, events, "i")
        results = finish_followers(started)
        assert all(r["received"] == events for r in results), [r["received"] for r in results]
        last = max((r["done"] for r in results), default=began)
        return {"events_per_s": rate, "followers_done_s": last - began}
    finally:
        daemon.terminate()


def latency(root: Path, rate: float, events: int, run: int) -> dict[str, float]:
    daemon = fresh_daemon(root, f"latency-{run}")
    context: zmq.Context[Any] = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        [follower] = start_followers(daemon, 1, events, record=True)
        sock.connect(daemon.ack)
        batch = 10
        interval = batch / rate
        acked: dict[int, float] = {}
        next_send = time.monotonic()
        sent = 0
        deadline = time.monotonic() + WAIT_S
        while len(acked) < events // batch and time.monotonic() < deadline:
            now = time.monotonic()
            if sent < events and now >= next_send:
                frame = {"batch": sent // batch, "events": [make_event(sent + k, 100, "l") for k in range(batch)]}
                sock.send(msgpack.packb(frame))
                sent += batch
                next_send += interval
            if sock.poll(max(0, int((next_send - time.monotonic()) * 1000)) if sent < events else 100):
                reply = msgpack.unpackb(sock.recv())
                acked[reply["batch"]] = time.monotonic()
        [result] = finish_followers([follower])
        arrivals = result["arrivals"]
        delays = sorted(
            (arrivals[f"l{index}"] - acked[index // batch]) * 1000
            for index in range(events)
            if f"l{index}" in arrivals and index // batch in acked
        )
        return {
            "p50_ms": delays[len(delays) // 2],
            "p99_ms": delays[int(len(delays) * 0.99)],
            "rate": rate,
            "events": len(delays),
        }
    finally:
        sock.close(linger=0)
        daemon.terminate()


def catch_up(root: Path, backlog: int, run: int) -> dict[str, float]:
    daemon = fresh_daemon(root, f"catchup-{run}")
    try:
        publish(daemon, backlog, "c")
        [follower] = start_followers(daemon, 1, backlog)
        [result] = finish_followers([follower])
        assert result["received"] == backlog
        return {"events_per_s": backlog / (result["done"] - result["first"])}
    finally:
        daemon.terminate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=100_000, help="events per ingest run (default 100000)")
    parser.add_argument("--followers", default="0,1,10", help="follower counts to measure (default 0,1,10)")
    parser.add_argument("--latency-events", type=int, default=20_000, help="events of the latency phase")
    parser.add_argument("--backlog", type=int, default=1_000_000, help="events of the catch-up phase (0: skip)")
    parser.add_argument("--runs", type=int, default=3, help="repeat each measurement; medians reported")
    parser.add_argument(
        "--light",
        action="store_true",
        help="ingest phase: followers that count events from the message header instead of decoding them",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    counts = [int(part) for part in args.followers.split(",")]
    if args.events < 1 or args.runs < 1 or any(count < 0 for count in counts):
        parser.error("--events and --runs must be 1 or more, --followers counts 0 or more")
    out: dict[str, Any] = {"events": args.events, "runs": args.runs, "light": args.light, "ingest": {}}
    with tempfile.TemporaryDirectory(prefix="bench-subscribe-") as tmp:
        root = Path(tmp)
        for run in range(args.runs):
            for count in counts:
                result = ingest_with_followers(root, count, args.events, run, args.light)
                out["ingest"].setdefault(str(count), []).append(result)
                print(f"run {run + 1}: {count} followers: {result}", file=sys.stderr)
        medians = {
            count: statistics.median(r["events_per_s"] for r in results) for count, results in out["ingest"].items()
        }
        out["ingest_median_events_per_s"] = medians
        base = medians.get("0")
        if base:
            out["ingest_cost_pct"] = {count: round(100 * (1 - rate / base), 1) for count, rate in medians.items()}
        half = medians.get("1", base or 10_000) / 2
        lat = [latency(root, half, args.latency_events, run) for run in range(args.runs)]
        out["latency"] = {key: statistics.median(r[key] for r in lat) for key in ("p50_ms", "p99_ms", "rate")}
        print(f"latency: {out['latency']}", file=sys.stderr)
        if args.backlog:
            catch = [catch_up(root, args.backlog, run) for run in range(args.runs)]
            out["catch_up_events_per_s"] = statistics.median(r["events_per_s"] for r in catch)
            out["backlog"] = args.backlog
    if args.json:
        print(json.dumps(out))
    else:
        print(f"ingest events/s (median of {args.runs}) by live followers: {out['ingest_median_events_per_s']}")
        if "ingest_cost_pct" in out:
            print(f"ingest cost vs no follower, %: {out['ingest_cost_pct']}")
        print(
            f"ack->delivered at {out['latency']['rate']:.0f} events/s: p50 {out['latency']['p50_ms']:.1f} ms, "
            f"p99 {out['latency']['p99_ms']:.1f} ms"
        )
        if args.backlog:
            print(f"catch-up over a {args.backlog}-event backlog: {out['catch_up_events_per_s']:.0f} events/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
