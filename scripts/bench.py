#!/usr/bin/env python3
"""Benchmark: end-to-end rate, latency, stats latency and memory, next to the raw SQLite ceiling.

``bench.py [--events N] [--duplicates F] [--topics K] [--topic-order cycle|random] [--batch B] [--processes P]
[--mode ff|acked] [--client raw|library] [--runs R] [--scaling] [--prefill N] [--json]
[--target CONFIG --pid PID]``

One run starts a daemon on a temporary database (or uses ``--target``'s running one), starts P
publisher processes that prepare their share of a deterministic stream (``transport.workload``)
and wait at a start line, then measures what follows. A ``raw`` publisher sends frames it
encoded before the start (fire-and-forget PUSH, or a DEALER keeping ``--window`` acknowledged
batches in flight), so it costs the shared CPUs almost nothing; a ``library`` publisher goes
through ``transport.publisher`` and validates and encodes each event as an application would.

* **end-to-end events/s**: N divided by the time from the first frame sent to the first stats
  reply showing all N events settled (committed or counted as duplicates). Stats are polled
  every 20 ms, so the end is late by at most that plus one query round trip.
* **stats-query latency**: the round trips of those polls while ingest runs at full speed.
* **publish→commit latency**, measured in a second, paced phase at half the rate just measured
  (reorder window as configured; default off). In acked mode it is exact: send of a batch to
  its acknowledgement, which the daemon sends after the commit. In fire-and-forget mode one
  publisher records when each frame left, and stats are polled every 2 ms; frame k counts as
  committed at the first poll whose settled count covers every event up to and including frame
  k. That takes the pipeline as first-in first-out (it is, but for the ordering actors'
  interleaving inside one commit group) and overstates each latency by up to one poll interval.
* **peak RSS** of the daemon: ``VmHWM`` from ``/proc/PID/status`` after both phases, plus the
  memory its decoder process shares with no other process (``rss_peak_mb``); the daemon alone
  (``rss_peak_mb_main``); and both VmHWMs added, shared library pages counted twice
  (``rss_peak_mb_upper``).
* **daemon CPU per event** in the full-speed phase (user + system, the decoder process's
  included), and the same split by thread kind (``cpu_us_per_event_dedup``, ``_ingest``,
  ``_ordering``, ..., and ``_decoder`` for the child process) from ``/proc/PID/task``, where the
  daemon names its threads (``transport.threadnames``).
* **publishers' CPU per event** (``publishers_cpu_us_per_event``): the publisher processes'
  own CPU from their start line to their last reply, all of them added; they share the CPUs
  with the daemon (library publishers validate and encode every event, raw ones send frames
  encoded beforehand).
* **the raw SQLite ceiling**, in the same run (before and after the daemon, averaged): the same rows
  (as the daemon would store them)
  put with ``executemany`` of ``INSERT OR IGNORE`` in transactions of 1 000, WAL,
  synchronous=NORMAL, into the daemon's own schema (``actors.store``) and into a table with only
  the primary key; the ratio is end-to-end / ceiling.

``--scaling`` runs, in each pass, the base case and then 100 000 topics, a database prefilled
with 5 000 000 events (built once with SQLite directly and cached), 2 and 4 publishers, and
acked mode with 4 publishers; each variant's rate is compared with the base case of the same
pass. ``--runs R`` repeats everything and reports medians. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import multiprocessing
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

from actors.store import INSERT_EVENT, Row, connect_writer
from transport.client import NoAnswer, QueryClient, connectable
from transport.config import ConfigError, load_config, parse_config
from transport.schema import validate_event
from transport.workload import BASE_TIME, IDS, TOPIC_ORDERS, distinct_count, plan

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from harness import Daemon  # noqa: E402  (the test harness starts real daemon processes)

CEILING_BATCH = 1_000
FULL_SPEED_POLL_S = 0.02
PACED_POLL_S = 0.002
READY_TIMEOUT_S = 120.0
PREFILL_FORMAT = 1  # bump when the prefilled database's contents change
PK_ONLY_SCHEMA = """
CREATE TABLE events (
    topic TEXT NOT NULL, event_id TEXT NOT NULL, seq INTEGER NOT NULL, timestamp TEXT NOT NULL,
    ts_ns INTEGER NOT NULL, source TEXT NOT NULL, payload BLOB NOT NULL, received_at REAL NOT NULL,
    late INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (topic, event_id)
)
"""


class BenchError(Exception):
    """A run could not complete: the daemon did not start, did not settle in time, or a publisher failed."""


@dataclass(frozen=True)
class Scenario:
    """What one run sends, how, and what it measures besides the end-to-end rate."""

    name: str
    events: int = 200_000
    duplicates: float = 0.2
    topics: int = 10
    ids: str = "counter"
    topic_order: str = "cycle"
    batch: int = 100
    processes: int = 1
    acked: bool = False
    library: bool = False
    window: int = 40
    prefill: int = 0
    ceiling: bool = True
    latency: bool = True
    latency_seconds: float = 3.0
    time_limit_s: float = 120.0


@dataclass(frozen=True)
class Target:
    """Where the daemon under test listens, and its pid (for its peak RSS)."""

    ingest: str
    ack: str
    query: str
    pid: int | None


# ---------------------------------------------------------------- the raw SQLite ceiling


def stored_rows(events: Sequence[dict[str, Any]]) -> list[Row]:
    """The rows the daemon would store for this stream (duplicates included, with their original's seq)."""
    seqs: dict[str, int] = {}
    known: dict[tuple[str, str], Row] = {}
    rows: list[Row] = []
    received_at = time.time()
    for obj in events:
        key = (obj["topic"], obj["event_id"])
        row = known.get(key)
        if row is None:
            event = validate_event(obj)
            seq = seqs[event.topic] = seqs.get(event.topic, 0) + 1
            # As a bytearray, as the daemon binds it (actors.ordering): the ceiling gets the same speed-up.
            row = known[key] = (
                event.topic,
                event.event_id,
                seq,
                event.timestamp,
                event.ts_ns,
                event.source,
                bytearray(event.payload),
                received_at,
                0,
            )
        rows.append(row)
    return rows


def _timed_inserts(conn: sqlite3.Connection, rows: Sequence[Row]) -> float:
    sql = INSERT_EVENT.replace("INSERT INTO", "INSERT OR IGNORE INTO")
    started = time.perf_counter()
    for start in range(0, len(rows), CEILING_BATCH):
        conn.execute("BEGIN")
        conn.executemany(sql, rows[start : start + CEILING_BATCH])
        conn.execute("COMMIT")
    return len(rows) / (time.perf_counter() - started)


def measure_ceiling(rows: Sequence[Row], workdir: Path) -> dict[str, float]:
    """Rows/s of plain ``executemany`` into the daemon's schema and into a primary-key-only table."""
    conn = connect_writer(workdir / "ceiling.db", "NORMAL")
    try:
        schema_rate = _timed_inserts(conn, rows)
    finally:
        conn.close()
    conn = sqlite3.connect(workdir / "ceiling-pk.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(PK_ONLY_SCHEMA)
        pk_rate = _timed_inserts(conn, rows)
    finally:
        conn.close()
    return {"ceiling_rows_per_s": round(schema_rate), "ceiling_pk_only_rows_per_s": round(pk_rate)}


# ---------------------------------------------------------------- a prefilled database


def prefilled_db(cache: Path, events: int, topics: int) -> tuple[Path, float]:
    """A database in the daemon's schema holding ``events`` events over ``topics`` topics (cached).

    Returns the path and how long building it took (0 when it came from the cache). Event ids are
    ``e10000000``, ``e10000001``, ...: the same prefix as the benchmark's ``e0``, ``e1``, ..., so
    a good share of the new ids (every one starting with ``e1``) lands among the old ones in the
    primary-key index rather than after them. Timestamps precede the benchmark's, and the
    ``topics`` and ``counters`` tables agree with the rows, as the daemon would have left them.
    """
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"prefill-{events}-{topics}-v{PREFILL_FORMAT}.db"
    if path.exists():
        return path, 0.0
    started = time.perf_counter()
    building = path.with_suffix(".building")
    for leftover in cache.glob(building.name + "*"):
        leftover.unlink()
    connect_writer(building, "NORMAL").close()
    conn = sqlite3.connect(building, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-262144")
        conn.execute("BEGIN")
        base_ns = int((BASE_TIME - dt.timedelta(hours=12)).timestamp()) * 1_000_000_000
        base_ms = base_ns // 1_000_000
        received_at = time.time()
        topic_rows = []
        for t in range(topics):
            topic = f"topic-{t}"

            # Within a topic, ids in increasing order are also seqs in increasing order: both
            # indexes are appended to, which is what makes the build fast.
            def rows(t: int = t, topic: str = topic) -> Any:
                for seq, g in enumerate(range(t, events, topics), start=1):
                    ms = base_ms + g
                    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"
                    payload = msgpack.packb({"n": g, "level": "info", "message": f"event {g}"})
                    yield (topic, f"e{10_000_000 + g}", seq, stamp, ms * 1_000_000, "prefill", payload, received_at, 0)

            conn.executemany(INSERT_EVENT, rows())
            count = len(range(t, events, topics))
            last_ms = base_ms + (t + (count - 1) * topics if count else 0)
            topic_rows.append((topic, count, last_ms * 1_000_000 if count else 0, count))
        conn.executemany("INSERT INTO topics (topic, last_seq, last_ts_ns, received) VALUES (?, ?, ?, ?)", topic_rows)
        for name in ("received", "unique_processed"):
            conn.execute("UPDATE counters SET value = ? WHERE name = ?", (events, name))
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()
    building.rename(path)
    return path, time.perf_counter() - started


# ---------------------------------------------------------------- publisher processes


@dataclass
class PublisherJob:
    """One publisher process's share: its frames, already encoded, and how to send them."""

    index: int
    endpoint: str
    frames: list[bytes]
    counts: list[int]
    batch_ids: list[int]
    acked: bool
    window: int
    rate: float  # events/s; 0 sends as fast as the socket takes them
    timeout_s: float
    chunks: list[list[dict[str, Any]]] = field(default_factory=list)  # for the publisher library


@dataclass
class PublisherReport:
    """What a publisher process saw: wall-clock send times and, in acked mode, the replies."""

    index: int
    first_send: float = 0.0
    last_send: float = 0.0
    sent: int = 0
    send_times: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    new: int = 0
    duplicate: int = 0
    rejected: int = 0
    cpu_s: float = 0.0  # the publisher process's CPU from its start line to its last reply
    error: str | None = None


def encode_job(
    index: int, events: Sequence[dict[str, Any]], batch: int, acked: bool, processes: int
) -> tuple[list[bytes], list[int], list[int]]:
    """Frames (fire-and-forget) or acknowledged-batch bodies for one publisher's events."""
    frames, counts, ids = [], [], []
    for number, start in enumerate(range(0, len(events), batch)):
        chunk = list(events[start : start + batch])
        batch_id = number * processes + index
        if acked:
            frames.append(msgpack.packb({"batch": batch_id, "events": chunk}, use_bin_type=True))
        else:
            frames.append(msgpack.packb(chunk[0] if batch == 1 else chunk, use_bin_type=True))
        counts.append(len(chunk))
        ids.append(batch_id)
    return frames, counts, ids


def _pace(job: PublisherJob, started: float, sent_events: int) -> None:
    if job.rate > 0:
        delay = started + sent_events / job.rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


def _send_fire_and_forget(job: PublisherJob, sock: zmq.Socket[Any], report: PublisherReport) -> None:
    started = time.perf_counter()
    for frame, count in zip(job.frames, job.counts):
        _pace(job, started, report.sent)
        now = time.time()
        sock.send(frame)  # SNDTIMEO bounds this
        report.send_times.append(now)
        report.sent += count
    report.first_send = report.send_times[0] if report.send_times else 0.0
    report.last_send = time.time()


def _send_acked(job: PublisherJob, sock: zmq.Socket[Any], report: PublisherReport) -> None:
    outstanding: dict[int, tuple[float, int]] = {}
    started = time.perf_counter()
    next_frame = 0
    total = len(job.frames)
    while next_frame < total or outstanding:
        while next_frame < total and len(outstanding) < job.window:
            if job.rate > 0 and started + report.sent / job.rate > time.perf_counter():
                break
            if not report.first_send:
                report.first_send = time.time()
            sock.send(job.frames[next_frame])
            # Latencies on the monotonic clock: a wall-clock step would skew (or negate) them.
            outstanding[job.batch_ids[next_frame]] = (time.perf_counter(), job.counts[next_frame])
            report.sent += job.counts[next_frame]
            next_frame += 1
        wait_ms = int(job.timeout_s * 1000)
        if job.rate > 0 and next_frame < total and len(outstanding) < job.window:
            wait_ms = max(0, int((started + report.sent / job.rate - time.perf_counter()) * 1000))
        if not sock.poll(wait_ms, zmq.POLLIN):
            if wait_ms >= job.timeout_s * 1000:
                raise BenchError(f"publisher {job.index}: no acknowledgement within {job.timeout_s:.0f} s")
            continue
        reply = msgpack.unpackb(sock.recv(), raw=False)
        received = time.perf_counter()
        if "error" in reply:
            raise BenchError(f"publisher {job.index}: batch {reply.get('batch')} refused: {reply['error']}")
        sent_at, _count = outstanding.pop(reply["batch"])
        report.latencies.append(received - sent_at)
        report.new += reply["new"]
        report.duplicate += reply["duplicate"]
        report.rejected += len(reply["rejected"])
    report.last_send = time.time()


def _send_with_library(job: PublisherJob, ready: Any, go: Any, report: PublisherReport) -> None:
    """Publish through ``transport.publisher`` (validation and encoding happen here, as in an application).

    A batch's latency runs from the moment the library sends its frame (first send, so a resend
    counts against it) to its acknowledgement, on the monotonic clock. Pairing publish_many calls
    with batch ids by position, as this did before, went wrong when a full window made a batch
    leave during the next call, and time.time() could step: it once gave a negative p50.
    """
    from transport.publisher import BatchResult, Publisher

    acked_at: dict[int, float] = {}
    sent_at: dict[int, float] = {}

    def on_ack(result: BatchResult) -> None:
        acked_at[result.batch_id] = time.perf_counter()
        report.new += result.new
        report.duplicate += result.duplicate
        report.rejected += len(result.rejected)

    calls: list[tuple[float, float]] = []
    with Publisher(
        job.endpoint,
        acked=job.acked,
        batch_size=max(job.counts, default=1),
        window=job.window,
        deadline=job.timeout_s,
        block_timeout=job.timeout_s,
        close_timeout=job.timeout_s,
        on_ack=on_ack,
    ) as publisher:
        send_batch = publisher._send_batch

        def timed_send_batch(events: list[dict[str, Any]], packed: list[bytes]) -> None:
            sent_at.setdefault(publisher._next_id, time.perf_counter())
            send_batch(events, packed)

        publisher._send_batch = timed_send_batch  # type: ignore[method-assign]
        ready.put(job.index)
        if not go.wait(READY_TIMEOUT_S):
            raise BenchError(f"publisher {job.index}: no start signal")
        cpu_start = time.process_time()
        started = time.perf_counter()
        report.first_send = time.time()
        for chunk in job.chunks:
            _pace(job, started, report.sent)
            before = time.time()
            publisher.publish_many(chunk)
            calls.append((before, time.time()))
            report.sent += len(chunk)
        publisher.flush(job.timeout_s)
        report.cpu_s = time.process_time() - cpu_start
    report.last_send = time.time()
    report.send_times = [after for _, after in calls]
    report.latencies = [acked - sent_at[batch_id] for batch_id, acked in acked_at.items() if batch_id in sent_at]


def publisher_main(job: PublisherJob, ready: Any, go: Any, results: Any) -> None:
    """A publisher process: connect, say ready, wait for the start line, send, report."""
    report = PublisherReport(job.index)
    if job.chunks:
        try:
            _send_with_library(job, ready, go, report)
        except Exception as exc:
            report.error = f"{type(exc).__name__}: {exc}"
        finally:
            results.put(report)
        return
    context: zmq.Context[Any] = zmq.Context()
    sock = context.socket(zmq.DEALER if job.acked else zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 1000)
    sock.setsockopt(zmq.SNDTIMEO, int(job.timeout_s * 1000))
    sock.setsockopt(zmq.LINGER, int(job.timeout_s * 1000))
    try:
        sock.connect(job.endpoint)
        ready.put(job.index)
        if not go.wait(READY_TIMEOUT_S):
            raise BenchError(f"publisher {job.index}: no start signal")
        cpu_start = time.process_time()
        if job.acked:
            _send_acked(job, sock, report)
        else:
            _send_fire_and_forget(job, sock, report)
        report.cpu_s = time.process_time() - cpu_start
    except (BenchError, zmq.ZMQError) as exc:
        report.error = f"{type(exc).__name__}: {exc}"
    finally:
        # Queued frames are dropped unless the socket lingers and the context is terminated.
        sock.close()
        context.term()
        results.put(report)


def run_publishers(jobs: list[PublisherJob], poller: StatsPoller | None, timeout_s: float) -> list[PublisherReport]:
    """Start the publisher processes, start them sending together, start the poller with them, and collect reports."""
    # Spawned, not forked: this process has threads by now (libzmq's), and a forked child may
    # inherit one's lock held. The frames are pickled to each child before the start signal.
    mp = multiprocessing.get_context("spawn")
    ready, results, go = mp.Queue(), mp.Queue(), mp.Event()
    procs = [mp.Process(target=publisher_main, args=(job, ready, go, results), daemon=True) for job in jobs]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            ready.get(timeout=READY_TIMEOUT_S)
        if poller is not None:
            poller.start()
        go.set()
        reports = [results.get(timeout=timeout_s) for _ in procs]
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    errors = [r.error for r in reports if r.error]
    if errors:
        raise BenchError("; ".join(errors))
    return sorted(reports, key=lambda r: r.index)


# ---------------------------------------------------------------- stats polling


class StatsPoller:
    """Polls the daemon's stats on a thread: round-trip times and the settled count over time."""

    def __init__(self, endpoint: str, interval_s: float) -> None:
        self.endpoint = endpoint
        self.interval_s = interval_s
        self.samples: list[tuple[float, float, int]] = []  # (sent, answered, settled), wall clock
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stats-poller", daemon=True)

    def start(self) -> None:
        """Start polling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and wait for the thread."""
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with QueryClient(self.endpoint, timeout=5.0) as client:
            while not self._stop.is_set():
                sent = time.time()
                try:
                    reply = client.request({"op": "stats"})
                except NoAnswer:
                    self.failures += 1
                    continue
                answered = time.time()
                self.samples.append((sent, answered, settled_of(reply)))
                self._stop.wait(max(0.0, self.interval_s - (answered - sent)))

    def wait_settled(self, count: int, timeout_s: float) -> float:
        """The wall time of the first answer showing ``count`` settled events."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            samples = self.samples
            for _sent, answered, settled in samples[seen:]:
                if settled >= count:
                    return answered
            seen = len(samples)
            time.sleep(self.interval_s / 2)
        last = self.samples[-1][2] if self.samples else None
        raise BenchError(f"daemon did not settle {count} events within {timeout_s:.0f} s (last seen: {last})")


def settled_of(stats: dict[str, Any]) -> int:
    """Events committed or counted as duplicates (what ``received`` becomes once nothing is in flight)."""
    if "error" in stats:
        raise BenchError(f"stats query failed: {stats['error']}")
    return int(stats["unique_processed"]) + int(stats["duplicate_dropped"])


def query_stats(endpoint: str) -> dict[str, Any]:
    with QueryClient(endpoint, timeout=10.0) as client:
        return client.request({"op": "stats"})


def child_pids(pid: int) -> list[int]:
    """The process's children: the daemon's decoder process (``[ingest] decode_process``)."""
    children: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []
    for task in tasks:  # each child is listed under the thread that started it
        try:
            children.extend(int(child) for child in (task / "children").read_text().split())
        except OSError:  # the thread ended meanwhile
            continue
    return children


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _private_mb(pid: int) -> float:
    """Resident memory of the process that no other process shares (private clean + dirty), in MiB."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0.0
    return sum(int(line.split()[1]) for line in lines if line.startswith(("Private_Clean:", "Private_Dirty:"))) / 1024


def peak_rss_mb(pid: int | None, children: str = "private") -> float | None:
    """Peak resident set (VmHWM) of the process in MiB, with its children's memory added.

    ``children="private"``: each child's resident memory that it shares with no other process,
    read now (a decoder process's memory does not shrink, so now is about its peak); shared
    pages such as the interpreter's and libzmq's are already in the daemon's figure. This is
    the two processes' footprint. ``"peak"``: each child's whole VmHWM, which counts those shared
    pages twice: an upper bound. ``"none"``: the daemon alone.
    """
    if pid is None:
        return None
    total = _vm_hwm_mb(pid)
    if total is None:
        return None
    for child in child_pids(pid) if children != "none" else []:
        total += _private_mb(child) if children == "private" else (_vm_hwm_mb(child) or 0.0)
    return round(total, 1)


# Kernel thread names (transport.threadnames), less any "-N" suffix, and how bench.py reports them.
THREAD_KINDS = {
    "DedupActor": "dedup",
    "OrderingActor": "ordering",
    "RouterActor": "router",
    "StatsActor": "stats",
    "ingest": "ingest",
    "query": "query",
    "ticker": "ticker",
    "checkpointer": "checkpointer",
}
CHILD_KIND = "decoder"  # the CPU of the daemon's child processes


def _stat_cpu_seconds(stat: Path) -> float:
    """User plus system CPU seconds from a ``/proc/.../stat`` file (raises OSError if it is gone)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float | None:
    """User plus system CPU time the process and its children have used so far, if it can be read."""
    if pid is None:
        return None
    try:
        return _stat_cpu_seconds(Path(f"/proc/{pid}/stat")) + _children_cpu_seconds(pid)
    except OSError:
        return None


def _children_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of the process's children (its decoder process) so far."""
    total = 0.0
    for child in child_pids(pid):
        try:
            total += _stat_cpu_seconds(Path(f"/proc/{child}/stat"))
        except OSError:  # it ended meanwhile
            continue
    return total


def thread_cpu_seconds(pid: int | None) -> dict[str, float]:
    """CPU seconds so far per kind of daemon thread, by the kernel names the daemon gives them.

    ``OrderingActor-1`` ... ``-4`` add up under ``ordering``; threads without a name of ours
    (the main thread, libzmq's I/O thread) under ``other``.
    """
    if pid is None:
        return {}
    totals: dict[str, float] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return {}
    for task in tasks:
        try:
            name = (task / "comm").read_text().strip()
            spent = _stat_cpu_seconds(task / "stat")
        except OSError:  # the thread ended meanwhile
            continue
        kind = THREAD_KINDS.get(name.rsplit("-", 1)[0], "other")
        totals[kind] = totals.get(kind, 0.0) + spent
    if child_pids(pid):
        totals[CHILD_KIND] = _children_cpu_seconds(pid)
    return totals


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def ms(value: float) -> float:
    return round(value * 1000, 2)


# ---------------------------------------------------------------- one run


def split_jobs(
    scenario: Scenario, events: list[dict[str, Any]], target: Target, processes: int, rate: float
) -> list[PublisherJob]:
    endpoint = target.ack if scenario.acked else target.ingest
    jobs = []
    for index in range(processes):
        share = events[index::processes]
        frames, counts, ids = encode_job(index, share, scenario.batch, scenario.acked, processes)
        chunks = (
            [share[i : i + scenario.batch] for i in range(0, len(share), scenario.batch)] if scenario.library else []
        )
        jobs.append(
            PublisherJob(
                index,
                endpoint,
                frames,
                counts,
                ids,
                scenario.acked,
                scenario.window,
                rate / processes,
                scenario.time_limit_s,
                chunks,
            )
        )
    return jobs


def full_speed_events(scenario: Scenario, id_prefix: str) -> list[dict[str, Any]]:
    """The stream of a run's full-speed phase (the raw SQLite ceiling stores the same rows)."""
    return plan(
        scenario.events,
        scenario.duplicates,
        scenario.topics,
        seed=1,
        id_prefix=id_prefix,
        ids=scenario.ids,
        topic_order=scenario.topic_order,
    )


def full_speed_phase(scenario: Scenario, target: Target, id_prefix: str) -> dict[str, Any]:
    """Send N events as fast as the daemon takes them; the end-to-end rate and stats latency."""
    events = full_speed_events(scenario, id_prefix)
    before = query_stats(target.query)
    base = settled_of(before)
    cpu_before = cpu_seconds(target.pid)
    threads_before = thread_cpu_seconds(target.pid)
    jobs = split_jobs(scenario, events, target, scenario.processes, 0.0)
    poller = StatsPoller(target.query, FULL_SPEED_POLL_S)
    try:
        reports = run_publishers(jobs, poller, scenario.time_limit_s)
        done = poller.wait_settled(base + scenario.events, scenario.time_limit_s)
    finally:
        poller.stop()
    first = min(r.first_send for r in reports)
    last_send = max(r.last_send for r in reports)
    after = query_stats(target.query)
    cpu_after = cpu_seconds(target.pid)
    threads_after = thread_cpu_seconds(target.pid)
    distinct = distinct_count(scenario.events, scenario.duplicates)
    unique = after["unique_processed"] - before["unique_processed"]
    duplicates = after["duplicate_dropped"] - before["duplicate_dropped"]
    rtts = [answered - sent for sent, answered, _ in poller.samples if first <= sent <= done]
    result: dict[str, Any] = {
        "events_per_s": round(scenario.events / (done - first)),
        "elapsed_s": round(done - first, 3),
        "publish_s": round(last_send - first, 3),
        "correct": unique == distinct and duplicates == scenario.events - distinct,
        "stats_p50_ms": ms(percentile(rtts, 50)),
        "stats_p99_ms": ms(percentile(rtts, 99)),
        "stats_samples": len(rtts),
        "commits": after["commits"] - before["commits"],
    }
    if cpu_before is not None and cpu_after is not None:
        # Less sensitive to a noisy machine than the rate: what each event cost the daemon in CPU.
        result["daemon_cpu_us_per_event"] = round((cpu_after - cpu_before) / scenario.events * 1e6, 1)
    # The publishers share the daemon's CPUs: what they spend is CPU the daemon cannot have.
    result["publishers_cpu_us_per_event"] = round(sum(r.cpu_s for r in reports) / scenario.events * 1e6, 1)
    for kind in sorted(threads_after, key=lambda k: -threads_after[k]):
        spent = threads_after[kind] - threads_before.get(kind, 0.0)
        result[f"cpu_us_per_event_{kind}"] = round(spent / scenario.events * 1e6, 1)
    if not result["correct"]:
        result["error"] = (
            f"stored {unique} new and {duplicates} duplicates; expected {distinct} and {scenario.events - distinct}"
        )
    if scenario.acked:
        latencies = [x for r in reports for x in r.latencies]
        result["full_speed_ack_p50_ms"] = ms(percentile(latencies, 50))
        result["full_speed_ack_p99_ms"] = ms(percentile(latencies, 99))
    return result


def paced_phase(scenario: Scenario, target: Target, id_prefix: str, rate: float) -> dict[str, Any]:
    """Send at ``rate`` events/s for ``latency_seconds``; publish→commit latency percentiles."""
    count = max(scenario.batch, int(rate * scenario.latency_seconds))
    # Stamped after every event of the full-speed phase: otherwise they would all be late and
    # leave the reorder window at once, and the latency would not include the window.
    events = plan(
        count,
        scenario.duplicates,
        scenario.topics,
        seed=2,
        id_prefix=id_prefix,
        start_ms=scenario.events + 1000,
        ids=scenario.ids,
        topic_order=scenario.topic_order,
    )
    base = settled_of(query_stats(target.query))
    if scenario.acked:
        jobs = split_jobs(scenario, events, target, scenario.processes, rate)
        reports = run_publishers(jobs, None, scenario.time_limit_s)
        latencies = [x for r in reports for x in r.latencies]
        method = "acknowledgement"
    else:
        # One publisher, so its frame order is the order the settled count covers them in.
        jobs = split_jobs(scenario, events, target, 1, rate)
        poller = StatsPoller(target.query, PACED_POLL_S)
        try:
            reports = run_publishers(jobs, poller, scenario.time_limit_s)
            poller.wait_settled(base + count, scenario.time_limit_s)
        finally:
            poller.stop()
        latencies = []
        samples = poller.samples
        cursor = 0
        covered = base
        for sent_at, frame_count in zip(reports[0].send_times, jobs[0].counts):
            covered += frame_count
            while cursor < len(samples) and samples[cursor][2] < covered:
                cursor += 1
            if cursor < len(samples):
                latencies.append(samples[cursor][1] - sent_at)
        method = f"stats poll every {PACED_POLL_S * 1000:g} ms"
    return {
        "latency_rate": round(rate),
        "latency_p50_ms": ms(percentile(latencies, 50)),
        "latency_p99_ms": ms(percentile(latencies, 99)),
        "latency_max_ms": ms(max(latencies)) if latencies else float("nan"),
        "latency_method": method,
    }


def _ceiling_in(workdir: Path, rows: Sequence[Row]) -> dict[str, float]:
    ceiling_dir = workdir / "ceiling"
    ceiling_dir.mkdir(exist_ok=True)
    try:
        return measure_ceiling(rows, ceiling_dir)
    finally:
        shutil.rmtree(ceiling_dir, ignore_errors=True)


def storage_figures(daemon: Daemon) -> dict[str, Any]:
    """The database's and its WAL's size on disk after both phases, with what retention did
    (``--set retention.max_age=...``): events stored and expired, and deleted keys kept."""
    wal = daemon.db_path.with_name(daemon.db_path.name + "-wal")
    stats = daemon.stats()
    return {
        "db_mb": round(daemon.db_path.stat().st_size / 1e6, 2),
        "wal_mb": round(wal.stat().st_size / 1e6, 2) if wal.exists() else 0.0,
        "stored": stats.get("stored", stats.get("unique_processed")),
        "expired": stats.get("expired", 0),
    }


def run_once(
    scenario: Scenario,
    workdir: Path,
    cache: Path,
    target: Target | None,
    overrides: dict[str, dict[str, Any]],
    run_token: str,
) -> dict[str, Any]:
    """One run of one scenario: its own daemon (unless targeting one), both phases, the ceiling."""
    result: dict[str, Any] = {"scenario": scenario.name}
    workdir.mkdir(parents=True, exist_ok=True)
    daemon: Daemon | None = None
    # A daemon of our own starts empty (or prefilled) and takes the ids "e0", "e1", ...; a running
    # one gets a fresh prefix per run, or every event would be a duplicate of an earlier run's.
    prefix = "e" if target is None else f"b{run_token}-"
    ceilings: list[dict[str, float]] = []
    rows = stored_rows(full_speed_events(scenario, prefix)) if scenario.ceiling else []
    if scenario.ceiling:
        ceilings.append(_ceiling_in(workdir, rows))
    try:
        if target is None:
            daemon = Daemon(workdir / "daemon", overrides)
            if scenario.prefill:
                source, build_s = prefilled_db(cache, scenario.prefill, scenario.topics)
                result["prefill_build_s"] = round(build_s, 2)
                shutil.copyfile(source, daemon.db_path)
            daemon.start(timeout=120)
            assert daemon.proc is not None
            target = Target(daemon.ingest, daemon.ack, daemon.query, daemon.proc.pid)
        result.update(full_speed_phase(scenario, target, prefix))
        if scenario.latency:
            result.update(paced_phase(scenario, target, "L" + prefix, result["events_per_s"] / 2))
        if daemon is not None:
            result.update(storage_figures(daemon))
        result["rss_peak_mb"] = peak_rss_mb(target.pid)
        result["rss_peak_mb_main"] = peak_rss_mb(target.pid, children="none")
        result["rss_peak_mb_upper"] = peak_rss_mb(target.pid, children="peak")
        if daemon is not None:
            daemon.terminate(timeout=60)
    finally:
        if daemon is not None:
            daemon.cleanup()
            shutil.rmtree(daemon.workdir, ignore_errors=True)
    if scenario.ceiling:
        # Measured before and after the daemon, and averaged: on a shared machine one
        # measurement alone can land in someone else's burst.
        ceilings.append(_ceiling_in(workdir, rows))
        for key in ceilings[0]:
            result[key] = round(statistics.fmean(c[key] for c in ceilings))
        result["ceiling_before_after"] = [c["ceiling_rows_per_s"] for c in ceilings]
        result["ratio"] = round(result["events_per_s"] / result["ceiling_rows_per_s"], 3)
        result["ratio_pk_only"] = round(result["events_per_s"] / result["ceiling_pk_only_rows_per_s"], 3)
    return result


# ---------------------------------------------------------------- passes, medians, output


def scaling_scenarios(base: Scenario, prefill: int) -> list[Scenario]:
    """The base case first, then each variant the issue asks for (one thing changed each)."""
    plain = dataclasses.replace(base, ceiling=False, latency=False)
    return [
        base,
        dataclasses.replace(plain, name="topics-100k", topics=100_000),
        dataclasses.replace(plain, name=f"prefill-{prefill // 1_000_000}M", prefill=prefill),
        dataclasses.replace(plain, name="publishers-2", processes=2),
        dataclasses.replace(plain, name="publishers-4", processes=4),
        dataclasses.replace(base, name="acked-4", processes=4, acked=True, ceiling=False, library=_library_exists()),
    ]


def _library_exists() -> bool:
    try:
        import transport.publisher  # noqa: F401
    except ImportError:
        return False
    return True


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per key, the median of the numeric values (and the first value of anything else)."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if key in r]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None for v in values):
            median = statistics.median(values)
            out[key] = round(median, 3) if isinstance(median, float) else median
        elif all(isinstance(v, bool) for v in values):
            out[key] = all(values)
        else:
            out[key] = values[0]
    return out


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "zmq": zmq.zmq_version(),
        "platform": platform.platform(),
    }


def print_table(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"machine: {m['cpus']} CPUs, Python {m['python']}, SQLite {m['sqlite']}, libzmq {m['zmq']}")
    print(f"runs: {report['runs']} (medians)")
    for name, row in report["median"].items():
        print(f"\n[{name}]")
        for key, value in row.items():
            if key != "scenario":
                print(f"  {key:30} {value}")


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--set storage.commit_max_events=10000`` into ``{"storage": {"commit_max_events": 10000}}``."""
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        key, _, raw = item.partition("=")
        section, _, name = key.partition(".")
        if not (section and name and raw):
            raise ValueError(f"--set wants SECTION.KEY=VALUE, not {item!r}")
        try:  # a TOML value, as in the config file: 10000, 0.5, true, "NORMAL"
            value: Any = tomllib.loads(f"value = {raw}")["value"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare word: a string
        overrides.setdefault(section, {})[name] = value
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark eventagg end to end next to the raw SQLite ceiling.")
    parser.add_argument("--events", type=int, default=200_000, metavar="N", help="events per run (default 200000)")
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
    parser.add_argument("--batch", type=int, default=100, metavar="B", help="events per frame (default 100)")
    parser.add_argument("--processes", type=int, default=1, metavar="P", help="publisher processes (default 1)")
    parser.add_argument("--mode", choices=("ff", "acked"), default="ff", help="fire-and-forget or acked (default ff)")
    parser.add_argument(
        "--client",
        choices=("raw", "library"),
        default=None,
        help="publishers: pre-encoded frames on a raw socket, or transport.publisher "
        "(default: library in acked mode when it exists, raw otherwise)",
    )
    parser.add_argument(
        "--window", type=int, default=40, metavar="W", help="acked: batches in flight per publisher (default 40)"
    )
    parser.add_argument(
        "--prefill", type=int, default=0, metavar="N", help="start from a database holding N events (default 0)"
    )
    parser.add_argument(
        "--scaling", action="store_true", help="also run the scaling variants (topics, prefill, publishers, acked)"
    )
    parser.add_argument(
        "--scaling-prefill",
        type=int,
        default=5_000_000,
        metavar="N",
        help="events in the scaling runs' prefilled database (default 5000000)",
    )
    parser.add_argument("--runs", type=int, default=1, metavar="R", help="repeat and report medians (default 1)")
    parser.add_argument(
        "--latency-seconds", type=float, default=3.0, metavar="S", help="length of the paced phase (default 3)"
    )
    parser.add_argument("--no-latency", action="store_true", help="skip the paced latency phase")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the raw SQLite ceiling")
    parser.add_argument(
        "--time-limit", type=float, default=120.0, metavar="S", help="most seconds one phase may take (default 120)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="daemon config override (repeatable)"
    )
    parser.add_argument("--target", metavar="CONFIG", help="benchmark the running daemon described by this config file")
    parser.add_argument("--pid", type=int, help="with --target: the daemon's pid, for its peak RSS")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "eventagg-bench-cache",
        help="where the prefilled database is kept between runs",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.events < 1 or args.processes < 1 or args.batch < 1 or args.runs < 1 or args.window < 1 or args.topics < 1:
        parser.error("--events, --processes, --batch, --runs, --window and --topics must be 1 or more")
    if not 0 <= args.duplicates < 1:
        parser.error("--duplicates must be a fraction from 0 up to (not including) 1")
    try:
        overrides = parse_overrides(args.set)
        parse_config(overrides)  # a bad key or value is refused here, not by the first daemon to start
        target = None
        if args.target:
            if args.set or args.prefill or args.scaling:
                parser.error("--target cannot be combined with --set, --prefill or --scaling")
            cfg = load_config(args.target)
            target = Target(
                connectable(cfg.ingest.bind), connectable(cfg.ingest.ack_bind), connectable(cfg.query.bind), args.pid
            )
    except (ConfigError, ValueError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2

    client = args.client or ("library" if args.mode == "acked" and _library_exists() else "raw")
    base = Scenario(
        name=f"{args.mode}-p{args.processes}",
        library=client == "library",
        events=args.events,
        duplicates=args.duplicates,
        topics=args.topics,
        ids=args.ids,
        topic_order=args.topic_order,
        batch=args.batch,
        processes=args.processes,
        acked=args.mode == "acked",
        window=args.window,
        prefill=args.prefill,
        ceiling=not args.no_ceiling,
        latency=not args.no_latency,
        latency_seconds=args.latency_seconds,
        time_limit_s=args.time_limit,
    )
    scenarios = scaling_scenarios(base, args.scaling_prefill) if args.scaling else [base]
    results: dict[str, list[dict[str, Any]]] = {s.name: [] for s in scenarios}
    with tempfile.TemporaryDirectory(prefix="eventagg-bench-") as tmp:
        try:
            for run in range(args.runs):
                base_rate: int | None = None
                base_ceiling: int | None = None
                for number, scenario in enumerate(scenarios):
                    token = f"{os.getpid():x}{run}{number}"
                    result = run_once(
                        scenario, Path(tmp) / f"run{run}-{number}", args.cache_dir, target, overrides, token
                    )
                    if base_rate is None:
                        base_rate = result["events_per_s"]
                        base_ceiling = result.get("ceiling_rows_per_s")
                    else:
                        result["vs_base"] = round(result["events_per_s"] / base_rate, 3)
                        if base_ceiling:
                            result["vs_ceiling"] = round(result["events_per_s"] / base_ceiling, 3)
                    results[scenario.name].append(result)
                    # Progress goes to stderr in both output modes; stdout holds only the report.
                    print(
                        f"run {run + 1}/{args.runs} {scenario.name}: {result['events_per_s']:,} events/s"
                        + (f", ratio {result['ratio']}" if "ratio" in result else "")
                        + (f", vs base {result['vs_base']}" if "vs_base" in result else ""),
                        file=sys.stderr,
                        flush=True,
                    )
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
    report = {
        "machine": machine(),
        "workload": {
            "events": args.events,
            "duplicates": args.duplicates,
            "topics": args.topics,
            "ids": args.ids,
            "topic_order": args.topic_order,
            "batch": args.batch,
            "processes": args.processes,
            "mode": args.mode,
            "client": client,
        },
        "overrides": overrides,
        "runs": args.runs,
        "median": {name: medians(runs) for name, runs in results.items()},
        "all": results,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0 if all(r.get("correct", True) for runs in results.values() for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
