"""scripts/peers.py runs Redis and NATS JetStream on a tiny workload and reports what they kept.

Skipped where the servers are not installed (``.ci/run`` installs them from Debian). No timing
is asserted; what is checked is that each peer dropped exactly the re-sends and each figure is
there.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from harness import run_script

from transport.workload import distinct_count

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

MISSING = [name for name in ("redis-server", "nats-server") if shutil.which(name) is None]
MISSING += [name for name in ("redis", "nats") if importlib.util.find_spec(name) is None]


@pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)}")
def test_each_peer_keeps_every_distinct_event_once_and_reports_its_rate() -> None:
    result = run_script("peers.py", "--events", "3000", "--awaited-events", "500", "--topics", "7", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["median"]) == {"redis", "nats-pipelined", "nats-awaited"}
    for peer, [run] in report["runs"].items():
        events = 500 if peer == "nats-awaited" else 3000
        assert run["events"] == events, peer
        assert run["new"] == distinct_count(events, 0.2), (peer, run)
        assert run["duplicates"] == events - run["new"], (peer, run)
        assert run["correct"] is True and run["events_per_s"] > 0 and run["elapsed_s"] > 0, (peer, run)
        assert report["median"][peer]["events_per_s"] == run["events_per_s"]


@pytest.mark.skipif(importlib.util.find_spec("redis") is None, reason="not installed: redis")
def test_a_missing_server_is_a_clear_error(tmp_path: Path) -> None:
    result = run_script("peers.py", "--events", "100", "--peer", "redis", env={"PATH": str(tmp_path)})
    assert result.returncode == 2
    assert "redis-server is not installed; on Debian: apt-get install redis-server" in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("redis") is None, reason="not installed: redis")
def test_a_server_that_does_not_start_is_a_clear_error_with_what_it_said(tmp_path: Path) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL: cannot open the AOF file' >&2\nexit 1\n")
    fake.chmod(0o755)
    result = run_script("peers.py", "--events", "100", "--peer", "redis", env={"PATH": str(tmp_path)})
    assert result.returncode == 2
    assert "redis-server did not start on port" in result.stderr
    assert "FATAL: cannot open the AOF file" in result.stderr
