"""The daemon end to end: real processes, real sockets, real SQLite files."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from harness import (
    SCRIPTS,
    Daemon,
    default_sigint,
    eventually,
    free_port,
    publish,
    push_frames,
    run_script,
    stored_rows,
    unprivileged,
    write_config,
)

from actors.bind_check import bind_problem
from transport.affinity import rendezvous_order
from transport.client import QueryClient
from transport.config import load_config
from transport.workload import plan, topic_name

pytestmark = pytest.mark.e2e  # every test here starts processes

EVENT = {
    "topic": "orders",
    "event_id": "o-1",
    "timestamp": "2025-10-22T10:00:00Z",
    "source": "shop",
    "payload": {"n": 1},
}


def test_same_key_is_stored_once_and_same_id_in_two_topics_twice(daemon: Daemon) -> None:
    other_topic = {**EVENT, "topic": "refunds"}
    push_frames(daemon.ingest, [msgpack.packb(EVENT), msgpack.packb([EVENT, other_topic]), msgpack.packb(EVENT)])
    stats = daemon.wait_stats(received=4, unique_processed=2, duplicate_dropped=2)
    assert stats["topic_count"] == 2
    assert sorted(stored_rows(daemon.db_path)) == [("orders", "o-1", 1), ("refunds", "o-1", 1)]


def test_unknown_fields_are_accepted_and_not_stored(daemon: Daemon) -> None:
    push_frames(daemon.ingest, [msgpack.packb({**EVENT, "priority": "high", "seq": 99})])
    daemon.wait_stats(unique_processed=1, rejected=0)
    (stored,) = daemon.events("orders")
    assert stored == {
        "topic": "orders",
        "event_id": "o-1",
        "timestamp": "2025-10-22T10:00:00Z",
        "source": "shop",
        "payload": {"n": 1},
        "seq": 1,
        "late": False,
    }


def start_publishers(daemon: Daemon, total: int, *, prefix: str = "e") -> list[subprocess.Popen[str]]:
    """Three publisher processes share one stream: one sends single-event frames, two send batches."""
    common = [
        "--endpoint",
        daemon.ingest,
        "--events",
        str(total),
        "--duplicates",
        "0.2",
        "--topics",
        "10",
        "--seed",
        "7",
        "--id-prefix",
        prefix,
    ]
    return [
        subprocess.Popen(
            [sys.executable, str(SCRIPTS / "publish.py"), *common, "--slice", f"{i}/3", "--batch", batch],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, batch in enumerate(("1", "100", "37"))
    ]


def wait_all(procs: list[subprocess.Popen[str]], timeout: float = 120) -> None:
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"publisher failed: {out}\n{err}"


def test_three_publishers_with_duplicates_then_restart_and_resend(daemon: Daemon) -> None:
    wait_all(start_publishers(daemon, 5000))
    stats = daemon.wait_stats(received=5000, unique_processed=4000, duplicate_dropped=1000)
    assert stats["rejected"] == 0 and stats["topic_count"] == 10

    # The events query returns exactly the 4 000 distinct events, seqs 1..n per topic, payloads intact.
    expected = {e["event_id"]: e for e in plan(5000, 0.2, topics=10, seed=7, id_prefix="e")}
    stored = daemon.events()
    assert len(stored) == 4000 and {e["event_id"] for e in stored} == set(expected)
    per_topic: dict[str, list[int]] = defaultdict(list)
    for event in stored:
        original = expected[event["event_id"]]
        assert {k: event[k] for k in original} == original
        per_topic[event["topic"]].append(event["seq"])
    for topic, seqs in per_topic.items():
        assert sorted(seqs) == list(range(1, len(seqs) + 1)), topic
        assert [e["seq"] for e in daemon.events(topic, page=333)] == list(range(1, len(seqs) + 1))

    # Restart: counters survive; resending everything adds only duplicates.
    assert daemon.terminate() == 0
    daemon.start()
    before = daemon.stats()
    assert {k: before[k] for k in ("received", "unique_processed", "duplicate_dropped", "topic_count")} == {
        "received": 5000,
        "unique_processed": 4000,
        "duplicate_dropped": 1000,
        "topic_count": 10,
    }
    wait_all(start_publishers(daemon, 5000))
    daemon.wait_stats(received=10000, unique_processed=4000, duplicate_dropped=6000)
    assert len(stored_rows(daemon.db_path)) == 4000


def test_kill_9_mid_stream_leaves_a_consistent_database(daemon: Daemon) -> None:
    publisher = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPTS / "publish.py"),
            "--endpoint",
            daemon.ingest,
            "--events",
            "200000",
            "--duplicates",
            "0.2",
            "--batch",
            "100",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        eventually(lambda: daemon.stats()["unique_processed"] >= 5000, 60, "5000 events committed before the kill")
        daemon.kill()
    finally:
        publisher.kill()
        publisher.wait(10)
    daemon.start()
    stats = daemon.wait_idle()
    rows = stored_rows(daemon.db_path)
    assert stats["unique_processed"] == len(rows) > 0
    assert stats["received"] == stats["unique_processed"] + stats["duplicate_dropped"]
    assert len({(t, e) for t, e, _ in rows}) == len(rows)
    per_topic = Counter(t for t, _, _ in rows)
    for topic, count in per_topic.items():
        assert sorted(s for t, _, s in rows if t == topic) == list(range(1, count + 1))


def malformed_frames() -> tuple[list[Any], int]:
    """A few thousand bad messages of every kind, and how many refusals they must add up to."""
    import random

    rng = random.Random(3)
    frames: list[Any] = []
    expected = 0
    for _ in range(1000):  # 0xc1 is never valid msgpack
        frames.append(b"\xc1" + rng.randbytes(rng.randrange(0, 64)))
        expected += 1
    for _ in range(300):  # truncated msgpack
        frames.append(msgpack.packb([EVENT, EVENT])[: rng.randrange(1, 40)])
        expected += 1
    for value in ([], 0, -5, "text", None, True, 2.5, b"bin", msgpack.ExtType(5, b"x")):
        frames.extend([msgpack.packb(value)] * 50)
        expected += 50
    bad_events = [
        {k: v for k, v in EVENT.items() if k != "topic"},
        {**EVENT, "topic": "white space"},
        {**EVENT, "topic": "x" * 256},
        {**EVENT, "event_id": ""},
        {**EVENT, "event_id": 12},
        {**EVENT, "timestamp": "2025-10-22T10:00:00"},
        {**EVENT, "timestamp": "not a time"},
        {**EVENT, "source": ["list"]},
        {**EVENT, "payload": [1, 2]},
        [[EVENT]],
        "event",
    ]
    for bad in bad_events:  # each alone, and all of them in one batch
        frames.extend([msgpack.packb(bad)] * 40)
        expected += 40
    frames.extend([msgpack.packb(bad_events)] * 100)
    expected += 100 * len(bad_events)
    frames.extend([[msgpack.packb(EVENT), msgpack.packb(EVENT)]] * 50)  # two-part messages
    expected += 50
    frames.extend([msgpack.packb(EVENT) + b"\x00"] * 50)  # trailing bytes
    expected += 50
    return frames, expected


def test_malformed_input_is_rejected_counted_and_harmless(daemon: Daemon) -> None:
    frames, expected = malformed_frames()
    assert len(frames) > 2000
    push_frames(daemon.ingest, frames)
    stats = daemon.wait_stats(rejected=expected)
    assert stats["received"] == 0 and stats["unique_processed"] == 0
    assert stored_rows(daemon.db_path) == []
    assert "error" not in daemon.request({"op": "health"})
    push_frames(daemon.ingest, [msgpack.packb(EVENT)])
    daemon.wait_stats(unique_processed=1, rejected=expected)
    assert "rejected" in daemon.log()  # explained in the log (rate-limited)
    assert daemon.log().count("rejected ") < 100


def test_a_log_line_for_several_refused_events_gives_each_reason(daemon: Daemon) -> None:
    # One batch, three events refused for three different reasons: the warning counts 3 and must
    # not give the first event's reason as if it were all three's.
    batch = [{**EVENT, "event_id": 12}, {**EVENT, "timestamp": "not a time"}, {**EVENT, "payload": [1, 2]}, EVENT]
    push_frames(daemon.ingest, [msgpack.packb(batch)])
    daemon.wait_stats(rejected=3, unique_processed=1)
    line = next(line for line in daemon.log().splitlines() if "rejected 3" in line)
    assert "1 at index 0: " in line and "event_id" in line
    assert "1 at index 1: " in line and "not a time" in line
    assert "1 at index 2: " in line and "payload" in line


def test_the_stop_line_says_what_this_run_did_beside_the_databases_totals(
    daemon_factory: Callable[..., Daemon],
) -> None:
    # "stopped: received 5" from a run that received 3 read as this run's figures: they are the totals.
    daemon = daemon_factory().start()
    push_frames(daemon.ingest, [msgpack.packb([{**EVENT, "event_id": str(i)} for i in range(5)])])
    daemon.wait_stats(unique_processed=5)
    assert daemon.terminate() == 0
    daemon.start()
    again = [{**EVENT, "event_id": "0"}, {**EVENT, "event_id": "1"}, {**EVENT, "event_id": "new"}, {"x": 1}]
    push_frames(daemon.ingest, [msgpack.packb(again)])
    daemon.wait_stats(unique_processed=6, rejected=1)
    assert daemon.terminate() == 0
    line = [line for line in daemon.log().splitlines() if "stopped: " in line][-1]  # the second run's
    assert "stopped: received 8, unique 6, duplicates 2, rejected 1 in all;" in line, line
    assert "this run received 3, unique 1, duplicates 2, rejected 1" in line, line


def test_a_burst_of_refusals_nothing_follows_is_counted_in_the_log(daemon: Daemon) -> None:
    # Ten warnings are logged in 10 s, the rest counted; the count came only with a later
    # warning, so a burst that nothing followed left its refusals out of the log for ever.
    push_frames(daemon.ingest, [b"\xc1"] * 15)
    daemon.wait_stats(rejected=15)
    assert daemon.log().count("rejected 1: frame is not valid msgpack") == 10
    eventually(lambda: "5 similar warnings suppressed between" in daemon.log(), 20, "the count of the held back")


def test_query_protocol_errors_and_paging(daemon: Daemon) -> None:
    events = [{**EVENT, "topic": f"t{i % 2}", "event_id": str(i)} for i in range(25)]
    push_frames(daemon.ingest, [msgpack.packb(events)])
    daemon.wait_stats(unique_processed=25)
    import zmq

    context = zmq.Context()
    try:
        for bad in (
            b"\xc1",
            msgpack.packb({"op": "nope"}),
            msgpack.packb({"op": "events", "after": "x"}),
            msgpack.packb([1]),
            msgpack.packb({"op": "events", "limit": -1}),
            msgpack.packb({"op": "events", "topic": ""}),  # no event can have it: refused, not an empty page
            msgpack.packb({"op": "stats", "topic": "t0"}),  # a field stats does not take: refused, not ignored
            msgpack.packb({"op": "stats", msgpack.Timestamp(1, 0): 1}),  # their hashes can be made to collide
        ):
            sock = context.socket(zmq.REQ)
            sock.connect(daemon.query)
            sock.send(bad)
            assert sock.poll(10_000), "no reply to a bad request"
            reply = msgpack.unpackb(sock.recv())
            assert isinstance(reply.get("error"), str) and reply["error"]
            sock.close(linger=0)
    finally:
        context.term()
    # Paging one topic: next strictly increases, an empty page ends it, never null.
    seen, after, cursors = [], 0, []
    while True:
        page = daemon.request({"op": "events", "topic": "t0", "after": after, "limit": 5})
        assert isinstance(page["next"], int)
        if not page["events"]:
            assert page["events"] == []
            break
        cursors.append(page["next"])
        seen.extend(e["seq"] for e in page["events"])
        after = page["next"]
    assert seen == list(range(1, 14)) and cursors == sorted(set(cursors))
    # All topics in commit order, paged: each event once, each topic's seqs ascending.
    listed, after, cursors = [], 0, []
    while page := daemon.request({"op": "events", "after": after, "limit": 7})["events"]:
        listed.extend(page)
        after = daemon.request({"op": "events", "after": after, "limit": 7})["next"]
        cursors.append(after)
    assert sorted(int(e["event_id"]) for e in listed) == list(range(25))
    assert cursors == sorted(set(cursors))
    for topic in ("t0", "t1"):
        seqs = [e["seq"] for e in listed if e["topic"] == topic]
        assert seqs == sorted(seqs)
    assert daemon.request({"op": "events", "topic": "absent"}) == {"events": [], "next": 0, "first": 1}
    topics = {t["topic"]: t for t in daemon.request({"op": "topics"})["topics"]}
    assert topics["t0"]["count"] == 13 and topics["t1"]["last_seq"] == 12
    health = daemon.request({"op": "health"})
    assert "error" not in health and all(health["actors"].values())


def test_limit_is_capped(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(query={"max_limit": 10}).start()
    push_frames(daemon.ingest, [msgpack.packb([{**EVENT, "event_id": str(i)} for i in range(30)])])
    daemon.wait_stats(unique_processed=30)
    assert len(daemon.request({"op": "events", "topic": "orders", "limit": 1000})["events"]) == 10


def topic_pages(daemon: Daemon, limit: int) -> list[list[str]]:
    """The names on each page of the topics listing, paged with ``next`` to the empty page."""
    pages, after = [], ""
    while True:
        reply = daemon.request({"op": "topics", "after": after, "limit": limit})
        pages.append([t["topic"] for t in reply["topics"]])
        if not reply["topics"]:
            assert reply["next"] == after
            return pages
        assert reply["next"] == reply["topics"][-1]["topic"]
        after = reply["next"]


def test_the_topics_listing_pages_by_name(daemon_factory: Callable[..., Daemon]) -> None:
    """100 000 topics were one reply of 9 MB, held whole by the daemon; pages keep it small."""
    check_topic_pages(daemon_factory(query={"max_limit": 4}).start())


def check_topic_pages(daemon: Daemon) -> None:
    """Ten topics, listed whole and in pages (``[query] max_limit`` is 4), by raw queries and the command."""
    names = [f"t{n:02}" for n in range(10)]
    push_frames(daemon.ingest, [msgpack.packb([{**EVENT, "topic": name} for name in reversed(names)])])
    daemon.wait_stats(unique_processed=10)
    whole = daemon.request({"op": "topics"})["topics"]  # no page asked: every topic, as before
    assert [t["topic"] for t in whole] == names
    assert topic_pages(daemon, limit=100) == [names[0:4], names[4:8], names[8:], []]  # capped at max_limit
    assert topic_pages(daemon, limit=3) == [names[0:3], names[3:6], names[6:9], names[9:], []]
    page = daemon.request({"op": "topics", "after": "t04", "limit": 2})
    assert page == {"topics": whole[5:7], "next": "t06"}
    assert daemon.request({"op": "topics", "after": "t0"})["topics"] == whole[:4]  # a prefix is a cursor too
    refused = daemon.request({"op": "topics", "after": 4})
    assert "'after' must be a topic name" in refused["error"], refused
    # The command reads every page (of 4 here) and prints them as one listing.
    listed = run_script("topics.py", "--endpoint", daemon.query, "--json", timeout=30)
    assert json.loads(listed.stdout) == {"topics": whole}, listed.stderr
    one = run_script("topics.py", "--endpoint", daemon.query, "--json", "--after", "t07", "--limit", "5")
    assert json.loads(one.stdout) == {"topics": whole[8:], "next": "t09"}, one.stderr
    table = run_script("topics.py", "--endpoint", daemon.query)
    assert table.stdout.splitlines()[0].endswith(": 10 topics"), table
    # A page asked for, capped at max_limit, says it is one and where the next starts ("4 topics" read as all).
    paged = run_script("topics.py", "--endpoint", daemon.query, "--limit", "100")
    assert paged.stdout.splitlines()[0].endswith(": 4 topics (one page; the next: --after t03)"), paged


def test_stats_script_against_a_live_daemon_and_against_nothing(daemon: Daemon) -> None:
    push_frames(daemon.ingest, [msgpack.packb(EVENT)])
    daemon.wait_stats(unique_processed=1)
    table = run_script("stats.py", "--endpoint", daemon.query)
    assert table.returncode == 0 and "unique_processed" in table.stdout and "duplicate_dropped" in table.stdout
    as_json = run_script("stats.py", "--config", str(daemon.config_path), "--json")
    assert as_json.returncode == 0
    document = json.loads(as_json.stdout)  # exactly one JSON document and nothing else
    assert document["unique_processed"] == 1 and document["received"] == 1

    started = time.monotonic()
    nobody = run_script("stats.py", "--endpoint", "tcp://127.0.0.1:1", "--timeout", "1", timeout=30)
    assert nobody.returncode != 0 and "no answer" in nobody.stderr and nobody.stdout == ""
    assert "accepted no connection within 1 s: is the daemon running" in nobody.stderr
    assert time.monotonic() - started < 15
    # A timeout that is not above 0 would let the client wait for ever: refused before asking.
    for value in ("0", "-1", "nan", "inf"):
        refused = run_script("stats.py", "--endpoint", daemon.query, "--timeout", value, timeout=30)
        assert refused.returncode == 2 and "argument --timeout" in refused.stderr
    with pytest.raises(ValueError, match="above 0"):
        QueryClient(daemon.query, timeout=-1)


def test_events_script_pages_through_a_topic(daemon: Daemon) -> None:
    push_frames(daemon.ingest, [msgpack.packb([{**EVENT, "event_id": str(i)} for i in range(2500)])])
    daemon.wait_stats(unique_processed=2500)
    result = run_script("events.py", "orders", "--endpoint", daemon.query, "--page", "1000")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0 and [e["seq"] for e in lines] == list(range(1, 2501))
    limited = run_script("events.py", "orders", "--endpoint", daemon.query, "--after", "10", "--limit", "3")
    assert [json.loads(line)["seq"] for line in limited.stdout.splitlines()] == [11, 12, 13]
    for follow in ([], ["--follow"]):
        nothing = run_script("events.py", "orders", "--endpoint", daemon.query, "--limit", "0", *follow)
        assert (nothing.returncode, nothing.stdout, nothing.stderr) == (0, "", "")
    # Printing nothing still asks the daemon, as `head -n 0 FILE` still opens FILE: with --follow,
    # the subscription (a cursor past the head is refused there, not by a page query).
    past = run_script("events.py", "--endpoint", daemon.query, "--follow", "--after", "999999", "--limit", "0")
    assert past.returncode == 1 and "after 999999 is past the last commit position" in past.stderr, past
    nobody = run_script("events.py", "orders", "--endpoint", "tcp://127.0.0.1:9", "--timeout", "0.3", "--limit", "0")
    assert nobody.returncode == 1 and "tcp://127.0.0.1:9" in nobody.stderr and nobody.stdout == ""
    for flag, value in (("--page", "0"), ("--limit", "-1"), ("--after", "x")):
        refused = run_script("events.py", "orders", "--endpoint", daemon.query, flag, value)
        assert refused.returncode == 2 and f"argument {flag}:" in refused.stderr and refused.stdout == ""


def test_query_scripts_end_quietly_when_the_reader_goes_away(daemon: Daemon) -> None:
    # As in `stats.py | head -1` once head has exited: the pipe is closed before the script writes.
    push_frames(daemon.ingest, [msgpack.packb(EVENT)])
    daemon.wait_stats(unique_processed=1)
    for script, *args in (("stats.py",), ("stats.py", "--json"), ("events.py", "orders")):
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPTS / script), *args, "--endpoint", daemon.query],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        proc.stdout.close()
        _, stderr = proc.communicate(timeout=60)
        assert (script, proc.returncode, stderr) == (script, 0, "")


def test_bad_config_fails_at_start_naming_the_key(tmp_path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[ordering]\nactorz = 3\n")
    result = run_script("aggregatord.py", "--config", str(config), timeout=30)
    assert result.returncode == 2 and "[ordering] actorz" in result.stderr


def test_values_zeromq_or_the_publishers_cannot_take_are_refused_at_start(tmp_path) -> None:
    # Taken, a heartbeat over a C int stopped the daemon at start with a traceback and exit 1
    # (restarted in a loop by systemd), and a payload limit over 2 GiB left `publish --config`
    # failing with "process 0: ValueError" while the daemon ran.
    binds = {
        "ingest": {"bind": f"tcp://127.0.0.1:{free_port()}", "ack_bind": f"tcp://127.0.0.1:{free_port()}"},
        "query": {"bind": f"tcp://127.0.0.1:{free_port()}"},
        "storage": {"path": str(tmp_path / "events.db")},
    }
    cases = {
        "[subscribe] heartbeat_ms": {"subscribe": {"heartbeat_ms": 2**31, "timeout_ms": 2**31 + 1}},
        "[subscribe] timeout_ms": {"subscribe": {"timeout_ms": 2**31}},
        "[ingest] max_payload_bytes": {"ingest": {**binds["ingest"], "max_payload_bytes": 2**31}},
    }
    for key, sections in cases.items():
        subscribe = {"bind": f"tcp://127.0.0.1:{free_port()}", **sections.get("subscribe", {})}
        config = write_config(tmp_path / "big.toml", {**binds, **sections, "subscribe": subscribe})
        result = run_script("aggregatord.py", "--config", str(config), timeout=30)
        assert result.returncode == 2 and f"{key} must be at most 2147483647" in result.stderr, (key, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        published = run_script("publish.py", "--config", str(config), "--events", "1", "--deadline", "2", timeout=30)
        assert published.returncode == 2 and f"publish: {key} must be at most" in published.stderr, published.stderr


@contextlib.contextmanager
def daemon_on(config: Path, cwd: Path | None = None) -> Iterator[subprocess.Popen[str]]:
    """The daemon run on ``config`` (from ``cwd``) for the block, then stopped with SIGINT: it must exit 0."""
    daemon = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "aggregatord.py"), "--config", str(config)],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield daemon
    finally:
        daemon.send_signal(signal.SIGINT)
        _, err = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, err


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_clients_given_the_config_connect_to_binds_that_name_an_interface(tmp_path) -> None:
    # A bind may name an interface (tcp://lo:PORT); the clients read it from the config and tried
    # to connect to a host named "lo": "accepted no connection ... is the daemon running?".
    ports = {name: free_port() for name in ("bind", "ack_bind", "query", "subscribe")}
    config = write_config(
        tmp_path / "lo.toml",
        {
            "ingest": {"bind": f"tcp://lo:{ports['bind']}", "ack_bind": f"tcp://lo:{ports['ack_bind']}"},
            "query": {"bind": f"tcp://lo:{ports['query']}"},
            "subscribe": {"bind": f"tcp://lo:{ports['subscribe']}"},
            "storage": {"path": str(tmp_path / "events.db")},
        },
    )
    with daemon_on(config):
        published = run_script(
            "publish.py", "--config", str(config), "--acked", "--events", "5", "--deadline", "20", timeout=60
        )
        assert published.returncode == 0, published.stderr
        stats = run_script("stats.py", "--config", str(config), "--json", "--timeout", "10", timeout=60)
        assert stats.returncode == 0 and json.loads(stats.stdout)["unique_processed"] == 5, stats.stderr


@pytest.mark.timeout(120)
def test_a_relative_ipc_bind_is_relative_to_the_config_file_for_daemon_and_clients(tmp_path) -> None:
    # The daemon bound it in its own working folder, and `stats --config` (run from another)
    # looked for it in its own: "accepted no connection: is the daemon running?".
    folder, elsewhere = tmp_path / "conf", tmp_path / "run"
    folder.mkdir()
    elsewhere.mkdir()
    config = write_config(
        folder / "c.toml",
        {
            "ingest": {"bind": "ipc://in.sock", "ack_bind": "ipc://ack.sock"},
            "query": {"bind": "ipc://q.sock"},
            "subscribe": {"bind": "ipc://sub.sock"},
            "storage": {"path": "events.db"},
        },
    )
    with daemon_on(config, cwd=elsewhere) as daemon:
        eventually(lambda: (folder / "sub.sock").exists() or daemon.poll() is not None, 30, "the daemon bound")
        assert daemon.poll() is None and not list(elsewhere.iterdir()), list(elsewhere.iterdir())
        stats = run_script("stats.py", "--config", str(config), "--json", "--timeout", "10", timeout=60)
        assert stats.returncode == 0 and json.loads(stats.stdout)["received"] == 0, stats.stderr


def test_an_empty_storage_path_is_refused_at_start_naming_the_key(tmp_path) -> None:
    config = tmp_path / "empty-path.toml"
    config.write_text('[storage]\npath = ""\n')
    result = run_script("aggregatord.py", "--config", str(config), timeout=30)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr == (
        'aggregatord: [storage] path is empty; name the SQLite database file, e.g. path = "data/events.db"'
        " (the default)\n"
    )
    # A postgresql daemon never uses [storage] path, so "" stays fine there.
    postgres = tmp_path / "postgres.toml"
    postgres.write_text('[storage]\nbackend = "postgresql"\ndsn = "postgresql://db/eventagg"\npath = ""\n')
    assert load_config(postgres).storage.path == ""


def test_port_in_use_fails_with_a_clear_message(daemon: Daemon, daemon_factory: Callable[..., Daemon]) -> None:
    second = daemon_factory("second", ingest={"bind": daemon.ingest})
    second.start(wait=False)
    assert second.proc is not None and second.proc.wait(30) == 1
    # exit 1, not 2: a port another process holds may be free again when systemd retries
    assert f"cannot bind [ingest] bind: Address already in use ({daemon.ingest})" in second.log()
    assert not second.db_path.exists()  # refused before the database was created


def test_the_bind_check_finds_a_taken_port_by_any_name_and_a_missing_ipc_folder(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for endpoint in (f"tcp://127.0.0.1:{port}", f"tcp://localhost:{port}", f"tcp://*:{port}"):
            problem = bind_problem(endpoint)
            assert problem is not None and problem.errno == errno.EADDRINUSE, endpoint
    assert bind_problem(f"tcp://127.0.0.1:{port}") is None  # free again once closed
    assert bind_problem(f"ipc://{tmp_path}/daemon.sock") is None
    missing = bind_problem(f"ipc://{tmp_path}/no-such-folder/daemon.sock")
    assert missing is not None and missing.errno == errno.ENOENT


def test_an_endpoint_the_config_names_wrongly_is_refused_as_a_config_is(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    # Exit 2 (not restarted by systemd): starting again cannot create a folder or an address.
    lost = daemon_factory("lost", subscribe={"bind": f"ipc://{tmp_path}/no-such-folder/subscribe"})
    lost.start(wait=False)
    elsewhere = "tcp://192.0.2.1:5555"  # TEST-NET-1: documentation only, never this machine's
    foreign = daemon_factory("foreign", ingest={"ack_bind": elsewhere}, security={"allow_insecure": True})
    foreign.start(wait=False)
    assert lost.proc is not None and lost.proc.wait(30) == 2
    assert (
        f"cannot bind [subscribe] bind: No such file or directory for ipc path '{tmp_path}/no-such-folder/"
        in lost.log()
    )
    assert "create the ipc:// path's folder" in lost.log() and not lost.db_path.exists()
    assert foreign.proc is not None and foreign.proc.wait(30) == 2
    assert f"cannot bind [ingest] ack_bind: Cannot assign requested address ({elsewhere})" in foreign.log()
    assert "the host must be an address of this machine" in foreign.log() and not foreign.db_path.exists()


def test_an_ipc_path_holding_a_file_and_binds_alike_once_resolved_are_refused_before_the_database(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    """libzmq deletes whatever is at an ipc path before binding there; and two binds written
    differently may still be one address (localhost and 127.0.0.1, a path through ..)."""
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    port = free_port()
    cases = {
        "file": (
            {"subscribe": {"bind": f"ipc://{precious}"}},
            "is a file that is not a socket (binding would delete it)",
        ),
        "alias": (
            {"ingest": {"bind": f"tcp://127.0.0.1:{port}"}, "subscribe": {"bind": f"tcp://localhost:{port}"}},
            "would take the same address",
        ),
        "path": (
            {"query": {"bind": f"ipc://{tmp_path}/q.sock"}, "subscribe": {"bind": f"ipc://{tmp_path}/x/../q.sock"}},
            "would take the same address",
        ),
        "long": ({"subscribe": {"bind": f"ipc://{tmp_path}/{'s' * 120}.sock"}}, "choose a shorter path"),
    }
    (tmp_path / "x").mkdir()
    for name, (overrides, said) in cases.items():
        daemon = daemon_factory(name, **overrides)
        daemon.start(wait=False)
        assert daemon.proc is not None and daemon.proc.wait(30) == 2, (name, daemon.log())
        assert said in daemon.log() and "Traceback" not in daemon.log(), (name, daemon.log())
        assert not daemon.db_path.exists(), name
    assert precious.read_text() == "keep me"


def _an_interface_with_its_ipv4_address() -> tuple[str, str] | None:
    """A non-loopback interface of this machine and its IPv4 address (SIOCGIFADDR), if any."""
    for _index, name in socket.if_nameindex():
        if name == "lo":
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                answer = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
        return name, socket.inet_ntoa(answer[20:24])
    return None


def test_binds_naming_an_interface_and_one_of_its_addresses_are_refused_before_the_database(
    daemon_factory: Callable[..., Daemon],
) -> None:
    # libzmq binds an interface name to the interface's address: the second bind would fail with
    # "Address already in use" (exit 1) after the database was made.
    port = free_port()
    cases: dict[str, dict[str, Any]] = {
        "lo-address": {"ingest": {"bind": f"tcp://lo:{port}", "ack_bind": f"tcp://127.0.0.1:{port}"}},
        "lo-name": {"ingest": {"bind": f"tcp://lo:{port}"}, "subscribe": {"bind": f"tcp://localhost:{port}"}},
    }
    interface = _an_interface_with_its_ipv4_address()
    if interface is not None:
        name, address = interface
        cases["interface"] = {
            "ingest": {"bind": f"tcp://{name}:{port}", "ack_bind": f"tcp://{address}:{port}"},
            "security": {"allow_insecure": True},
        }
    for case, overrides in cases.items():
        daemon = daemon_factory(case, **overrides)
        daemon.start(wait=False)
        assert daemon.proc is not None and daemon.proc.wait(30) == 2, (case, daemon.log())
        assert "would take the same address; give each its own port" in daemon.log(), (case, daemon.log())
        assert not daemon.db_path.exists(), case


def test_an_ipc_folder_the_daemon_may_not_write_is_refused_before_the_database() -> None:
    # Root writes everywhere, so as root the daemon runs as nobody, in a folder it may enter.
    as_user, me = unprivileged()
    if as_user and shutil.which("setpriv") is None:
        pytest.skip("as root, this needs setpriv to run the daemon as another user")
    home = Path(tempfile.mkdtemp(prefix="eventagg-ipc-"))
    closed, data = home / "closed", home / "data"
    try:
        home.chmod(0o755)
        closed.mkdir()
        data.mkdir()
        if as_user:
            os.chown(data, me, me)  # the database could be made: only the bind is refused
        else:
            closed.chmod(0o500)
        tcp = [f"tcp://127.0.0.1:{free_port()}" for _ in range(3)]
        sections = {
            "ingest": {"bind": tcp[0], "ack_bind": tcp[1]},
            "query": {"bind": tcp[2]},
            "subscribe": {"bind": f"ipc://{closed}/subscribe"},
            "storage": {"path": str(data / "events.db")},
        }
        config = write_config(home / "config.toml", sections)
        command = [*as_user, sys.executable, str(SCRIPTS / "aggregatord.py"), "--config", str(config)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=10, cwd=home)
        assert result.returncode == 2, result.stderr
        assert (
            f"cannot bind [subscribe] bind: Permission denied for ipc path '{closed}/subscribe'; this user may not"
            " bind there" in result.stderr
        )
        assert not (data / "events.db").exists()
    finally:
        closed.chmod(0o700)
        shutil.rmtree(home)


def test_a_daemon_bound_to_ipv6_loopback_takes_and_answers(daemon_factory: Callable[..., Daemon]) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("this machine has no IPv6 loopback")
    ports = {name: free_port() for name in ("ingest", "ack", "query", "subscribe")}
    v6 = {name: f"tcp://[::1]:{port}" for name, port in ports.items()}
    d = daemon_factory(
        "v6",
        ingest={"bind": v6["ingest"], "ack_bind": v6["ack"]},
        query={"bind": v6["query"]},
        subscribe={"bind": v6["subscribe"]},
    )
    d.ingest, d.ack, d.query, d.subscribe = v6["ingest"], v6["ack"], v6["query"], v6["subscribe"]
    d.start()
    publish(d.ingest, "--events", "200", "--topics", "2")
    d.wait_stats(received=200, unique_processed=200)
    acked = publish(d.ack, "--acked", "--events", "50", "--json", "--id-prefix", "a")
    assert json.loads(acked.stdout.strip().splitlines()[-1])["acked_new"] == 50
    stats = run_script("stats.py", "--endpoint", v6["query"], "--json", timeout=30)
    assert stats.returncode == 0 and json.loads(stats.stdout)["unique_processed"] == 250
    followed = run_script("events.py", "--config", str(d.config_path), "--follow", "--limit", "3", timeout=30)
    assert followed.returncode == 0 and len(followed.stdout.splitlines()) == 3, followed.stderr


def test_stats_at_another_of_the_daemons_ports_names_that_cause_too(daemon: Daemon) -> None:
    result = run_script("stats.py", "--endpoint", daemon.ingest, "--timeout", "1", timeout=30)
    assert result.returncode == 1 and "or this is another of the daemon's ports" in result.stderr, result.stderr


def test_output_to_a_full_disk_ends_in_a_line_not_a_traceback(daemon: Daemon) -> None:
    publish(daemon.ingest, "--events", "10")
    daemon.wait_stats(unique_processed=10)
    for script in ("stats.py", "health.py", "events.py"):
        with open("/dev/full", "w") as full:
            result = subprocess.run(
                [sys.executable, str(SCRIPTS / script), "--endpoint", daemon.query],
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                timeout=30,
            )
        assert result.returncode == 1 and "Traceback" not in result.stderr, (script, result.stderr)
        assert "cannot write the output: No space left on device" in result.stderr, (script, result.stderr)


def test_publish_script_reports_what_it_sent(daemon: Daemon) -> None:
    result = publish(daemon.ingest, "--events", "300", "--duplicates", "0.1", "--json")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["sent"] == 300
    daemon.wait_stats(received=300, unique_processed=270, duplicate_dropped=30)
    for flag, value in (("--events", "-5"), ("--topics", "0"), ("--duplicates", "1.5"), ("--batch", "0")):
        refused = run_script("publish.py", "--endpoint", daemon.ingest, flag, value, timeout=30)
        assert refused.returncode == 2 and flag in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.timeout(120)
def test_publish_to_several_daemons_one_down_exits_0_once_every_event_is_acknowledged(daemon: Daemon) -> None:
    # The events of the topics whose daemon is down go to the next one: `sent` once counted them
    # twice, and the command compared it with the events planned, exiting 1 without a word
    # though every event was acknowledged ("unacked": 0, "errors": []).
    down = f"tcp://127.0.0.1:{free_port()}"
    endpoints = [daemon.ack, down]
    assert any(rendezvous_order(topic_name(n, 10), endpoints)[0] == down for n in range(10)), (
        "no topic goes to the daemon that is down first: the test tests nothing"
    )
    args = ("--acked", "--events", "200", "--topics", "10", "--ack-timeout", "1", "--deadline", "10", "--json")
    result = run_script("publish.py", "--endpoint", daemon.ack, "--endpoint", down, *args, timeout=100)
    summary = json.loads(result.stdout)
    assert (summary["acked_new"], summary["unacked"], summary["errors"]) == (200, 0, []), summary
    assert summary["sent"] == 200, summary  # what the daemon that is down never got is counted where it went
    assert result.returncode == 0, (summary, result.stderr)
    assert daemon.stats()["unique_processed"] == 200


def test_publish_waits_for_a_daemon_that_cut_off_one_handshake_as_it_stopped(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """A daemon killed with a connection in its listen backlog resets it mid-handshake: publish
    gave up at once, blaming CURVE keys or the port, instead of waiting for its --deadline."""
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    endpoint = f"tcp://127.0.0.1:{port}"
    command = [sys.executable, str(SCRIPTS / "publish.py"), "--endpoint", endpoint, "--events", "10"]
    command += ["--deadline", "30"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        listener.settimeout(20)
        connection, _ = listener.accept()
        connection.close()  # the one handshake cut off; then nothing listens until the daemon is up
        listener.close()
        time.sleep(0.5)
        daemon = daemon_factory(ingest={"bind": endpoint}).start()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        listener.close()
    assert proc.returncode == 0 and "handshake failed" not in err, err
    daemon.wait_stats(unique_processed=10)


def test_publish_script_to_an_endpoint_with_no_daemon_says_so_and_fails() -> None:
    # Fire-and-forget: ZeroMQ would queue the frames for a daemon that is not there, and the
    # script reported them all sent (exit 0). It checks for a handshake first.
    nowhere = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    publishing = {
        mode: subprocess.Popen(
            [
                sys.executable,
                str(SCRIPTS / "publish.py"),
                "--endpoint",
                nowhere,
                *mode,
                "--events",
                "10",
                "--deadline",
                "2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode in ((), ("--acked",))
    }
    for mode, proc in publishing.items():
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 1, (mode, out, err)
        assert f"publish: waiting up to 2 s (--deadline) for {nowhere}" in err
        assert f"publish: {nowhere} accepted no connection within 2 s: is the daemon running" in err
        assert "sent" not in out and time.monotonic() - started < 20
    # Ctrl-C while it waits (or while stats waits for an answer) ends it quietly, with 130.
    waiting = {
        script: subprocess.Popen(
            [sys.executable, str(SCRIPTS / script), "--endpoint", nowhere, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_sigint,
        )
        for script, args in (("publish.py", ("--deadline", "30")), ("stats.py", ("--timeout", "30")))
    }
    time.sleep(1.5)
    for script, proc in waiting.items():
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and "Traceback" not in err, (script, out, err)
    # SIGTERM too, before the sending began (it killed the command silently there).
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "publish.py"), "--endpoint", nowhere, "--deadline", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and "Traceback" not in err, (out, err)


@pytest.mark.parametrize(
    ("to", "signum", "pace"),
    [
        ("the process group", signal.SIGINT, ["--rate", "2000"]),
        ("the command alone", signal.SIGINT, ["--rate", "2000"]),
        # Unpaced, the first process sends thousands of events while the command still forks the
        # second: a KeyboardInterrupt there was a traceback, and one landing inside the publisher
        # between sending a batch (or taking its ack) and counting it made the summary disagree
        # with the daemon. Ctrl-C now only sets a flag the sending loops check.
        ("the command alone", signal.SIGINT, []),
        # `timeout`, a service manager, a closing terminal: the command died by the signal with
        # no summary, and its workers sent on until their next check, 1 000 events later.
        ("the command alone", signal.SIGTERM, ["--rate", "2000"]),
        ("the command alone", signal.SIGHUP, ["--rate", "2000"]),
    ],
    ids=[
        "the process group",
        "the command alone",
        "the command alone, unpaced, as its processes start",
        "SIGTERM",
        "SIGHUP",
    ],
)
def test_ctrl_c_stops_every_publisher_process_and_still_prints_the_summary(
    daemon: Daemon, to: str, signum: signal.Signals, pace: list[str]
) -> None:
    # Before: a traceback from each process, no summary, and with SIGINT to the command alone
    # (kill -INT PID) its worker processes went on sending.
    events = 400_000
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "publish.py"), "--endpoint", daemon.ack, "--acked", "--json"]
        + ["--events", str(events), "--processes", "2", *pace],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
        start_new_session=True,
    )
    eventually(lambda: daemon.stats()["unique_processed"] >= 500, 30, "the publishers are sending")
    if to == "the process group":
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum and "Traceback" not in err, (out, err)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["interrupted"] is True and 0 < summary["sent"] < events, summary
    # What was sent was acknowledged before the processes ended, and none of them sends on.
    assert summary["acked_new"] == summary["sent"] and summary["unacked"] == events - summary["sent"], summary
    stored = daemon.wait_stats(unique_processed=summary["sent"], in_flight=0)
    time.sleep(1.0)
    assert daemon.stats()["received"] == stored["received"]


def test_publish_workers_stop_when_the_command_is_killed(daemon: Daemon) -> None:
    """A worker looked for its command every 1 000 events: at --rate 5 one killed with SIGKILL
    left its workers sending for minutes (at --rate 0.01, for a day)."""
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "publish.py"), "--endpoint", daemon.ack, "--acked"]
        + ["--events", "2000", "--processes", "2", "--rate", "20"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    eventually(lambda: daemon.stats()["unique_processed"] >= 10, 30, "the publishers are sending")
    proc.kill()
    proc.wait(10)
    time.sleep(1.0)  # the workers' last batches
    received = daemon.stats()["received"]
    time.sleep(2.0)
    assert daemon.stats()["received"] == received, "a worker went on sending after its command was killed"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the workers, should the test fail


def test_publish_output_that_cannot_be_written_leaves_what_was_sent_and_no_traceback(daemon: Daemon) -> None:
    """A closed pipe (`| head -0`) or a full disk raised BrokenPipeError or OSError from the summary's
    print: a traceback and exit 1 after every event had been sent."""
    command = [sys.executable, str(SCRIPTS / "publish.py"), "--endpoint", daemon.ack, "--acked", "--events", "10"]
    pipeline = f"set -o pipefail; {shlex.join(command)} | head -c 0"  # the status is publish's
    reader_gone = subprocess.run(["bash", "-c", pipeline], capture_output=True, text=True, timeout=60)
    assert reader_gone.returncode == 0 and "Traceback" not in reader_gone.stderr, reader_gone
    with open("/dev/full", "w") as full:
        no_room = subprocess.run([*command, "--json"], stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
    assert no_room.returncode == 1 and "Traceback" not in no_room.stderr, no_room.stderr
    assert "cannot write the output: No space left on device" in no_room.stderr
    daemon.wait_stats(unique_processed=10)


def test_publish_refuses_a_rate_it_cannot_pace() -> None:
    for rate in ("1e-300", "nan", "inf", "-1", "1e10"):
        result = run_script("publish.py", "--rate", rate, "--events", "1", timeout=30)
        assert result.returncode == 2 and "--rate" in result.stderr and "Traceback" not in result.stderr, rate


def test_threads_carry_their_names_for_the_kernel(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(ordering={"actors": 4}).start()  # Pykka numbers the actors in the order they start
    assert daemon.proc is not None
    tasks = Path(f"/proc/{daemon.proc.pid}/task")
    names = Counter((task / "comm").read_text().strip() for task in tasks.iterdir())
    for name in ("DedupActor-0", "RouterActor-5", "StatsActor-6", "ingest", "query", "ticker", "checkpointer"):
        assert names[name] == 1, (name, names)
    assert sum(count for name, count in names.items() if name.startswith("OrderingActor-")) == 4, names
    # The main thread's name is the process's, which ps, pgrep and systemd show: left alone.
    assert Path(f"/proc/{daemon.proc.pid}/comm").read_text().strip().startswith("python"), names


def test_a_page_of_every_topic_gives_each_event_its_commit_position(daemon: Daemon) -> None:
    publish(daemon.ack, "--acked", "--events", "30", "--topics", "3")
    page = daemon.request({"op": "events", "after": 10, "limit": 5})
    assert [event["position"] for event in page["events"]] == [11, 12, 13, 14, 15]
    assert page["next"] == 15
    one_topic = daemon.request({"op": "events", "topic": "topic-1", "after": 0, "limit": 5})
    assert all("position" not in event for event in one_topic["events"])
    result = run_script("events.py", "--after", "10", "--limit", "2", "--endpoint", daemon.query, timeout=60)
    assert [json.loads(line)["position"] for line in result.stdout.splitlines()] == [11, 12]


def test_a_sighup_with_a_config_file_gone_bad_is_logged_and_sigterm_still_stops_the_daemon(
    daemon_factory: Callable[..., Daemon],
) -> None:
    # A Latin-1 comment made reload() raise past its ConfigError handler: the main loop died, and
    # with it the handling of SIGTERM, SIGINT and later SIGHUPs (only SIGKILL stopped the daemon).
    daemon = daemon_factory().start()
    assert daemon.proc is not None
    with daemon.config_path.open("ab") as config:
        config.write(b"# r\xe9sum\xe9\n")
    daemon.proc.send_signal(signal.SIGHUP)
    eventually(lambda: "SIGHUP: config not reloaded" in daemon.log() or None, 10, "the reload refused")
    assert "is not UTF-8 text" in daemon.log() and "Traceback" not in daemon.log()
    assert daemon.terminate(timeout=20) == 0


def test_stats_prints_the_counters_when_only_health_is_slow(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory().start(env={**os.environ, "EVENTAGG_TEST_HOOKS": "1"})
    push_frames(daemon.ingest, [msgpack.packb(EVENT)])
    daemon.wait_stats(unique_processed=1)
    # A frozen writer: health pings it and waits; the counters are the stats actor's own.
    assert "error" not in daemon.request({"op": "debug_freeze", "actor": "dedup", "seconds": 6})
    result = run_script("stats.py", "--endpoint", daemon.query, "--timeout", "1.5", "--json", timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["unique_processed"] == 1
    assert "its health did not answer within 1.5 s" in result.stderr


@pytest.mark.timeout(120)
def test_an_actor_that_does_not_stop_ends_the_stop_in_bounded_time_with_status_1(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory().start(env={**os.environ, "EVENTAGG_TEST_HOOKS": "1"})
    push_frames(daemon.ingest, [msgpack.packb(EVENT)])
    daemon.wait_stats(unique_processed=1)
    # The reader stands for an actor stuck in a call that does not return (a storage server
    # that stopped answering): it is not on the drain's path, so only the actors' stop waits.
    assert "error" not in daemon.request({"op": "debug_freeze", "actor": "reader", "seconds": 100})
    started = time.monotonic()
    status = daemon.terminate(90)
    took = time.monotonic() - started
    log = daemon.log()
    assert status == 1, log[-2000:]
    assert took < 30, f"the stop took {took:.0f} s"  # 15 s for the actors, then out (it took 100 s)
    assert "actor(s) reader did not stop within 15 s; exiting without them" in log
    assert "Traceback" not in log
