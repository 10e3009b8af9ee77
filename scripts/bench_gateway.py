#!/usr/bin/env python3
"""Benchmark the HTTP gateway: events/s through ``POST /publish`` from several concurrent clients.

``bench_gateway.py [--batch B ...] [--events N] [--clients C] [--processes P] [--runs R]
[--set SECTION.KEY=VALUE ...] [--json]``; ``bench_gateway.py --stream [--events N] [--runs R]``

Each run starts a fresh daemon and a fresh ``scripts/gateway.py`` in front of it (loopback
ports, a temporary database), then C HTTP clients spread over P processes (keep-alive
connections, stdlib ``http.client``; the JSON bodies are made before the start line) post N
events in requests of B events each, as fast as the answers come. A request is answered only
after the daemon acknowledged the commit, so the rate is of events stored, not just accepted.

* **events/s**: N divided by the time from the start line to the last answer.
* **request latency**: p50 and p99 of the requests' round trips.
* **CPU per event** of the gateway and of the daemon (its decoder process included), user +
  system from ``/proc``, over the same span: where the time goes on a machine this shared.

With ``--stream`` it measures ``GET /events/stream`` instead: N events are stored first
(``publish.py --acked`` to the daemon), then one client opens the stream after 0 and reads
until it has counted N events; **events/s** is N over the time from the request to the last
one, with the gateway's CPU per event over the same span.

Every answer must be 200 with every event new (``added_to_queue``), or the run fails. ``--batch``
may be given several times (default: 100 and 1, the two cases the original FastAPI service
was measured with: ~1 050 events/s in batches of 100, ~400/s one by one). ``--runs R`` repeats
each case and reports medians. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from harness import Daemon, eventually, free_port, publish  # noqa: E402  (the test harness starts real daemons)

ORIGINAL = {100: 1050.0, 1: 400.0}  # the original FastAPI service's events/s on this machine
TOPICS = 10
RUN_TIMEOUT_S = 600.0


def bodies(events: int, batch: int, client: int, clients: int, run: str) -> list[bytes]:
    """This client's share of the requests, as JSON bodies: event ids unique across clients and runs."""
    mine = range(client, events, clients)
    out = []
    chunk: list[dict[str, Any]] = []
    for i in mine:
        chunk.append(
            {
                "topic": f"bench-{i % TOPICS}",
                "event_id": f"{run}-{i}",
                "timestamp": f"2025-10-22T10:{(i // 1_000_000) % 60:02d}:{(i // 10_000) % 60:02d}.{i % 10_000:04d}Z",
                "source": "bench_gateway",
                "payload": {"n": i, "kind": "bench", "values": [1, 2, 3]},
            }
        )
        if len(chunk) == batch:
            out.append(json.dumps({"events": chunk} if batch > 1 else chunk[0]).encode())
            chunk = []
    if chunk:
        out.append(json.dumps({"events": chunk}).encode())
    return out


def client_thread(host: str, port: int, work: list[bytes], go: Any, latencies: list[float], errors: list[str]) -> None:
    connection = http.client.HTTPConnection(host, port, timeout=60)
    headers = {"Content-Type": "application/json"}
    go.wait(RUN_TIMEOUT_S)
    for body in work:
        started = time.perf_counter()
        try:
            connection.request("POST", "/publish", body, headers)
            response = connection.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            connection.close()
            continue
        latencies.append(time.perf_counter() - started)
        if response.status != 200:
            errors.append(f"{response.status}: {answer[:300]!r}")
            continue
        reply = json.loads(answer)
        expected = body.count(b'"event_id"')
        if reply["added_to_queue"] != expected:
            errors.append(f"added_to_queue {reply['added_to_queue']} for {expected} new events: {reply}")
    connection.close()


def client_process(
    host: str, port: int, shares: list[list[bytes]], ready: Any, go: Any, results: Any
) -> None:  # pragma: no cover (runs in a child)
    latencies: list[float] = []
    errors: list[str] = []
    local_go = threading.Event()
    threads = [
        threading.Thread(target=client_thread, args=(host, port, work, local_go, latencies, errors)) for work in shares
    ]
    for thread in threads:
        thread.start()
    ready.put(True)
    go.wait(RUN_TIMEOUT_S)
    local_go.set()
    for thread in threads:
        thread.join(RUN_TIMEOUT_S)
    results.put((latencies, errors))


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU seconds of a process (and, with ``children``, of its child processes)."""
    pids = [pid]
    if children:
        try:
            pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            pass
    total = 0.0
    for one in pids:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def start_gateway(daemon: Daemon, url: str) -> subprocess.Popen[bytes]:
    log = (daemon.workdir / "gateway.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "gateway.py"), "--config", str(daemon.config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=daemon.workdir,
    )
    log.close()

    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}; see {daemon.workdir / 'gateway.log'}")
        host, port = url.removeprefix("http://").split(":")
        try:
            connection = http.client.HTTPConnection(host, int(port), timeout=2)
            connection.request("GET", "/healthz")
            status = connection.getresponse().status
            connection.close()
        except OSError:
            return False
        return status == 200

    eventually(answers, 60, "the gateway answering /healthz 200")
    return proc


def stop(gateway: subprocess.Popen[bytes] | None, daemon: Daemon) -> None:
    """Stop a run's gateway (if it started) and daemon, and remove the daemon's files."""
    if gateway is not None and gateway.poll() is None:
        gateway.terminate()
        try:
            gateway.wait(30)
        except subprocess.TimeoutExpired:
            gateway.kill()
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.terminate()
    daemon.cleanup()


def run_once(
    batch: int, events: int, clients: int, processes: int, overrides: dict[str, dict[str, Any]], run: str
) -> dict[str, Any]:
    """One case: a fresh daemon and gateway, the clients, the rate; everything stopped after."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        sections = {key: dict(values) for key, values in overrides.items()}
        sections.setdefault("http", {}).setdefault("bind", f"127.0.0.1:{port}")
        sections["http"]["bind"] = f"127.0.0.1:{port}"
        sections["http"].setdefault("publishers", max(32, clients))
        sections["http"].setdefault("request_timeout_ms", 30_000)
        daemon = Daemon(Path(tmp) / "daemon", sections)
        gateway: subprocess.Popen[bytes] | None = None
        try:
            daemon.start(timeout=120)
            gateway = start_gateway(daemon, f"http://127.0.0.1:{port}")
            context = multiprocessing.get_context("fork")
            ready, results, go = context.Queue(), context.Queue(), context.Event()
            per_process: list[list[list[bytes]]] = [[] for _ in range(processes)]
            for client in range(clients):
                per_process[client % processes].append(bodies(events, batch, client, clients, run))
            children = [
                context.Process(target=client_process, args=("127.0.0.1", port, shares, ready, go, results))
                for shares in per_process
                if shares
            ]
            for child in children:
                child.start()
            for _ in children:
                ready.get(timeout=RUN_TIMEOUT_S)
            assert daemon.proc is not None
            cpu_before = (cpu_seconds(gateway.pid, children=True), cpu_seconds(daemon.proc.pid, children=True))
            started = time.perf_counter()
            go.set()
            latencies: list[float] = []
            errors: list[str] = []
            for _ in children:
                child_latencies, child_errors = results.get(timeout=RUN_TIMEOUT_S)
                latencies.extend(child_latencies)
                errors.extend(child_errors)
            elapsed = time.perf_counter() - started
            cpu_gateway = cpu_seconds(gateway.pid, children=True) - cpu_before[0]
            cpu_daemon = cpu_seconds(daemon.proc.pid, children=True) - cpu_before[1]
            for child in children:
                child.join(30)
            if errors:
                raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[:3]}")
            stored = daemon.stats()["unique_processed"]
            if stored != events:
                raise RuntimeError(f"the daemon stored {stored} events, not {events}")
            latencies.sort()
            return {
                "batch": batch,
                "events": events,
                "clients": clients,
                "events_per_s": round(events / elapsed),
                "requests_per_s": round(len(latencies) / elapsed),
                "latency_p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
                "latency_p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1),
                "gateway_cpu_us_per_event": round(1e6 * cpu_gateway / events, 1),
                "daemon_cpu_us_per_event": round(1e6 * cpu_daemon / events, 1),
            }
        finally:
            stop(gateway, daemon)


def stream_once(events: int, overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One ``--stream`` run: N events stored, then read back through ``GET /events/stream``."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        sections = {key: dict(values) for key, values in overrides.items()}
        sections.setdefault("http", {})["bind"] = f"127.0.0.1:{port}"
        daemon = Daemon(Path(tmp) / "daemon", sections)
        gateway: subprocess.Popen[bytes] | None = None
        try:
            daemon.start(timeout=120)
            publish(daemon.ack, "--acked", "--events", str(events), "--topics", str(TOPICS), timeout=RUN_TIMEOUT_S)
            gateway = start_gateway(daemon, f"http://127.0.0.1:{port}")
            marker = b"event: event\n"
            cpu_before = cpu_seconds(gateway.pid, children=True)
            started = time.perf_counter()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("GET", "/events/stream?after=0")
            response = connection.getresponse()
            if response.status != 200:
                raise RuntimeError(f"GET /events/stream answered {response.status}: {response.read(500)!r}")
            seen, tail = 0, b""
            while seen < events:
                chunk = response.read1(1 << 16)
                if not chunk:
                    raise RuntimeError(f"the stream ended after {seen} of {events} events")
                text = tail + chunk
                seen += text.count(marker)
                tail = text[-(len(marker) - 1) :]  # a marker cut in two by the chunks is counted once
            elapsed = time.perf_counter() - started
            cpu_gateway = cpu_seconds(gateway.pid, children=True) - cpu_before
            connection.close()
            return {
                "events": events,
                "events_per_s": round(events / elapsed),
                "gateway_cpu_us_per_event": round(1e6 * cpu_gateway / events, 1),
            }
        finally:
            stop(gateway, daemon)


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--set section.key=value`` (value read as TOML: numbers, booleans, quoted strings)."""
    import tomllib

    sections: dict[str, dict[str, Any]] = {}
    for item in items:
        key, equals, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not (equals and dot and section and name):
            raise SystemExit(f"bench_gateway: --set needs SECTION.KEY=VALUE, not {item!r}")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        sections.setdefault(section, {})[name] = parsed
    return sections


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure events/s through the HTTP gateway's POST /publish.")
    parser.add_argument(
        "--batch", type=positive, action="append", help="events per request (repeatable; default 100 and 1)"
    )
    parser.add_argument("--events", type=positive, help="events per run (default 20 000 for batches, 4 000 one by one)")
    parser.add_argument("--clients", type=positive, default=16, help="concurrent HTTP clients (default 16)")
    parser.add_argument("--processes", type=positive, default=4, help="processes the clients run in (default 4)")
    parser.add_argument("--runs", type=positive, default=3, help="runs per case; medians are reported (default 3)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--stream", action="store_true", help="measure reading N stored events through GET /events/stream instead"
    )
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    if args.stream:
        events = args.events or 200_000
        runs = [stream_once(events, overrides) for _ in range(args.runs)]
        case = {
            "stream": True,
            "events": events,
            "events_per_s": statistics.median(run["events_per_s"] for run in runs),
            "gateway_cpu_us_per_event": statistics.median(run["gateway_cpu_us_per_event"] for run in runs),
            "runs_events_per_s": [run["events_per_s"] for run in runs],
        }
        if args.json:
            print(json.dumps(case, indent=2))
        else:
            print(
                f"GET /events/stream: {case['events_per_s']:,.0f} events/s, gateway CPU/event "
                f"{case['gateway_cpu_us_per_event']:.1f} µs, runs {case['runs_events_per_s']}"
            )
        return 0
    report: list[dict[str, Any]] = []
    for batch in args.batch or [100, 1]:
        events = args.events or (20_000 if batch > 1 else 4_000)
        runs = [
            run_once(
                batch, events, args.clients, min(args.processes, args.clients), overrides, f"r{n}-{time.time_ns()}"
            )
            for n in range(args.runs)
        ]
        case = dict(runs[0])
        for key in (
            "events_per_s",
            "requests_per_s",
            "latency_p50_ms",
            "latency_p99_ms",
            "gateway_cpu_us_per_event",
            "daemon_cpu_us_per_event",
        ):
            case[key] = statistics.median(run[key] for run in runs)
        case["runs_events_per_s"] = [run["events_per_s"] for run in runs]
        original = ORIGINAL.get(batch)
        if original:
            case["original_events_per_s"] = original
            case["vs_original"] = round(case["events_per_s"] / original, 1)
        report.append(case)
        if not args.json:
            versus = f"  ({case['vs_original']}x the original's {original:,.0f})" if original else ""
            print(
                f"batch {batch:>4}: {case['events_per_s']:>9,.0f} events/s {case['requests_per_s']:>7,.0f} req/s  "
                f"p50 {case['latency_p50_ms']:.1f} ms  p99 {case['latency_p99_ms']:.1f} ms  "
                f"CPU/event gateway {case['gateway_cpu_us_per_event']:.0f} µs "
                f"daemon {case['daemon_cpu_us_per_event']:.0f} µs  "
                f"runs {case['runs_events_per_s']}{versus}",
                flush=True,
            )
    if args.json:
        print(json.dumps({"clients": args.clients, "processes": args.processes, "cases": report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
