"""``eventagg migrate --from-sqlite`` (docs/postgresql.md, "Moving from SQLite"): a stopped SQLite
daemon's database copied into an empty PostgreSQL one, and a PostgreSQL daemon going on from it
exactly where the SQLite daemon stopped. Real daemons, a real SQLite file, a real PostgreSQL.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon

from actors.postgres import NODE_COUNTERS
from transport.publisher import Publisher
from transport.subscriber import Subscriber

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def event(topic: str, n: int, **fields: Any) -> dict[str, Any]:
    return {
        "topic": topic,
        "event_id": f"{topic}-{n}",
        "timestamp": f"2025-10-22T10:00:{n:02d}Z",
        "source": "import-test",
        "payload": {"n": n, "raw": bytes([n, 0, 255]), 7: [1.5, None]},  # stored as sent, bytes and int keys too
        **fields,
    }


def run_migrate(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "actors.cli", "migrate", "--config", str(config), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_a_sqlite_database_copied_into_postgresql_goes_on_with_every_key_seq_position_and_counter(
    daemon_factory: Callable[..., Daemon], database: str, tmp_path: Path
) -> None:
    old = daemon_factory(
        "sqlite", retention={"sweep_interval": "1s", "max_events_per_topic": 3}, ordering={"window_ms": 0}
    ).start()
    with Publisher(old.ack, deadline=60.0) as publisher:
        publisher.publish_many([event("a", n) for n in range(1, 6)] + [event("b", n) for n in (1, 3)])
        publisher.publish_many([event("a", 1), event("b", 2), event("b", 9, payload={"other": 1})])  # b-2 is late
    old.wait_stats(timeout=60, stored=6, expired=3, late=1)  # a-1, a-2 and b-1 deleted
    with Subscriber(old.subscribe, name="reader", after=0) as reader:  # acknowledges two events at close
        taken = [reader.next_event(10) for _ in range(2)]
    assert all(taken)
    config = tmp_path / "pg.toml"
    config.write_text(f'[storage]\nbackend = "postgresql"\ndsn = "{database}"\nnode = "moved"\n')
    running = run_migrate(config, "--from-sqlite", str(old.db_path))
    assert running.returncode == 2 and "stop that daemon first" in running.stderr, running
    before, listed, topics = old.stats(), old.events(), old.request({"op": "topics"})["topics"]
    assert len(listed) == 6 and len(topics) == 2
    assert old.terminate() == 0

    copied = run_migrate(config, "--from-sqlite", str(old.db_path))
    assert copied.returncode == 0, copied.stderr
    assert "6 events of 2 topics" in copied.stdout and "3 deleted keys, 1 consumers" in copied.stdout, copied.stdout
    again = run_migrate(config, "--from-sqlite", str(old.db_path))
    assert again.returncode == 2 and "is not empty (6 events" in again.stderr, again

    new = daemon_factory("postgresql", storage={"backend": "postgresql", "dsn": database, "node": "moved"}).start()
    after = new.stats()
    assert {name: after[name] for name in NODE_COUNTERS} == {name: before[name] for name in NODE_COUNTERS}
    assert new.events() == listed  # seqs, positions, late flags, timestamps and payloads as stored
    assert new.request({"op": "topics"})["topics"] == topics  # each topic's counters and retention figures
    with Subscriber(new.subscribe, name="reader") as reader:  # resumes after what it acknowledged
        assert reader.next_event(10) == listed[2]
    with Publisher(new.ack, deadline=60.0) as publisher:
        # A stored key, a key retention deleted, and a new event: only the last is stored.
        publisher.publish_many([event("a", 5), event("a", 1), event("a", 6)])
    new.wait_stats(timeout=60, duplicate_dropped=before["duplicate_dropped"] + 2, stored=7)
    last = new.events()[-1]
    assert (last["event_id"], last["seq"], last["position"]) == ("a-6", 6, listed[-1]["position"] + 1)


def test_a_copy_is_refused_with_a_sqlite_config_or_no_sqlite_file(tmp_path: Path) -> None:
    sqlite_config = tmp_path / "sqlite.toml"
    sqlite_config.write_text(f'[storage]\npath = "{tmp_path / "events.db"}"\n')
    refused = run_migrate(sqlite_config, "--from-sqlite", str(tmp_path / "events.db"))
    assert refused.returncode == 2 and "give the config of the PostgreSQL daemons" in refused.stderr, refused
    pg_config = tmp_path / "pg.toml"
    pg_config.write_text('[storage]\nbackend = "postgresql"\ndsn = "host=127.0.0.1 port=9 connect_timeout=1"\n')
    missing = run_migrate(pg_config, "--from-sqlite", str(tmp_path / "missing.db"))  # said before any server is asked
    assert missing.returncode == 2 and f"no SQLite database at {tmp_path / 'missing.db'}" in missing.stderr, missing


def test_arrival_times_ahead_of_the_servers_clock_are_clamped_so_retention_still_expires(
    daemon_factory: Callable[..., Daemon], database: str, tmp_path: Path
) -> None:
    # The SQLite daemon's host clock ran ten years ahead: its arrival times (and so its kept keys'
    # commit times) lie in the future of the PostgreSQL server's clock, which the daemons now sweep
    # against. Copied as they are, the first such event would stop every max_age sweep of the
    # cluster (expiry goes in commit order and stops at the first event too young) for ten years.
    old = daemon_factory(
        "sqlite", retention={"sweep_interval": "1s", "max_events_per_topic": 2}, ordering={"window_ms": 0}
    ).start()
    with Publisher(old.ack, deadline=60.0) as publisher:
        publisher.publish_many([event("a", n) for n in range(1, 5)])
    old.wait_stats(timeout=60, stored=2, expired=2)
    assert old.terminate() == 0
    ahead = 10 * 365 * 86400
    with sqlite3.connect(old.db_path) as conn:
        conn.execute("UPDATE events SET received_at = received_at + ?", (ahead,))
        conn.execute("UPDATE deleted_keys SET committed_at = committed_at + ?", (ahead,))
    conn.close()
    config = tmp_path / "pg.toml"
    config.write_text(f'[storage]\nbackend = "postgresql"\ndsn = "{database}"\nnode = "moved"\n')
    copied = run_migrate(config, "--from-sqlite", str(old.db_path))
    assert copied.returncode == 0, copied.stderr
    assert "2 events" in copied.stdout and "2 deleted keys" in copied.stdout, copied.stdout
    assert "2 arrival times and 2 deleted keys' commit times were ahead of the PostgreSQL server's clock" in (
        copied.stdout
    ), copied.stdout

    import psycopg

    with psycopg.connect(database) as pg:
        row = pg.execute(
            "SELECT (SELECT max(received_at) FROM events), (SELECT max(committed_at) FROM deleted_keys),"
            " extract(epoch FROM clock_timestamp())::float8"
        ).fetchone()
    assert row is not None and row[0] <= row[2] + 1 and row[1] <= row[2] + 1, row
    new = daemon_factory(
        "postgresql",
        storage={"backend": "postgresql", "dsn": database, "node": "moved"},
        retention={"sweep_interval": "1s", "max_age": "2s", "dedup_horizon": "2s"},
    ).start()
    with Publisher(new.ack, deadline=60.0) as publisher:
        publisher.publish_many([event("a", 9)])
    new.wait_stats(timeout=30, stored=0)  # the copied events and the new one behind them expire
    with psycopg.connect(database) as pg:
        deadline = time.monotonic() + 30
        while (kept := pg.execute("SELECT count(*) FROM deleted_keys").fetchone()) != (0,):
            assert time.monotonic() < deadline, kept  # the copied keys are forgotten past the horizon
            time.sleep(0.5)
