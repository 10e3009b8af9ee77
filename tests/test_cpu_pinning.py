"""``[cpu] pin``: the daemon's threads share one CPU, its decoder process has another, and events still flow."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import Daemon, decoder_pids, publish

ALLOWED = sorted(os.sched_getaffinity(0))


def cpus_of(pid: int) -> dict[str, set[int]]:
    """Each thread's allowed CPUs, by thread id and name."""
    found: dict[str, set[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        [line] = [line for line in status.splitlines() if line.startswith("Cpus_allowed_list:")]
        found[f"{task.name} {name}"] = parse_cpu_list(line.split(":", 1)[1].strip())
    return found


def parse_cpu_list(text: str) -> set[int]:
    """``0-2,5`` -> {0, 1, 2, 5}."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


@pytest.mark.skipif(len(ALLOWED) < 2, reason="pinning to two CPUs needs two CPUs")
def test_a_pinned_daemon_keeps_its_threads_on_one_cpu_and_its_decoder_on_another(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory(cpu={"pin": True}).start()
    assert daemon.proc is not None
    first, second = ALLOWED[0], ALLOWED[1]
    health = daemon.request({"op": "health"})
    assert health["cpus"] == f"threads pinned to CPU {first}, the decoder process to CPU {second}", health
    publish(daemon.ingest, "--events", "3000", "--topics", "7", "--duplicates", "0.2")
    daemon.wait_stats(unique_processed=2400, duplicate_dropped=600)
    threads = cpus_of(daemon.proc.pid)
    assert len(threads) > 10 and all(cpus == {first} for cpus in threads.values()), threads
    [decoder] = decoder_pids(daemon)
    assert all(cpus == {second} for cpus in cpus_of(decoder).values()), cpus_of(decoder)
    # A decoder started in place of a dead one is pinned like the first.
    os.kill(decoder, signal.SIGKILL)
    wait_for(lambda: decoder_pids(daemon) not in ([], [decoder]), 20, "a new decoder process\n" + daemon.log())
    [replacement] = decoder_pids(daemon)
    wait_for(lambda: daemon.request({"op": "health"})["decoding"] == f"decoder process, pid {replacement}", 20,
             "the new decoder at work")  # so it has pinned itself, which it does first
    assert all(cpus == {second} for cpus in cpus_of(replacement).values()), cpus_of(replacement)
    publish(daemon.ingest, "--events", "3000", "--topics", "7", "--duplicates", "0.2", "--id-prefix", "again")
    daemon.wait_stats(unique_processed=4800)
    assert daemon.terminate() == 0


def test_by_default_the_daemon_runs_where_the_kernel_puts_it(daemon: Daemon) -> None:
    assert daemon.proc is not None
    assert daemon.request({"op": "health"})["cpus"] == "not pinned to CPUs"
    threads = cpus_of(daemon.proc.pid)
    assert all(cpus == set(ALLOWED) for cpus in threads.values()), threads
    [decoder] = decoder_pids(daemon)
    assert all(cpus == set(ALLOWED) for cpus in cpus_of(decoder).values())


def test_without_a_decoder_process_only_the_threads_are_pinned(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(cpu={"pin": True}, ingest={"decode_process": False}).start()
    assert daemon.proc is not None
    assert daemon.request({"op": "health"})["cpus"] == f"threads pinned to CPU {ALLOWED[0]}"
    assert all(cpus == {ALLOWED[0]} for cpus in cpus_of(daemon.proc.pid).values())
    publish(daemon.ingest, "--events", "1000")
    daemon.wait_stats(unique_processed=1000)
