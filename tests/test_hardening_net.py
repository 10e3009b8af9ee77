"""Hostile peers on the network endpoints (issue 20, items 1 and 3), against real daemons.

Item 1: a peer that claims (``ZMQ_ROUTING_ID``) the routing id a ROUTER is about to give the
next anonymous peer made libzmq abort the daemon. Those auto ids are ``0x00`` + a counter started
from libc ``rand()``, which libzmq never seeds, so :func:`predicted_auto_ids` computes them.
Item 3: a CURVE key removed from the authorized folder kept its open connections.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from harness import Daemon, eventually, run_script

from transport.client import QueryClient
from transport.security import curve_client
from transport.workload import plan
from transport.zap import new_routing_id, zmtp_property

pytestmark = pytest.mark.timeout(120)

Hook = Callable[["zmq.Socket[Any]"], None]


def predicted_auto_ids(sockets: int = 12, per_socket: int = 8) -> list[bytes]:
    """The auto routing ids of the first ``sockets`` ROUTERs of a process with unseeded libc rand().

    libzmq's ``generate_random()`` is ``rand() | rand() << 31`` per ROUTER; each ROUTER then
    counts up from there, one id per anonymous peer.
    """
    libc = ctypes.CDLL(None)
    libc.srand(1)  # glibc's state before any srand() call
    ids = []
    for _ in range(sockets):
        low, high = libc.rand() & 0xFFFFFFFF, libc.rand() & 0xFFFFFFFF
        start = (low | (high << 31)) & 0xFFFFFFFF
        ids += [b"\x00" + ((start + step) & 0xFFFFFFFF).to_bytes(4, "big") for step in range(per_socket)]
    return ids


def test_predicted_ids_are_the_ones_from_the_issue() -> None:
    assert predicted_auto_ids(1, 1) == [bytes.fromhex("006b8b4567")]


def test_zap_routing_ids_and_metadata() -> None:
    rid = new_routing_id()
    assert len(rid) == 16 and rid[0] == 1 and rid != new_routing_id()
    assert zmtp_property(b"Identity", b"ab") == b"\x08Identity\x00\x00\x00\x02ab"


@contextmanager
def attackers(endpoints: list[str], ids: list[bytes], hook: Hook | None = None) -> Iterator[zmq.Context[Any]]:
    """DEALERs connected to every endpoint, each claiming one of ``ids``."""
    context: zmq.Context[Any] = zmq.Context()
    try:
        for endpoint in endpoints:
            for rid in ids:
                sock = context.socket(zmq.DEALER)
                sock.linger = 0
                if hook is not None:
                    hook(sock)
                sock.setsockopt(zmq.ROUTING_ID, rid)
                sock.connect(endpoint)
        time.sleep(1.0)  # let their handshakes finish before the honest clients come
        yield context
    finally:
        context.destroy(linger=0)


def dealer(context: zmq.Context[Any], endpoint: str, hook: Hook | None = None) -> zmq.Socket[Any]:
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    if hook is not None:
        hook(sock)
    sock.connect(endpoint)
    return sock


def exchange(sock: zmq.Socket[Any], message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one msgpack map; the next reply that is not a heartbeat."""
    sock.send(msgpack.packb(message))
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0 and sock.poll(int(left * 1000)), f"no reply to {message.get('op', message.get('batch'))}"
        reply: dict[str, Any] = msgpack.unpackb(sock.recv_multipart()[-1], raw=False)
        if reply.get("op") != "heartbeat":
            return reply


def acked_batch(batch: int, prefix: str) -> dict[str, Any]:
    return {"batch": batch, "events": plan(1, id_prefix=f"{prefix}-{batch}-")}


def serve_honest_clients(daemon: Daemon, rounds: int, prefix: str, hook: Hook | None = None) -> None:
    """Fresh anonymous connections to each endpoint, each one served, the daemon alive throughout."""
    context: zmq.Context[Any] = zmq.Context()
    try:
        for n in range(rounds):
            ack = dealer(context, daemon.ack, hook)
            assert exchange(ack, acked_batch(n, prefix)).get("new") == 1
            ack.close()
            with QueryClient(daemon.query, timeout=10.0, configure=hook) as client:
                assert "error" not in client.request({"op": "stats"})
            sub = dealer(context, daemon.subscribe, hook)
            reply = exchange(sub, {"op": "subscribe", "topic": "nothing-here", "after": 0, "credit": 1})
            assert reply["op"] == "subscribed", reply
            sub.close()
            assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()
    finally:
        context.destroy(linger=0)


@pytest.mark.e2e
@pytest.mark.parametrize("decode_process", [True, False])
def test_peers_claiming_the_next_auto_ids_crash_nothing(
    daemon_factory: Callable[..., Daemon], decode_process: bool
) -> None:
    daemon = daemon_factory(ingest={"decode_process": decode_process}).start()
    endpoints = [daemon.ack, daemon.query, daemon.subscribe]
    with attackers(endpoints, predicted_auto_ids()):
        serve_honest_clients(daemon, rounds=10, prefix="first")
        # Claimed ids that look like libzmq's own (0x00 + 4 bytes), many of them, from a second wave.
        with attackers(endpoints, [b"\x00" + os.urandom(4) for _ in range(100)]):
            serve_honest_clients(daemon, rounds=5, prefix="second")
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert "Assertion failed" not in daemon.log()
    assert daemon.terminate() == 0


@pytest.mark.e2e
@pytest.mark.parametrize("decode_process", [True, False])
def test_the_issues_reproduction_no_longer_aborts_the_daemon(
    daemon_factory: Callable[..., Daemon], decode_process: bool
) -> None:
    """The issue's reproduction: one DEALER claims the acked ROUTER's first auto id, then an
    honest ``publish.py --acked`` connects (this aborted the daemon before the ZAP routing ids)."""
    daemon = daemon_factory(ingest={"decode_process": decode_process}).start()
    with attackers([daemon.ack], predicted_auto_ids(1, 1)):
        result = run_script(
            "publish.py", "--endpoint", daemon.ack, "--acked", "--events", "100", "--deadline", "20", timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr + daemon.log()
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()
    assert daemon.stats()["unique_processed"] == 100
    assert daemon.terminate() == 0


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    folder, authorized = tmp_path / "keys", tmp_path / "authorized"
    for args in (
        ("server", str(folder)),
        ("client", "alice", str(folder), "--authorize", str(authorized)),
        ("client", "bob", str(folder), "--authorize", str(authorized)),
    ):
        result = run_script("keys.py", *args, timeout=30)
        assert result.returncode == 0, result.stderr
    return {
        "server_public": folder / "server.key",
        "server_secret": folder / "server.key_secret",
        "alice": folder / "alice.key_secret",
        "bob": folder / "bob.key_secret",
        "authorized": authorized,
    }


def curve_daemon(daemon_factory: Callable[..., Daemon], keys: dict[str, Path]) -> Daemon:
    security = {"curve_secret_key": str(keys["server_secret"]), "authorized_keys": str(keys["authorized"])}
    return daemon_factory(security=security).start(wait=False)


@pytest.mark.e2e
def test_a_client_reads_the_services_config_whose_secret_key_names_systemd_credentials(
    daemon_factory: Callable[..., Daemon], keys: dict[str, Path]
) -> None:
    """The documented curve_secret_key under systemd is "${CREDENTIALS_DIRECTORY}/...", set only
    for the service: every client command given that config stopped with exit 2, though with
    server_public_key set it never reads the daemon's secret."""
    security = {
        "curve_secret_key": "${CREDENTIALS_DIRECTORY}/server.key_secret",
        "authorized_keys": str(keys["authorized"]),
        "server_public_key": str(keys["server_public"]),
        "client_certificate": str(keys["alice"]),
    }
    daemon = daemon_factory(security=security)
    daemon.start(wait=False, env={**os.environ, "CREDENTIALS_DIRECTORY": str(keys["server_secret"].parent)})
    wait_curve_ready(daemon, curve_client(keys["server_public"], keys["alice"]))
    outside = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    stats = run_script("stats.py", "--config", str(daemon.config_path), "--json", env=outside, timeout=60)
    assert stats.returncode == 0 and '"unique_processed": 0' in stats.stdout, stats.stderr
    # The daemon itself still needs the variable, and says so.
    refused = daemon_factory("unset", security=security).start(wait=False, env=outside)
    assert refused.proc is not None and refused.proc.wait(30) == 2
    assert "[security] curve_secret_key = '${CREDENTIALS_DIRECTORY}/server.key_secret' names the" in refused.log()


def wait_curve_ready(daemon: Daemon, hook: Hook) -> None:
    def ready() -> bool:
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()
        return "eventagg ready" in daemon.log()

    eventually(ready, 30, "the CURVE daemon to start")


@pytest.mark.e2e
def test_an_authorized_curve_peer_claiming_the_next_auto_ids_crashes_nothing(
    daemon_factory: Callable[..., Daemon], keys: dict[str, Path]
) -> None:
    alice = curve_client(keys["server_public"], keys["alice"])
    daemon = curve_daemon(daemon_factory, keys)
    wait_curve_ready(daemon, alice)
    with attackers([daemon.ack, daemon.query, daemon.subscribe], predicted_auto_ids(), alice):
        serve_honest_clients(daemon, rounds=5, prefix="curve", hook=alice)
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert daemon.terminate() == 0


@pytest.mark.e2e
def test_a_subscriber_that_only_listens_is_sent_nothing_once_its_key_is_revoked(
    daemon_factory: Callable[..., Daemon], keys: dict[str, Path]
) -> None:
    """The revocation was checked only on what a connection sends: a subscriber that sent
    nothing after the reload was sent every event stored meanwhile, up to its credit."""
    alice = curve_client(keys["server_public"], keys["alice"])
    bob = curve_client(keys["server_public"], keys["bob"])  # stays authorized: publishes
    daemon = curve_daemon(daemon_factory, keys)
    wait_curve_ready(daemon, alice)
    context: zmq.Context[Any] = zmq.Context()
    try:
        publisher = dealer(context, daemon.ack, bob)
        sub = dealer(context, daemon.subscribe, alice)
        assert exchange(sub, {"op": "subscribe", "after": 0, "credit": 1000})["op"] == "subscribed"
        assert exchange(publisher, acked_batch(1, "before")).get("new") == 1
        assert exchange(sub, {"op": "heartbeat"}, timeout=10)["op"] == "events"  # alice follows
        (keys["authorized"] / "alice.key").unlink()
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        eventually(lambda: "reloaded" in daemon.log(), 15, "the reload to be logged")
        for batch in range(2, 12):
            assert exchange(publisher, acked_batch(batch, "after")).get("new") == 1
        told = []
        while sub.poll(3000):
            told.append(msgpack.unpackb(sub.recv_multipart()[-1], raw=False))
        assert [m for m in told if m.get("op") == "events"] == [], told
        assert any(m.get("code") == "revoked" for m in told), told
    finally:
        context.destroy(linger=0)
    assert daemon.terminate() == 0


@pytest.mark.e2e
def test_a_revoked_key_is_refused_on_its_open_connections(
    daemon_factory: Callable[..., Daemon], keys: dict[str, Path]
) -> None:
    alice = curve_client(keys["server_public"], keys["alice"])
    bob = curve_client(keys["server_public"], keys["bob"])  # stays authorized: reads the stats
    daemon = curve_daemon(daemon_factory, keys)
    wait_curve_ready(daemon, alice)

    def stats() -> dict[str, Any]:
        with QueryClient(daemon.query, timeout=10.0, configure=bob) as client:
            return client.request({"op": "stats"})

    context: zmq.Context[Any] = zmq.Context()
    try:
        ack = dealer(context, daemon.ack, alice)
        assert exchange(ack, acked_batch(1, "alice")).get("new") == 1
        query = context.socket(zmq.REQ)
        query.linger = 0
        alice(query)
        query.connect(daemon.query)
        query.send(msgpack.packb({"op": "stats"}))
        assert query.poll(10_000)
        assert "error" not in msgpack.unpackb(query.recv(), raw=False)
        sub = dealer(context, daemon.subscribe, alice)
        assert exchange(sub, {"op": "subscribe", "topic": "t", "after": 0, "credit": 1})["op"] == "subscribed"
        push = context.socket(zmq.PUSH)
        push.linger = 0
        alice(push)
        push.connect(daemon.ingest)
        push.send(msgpack.packb(plan(1, id_prefix="alice-push-before-")[0]))
        eventually(lambda: stats()["unique_processed"] == 2, 15, "alice's two events stored")

        (keys["authorized"] / "alice.key").unlink()
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        eventually(lambda: "reloaded" in daemon.log(), 15, "the reload to be logged")

        reply = exchange(ack, acked_batch(2, "alice"))
        assert reply["batch"] == 2 and "no longer authorized" in reply["error"], reply
        query.send(msgpack.packb({"op": "stats"}))
        assert query.poll(10_000)
        assert "no longer authorized" in msgpack.unpackb(query.recv(), raw=False)["error"]
        reply = exchange(sub, {"op": "credit", "credit": 5})
        assert reply["op"] == "error" and reply["code"] == "revoked", reply
        rejected = stats()["rejected"]
        push.send(msgpack.packb(plan(1, id_prefix="alice-push-after-")[0]))
        eventually(lambda: stats()["rejected"] > rejected, 15, "the revoked push to be refused")
        assert stats()["unique_processed"] == 2  # nothing from alice after the reload
    finally:
        context.destroy(linger=0)
    assert daemon.terminate() == 0


@contextmanager
def held_connections(endpoint: str, count: int) -> Iterator[None]:
    """``count`` DEALER connections to ``endpoint`` (a daemon's descriptor each), held for the block."""
    context: zmq.Context[Any] = zmq.Context()
    sockets = []
    try:
        for _ in range(count):
            sockets.append(context.socket(zmq.DEALER))
            sockets[-1].setsockopt(zmq.LINGER, 0)
            sockets[-1].connect(endpoint)
        yield
    finally:
        context.destroy(linger=0)


@pytest.mark.e2e
def test_a_daemon_at_its_descriptor_limit_says_so_and_serves_once_clients_leave(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """At the limit libzmq retried each accept in a busy loop and told nobody: clients hung, the log was silent."""
    daemon = daemon_factory().start(descriptors=(150, 150))
    assert daemon.proc is not None
    held = len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))
    with held_connections(daemon.ack, 150 - held + 20):  # more connections than descriptors left
        eventually(lambda: "file descriptors it may open" in daemon.log(), 20, "the warning")
        assert "of the 150 file descriptors it may open (RLIMIT_NOFILE)" in daemon.log()
        assert "raise LimitNOFILE= in the unit" in daemon.log()
    eventually(lambda: "back under the limit" in daemon.log(), 20, "the all-clear")
    assert daemon.stats()["received"] == 0
    assert daemon.log().count("file descriptors it may open") == 1  # once while it lasted, not every check


@pytest.mark.e2e
def test_the_daemon_raises_its_soft_descriptor_limit_to_the_hard_one_and_watches_it_lowered_later(
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory().start(descriptors=(256, 4096))
    assert daemon.proc is not None
    assert resource.prlimit(daemon.proc.pid, resource.RLIMIT_NOFILE) == (4096, 4096)
    assert "file descriptor limit raised from 256 to 4096, the hard limit" in daemon.log()
    # A limit lowered while it runs (prlimit) is the one watched.
    held = len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))
    resource.prlimit(daemon.proc.pid, resource.RLIMIT_NOFILE, (held + 15, 4096))
    with held_connections(daemon.ack, 30):
        eventually(lambda: f"of the {held + 15} file descriptors it may open" in daemon.log(), 20, "the warning")
