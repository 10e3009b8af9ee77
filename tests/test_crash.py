"""The crash test: acknowledged publishers keep going while the daemon is killed with SIGKILL.

Four publisher processes send 20 000 events (20 % re-sends) in acknowledged mode, paced so they
are still sending when the daemon is killed -9 three times and restarted each time on the same
config, ports and database. At-least-once in plus dedup must give exactly-once out: every event
acknowledged, every distinct event stored once, and counters that agree with the rows.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable

import pytest
from harness import SCRIPTS, Daemon, eventually

from transport.workload import distinct_count, plan

pytestmark = pytest.mark.e2e  # every test here starts processes

EVENTS = 20_000
DUPLICATES = 0.2
SEED = 11
PREFIX = "crash-"
KILL_AT = (0.15, 0.40, 0.65)  # fractions of the distinct events committed before each kill


def wait_for_progress(daemon: Daemon, unique: int, publishers: subprocess.Popen[str], timeout: float = 60) -> int:
    """Wait until the daemon has committed ``unique`` distinct events; returns the figure seen."""

    def committed() -> int:
        seen = int(daemon.stats()["unique_processed"])
        if seen >= unique:
            return seen
        assert publishers.poll() is None, f"publishers ended before {unique} events were committed"
        return 0

    return eventually(committed, timeout, f"the daemon commits {unique} events")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_acked_publishers_lose_nothing_and_store_nothing_twice_across_three_kill_9(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory("crash").start()
    distinct = distinct_count(EVENTS, DUPLICATES)
    publishers = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPTS / "publish.py"),
            "--endpoint",
            daemon.ack,
            "--acked",
            "--events",
            str(EVENTS),
            "--duplicates",
            str(DUPLICATES),
            "--topics",
            "10",
            "--processes",
            "4",
            "--batch",
            "50",
            "--window",
            "4",
            "--ack-timeout",
            "1",
            "--deadline",
            "90",
            "--rate",
            "2000",
            "--seed",
            str(SEED),
            "--id-prefix",
            PREFIX,
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for fraction in KILL_AT:
            wait_for_progress(daemon, int(distinct * fraction), publishers)
            assert publishers.poll() is None, "publishers finished before the kill: nothing was tested"
            daemon.kill()
            daemon.start()
        out, err = publishers.communicate(timeout=150)
    finally:
        if publishers.poll() is None:
            publishers.kill()
            publishers.communicate(timeout=10)
    assert publishers.returncode == 0, f"publishers failed:\n{out}\n{err}"

    # Every event was acknowledged: each as new or as a duplicate (a resend whose first copy had
    # committed before a kill comes back as a duplicate, so new acks can only be fewer).
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["sent"] == EVENTS and summary["unacked"] == 0 and summary["rejected"] == 0
    assert summary["acked_new"] + summary["acked_duplicate"] == EVENTS
    assert summary["acked_new"] <= distinct
    assert summary["retries"] >= 1

    stats = daemon.wait_idle()
    assert stats["unique_processed"] == distinct
    assert stats["received"] == stats["unique_processed"] + stats["duplicate_dropped"]
    assert stats["rejected"] == 0
    expected = {(event["topic"], event["event_id"]) for event in plan(EVENTS, DUPLICATES, 10, SEED, PREFIX)}
    assert len(expected) == distinct
    stored = [(event["topic"], event["event_id"]) for event in daemon.events()]
    assert len(stored) == distinct and set(stored) == expected

    # And straight from the SQLite file, with the daemon stopped.
    assert daemon.terminate() == 0
    with sqlite3.connect(f"file:{daemon.db_path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT topic, event_id FROM events").fetchall()
        twice = db.execute("SELECT topic, event_id FROM events GROUP BY topic, event_id HAVING COUNT(*) > 1").fetchall()
        seq_gaps = db.execute("SELECT topic, COUNT(*), MAX(seq) FROM events GROUP BY topic").fetchall()
    assert twice == []
    assert len(rows) == distinct and set(rows) == expected
    assert all(count == top for _, count, top in seq_gaps)  # seqs 1..n per topic, no gaps
