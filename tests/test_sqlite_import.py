"""``eventagg migrate --from-sqlite`` (docs/postgresql.md, "Moving from SQLite"): a stopped SQLite
daemon's database copied into an empty PostgreSQL one, and a PostgreSQL daemon going on from it
exactly where the SQLite daemon stopped. Real daemons, a real SQLite file, a real PostgreSQL.
"""

from __future__ import annotations

import subprocess
import sys
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
