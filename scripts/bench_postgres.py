#!/usr/bin/env python3
"""Benchmark: 1, 2, 3 … daemons sharing one PostgreSQL, beside PostgreSQL's own ceiling.

``bench_postgres.py --dsn DSN [--daemons 0,1,2,3] [--events N] [--duplicates F] [--topics K]
[--processes P] [--runs R] [--batch-rows B] [--json]``

``DSN`` names a PostgreSQL server and a role allowed to create databases; each run gets a fresh
database ``eventagg_bench`` (dropped and made again). One run starts D daemons
(``[storage] backend = "postgresql"``), then ``publish.py --acked`` with D ``--endpoint``\\ s
(topic-affine) and P processes sends N events (a fraction F re-sends, K topics). The rate is
N over publish.py's elapsed time: every event acknowledged, so committed. ``0`` daemons means
one daemon on SQLite, through the same publisher command, for comparison. Also measured:

* **daemon CPU per event**: user + system CPU of every daemon process and its decoder child
  over the run, divided by N (what would stay flat when daemons get CPUs of their own);
* **lock wait share**: of the samples (every 20 ms) of the daemons' writer sessions that were
  busy, the fraction waiting for a lock (``pg_stat_activity.wait_event_type = 'Lock'``);
* **ceiling**: the same distinct rows, inserted by one client into the daemons' own schema
  in transactions of ``--batch-rows`` rows, once with ``INSERT … SELECT FROM unnest(arrays)``
  (what the daemons do) and once with ``COPY``.

Medians of ``--runs``. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from actors.pg_session import connect
from actors.postgres import migrate
from transport.client import QueryClient
from transport.workload import plan

SCRIPTS = Path(__file__).resolve().parent
BENCH_DB = "eventagg_bench"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def fresh_database(admin_dsn: str) -> str:
    """Drop and create the bench database; its dsn."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {BENCH_DB}")
    return make_conninfo(admin_dsn, dbname=BENCH_DB)


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its live children."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(child) for child in (task / "children").read_text().split()]
    except OSError:
        pass
    for one in pids:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


class DaemonProcess:
    """One aggregatord on the bench database."""

    def __init__(self, workdir: Path, index: int, dsn: str | None) -> None:
        """``dsn`` None: the SQLite backend, on a file in ``workdir``."""
        self.ingest, self.ack, self.query = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
        config = workdir / f"daemon{index}.toml"
        storage = (
            f'backend = "postgresql"\ndsn = "{dsn}"\nnode = "bench{index}"\n'
            if dsn is not None
            else f'path = "{workdir}/events.db"\n'
        )
        config.write_text(
            f'[ingest]\nbind = "{self.ingest}"\nack_bind = "{self.ack}"\n[query]\nbind = "{self.query}"\n'
            f'[storage]\n{storage}[log]\nlevel = "WARNING"\n'
        )
        self.log = (workdir / f"daemon{index}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPTS / "aggregatord.py"), "--config", str(config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with QueryClient(self.query, timeout=1.0) as client:
                    if "error" not in client.request({"op": "health"}):
                        return
            except Exception:
                pass
            time.sleep(0.1)
        raise TimeoutError("daemon not ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def sample_lock_waits(dsn: str, stop: threading.Event, counts: list[int]) -> None:
    """Count busy writer sessions, and those waiting for a lock, every 20 ms until ``stop``."""
    conn = connect(dsn, "bench", "sampler")
    try:
        while not stop.wait(0.02):
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE state = 'active'),"
                " count(*) FILTER (WHERE state = 'active' AND wait_event_type = 'Lock')"
                " FROM pg_stat_activity WHERE application_name LIKE 'eventagg % writer'"
            ).fetchone()
            if row:
                counts[0] += int(row[0])
                counts[1] += int(row[1])
    finally:
        conn.close()


def run_daemons(args: argparse.Namespace, count: int) -> dict[str, Any]:
    """``count`` daemons on a fresh PostgreSQL database, or (``count`` 0) one on SQLite."""
    dsn = fresh_database(args.dsn)
    with tempfile.TemporaryDirectory(prefix="eventagg-bench-pg-") as folder:
        if count:
            daemons = [DaemonProcess(Path(folder), index, dsn) for index in range(count)]
        else:
            daemons = [DaemonProcess(Path(folder), 0, None)]
        try:
            for daemon in daemons:
                daemon.wait_ready()
            cpu_before = sum(process_cpu(d.proc.pid) for d in daemons)
            counts = [0, 0]
            stop = threading.Event()
            sampler = threading.Thread(target=sample_lock_waits, args=(dsn, stop, counts), daemon=True)
            sampler.start()
            command = [sys.executable, str(SCRIPTS / "publish.py"), "--acked", "--json"]
            for daemon in daemons:
                command += ["--endpoint", daemon.ack]
            command += [
                "--events",
                str(args.events),
                "--duplicates",
                str(args.duplicates),
                "--topics",
                str(args.topics),
                "--processes",
                str(args.processes),
            ]
            result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
            cpu = sum(process_cpu(d.proc.pid) for d in daemons) - cpu_before
            stop.set()
            sampler.join(5)
            if result.returncode != 0:
                raise RuntimeError(f"publish.py failed: {result.stdout}\n{result.stderr}")
            summary = json.loads(result.stdout.strip().splitlines()[-1])
        finally:
            for daemon in daemons:
                daemon.stop()
    return {
        "events_per_s": round(args.events / summary["elapsed_s"]),
        "cpu_us_per_event": round(cpu / args.events * 1e6, 1),
        "lock_wait_share": round(counts[1] / counts[0], 3) if counts[0] else 0.0,
    }


def run_ceiling(args: argparse.Namespace) -> dict[str, Any]:
    """One client, the daemons' schema, the same distinct rows in unnest batches."""
    dsn = fresh_database(args.dsn)
    conn = connect(dsn, "bench", "ceiling")
    try:
        migrate(conn, "bench")
        events = {(e["topic"], e["event_id"]): e for e in plan(args.events, args.duplicates, args.topics, 1, "c")}
        seqs: dict[str, int] = {}
        rows = []
        for position, ((topic, event_id), event) in enumerate(events.items(), start=1):
            seqs[topic] = seqs.get(topic, 0) + 1
            rows.append(
                (topic, event_id, seqs[topic], position, event["timestamp"], position, "bench", b"\x80", 0.0, False)
            )
        started = time.perf_counter()
        for start in range(0, len(rows), args.batch_rows):
            columns = [list(column) for column in zip(*rows[start : start + args.batch_rows])]
            with conn.transaction():
                conn.execute(
                    f"INSERT INTO events ({_COLUMNS}) SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[],"
                    " %s::bigint[], %s::text[], %s::bigint[], %s::text[], %s::bytea[], %s::float8[], %s::boolean[])",
                    columns,
                )
        unnest_s = time.perf_counter() - started
        conn.execute("TRUNCATE events")
        started = time.perf_counter()
        for start in range(0, len(rows), args.batch_rows):
            with conn.transaction(), conn.cursor().copy(f"COPY events ({_COLUMNS}) FROM STDIN") as copy:
                for row in rows[start : start + args.batch_rows]:
                    copy.write_row(row)
        copy_s = time.perf_counter() - started
    finally:
        conn.close()
    return {
        "rows": len(rows),
        "unnest_rows_per_s": round(len(rows) / unnest_s),
        "copy_rows_per_s": round(len(rows) / copy_s),
    }


_COLUMNS = "topic, event_id, seq, position, timestamp, ts_ns, source, payload, received_at, late"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark several daemons on one PostgreSQL.")
    parser.add_argument("--dsn", required=True, help="a server and role that may create databases")
    parser.add_argument(
        "--daemons", default="0,1,2,3", help="daemon counts to run; 0 is one daemon on SQLite (default 0,1,2,3)"
    )
    parser.add_argument("--events", type=int, default=50_000, help="events per run (default 50000)")
    parser.add_argument("--duplicates", type=float, default=0.2, help="fraction of re-sends (default 0.2)")
    parser.add_argument("--topics", type=int, default=10, help="topics (default 10)")
    parser.add_argument("--processes", type=int, default=2, help="publisher processes (default 2)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each, medians reported (default 3)")
    parser.add_argument("--batch-rows", type=int, default=5000, help="rows per ceiling transaction (default 5000)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"events": args.events, "runs": args.runs, "cpus": os.cpu_count()}
    for count in (int(part) for part in args.daemons.split(",")):
        results = [run_daemons(args, count) for _ in range(args.runs)]
        report[f"daemons_{count}" if count else "sqlite"] = {
            key: statistics.median(r[key] for r in results) for key in results[0]
        }
    ceilings = [run_ceiling(args) for _ in range(args.runs)]
    report["ceiling"] = {key: statistics.median(r[key] for r in ceilings) for key in ceilings[0]}
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:12} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
