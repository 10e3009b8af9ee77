"""scripts/bench.py runs end to end on a tiny workload and prints well-formed results.

No timing is asserted: the figures depend on the machine. What is checked is that each mode
runs to completion, stores exactly the distinct events, and reports every figure it promises.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest
from harness import ROOT, run_script

sys.path.insert(0, str(ROOT / "scripts"))
import bench

pytestmark = pytest.mark.timeout(120)

EVENTS = 3000
COMMON = (
    "events_per_s",
    "elapsed_s",
    "publishers_cpu_us_per_event",
    "stats_p50_ms",
    "stats_p99_ms",
    "commits",
    "rss_peak_mb",
    "latency_p50_ms",
    "latency_p99_ms",
    "latency_max_ms",
    "latency_rate",
)


def run_bench(*args: str) -> dict[str, Any]:
    result = run_script("bench.py", "--events", str(EVENTS), "--latency-seconds", "0.5", "--json", *args, timeout=100)
    assert result.returncode == 0, f"bench.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    report = json.loads(result.stdout)
    assert report["machine"]["cpus"] >= 1
    return report


def check_figures(row: dict[str, Any], keys: tuple[str, ...]) -> None:
    assert row["correct"] is True, row
    for key in keys:
        value = row[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value) and value >= 0, (key, value)
    assert row["events_per_s"] > 0


@pytest.mark.e2e
def test_fire_and_forget_with_ceiling() -> None:
    report = run_bench("--runs", "2")
    assert report["runs"] == 2 and report["workload"]["mode"] == "ff"
    ((name, row),) = report["median"].items()
    assert len(report["all"][name]) == 2
    check_figures(row, COMMON + ("ceiling_rows_per_s", "ceiling_pk_only_rows_per_s", "ratio"))
    assert row["latency_method"].startswith("stats poll")
    # The CPU split by thread kind adds up to the whole, give or take a clock tick per figure
    # (and threads that ended: none should).
    split = {key: value for key, value in row.items() if key.startswith("cpu_us_per_event_")}
    assert {
        "cpu_us_per_event_dedup",
        "cpu_us_per_event_ingest",
        "cpu_us_per_event_ordering",
        "cpu_us_per_event_decoder",
    } <= split.keys(), row
    # The decoder process's memory is counted: its own pages in rss_peak_mb, all of it in _upper.
    assert row["rss_peak_mb_main"] < row["rss_peak_mb"] < row["rss_peak_mb_upper"], row
    tick_us_per_event = 1e6 / os.sysconf("SC_CLK_TCK") / EVENTS
    assert sum(split.values()) == pytest.approx(
        row["daemon_cpu_us_per_event"], abs=(len(split) + 1) * tick_us_per_event
    ), row
    assert row["ratio"] == pytest.approx(row["events_per_s"] / row["ceiling_rows_per_s"], rel=0.5)


@pytest.mark.e2e
def test_acked_with_two_publishers() -> None:
    report = run_bench("--mode", "acked", "--processes", "2", "--no-ceiling", "--batch", "50")
    (row,) = report["median"].values()
    check_figures(row, COMMON + ("full_speed_ack_p50_ms", "full_speed_ack_p99_ms"))
    assert row["latency_method"] == "acknowledgement"
    assert "ratio" not in row
    assert report["workload"]["client"] == "library"
    assert row["publishers_cpu_us_per_event"] > 0  # library publishers validate and encode every event


@pytest.mark.e2e
def test_acked_with_the_raw_client() -> None:
    report = run_bench(
        "--mode",
        "acked",
        "--client",
        "raw",
        "--no-ceiling",
        "--window",
        "4",
        "--topics",
        "300",
        "--topic-order",
        "random",
    )
    (row,) = report["median"].values()
    check_figures(row, COMMON + ("full_speed_ack_p50_ms", "full_speed_ack_p99_ms"))
    assert report["workload"]["client"] == "raw"
    assert report["workload"]["topic_order"] == "random"


@pytest.mark.e2e
def test_text_output_names_every_figure() -> None:
    result = run_script("bench.py", "--events", "1000", "--no-latency", timeout=100)
    assert result.returncode == 0, result.stderr
    assert "events_per_s" in result.stdout and "ceiling_rows_per_s" in result.stdout


@pytest.mark.e2e
def test_bad_arguments_and_overrides_are_refused_before_any_daemon_starts() -> None:
    for args, reason in (
        (("--set", "nosuch.key=1"), "unknown section [nosuch]"),
        (("--set", "storage.cache_mb=abc"), "[storage] cache_mb must be an integer, not a string"),
        (("--duplicates", "2"), "--duplicates must be a fraction"),
        (("--topics", "0"), "must be 1 or more"),
    ):
        result = run_script("bench.py", *args, timeout=60)
        assert result.returncode == 2 and reason in result.stderr and "Traceback" not in result.stderr, args


def test_prefilled_database_agrees_with_its_counters(tmp_path: Path) -> None:
    path, build_s = bench.prefilled_db(tmp_path, 1000, 7)
    assert build_s > 0 and bench.prefilled_db(tmp_path, 1000, 7) == (path, 0.0)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 1000
        per_topic = dict(conn.execute("SELECT topic, count(*) FROM events GROUP BY topic"))
        for topic, last_seq, received in conn.execute("SELECT topic, last_seq, received FROM topics"):
            assert per_topic[topic] == last_seq == received
            seqs = [s for (s,) in conn.execute("SELECT seq FROM events WHERE topic = ? ORDER BY seq", (topic,))]
            assert seqs == list(range(1, last_seq + 1))
        counters = dict(conn.execute("SELECT name, value FROM counters"))
        assert counters["received"] == counters["unique_processed"] == 1000
    finally:
        conn.close()


@pytest.mark.e2e
def test_prefilled_run_continues_the_stored_topics(tmp_path: Path) -> None:
    result = run_script(
        "bench.py",
        "--events",
        "2000",
        "--prefill",
        "5000",
        "--no-latency",
        "--no-ceiling",
        "--cache-dir",
        str(tmp_path),
        "--json",
        timeout=100,
    )
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["median"].values()
    assert row["correct"] is True and row["prefill_build_s"] >= 0


def test_percentile_and_medians() -> None:
    assert bench.percentile([5, 1, 3, 2, 4], 50) == 3
    assert bench.percentile(list(range(1, 101)), 99) == 99
    assert math.isnan(bench.percentile([], 50))
    merged = bench.medians(
        [{"a": 1, "ok": True, "m": "x"}, {"a": 3, "ok": False, "m": "x"}, {"a": 2, "ok": True, "m": "x"}]
    )
    assert merged == {"a": 2, "ok": False, "m": "x"}


def test_overrides_parse_as_toml_values() -> None:
    assert bench.parse_overrides(
        [
            "storage.commit_max_events=10000",
            "storage.synchronous=FULL",
            "ingest.decode_process=false",
            'storage.path="a b.db"',
        ]
    ) == {
        "storage": {"commit_max_events": 10000, "synchronous": "FULL", "path": "a b.db"},
        "ingest": {"decode_process": False},
    }
    with pytest.raises(ValueError):
        bench.parse_overrides(["nonsense"])


@pytest.mark.parametrize("topics, window_ms", [(10, 0), (10, 50), (3000, 50)])
def test_the_ordering_cost_driver_writes_each_distinct_event_once(topics: int, window_ms: int) -> None:
    """scripts/ordering_cost.py drives the real ordering actor; it fails unless its rows are
    exactly the distinct events (re-sends, late events and the window included)."""
    import ordering_cost

    events = ordering_cost.make_events(3_000, topics, seed=topics + window_ms)
    assert ordering_cost.drive(events, window_ms) == len({event.key for event in events}) < 3_000


@pytest.mark.parametrize("workload, topics, window_ms", [("mixed", 10, 50), ("mixed", 3000, 0), ("bench", 10, 50)])
def test_the_writer_cost_driver_stores_each_distinct_event_once(
    tmp_path: Path, workload: str, topics: int, window_ms: int
) -> None:
    """scripts/writer_cost.py drives the real ordering and dedup actors on a real SQLite file;
    its count is of the rows in the database, which must be exactly the distinct events."""
    import ordering_cost
    import writer_cost

    if workload == "bench":
        events = writer_cost.bench_events(3_000, topics)
    else:
        events = ordering_cost.make_events(3_000, topics, seed=topics + window_ms)
    stored = writer_cost.drive(events, window_ms, tmp_path, commit_events=700, rate=writer_cost.RATES[workload])
    assert stored == len({event.key for event in events}) < 3_000


def test_the_decode_cost_script_times_both_forms_of_the_same_events() -> None:
    """scripts/decode_cost.py checks that its columns decode to the very Event tuples first."""
    done = run_script("decode_cost.py", "--events", "20", "--runs", "1", timeout=60)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^Event tuples +median \d+ ns an event", done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^columns +median \d+ ns an event", done.stdout, re.MULTILINE), done.stdout
    # --decoder checks that every frame decodes whole, with no event refused, before timing.
    done = run_script("decode_cost.py", "--decoder", "--runs", "1", timeout=60)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^decoder +median \d+ ns an event", done.stdout, re.MULTILINE), done.stdout


@pytest.mark.parametrize("topic_order", ["cycle", "random"])
def test_the_index_cost_script_stores_the_same_rows_in_both_shapes(tmp_path: Path, topic_order: str) -> None:
    """scripts/index_cost.py: the integer-id table holds the same events, topic for topic, and
    the script's own run fails unless both databases hold every row."""
    import index_cost

    rows = index_cost.make_rows(2_000, 70, topic_order)
    with_ids = index_cost.with_topic_ids(rows)
    assert [row[1:] for row in with_ids] == [row[1:] for row in rows]
    pairs = {(named[0], numbered[0]) for named, numbered in zip(rows, with_ids, strict=True)}
    assert len(pairs) == len({name for name, _ in pairs}) == len({number for _, number in pairs}) == 70
    for shape, stored in (("names", rows), ("ids", with_ids)):
        figures = index_cost.store(shape, stored, tmp_path, commit=300)
        assert figures["rows_per_s"] > 0 and figures["cpu_us_per_row"] > 0
        conn = sqlite3.connect(tmp_path / f"{shape}.db")
        column_type = {name: kind for _, name, kind, *_ in conn.execute("PRAGMA table_info(events)")}["topic"]
        count, seqs = conn.execute("SELECT count(*), count(DISTINCT topic || '/' || seq) FROM events").fetchone()
        conn.close()
        assert column_type == ("TEXT" if shape == "names" else "INTEGER")
        assert count == seqs == 2_000
    done = run_script("index_cost.py", "--events", "500", "--topics", "40", "--runs", "2", timeout=60)
    assert done.returncode == 0, done.stderr
    assert "medians of 2: topic names" in done.stdout and "integer ids" in done.stdout
