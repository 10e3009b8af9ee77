"""Test harness: real daemon processes on real loopback ports with real SQLite files.

Ports come from below the kernel's ephemeral range, so a client reconnecting to a stopped
daemon can never connect to itself (libzmq issue 4588) and a restarted daemon can bind again.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx

from transport.client import NoAnswer, QueryClient

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
_used_ports: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_range() -> tuple[int, int]:
    """The ports this test process picks from: below the ephemeral range, and, under pytest-xdist,
    a share of them no other worker picks from (a port is only probed free here, and a worker
    that probed the same one before this one's daemon bound it would take it too)."""
    low, high = 20000, min(_ephemeral_low(), 32768) - 1
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or workers < 2:
        return low, high
    span = (high - low + 1) // workers
    start = low + int(worker[2:]) * span
    return start, start + span - 1


def free_port() -> int:
    """A loopback TCP port in this process's range (:func:`_port_range`) that nothing is bound to right now."""
    low, high = _port_range()
    for _ in range(1000):
        port = random.randint(low, high)
        if port in _used_ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _used_ports.add(port)
        return port
    raise RuntimeError("no free port found")


T = TypeVar("T")


def eventually(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; fail naming ``what``.

    The one polling loop of the tests: a wait on an observable state, never a bare sleep.
    ``detail``, if given, is called on failure and its text added to the message (a log, say).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            more = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"not within {timeout:g} s: {what} (last: {result!r}){more}")
        time.sleep(interval)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def default_sigint() -> None:
    """A ``preexec_fn`` that gives a child SIGINT's default action, as from a terminal: a suite
    started in the background (``&`` without job control) ignores SIGINT, and a Python child
    that starts ignoring it keeps ignoring it, so a test's Ctrl-C would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


NOBODY = 65534


def unprivileged() -> tuple[list[str], int]:
    """A command prefix that runs a process as a user whom file modes stop, and that user's uid:
    as root (who reads and writes everything) ``setpriv`` to nobody, else nothing and our own."""
    if os.geteuid() != 0:
        return [], os.geteuid()
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"], NOBODY


def run_script(
    name: str, *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one of scripts/*.py with this interpreter, bounded in time."""
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


class Daemon:
    """One aggregatord process with its own config, ports and database under ``workdir``."""

    def __init__(self, workdir: Path, overrides: dict[str, dict[str, Any]] | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ingest = f"tcp://127.0.0.1:{free_port()}"
        self.ack = f"tcp://127.0.0.1:{free_port()}"
        self.query = f"tcp://127.0.0.1:{free_port()}"
        self.subscribe = f"tcp://127.0.0.1:{free_port()}"
        sections: dict[str, dict[str, Any]] = {
            "ingest": {"bind": self.ingest, "ack_bind": self.ack},
            "query": {"bind": self.query},
            "subscribe": {"bind": self.subscribe},
            "storage": {"path": "events.db"},
            "log": {"level": "INFO"},
        }
        for section, values in (overrides or {}).items():
            sections.setdefault(section, {}).update(values)
        self.config_path = write_config(workdir / "config.toml", sections)
        self.db_path = workdir / str(sections["storage"]["path"])
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    def start(
        self,
        wait: bool = True,
        timeout: float = 30.0,
        env: dict[str, str] | None = None,
        own_session: bool = False,
        descriptors: tuple[int, int] | None = None,
    ) -> Daemon:
        """Start the daemon; with ``own_session`` it leads a process group of its own, as under a
        shell; with ``descriptors`` its (soft, hard) limit of open files is that."""
        log = self.log_path.open("ab")
        self._log_start = log.tell()  # this run's lines begin here (a restart appends to the same file)
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPTS / "aggregatord.py"), "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=env,
            start_new_session=own_session,
            preexec_fn=None if descriptors is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, descriptors),
        )
        log.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until health answers without an error and the daemon has logged that it is ready.

        Health answers as soon as the query thread runs, a moment before start-up is complete
        (the threads' kernel names, for one, are set last); the log line comes at the end, as
        READY=1 does under systemd. The config's log level must let INFO through (the default).
        """

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                reply = self.request({"op": "health"}, timeout=1.0)
            except NoAnswer:
                return False
            return "error" not in reply and b"eventagg ready" in self.log_path.read_bytes()[self._log_start :]

        eventually(ready, timeout, "the daemon is ready", detail=self.log)

    def request(self, query: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        with QueryClient(self.query, timeout=timeout) as client:
            return client.request(query)

    def stats(self) -> dict[str, Any]:
        reply = self.request({"op": "stats"})
        assert "error" not in reply, reply
        return reply

    def wait_stats(self, timeout: float = 60.0, **expected: int) -> dict[str, Any]:
        """Poll stats until every named counter has the expected value (or time out with the last seen)."""
        last: dict[str, Any] = {}

        def reached() -> dict[str, Any] | None:
            nonlocal last
            last = self.stats()
            return last if all(last.get(k) == v for k, v in expected.items()) else None

        return eventually(reached, timeout, f"stats reach {expected}", interval=0.1, detail=lambda: f"last: {last}")

    def wait_idle(self, timeout: float = 60.0, quiet_s: float = 0.5) -> dict[str, Any]:
        """Poll stats until nothing is in flight and the counters stop moving for ``quiet_s``."""
        last: dict[str, Any] | None = None
        stable_since = time.monotonic()

        def idle() -> dict[str, Any] | None:
            nonlocal last, stable_since
            stats = self.stats()
            keys = ("received", "unique_processed", "duplicate_dropped", "rejected")
            now = time.monotonic()
            quiet = None
            if last is None or any(stats[k] != last[k] for k in keys) or stats["in_flight"] or stats.get("buffered"):
                stable_since = now
            elif now - stable_since >= quiet_s:
                quiet = stats
            last = stats
            return quiet

        return eventually(idle, timeout, "the daemon is idle", detail=lambda: f"last: {last}")

    def events(self, topic: str | None = None, page: int = 1000) -> list[dict[str, Any]]:
        with QueryClient(self.query, timeout=10.0) as client:
            return list(client.iter_events(topic, 0, page))

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL and reap."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def publish(endpoint: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run scripts/publish.py against ``endpoint`` and fail loudly if it fails."""
    result = run_script("publish.py", "--endpoint", endpoint, *args, timeout=timeout)
    assert result.returncode == 0, f"publish.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def env_with(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def push_frames(endpoint: str, frames: list[bytes | list[bytes]]) -> None:
    """Send raw messages over PUSH (a list is a multipart message), then linger until delivered."""
    import zmq

    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.connect(endpoint)
    try:
        for frame in frames:
            if isinstance(frame, list):
                sock.send_multipart(frame)
            else:
                sock.send(frame)
    finally:
        sock.close(linger=10_000)
        context.term()


def stored_rows(db_path: Path) -> list[tuple[str, str, int]]:
    """(topic, event_id, seq) of every stored row, read straight from the SQLite file."""
    import sqlite3

    conn = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT topic, event_id, seq FROM events ORDER BY rowid").fetchall()
    finally:
        conn.close()


GATEWAY_TIMEOUT_MS = 2000  # [http] request_timeout_ms of the gateways tests start
# ``python -c`` this, names, constants, script, its arguments: runs the script with the modules
# named (comma separated) unimportable, as where they are not installed, and the constants of
# transport.gateway given (a JSON object) set, as a test's shorter idle limit.
WITHOUT_MODULES = """\
import json, runpy, sys
for name in filter(None, sys.argv[1].split(",")):
    sys.modules[name] = None  # an import of it raises ImportError
constants = json.loads(sys.argv[2])
if constants:
    import transport.gateway
    for name, value in constants.items():
        assert hasattr(transport.gateway, name), f"transport.gateway has no {name}"
        setattr(transport.gateway, name, value)
del sys.argv[:3]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class Gateway:
    """One scripts/gateway.py process reading a daemon's config file; ``without``: modules it runs
    without, as if not installed (``("uvloop",)``: uvicorn's asyncio event loop); ``constants``:
    module constants of transport.gateway it runs with (one worker only: workers import it anew)."""

    def __init__(
        self, daemon: Daemon, url: str, without: tuple[str, ...] = (), constants: dict[str, Any] | None = None
    ) -> None:
        self.daemon = daemon
        self.url = url
        self.without = without
        self.constants = constants or {}
        self.log_path = daemon.workdir / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=30.0)

    def start(self, timeout: float = 30.0) -> Gateway:
        with self.log_path.open("ab") as log:
            command = [str(SCRIPTS / "gateway.py"), "--config", str(self.daemon.config_path)]
            if self.without or self.constants:
                command = ["-c", WITHOUT_MODULES, ",".join(self.without), json.dumps(self.constants), *command]
            self.proc = subprocess.Popen(
                [sys.executable, *command],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.daemon.workdir,
                preexec_fn=default_sigint,  # so a test's SIGINT arrives even in a suite run in the background
            )
        eventually(self._listening, timeout, f"gateway listening at {self.url}:\n{self.log()}")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
        try:
            self.client.get("/openapi.json", timeout=1.0)
        except httpx.TransportError:
            return False
        return True

    def publish(self, body: Any) -> httpx.Response:
        return self.client.post("/publish", json=body)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Stream:
    """One open ``GET /events/stream``; :meth:`next` parses the next message (comment lines skipped)."""

    def __init__(self, gateway: Gateway, headers: dict[str, str] | None = None, **params: Any) -> None:
        self._context = gateway.client.stream(
            "GET", "/events/stream", params=params, headers=headers, timeout=httpx.Timeout(10.0)
        )
        self.response = self._context.__enter__()
        self._lines: Iterator[str] = self.response.iter_lines()

    def next(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for line in self._lines:
            if not line:
                if fields:
                    return fields
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = json.loads(value) if name == "data" else value
        raise EOFError(f"the stream ended: {fields}")

    def take(self, count: int) -> list[dict[str, Any]]:
        return [self.next() for _ in range(count)]

    def close(self) -> None:
        self._context.__exit__(None, None, None)
