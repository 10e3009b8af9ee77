"""systemd integration: sd_notify, the watchdog tied to actor liveness, graceful stop, journald logs.

systemd is not needed: a real AF_UNIX datagram socket plays $NOTIFY_SOCKET, and the daemon runs
as a real process, exactly as systemd would start it (same environment variables).
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from harness import Daemon, env_with, eventually, free_port, publish, stored_rows

from actors.daemon import Daemon as InProcessDaemon
from actors.watchdog import ServiceMonitor, Snapshot, ping_timeout, status_line
from transport.config import parse_config
from transport.queries import DebugFreezeQuery, QueryError, parse_query
from transport.sdnotify import Notifier, NotifyError, notify_address, watchdog_interval
from transport.workload import plan

WATCHDOG_USEC = "2000000"  # WatchdogSec=2: pings expected every second
SLACK_S = 0.3  # scheduling jitter allowed on top of the 1 s interval on a busy CI machine
ACKED_BATCHES = 20
ACKED_PER_BATCH = 100


class NotifyListener:
    """A real ``$NOTIFY_SOCKET``: receives datagrams on a thread and keeps them with their arrival time."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, list[str]]] = []
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append((time.monotonic(), data.decode().split("\n")))
                self._lock.notify_all()

    def wait_for(self, assignment: str, timeout: float, after: float = 0.0) -> float:
        """Arrival time of the first datagram at or after ``after`` holding ``assignment``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for at, lines in self.messages:
                    if at >= after and assignment in lines:
                        return at
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {assignment} within {timeout} s; got {self.messages}")
                self._lock.wait(left)

    def times(self, assignment: str) -> list[float]:
        """Arrival times of every datagram holding ``assignment``."""
        with self._lock:
            return [at for at, lines in self.messages if assignment in lines]

    def values(self, key: str) -> list[str]:
        """Every value sent for ``key`` (e.g. every STATUS= text)."""
        with self._lock:
            return [line.split("=", 1)[1] for _, lines in self.messages for line in lines if line.startswith(key + "=")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    """A notify socket at a real path (AF_UNIX paths are short; tmp_path is short enough)."""
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100, "AF_UNIX path too long for this tmp_path"
    made = NotifyListener(str(path))
    yield made
    made.close()


def max_gap(times: list[float]) -> float:
    return max(b - a for a, b in itertools.pairwise(times))


# --- the pure parts ------------------------------------------------------------------------


def test_notify_address_accepts_a_path_or_an_abstract_name() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@eventagg/notify") == b"\0eventagg/notify"
    for bad in ("relative/path", "@", "vsock:2:1234"):
        with pytest.raises(NotifyError, match="NOTIFY_SOCKET"):
            notify_address(bad)


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_us() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, pid=42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, pid=43) is None
    with pytest.raises(NotifyError, match="WatchdogSec"):
        watchdog_interval({"WATCHDOG_USEC": "soon"})
    # 1 us once made the daemon ping its actors in a busy loop, logging thousands of errors.
    with pytest.raises(NotifyError, match="under 1 s.*WatchdogSec= in the unit to 10s or more"):
        watchdog_interval({"WATCHDOG_USEC": "1"})
    assert watchdog_interval({"WATCHDOG_USEC": "1000000"}) == 0.5


def test_status_line_gives_rate_totals_and_silent_parts() -> None:
    before = Snapshot(at=10.0, received=1000, unique=900, duplicates=100, rejected=0, topics=3)
    after = Snapshot(at=12.0, received=5000, unique=4400, duplicates=600, rejected=2, topics=4)
    assert status_line(after, before) == "2,000 events/s; 4,400 unique, 600 duplicates, 2 rejected; 4 topics"
    assert status_line(after).startswith("0 events/s;")
    assert status_line(after, before, ["dedup"]).startswith("UNHEALTHY, not answering: dedup; 2,000 events/s")


def test_status_line_shows_a_trickle_rather_than_zero() -> None:
    # One event committed in the 2 s between status lines is 0.5 events/s, not "0 events/s".
    before = Snapshot(at=10.0, received=7, unique=7, duplicates=0, rejected=0, topics=1)
    after = Snapshot(at=12.0, received=8, unique=8, duplicates=0, rejected=0, topics=1)
    assert status_line(after, before).startswith("0.5 events/s;")
    slow = Snapshot(at=22.0, received=8 + 73, unique=81, duplicates=0, rejected=0, topics=1)
    assert status_line(slow, after).startswith("7.3 events/s;")
    assert status_line(after, after).startswith("0 events/s;")  # nothing came


def test_ping_timeout_leaves_room_within_the_interval() -> None:
    assert ping_timeout(1.0) == pytest.approx(0.8)
    assert ping_timeout(15.0) == 10.0


def test_debug_freeze_is_an_unknown_op_unless_test_hooks_are_on() -> None:
    request = {"op": "debug_freeze", "actor": "dedup", "seconds": 5}
    with pytest.raises(QueryError, match="unknown op 'debug_freeze'"):
        parse_query(request, 100, test_hooks=False)
    assert parse_query(request, 100, test_hooks=True) == DebugFreezeQuery("dedup", 5.0)
    with pytest.raises(QueryError, match="'seconds'"):
        parse_query({**request, "seconds": 0}, 100, test_hooks=True)
    with pytest.raises(QueryError, match="'actor'"):
        parse_query({"op": "debug_freeze", "seconds": 1}, 100, test_hooks=True)


# --- the notifier on a real socket ---------------------------------------------------------


def test_notifier_without_notify_socket_is_silent_and_opens_nothing() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert notifier.ready("up") is False
    assert notifier.watchdog() is False
    assert notifier._socket is None  # the point: no socket exists


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notifier_delivers_datagrams(tmp_path: Path, abstract: bool) -> None:
    name = f"@eventagg-test-{os.getpid()}-{time.monotonic_ns()}" if abstract else str(tmp_path / "n.sock")
    listener = NotifyListener(notify_address(name))
    try:
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": name})
        assert notifier.enabled
        assert notifier.ready("ready, line\nbreak")
        assert notifier.watchdog()
        assert notifier.stopping()
        listener.wait_for("STOPPING=1", timeout=2)
        assert [lines for _, lines in listener.messages] == [
            ["READY=1", "STATUS=ready, line break"],
            ["WATCHDOG=1"],
            ["STOPPING=1"],
        ]
        notifier.close()
    finally:
        listener.close()


def test_notifier_survives_a_missing_socket(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens.sock"))
    assert notifier.watchdog() is False
    assert notifier.watchdog() is False
    assert sum("cannot notify systemd" in r.message for r in caplog.records) == 1


# --- the watchdog against real actors in this process -----------------------------------------


def in_process_daemon(tmp_path: Path) -> InProcessDaemon:
    config = parse_config(
        {
            "ingest": {"bind": f"tcp://127.0.0.1:{free_port()}", "ack_bind": f"tcp://127.0.0.1:{free_port()}"},
            "query": {"bind": f"tcp://127.0.0.1:{free_port()}"},
            "subscribe": {"bind": f"tcp://127.0.0.1:{free_port()}"},
            "storage": {"path": str(tmp_path / "events.db")},
            "ordering": {"actors": 2},
        }
    )
    return InProcessDaemon(config)


@pytest.mark.e2e
def test_a_dead_ordering_actor_stops_the_watchdog(tmp_path: Path, listener: NotifyListener) -> None:
    daemon = in_process_daemon(tmp_path)
    daemon.start()
    try:
        notifier = Notifier(listener.sock.getsockname())
        monitor = ServiceMonitor(notifier, lambda timeout: daemon.liveness(timeout), daemon.live, watchdog_s=0.5)
        assert monitor.check() is True
        listener.wait_for("WATCHDOG=1", timeout=2)
        daemon.ordering[1].stop()
        assert monitor.check() is False
        assert "ordering-1" in monitor.status_text()
        # Datagrams on one socket arrive in order: once this marker is in, a ping sent before it would be too.
        notifier.status("marker after the failed check")
        listener.wait_for("STATUS=marker after the failed check", timeout=5)
        assert len(listener.times("WATCHDOG=1")) == 1
    finally:
        daemon.stop()


# --- a real daemon process under a fake systemd ------------------------------------------


def systemd_env(listener: NotifyListener, **extra: str) -> dict[str, str]:
    return env_with(NOTIFY_SOCKET=listener.sock.getsockname(), WATCHDOG_USEC=WATCHDOG_USEC, **extra)


@pytest.mark.e2e
def test_ready_watchdog_status_then_stopping_and_a_full_drain(
    daemon_factory: Callable[..., Daemon], listener: NotifyListener
) -> None:
    daemon = daemon_factory("notify")
    daemon.start(wait=False, env=systemd_env(listener))
    ready_at = listener.wait_for("READY=1", timeout=30)
    # READY=1 means the sockets are bound and the database is open: a query is answered at once.
    assert daemon.request({"op": "health"}, timeout=2.0).get("status") == "ok"
    assert daemon.db_path.exists()

    publish(daemon.ingest, "--events", "3000", "--duplicates", "0.1", "--topics", "5", "--batch", "50")

    def pings_since_ready() -> list[float]:
        return [at for at in listener.times("WATCHDOG=1") if at >= ready_at]

    def rate_reported() -> bool:
        return any(re.search(r"events/s; [\d,]+ unique, [\d,]+ duplicates", s) for s in listener.values("STATUS"))

    eventually(lambda: len(pings_since_ready()) >= 3 and rate_reported(), 30, "3 pings and a status with the rate")
    pings = pings_since_ready()
    assert len(pings) >= 3, pings
    assert max_gap([ready_at, *pings]) <= 1.0 + SLACK_S
    statuses = listener.values("STATUS")
    assert any(re.search(r"events/s; [\d,]+ unique, [\d,]+ duplicates", s) for s in statuses), statuses

    # The next events are still in flight when SIGTERM arrives: all must be stored, every ack answered.
    publish(daemon.ingest, "--events", "3000", "--duplicates", "0", "--topics", "5", "--id-prefix", "late")
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(daemon.ack)
    try:
        for batch in range(ACKED_BATCHES):
            events = plan(ACKED_PER_BATCH, 0.0, 3, batch, f"acked-{batch}-")
            dealer.send(msgpack.packb({"batch": batch, "events": events}, use_bin_type=True))
        # The signal comes once the daemon has the first acked events (past the 6000 sent before them).
        eventually(lambda: daemon.stats()["received"] > 6000, 30, "the acked frames reach the daemon")
        signalled = time.monotonic()
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        acks: dict[int, dict[str, Any]] = {}
        while len(acks) < ACKED_BATCHES and dealer.poll(30_000):
            reply = msgpack.unpackb(dealer.recv(), raw=False)
            acks[reply["batch"]] = reply
    finally:
        dealer.close(linger=0)
        context.term()
    assert daemon.proc.wait(60) == 0, daemon.log()
    assert sorted(acks) == list(range(ACKED_BATCHES)), acks
    assert all(a["new"] == ACKED_PER_BATCH and "error" not in a for a in acks.values()), acks
    stopping_at = listener.wait_for("STOPPING=1", timeout=1, after=signalled)
    assert not [at for at in listener.times("WATCHDOG=1") if at > stopping_at]
    assert len(listener.times("READY=1")) == 1
    rows = stored_rows(daemon.db_path)
    assert len(rows) == 2700 + 3000 + ACKED_BATCHES * ACKED_PER_BATCH
    assert len({(topic, event_id) for topic, event_id, _ in rows}) == len(rows)
    assert "drain incomplete" not in daemon.log()


@pytest.mark.e2e
def test_an_unresponsive_actor_stops_the_watchdog_until_it_answers_again(
    daemon_factory: Callable[..., Daemon], listener: NotifyListener
) -> None:
    daemon = daemon_factory("frozen")
    daemon.start(wait=False, env=systemd_env(listener, EVENTAGG_TEST_HOOKS="1"))
    first = listener.wait_for("WATCHDOG=1", timeout=30)
    listener.wait_for("WATCHDOG=1", timeout=3, after=first + 0.01)

    reply = daemon.request({"op": "debug_freeze", "actor": "dedup", "seconds": 4})
    assert reply == {"frozen": "dedup", "seconds": 4.0}
    frozen_at = time.monotonic()
    resumed = listener.wait_for("WATCHDOG=1", timeout=10, after=frozen_at + 1.1)
    # A check that began before the freeze may still land; after that, nothing for the freeze's length.
    assert resumed - frozen_at >= 3.5, listener.times("WATCHDOG=1")
    assert any(s.startswith("UNHEALTHY, not answering: dedup") for s in listener.values("STATUS"))
    assert "not answering a liveness ping: dedup" in daemon.log()
    assert "watchdog notifications resume" in daemon.log()
    assert daemon.request({"op": "debug_freeze", "actor": "nobody", "seconds": 1})["error"].startswith(
        "no actor named 'nobody'"
    )
    assert daemon.terminate(timeout=30) == 0, daemon.log()


@pytest.mark.e2e
def test_debug_freeze_is_refused_without_the_test_hooks_variable(daemon_factory: Callable[..., Daemon]) -> None:
    env = env_with()
    env.pop("EVENTAGG_TEST_HOOKS", None)
    daemon = daemon_factory("nohooks").start(env=env)
    reply = daemon.request({"op": "debug_freeze", "actor": "dedup", "seconds": 5})
    assert reply["error"].startswith("unknown op 'debug_freeze'")
    assert daemon.request({"op": "health"}, timeout=2.0).get("status") == "ok"
    assert daemon.terminate(timeout=30) == 0


def log_lines(daemon: Daemon) -> list[str]:
    return [line for line in daemon.log().splitlines() if line.strip()]


@pytest.mark.e2e
def test_journald_format_under_systemd_and_timestamps_otherwise(daemon_factory: Callable[..., Daemon]) -> None:
    journald = daemon_factory("journald").start(env=env_with(JOURNAL_STREAM="8:12345"))
    plain = daemon_factory("plain")
    env = env_with()
    env.pop("JOURNAL_STREAM", None)
    plain.start(env=env)
    assert journald.proc is not None
    journald.proc.send_signal(signal.SIGHUP)  # reloads the log level and says so
    eventually(lambda: "SIGHUP: re-read" in journald.log(), 10, "the journald daemon logs its reload")
    assert journald.terminate() == 0 and plain.terminate() == 0

    lines = log_lines(journald)
    assert lines and all(re.match(r"<[0-7]>[\w.]+: ", line) for line in lines), lines
    assert any(line.startswith("<6>actors.daemon: eventagg ready") for line in lines)
    assert any(line.startswith("<4>actors.daemon: SIGHUP: re-read") for line in lines), lines
    assert not any(re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", line) for line in lines)

    lines = log_lines(plain)
    assert lines and all(
        re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) ", line) for line in lines
    ), lines
