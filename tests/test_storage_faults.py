"""Storage faults on real daemons: damaged databases stop the start, a full disk never gets an ack.

The write fault is a real full filesystem: a 4 MiB tmpfs mounted under the test's folder (root
only), filled with a filler file after the daemon has opened its database there. Removing the
filler is the repair. Where mounting is not possible the test is skipped with the reason.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from harness import Daemon, eventually, push_frames, run_script

from transport.workload import make_event

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def test_database_and_folder_are_owner_only(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(storage={"path": "state/events.db"}).start()
    assert daemon.db_path.parent.stat().st_mode & 0o777 == 0o700
    assert daemon.db_path.stat().st_mode & 0o777 == 0o600
    assert daemon.terminate() == 0


def test_a_database_restored_readable_by_others_is_kept_so_and_said(daemon_factory: Callable[..., Daemon]) -> None:
    first = daemon_factory("first").start()
    assert first.terminate() == 0
    second = daemon_factory("second")
    shutil.copyfile(first.db_path, second.db_path)  # a restore from a backup, with the umask's 0644
    second.db_path.chmod(0o644)
    second.start()
    assert second.db_path.stat().st_mode & 0o777 == 0o644
    assert f"database {second.db_path} is mode 0644: other users may read its events" in second.log()
    assert second.terminate() == 0
    assert "is mode" not in first.log()


def test_not_a_database_stops_the_start(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory()
    daemon.db_path.write_bytes(b"this is not an SQLite database\n" * 200)
    daemon.start(wait=False)
    assert daemon.proc is not None and daemon.proc.wait(30) == 2  # restarting cannot help: no systemd loop
    assert f"cannot start: cannot open database {daemon.db_path}: file is not a database" in daemon.log()


def test_a_database_path_that_cannot_be_made_stops_the_start_with_the_reason(
    daemon_factory: Callable[..., Daemon],
) -> None:
    # Its folder would be inside a regular file. (Tests run as root, so a folder without write
    # permission would not stop them.)
    daemon = daemon_factory(storage={"path": "a-file/events.db"})
    (daemon.workdir / "a-file").write_text("not a folder\n")
    daemon.start(wait=False)
    # Exit 2, as for a refused config: under systemd, restarting it could never help (it was 1).
    assert daemon.proc is not None and daemon.proc.wait(30) == 2
    log = daemon.log()
    assert f"cannot start: cannot create database {daemon.workdir / 'a-file' / 'events.db'}" in log
    assert "[storage] path" in log and "Traceback" not in log
    folder = daemon_factory("folder", storage={"path": "."})  # a folder where the file goes
    folder.start(wait=False)
    assert folder.proc is not None and folder.proc.wait(30) == 2
    assert "[storage] path must name a file" in folder.log() and "Traceback" not in folder.log()


def test_a_second_daemon_on_the_same_database_is_refused_and_the_first_goes_on(
    daemon_factory: Callable[..., Daemon],
) -> None:
    # Two writers would number the same topics independently: the first one's commits then
    # fail on UNIQUE (topic, seq) for ever. The second must not start at all.
    first = daemon_factory("first").start()
    assert first.proc is not None
    second = daemon_factory("second", storage={"path": str(first.db_path)})
    second.start(wait=False)
    assert second.proc is not None and second.proc.wait(30) == 1
    assert (
        f"cannot start: database {first.db_path} is in use by another eventagg (pid {first.proc.pid})" in second.log()
    )
    push_frames(first.ingest, [msgpack.packb([make_event(i, 3, "one") for i in range(300)])])
    first.wait_stats(unique_processed=300)
    assert first.terminate() == 0
    # Once the first has stopped (or died: the lock goes with the process), the database is free.
    second.start()
    push_frames(second.ingest, [msgpack.packb([make_event(i, 3, "two") for i in range(200)])])
    second.wait_stats(unique_processed=500)


def test_failed_quick_check_stops_the_start(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory()
    conn = sqlite3.connect(daemon.db_path)
    conn.execute("CREATE TABLE filler (a INTEGER PRIMARY KEY, b TEXT)")
    conn.executemany("INSERT INTO filler VALUES (?, ?)", [(i, f"value-{i:06d}" * 3) for i in range(20_000)])
    conn.commit()
    conn.close()
    data = bytearray(daemon.db_path.read_bytes())
    # Scramble the cells of a b-tree page in the middle, leaving its header: the file still
    # opens, and only the integrity check can tell.
    offset = (len(data) // 4096 // 2) * 4096 + 2000
    data[offset : offset + 1000] = random.Random(7).randbytes(1000)
    daemon.db_path.write_bytes(bytes(data))
    daemon.start(wait=False)
    assert daemon.proc is not None and daemon.proc.wait(30) == 2
    log = daemon.log()
    assert f"cannot start: database {daemon.db_path} failed PRAGMA quick_check" in log
    assert "restore it from a backup or move it away to start empty" in log


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted after the test."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tiny tmpfs for the disk-full fault")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN?): {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=30)


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem is full."""
    chunk = b"\0" * 65536
    with path.open("wb", buffering=0) as handle:
        try:
            while True:
                handle.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        try:  # the last few bytes
            while True:
                handle.write(b"\0" * 512)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


class AckedPublisher:
    """A bare DEALER that sends one acknowledged batch and waits (bounded) for its reply."""

    def __init__(self, endpoint: str) -> None:
        self._context: zmq.Context[Any] = zmq.Context()
        self._sock = self._context.socket(zmq.DEALER)
        self._sock.connect(endpoint)

    def send(self, batch_id: int, events: list[dict[str, Any]]) -> None:
        self._sock.send(msgpack.packb({"batch": batch_id, "events": events}))

    def reply(self, timeout_s: float) -> dict[str, Any] | None:
        if not self._sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return None
        reply: dict[str, Any] = msgpack.unpackb(self._sock.recv(), raw=False)
        return reply

    def close(self) -> None:
        self._sock.close(linger=0)
        self._context.term()


def test_full_disk_gives_no_ack_and_recovers(daemon_factory: Callable[..., Daemon], tiny_disk: Path) -> None:
    daemon = daemon_factory(storage={"path": str(tiny_disk / "events.db")}).start()
    publisher = AckedPublisher(daemon.ack)
    try:
        publisher.send(1, [make_event(i, 3, "warm-") for i in range(10)])
        assert publisher.reply(10.0) == {"batch": 1, "new": 10, "duplicate": 0, "rejected": []}

        filler = tiny_disk / "filler"
        fill(filler)
        events = [make_event(i, 3, "full-", payload_bytes=1000) for i in range(300)]  # ~300 KB
        publisher.send(2, events)
        assert publisher.reply(3.0) is None, "a batch was acknowledged although the disk is full"
        log = daemon.log()
        # The 300 events may reach the dedup actor as several writes (one per ordering actor).
        failures = re.findall(r"\d+ events failed \(database or disk is full\)", log)
        assert failures and "acknowledged; retrying in" in log, log
        # Queries are still answered, and health says what is wrong.
        stats = daemon.stats()
        # A write that fitted in pages SQLite already had may have committed before the disk
        # refused the rest; the batch is acknowledged only once all of it has.
        committed = stats["unique_processed"] - 10
        assert 0 <= committed < 300 and stats["in_flight"] == 300 - committed, stats
        assert "database or disk is full" in stats["storage_error"], stats
        health = daemon.request({"op": "health"})
        assert "the last commit failed: database or disk is full" in health.get("error", ""), health
        assert len(failures) >= 2, "the commit was not retried"
        # The commands say it too: before, stats showed only in_flight stuck.
        said = run_script("stats.py", "--endpoint", daemon.query, timeout=30)
        assert said.returncode == 0 and "stats: the daemon reports a problem: " in said.stderr, said.stderr
        assert "the last commit failed: database or disk is full" in said.stderr
        checked = run_script("health.py", "--endpoint", daemon.query, timeout=30)
        assert checked.returncode == 1 and "PROBLEM: " in checked.stdout, checked
        assert "the last commit failed: database or disk is full" in checked.stdout

        filler.unlink()
        reply = publisher.reply(15.0)  # backoff is capped at 5 s
        assert reply == {"batch": 2, "new": 300, "duplicate": 0, "rejected": []}, reply
        assert "commit succeeded again after a failure" in daemon.log()
        stats = daemon.wait_stats(unique_processed=310, in_flight=0)
        assert "storage_error" not in stats, stats
        assert "error" not in daemon.request({"op": "health"})
        checked = run_script("health.py", "--endpoint", daemon.query, timeout=30)
        assert checked.returncode == 0 and f"eventagg at {daemon.query}: ok" in checked.stdout, checked
        assert "problem" not in run_script("stats.py", "--endpoint", daemon.query, timeout=30).stderr
        # A re-send after recovery is a duplicate: the retried commit stored each event once.
        publisher.send(3, events[:50])
        assert publisher.reply(10.0) == {"batch": 3, "new": 0, "duplicate": 50, "rejected": []}
    finally:
        publisher.close()
    assert daemon.terminate() == 0


def test_sigterm_with_the_disk_full_and_events_waiting_stops_without_a_traceback(
    daemon_factory: Callable[..., Daemon], tiny_disk: Path
) -> None:
    # The drain waits for credit that failing commits never give back; when the daemon stopped
    # waiting, the ingest thread logged its sockets' ended context as a failure.
    daemon = daemon_factory(storage={"path": str(tiny_disk / "events.db")}, ingest={"max_in_flight": 500}).start()
    fill(tiny_disk / "filler")
    frames = [msgpack.packb([make_event(i * 100 + j, 50, "flood-") for j in range(100)]) for i in range(30)]
    push_frames(daemon.ingest, frames)
    eventually(lambda: "failed (database or disk is full)" in daemon.log(), 30, "a commit failing")
    started = time.monotonic()
    assert daemon.terminate(90) == 1  # what was received and not committed is lost: said by the status
    log = daemon.log()
    assert "Traceback" not in log and "ingest loop failed" not in log, log[-3000:]
    assert "ingest did not finish reading what was queued within 3 s (commits are failing: " in log
    assert "drain incomplete" in log
    # The stop line says what was lost: "received 0 ... (drain incomplete)" did not.
    lost = re.search(r"ERROR +actors.daemon: stopped: .* \(drain incomplete: ([\d,]+) events received were not", log)
    assert lost is not None and int(lost[1].replace(",", "")) > 0, log[-1500:]
    assert "what stayed queued in its sockets was not read either" in log
    # The drain retries every 0.5 s: its own failures said "retrying in 0.4 / 0.8 / 3.2 s", the back-off's.
    stopping = log[log.index("stopping: no new events are read") :]
    assert "retrying when the stop's drain tries again" in stopping, stopping[-2000:]
    assert time.monotonic() - started < 10  # 15 s for credit that failing commits never give, then 10 more


@pytest.mark.parametrize("max_in_flight", [20_000, 500])  # 500: ingest also waits for credit
def test_sigterm_with_the_disk_full_commits_everything_if_space_comes_back_within_3_s(
    daemon_factory: Callable[..., Daemon], tiny_disk: Path, max_in_flight: int
) -> None:
    # The writer's own back-off (5 s after the first failure) is for a running daemon: a stop
    # once tried one commit at once and exited 1 with nothing stored, or never retried while it
    # waited and exited 0 with the events still queued in the socket lost.
    daemon = daemon_factory(
        storage={"path": str(tiny_disk / "events.db")}, ingest={"max_in_flight": max_in_flight}
    ).start()
    filler = tiny_disk / "filler"
    fill(filler)
    frames = [msgpack.packb([make_event(i * 100 + j, 50, "back-") for j in range(100)]) for i in range(10)]
    push_frames(daemon.ingest, frames)
    eventually(lambda: "failed (database or disk is full)" in daemon.log(), 30, "a commit failing")
    eventually(lambda: daemon.stats()["in_flight"] >= min(1_000, max_in_flight), 30, "events waiting for a commit")
    freeing = threading.Timer(0.5, filler.unlink)
    freeing.start()
    try:
        status = daemon.terminate(90)
    finally:
        freeing.join()
    with sqlite3.connect(tiny_disk / "events.db") as conn:
        stored = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    assert (status, stored) == (0, 1_000), (status, stored, daemon.log()[-3000:])


def test_retention_failing_on_a_full_disk_is_said_by_health_stats_and_the_status_line(
    daemon_factory: Callable[..., Daemon], tiny_disk: Path
) -> None:
    """With nothing being published, retention's sweeps are the only writes: each failed on the
    full disk and was only logged, while health said ok and stats showed nothing wrong."""
    database = tiny_disk / "events.db"
    daemon = daemon_factory(
        storage={"path": str(database)}, retention={"max_age": "3s", "sweep_interval": "1s"}
    ).start()
    # A snapshot from before the batch keeps its pages in the WAL: were they checkpointed, the WAL
    # would be reused from its start, and the sweeps would write into room it already holds.
    snapshot = sqlite3.connect(database, timeout=10, isolation_level=None)
    try:
        snapshot.execute("BEGIN")
        snapshot.execute("SELECT count(*) FROM events").fetchone()
        publisher = AckedPublisher(daemon.ack)
        try:
            publisher.send(1, [make_event(i, 3, "old-", payload_bytes=1000) for i in range(1000)])
            assert publisher.reply(10.0) == {"batch": 1, "new": 1000, "duplicate": 0, "rejected": []}
        finally:
            publisher.close()
        filler = tiny_disk / "filler"
        fill(filler)
        said = "retention's sweep failed: database or disk is full"
        health = eventually(
            lambda: reply if said in (reply := daemon.request({"op": "health"})).get("error", "") else None,
            20,
            "health saying retention fails",
        )
    finally:
        snapshot.close()
    assert "ok" not in health.get("status", ""), health
    stats = daemon.stats()
    assert "database or disk is full" in stats["retention_error"] and stats["expired"] == 0, stats
    said = run_script("stats.py", "--endpoint", daemon.query, timeout=30)
    assert "stats: the daemon reports a problem: retention's sweep failed" in said.stderr, said.stderr
    filler.unlink()
    stats = daemon.wait_stats(expired=1000, timeout=20)
    eventually(lambda: "error" not in daemon.request({"op": "health"}) or None, 10, "health ok once a sweep works")
    assert "retention_error" not in daemon.stats()
    assert daemon.terminate() == 0
