"""CURVE on real daemons: who gets in, who is refused and counted, and the safe defaults.

Certificates are made with scripts/keys.py. Publishers here are plain PUSH sockets in the test
process (with or without the :func:`transport.security.curve_client` hook), so the test does
not depend on the publisher library's own CURVE flags.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from harness import SCRIPTS, Daemon, env_with, eventually, free_port, run_script, unprivileged, write_config

from transport.client import HandshakeRefused, NoAnswer, QueryClient
from transport.config import Config, IngestConfig, QueryConfig, SecurityConfig
from transport.security import (
    BindHostError,
    InsecureBindError,
    KeyFileError,
    SecurityError,
    ServerSecurity,
    bind_is_local,
    curve_client,
    is_local_endpoint,
)
from transport.workload import plan

pytestmark = pytest.mark.timeout(90)

Hook = Callable[["zmq.Socket[Any]"], None]


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """A server certificate, an authorized client, and a client whose key is not authorized."""
    folder = tmp_path / "keys"
    authorized = tmp_path / "authorized"
    for args in (
        ("server", str(folder)),
        ("client", "alice", str(folder), "--authorize", str(authorized)),
        ("client", "mallory", str(folder)),
    ):
        result = run_script("keys.py", *args, timeout=30)
        assert result.returncode == 0, result.stderr
    return {
        "server_public": folder / "server.key",
        "server_secret": folder / "server.key_secret",
        "alice": folder / "alice.key_secret",
        "mallory": folder / "mallory.key_secret",
        "authorized": authorized,
    }


def curve_daemon(daemon_factory: Callable[..., Daemon], keys: dict[str, Path], **security: Any) -> Daemon:
    return daemon_factory(
        security={
            "curve_secret_key": str(keys["server_secret"]),
            "authorized_keys": str(keys["authorized"]),
            **security,
        }
    )


def ask(daemon: Daemon, query: dict[str, Any], hook: Hook | None, timeout: float = 2.0) -> dict[str, Any]:
    with QueryClient(daemon.query, timeout=timeout, configure=hook) as client:
        return client.request(query)


def wait_ready(daemon: Daemon, hook: Hook, timeout: float = 30.0) -> None:

    def ready() -> bool:
        assert daemon.proc is not None
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {daemon.proc.returncode}:\n{daemon.log()}")
        try:
            return "error" not in ask(daemon, {"op": "health"}, hook, timeout=1.0)
        except NoAnswer:
            return False

    eventually(ready, timeout, "the daemon answers health over CURVE")


def push(endpoint: str, events: list[dict[str, Any]], hook: Hook | None, linger_ms: int = 1000) -> None:
    """PUSH events one per frame; frames a refused peer never takes are dropped after ``linger_ms``."""
    context: zmq.Context[Any] = zmq.Context()
    sock = context.socket(zmq.PUSH)
    if hook is not None:
        hook(sock)
    sock.connect(endpoint)
    try:
        for event in events:
            sock.send(msgpack.packb(event), zmq.NOBLOCK)
    finally:
        sock.close(linger=linger_ms)
        context.term()


@pytest.mark.e2e
def test_curve_lets_in_only_authorized_clients(daemon_factory: Callable[..., Daemon], keys: dict[str, Path]) -> None:
    alice = curve_client(keys["server_public"], keys["alice"])
    mallory = curve_client(keys["server_public"], keys["mallory"])
    daemon = curve_daemon(daemon_factory, keys).start(wait=False)
    wait_ready(daemon, alice)

    # A plain REQ gets no reply at all, within its timeout; an unauthorized CURVE one neither.
    with pytest.raises(NoAnswer):
        ask(daemon, {"op": "stats"}, None, timeout=1.0)
    with pytest.raises(NoAnswer):
        ask(daemon, {"op": "stats"}, mallory, timeout=1.0)

    def stats() -> dict[str, Any]:
        reply = ask(daemon, {"op": "stats"}, alice)
        assert "error" not in reply, reply
        return reply

    # The two refused queries above (counted by the daemon's monitor thread, a moment after the
    # clients, which stop waiting at the refusal, have gone).
    eventually(lambda: stats()["refused"] >= 2, 15, "the two refused queries to be counted")
    refused_before = stats()["refused"]
    push(daemon.ingest, plan(50, id_prefix="plain-"), None)
    eventually(lambda: stats()["refused"] > refused_before, 15, "the plain publisher to be refused")
    refused_before = stats()["refused"]
    push(daemon.ingest, plan(50, id_prefix="mallory-"), mallory)
    eventually(lambda: stats()["refused"] > refused_before, 15, "the unauthorized publisher to be refused")
    # Refused at the handshake: the daemon never reads a frame from either, so nothing can arrive later.
    figures = stats()
    assert figures["received"] == 0 and figures["unique_processed"] == 0, figures

    push(daemon.ingest, plan(50, id_prefix="alice-"), alice, linger_ms=10_000)
    eventually(lambda: stats()["unique_processed"] == 50, 15, "alice's 50 events to be stored")
    with QueryClient(daemon.query, timeout=5.0, configure=alice) as client:
        stored = list(client.iter_events())
    assert {e["event_id"] for e in stored} == {f"alice-{i}" for i in range(50)}
    assert "refused a client" in daemon.log()

    # The acknowledged endpoint: alice gets her ack; mallory's batch is never read.
    for hook, who in ((alice, "alice"), (mallory, "mallory")):
        context: zmq.Context[Any] = zmq.Context()
        dealer = context.socket(zmq.DEALER)
        hook(dealer)
        dealer.connect(daemon.ack)
        dealer.send(msgpack.packb({"batch": 7, "events": plan(5, id_prefix=f"{who}-acked-")}))
        answered = dealer.poll(3000 if who == "alice" else 1000, zmq.POLLIN)
        reply = msgpack.unpackb(dealer.recv(), raw=False) if answered else None
        dealer.close(linger=0)
        context.term()
        if who == "alice":
            assert reply == {"batch": 7, "new": 5, "duplicate": 0, "rejected": []}, reply
        else:
            assert reply is None, reply
    assert stats()["unique_processed"] == 55

    # The query scripts speak CURVE with flags, and fail (not hang) without them.
    result = run_script(
        "stats.py",
        "--endpoint",
        daemon.query,
        "--json",
        "--server-key",
        str(keys["server_public"]),
        "--client-cert",
        str(keys["alice"]),
    )
    assert result.returncode == 0, result.stderr
    assert '"unique_processed": 55' in result.stdout
    result = run_script("stats.py", "--endpoint", daemon.query, "--timeout", "1")
    assert result.returncode == 1 and "no answer" in result.stderr
    assert daemon.terminate() == 0


@pytest.mark.e2e
def test_clients_say_why_a_curve_daemon_does_not_take_them(
    daemon_factory: Callable[..., Daemon], keys: dict[str, Path]
) -> None:
    daemon = curve_daemon(daemon_factory, keys).start(wait=False)
    alice = curve_client(keys["server_public"], keys["alice"])
    wait_ready(daemon, alice)
    as_alice = ("--server-key", str(keys["server_public"]), "--client-cert", str(keys["alice"]))
    as_mallory = ("--server-key", str(keys["server_public"]), "--client-cert", str(keys["mallory"]))
    handshake_failed = "took the connection but the security handshake failed"
    key_refused = "refused this client's CURVE key (ZAP status 400)"
    for keys_given, words in (((), handshake_failed), (as_mallory, key_refused)):
        # A refused handshake ends the wait at once: before, each waited its whole --timeout.
        started = time.monotonic()
        stats = run_script("stats.py", "--endpoint", daemon.query, "--timeout", "60", *keys_given, timeout=30)
        assert stats.returncode == 1 and f"no answer from {daemon.query}: it {words}" in stats.stderr, stats.stderr
        found = run_script("events.py", "--follow", "--endpoint", daemon.query, "--timeout", "60", *keys_given)
        assert found.returncode == 1 and f"no answer from {daemon.query}: it {words}" in found.stderr, found.stderr
        assert time.monotonic() - started < 20
        # Fire-and-forget too: before, ZeroMQ queued the frames for a peer that refused them
        # and the script reported them sent (exit 0).
        for endpoint, mode in ((daemon.ingest, ()), (daemon.ack, ("--acked",))):
            sent = run_script("publish.py", "--endpoint", endpoint, *mode, "--events", "10", *keys_given, timeout=30)
            assert sent.returncode == 1 and f"publish: {endpoint} {words}" in sent.stderr, sent.stderr
        # Following would otherwise wait in silence for a daemon that will never let it in.
        follow = ("--follow", "--endpoint", daemon.query, "--subscribe-endpoint", daemon.subscribe)
        followed = run_script("events.py", *follow, *keys_given, timeout=30)
        assert followed.returncode == 1 and f"events: {daemon.subscribe} {words}" in followed.stderr
    # The library says so too, naming the key when the daemon's ZAP refused it.
    mallory = curve_client(keys["server_public"], keys["mallory"])
    for hook, words in ((None, handshake_failed), (mallory, key_refused)):
        started = time.monotonic()
        with (
            QueryClient(daemon.query, timeout=60, configure=hook) as client,
            pytest.raises(HandshakeRefused) as refused,
        ):
            client.request({"op": "stats"})
        assert words in str(refused.value) and time.monotonic() - started < 10
        # Saying what to change, and where a program sets its keys (not the tools' flags).
        assert "transport.security.curve_client" in str(refused.value), refused.value
    sent = run_script("publish.py", "--endpoint", daemon.ingest, "--events", "10", *as_alice, timeout=30)
    assert sent.returncode == 0, sent.stderr
    eventually(lambda: ask(daemon, {"op": "stats"}, alice)["unique_processed"] == 10, 15, "alice's 10 events")
    assert ask(daemon, {"op": "stats"}, alice)["received"] == 10  # none of the refused ones arrived
    assert daemon.terminate() == 0


@pytest.mark.e2e
def test_query_clients_kept_open_while_their_daemon_refused_them_for_a_while_are_answered_after(
    daemon_factory: Callable[..., Daemon], keys: dict[str, Path]
) -> None:
    """Clients kept open between requests (as the gateway pools them) while their daemon ran for a
    while with CURVE: at their next request, to the plain daemon back again, the refusals their
    monitors had seen meanwhile were taken as the new daemon's (HandshakeRefused), and a REQ
    socket that libzmq had left without a connection blocked its send for ever."""
    daemon = daemon_factory().start()
    plain = daemon.config_path.read_text()
    clients = [QueryClient(daemon.query, timeout=5) for _ in range(8)]
    for client in clients:
        assert "error" not in client.request({"op": "health"})
    daemon.terminate()
    server_key, authorized = keys["server_secret"], keys["authorized"]
    daemon.config_path.write_text(
        f"{plain}\n[security]\ncurve_secret_key = '{server_key}'\nauthorized_keys = '{authorized}'\n"
    )
    daemon.start(wait=False)
    wait_ready(daemon, curve_client(keys["server_public"], keys["alice"]))
    time.sleep(1.0)  # the idle clients reconnect, and are refused
    daemon.terminate()
    daemon.config_path.write_text(plain)
    daemon.start()
    answers: dict[int, str] = {}

    def ask_again(index: int, client: QueryClient) -> None:
        try:
            answers[index] = "answered" if "error" not in client.request({"op": "health"}) else "error"
        except NoAnswer as exc:
            answers[index] = f"{type(exc).__name__}: {exc}"

    askers = [threading.Thread(target=ask_again, args=item, daemon=True) for item in enumerate(clients)]
    for asker in askers:
        asker.start()
    deadline = time.monotonic() + 15
    for asker in askers:
        asker.join(timeout=max(0.0, deadline - time.monotonic()))
    assert answers == dict.fromkeys(range(len(clients)), "answered"), answers
    for client in clients:
        client.close()
    assert daemon.terminate() == 0


def sighup(daemon: Daemon) -> None:
    """Send the daemon SIGHUP and wait until it logs that it re-read its config."""
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    eventually(lambda: "SIGHUP: re-read" in daemon.log(), 15, "the config to be re-read")


@pytest.mark.e2e
def test_sighup_reloads_authorized_keys(daemon_factory: Callable[..., Daemon], keys: dict[str, Path]) -> None:
    alice = curve_client(keys["server_public"], keys["alice"])
    mallory = curve_client(keys["server_public"], keys["mallory"])
    daemon = curve_daemon(daemon_factory, keys).start(wait=False)
    wait_ready(daemon, alice)
    with pytest.raises(NoAnswer):
        ask(daemon, {"op": "stats"}, mallory, timeout=1.0)
    mallory_public = keys["mallory"].with_suffix(".key")
    (keys["authorized"] / mallory_public.name).write_bytes(mallory_public.read_bytes())
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    eventually(lambda: "reloaded 2 authorized client keys" in daemon.log(), 15, "the keys to be reloaded")
    assert "error" not in ask(daemon, {"op": "stats"}, mallory, timeout=5.0)
    assert daemon.terminate() == 0


@pytest.mark.e2e
def test_a_bad_authorized_file_at_sighup_does_not_hold_back_a_revocation(
    daemon_factory: Callable[..., Daemon], keys: dict[str, Path]
) -> None:
    """At one SIGHUP alice's file is removed, bob's half rewritten and a bad carol.key added: before,
    the bad files kept the whole old set in force, alice's revocation with it, until they were fixed.
    Now alice is refused at once, bob keeps the key his file held, and the log names both bad files."""
    made = run_script("keys.py", "client", "bob", str(keys["alice"].parent), "--authorize", str(keys["authorized"]))
    assert made.returncode == 0, made.stderr
    alice = curve_client(keys["server_public"], keys["alice"])
    bob = curve_client(keys["server_public"], keys["alice"].with_name("bob.key_secret"))
    daemon = curve_daemon(daemon_factory, keys).start(wait=False)
    wait_ready(daemon, alice)
    assert "error" not in ask(daemon, {"op": "stats"}, bob, timeout=5.0)
    with QueryClient(daemon.query, timeout=5.0, configure=alice) as kept_open:
        assert "error" not in kept_open.request({"op": "stats"})
        (keys["authorized"] / "alice.key").unlink()
        bob_file = keys["authorized"] / "bob.key"
        bob_file.write_bytes(bob_file.read_bytes()[:60])  # a copy cut short, as one caught mid-write
        carol_file = keys["authorized"] / "carol.key"
        carol_file.write_bytes(b"not a certificate\n")
        os.chmod(carol_file, 0o644)
        sighup(daemon)
        # Alice: refused on her open connection and at a new handshake, right after the reload.
        started = time.monotonic()
        assert "no longer authorized" in kept_open.request({"op": "stats"}).get("error", ""), daemon.log()
    with pytest.raises(NoAnswer):
        ask(daemon, {"op": "stats"}, alice, timeout=5.0)
    assert time.monotonic() - started < 10
    # Bob: still served, with the key his file held before it was cut short.
    assert "error" not in ask(daemon, {"op": "stats"}, bob, timeout=5.0)
    log_text = daemon.log()
    assert "reloaded 1 authorized client keys" in log_text and "(1 revoked" in log_text, log_text
    assert f"authorized client certificate {bob_file} is not a zmq.auth certificate" in log_text, log_text
    assert "the key this file held before stays authorized until the file is fixed" in log_text, log_text
    assert f"authorized client certificate {carol_file} is not a zmq.auth certificate" in log_text, log_text
    assert "it authorizes no client until the file is fixed" in log_text, log_text
    assert "authorized keys not reloaded" not in log_text, log_text
    assert daemon.terminate() == 0


@pytest.mark.e2e
def test_the_secret_key_can_come_from_systemd_credentials(
    daemon_factory: Callable[..., Daemon], keys: dict[str, Path], tmp_path: Path
) -> None:
    # What LoadCredential=curve-secret:/etc/eventagg/server.key_secret gives the service: a
    # private folder in $CREDENTIALS_DIRECTORY holding a read-only copy under the credential's name.
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "curve-secret").write_bytes(keys["server_secret"].read_bytes())
    os.chmod(credentials / "curve-secret", 0o400)
    daemon = daemon_factory(
        "creds",
        security={
            "curve_secret_key": "${CREDENTIALS_DIRECTORY}/curve-secret",
            "authorized_keys": str(keys["authorized"]),
        },
    )
    daemon.start(wait=False, env=env_with(CREDENTIALS_DIRECTORY=str(credentials)))
    wait_ready(daemon, curve_client(keys["server_public"], keys["alice"]))
    assert daemon.terminate() == 0

    # Without the variable (not started by systemd with the credential) the config is refused.
    unset = daemon_factory(
        "nocreds",
        security={
            "curve_secret_key": "${CREDENTIALS_DIRECTORY}/curve-secret",
            "authorized_keys": str(keys["authorized"]),
        },
    )
    unset.start(wait=False, env={k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"})
    assert unset.proc is not None
    assert unset.proc.wait(30) == 2
    assert (
        "names the environment variable CREDENTIALS_DIRECTORY, which is not set (systemd sets it for a unit with"
        " LoadCredential=)" in unset.log()
    )


@pytest.mark.e2e
def test_wildcard_bind_without_curve_refuses_to_start(daemon_factory: Callable[..., Daemon]) -> None:
    port = free_port()
    daemon = daemon_factory("exposed", ingest={"bind": f"tcp://0.0.0.0:{port}"})
    daemon.start(wait=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(30) == 2  # a configuration refused: systemd does not restart it
    assert "refusing to listen beyond loopback without CURVE ([ingest] bind = tcp://0.0.0.0:" in daemon.log()
    assert "allow_insecure = true" in daemon.log()
    assert not daemon.db_path.exists()  # refused before the database was even opened

    # A host that does not resolve is named as such, not as a bind beyond loopback.
    nowhere = daemon_factory("nowhere", query={"bind": f"tcp://no-such-host.invalid:{port}"}).start(wait=False)
    assert nowhere.proc is not None and nowhere.proc.wait(30) == 2
    assert (
        f"[query] bind = tcp://no-such-host.invalid:{port}: 'no-such-host.invalid' is not an address" in nowhere.log()
    )
    assert "beyond loopback" not in nowhere.log() and not nowhere.db_path.exists()

    allowed = daemon_factory("allowed", ingest={"bind": f"tcp://0.0.0.0:{port}"}, security={"allow_insecure": True})
    allowed.start()
    assert "WITHOUT CURVE (allow_insecure = true): tcp://0.0.0.0:" in allowed.log()
    assert allowed.terminate() == 0


@pytest.mark.e2e
def test_loose_secret_key_permissions_refuse_to_start(
    daemon_factory: Callable[..., Daemon], keys: dict[str, Path]
) -> None:
    os.chmod(keys["server_secret"], 0o644)
    daemon = curve_daemon(daemon_factory, keys).start(wait=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(30) == 2
    assert f"{keys['server_secret']} has loose permissions (-rw-r--r--)" in daemon.log()
    assert "chmod 600" in daemon.log()


@pytest.mark.e2e
def test_key_file_checks(keys: dict[str, Path]) -> None:
    os.chmod(keys["alice"], 0o640)
    with pytest.raises(KeyFileError, match="loose permissions"):
        curve_client(keys["server_public"], keys["alice"])
    os.chmod(keys["alice"], 0o600)
    with pytest.raises(KeyFileError, match="holds no secret key"):
        curve_client(keys["server_public"], keys["alice"].with_suffix(".key"))
    with pytest.raises(KeyFileError, match="does not exist"):
        curve_client(keys["server_public"], keys["alice"].with_name("nobody.key_secret"))
    os.chmod(keys["authorized"], 0o777)
    config = Config(security=SecurityConfig(str(keys["server_secret"]), str(keys["authorized"])))
    with pytest.raises(KeyFileError, match="writable by others"):
        ServerSecurity(zmq.Context.instance(), config)
    os.chmod(keys["authorized"], 0o755)
    ServerSecurity(zmq.Context.instance(), config).stop()
    if os.geteuid() == 0:  # only root can give a file away
        os.chown(keys["authorized"] / "alice.key", 4242, -1)
        with pytest.raises(KeyFileError, match=r"alice.key is owned by uid 4242, neither root nor"):
            ServerSecurity(zmq.Context.instance(), config)
        os.chown(keys["authorized"] / "alice.key", 0, -1)
        os.chown(keys["authorized"], 4242, -1)
        with pytest.raises(KeyFileError, match=r"authorized_keys folder .* is owned by uid 4242"):
            ServerSecurity(zmq.Context.instance(), config)
    half = Config(security=SecurityConfig(curve_secret_key=str(keys["server_secret"])))
    with pytest.raises(SecurityError, match="authorized_keys is empty"):
        ServerSecurity(zmq.Context.instance(), half)
    # keys.py never overwrites a certificate.
    again = run_script("keys.py", "server", str(keys["server_public"].parent), timeout=30)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert keys["server_secret"].stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("endpoint", "local"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.0.0.5:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("ipc:///run/eventagg.sock", True),
        ("inproc://x", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://eth0:5555", False),
        ("tcp://192.168.1.4:5555", False),
        ("tcp://[::]:5555", False),
        ("pgm://eth0;239.0.0.1:5555", False),
    ],
)
def test_is_local_endpoint(endpoint: str, local: bool) -> None:
    assert is_local_endpoint(endpoint) is local


def test_a_bind_host_name_is_as_local_as_its_addresses_and_one_that_does_not_resolve_is_refused() -> None:
    assert bind_is_local("[query] bind", "tcp://localhost:5556")
    assert not bind_is_local("[query] bind", "tcp://*:5556")
    assert not bind_is_local("[query] bind", "tcp://10.0.0.1:5556")
    name = socket.gethostname()  # resolved as the daemon resolves it (here: 127.0.0.1, by /etc/hosts)
    with contextlib.suppress(socket.gaierror):
        addresses = {found[4][0] for found in socket.getaddrinfo(name, None)}
        local = all(ipaddress.ip_address(address).is_loopback for address in addresses)
        assert bind_is_local("[query] bind", f"tcp://{name}:5556") is local, addresses
    with pytest.raises(BindHostError, match=r"\[query\] bind = tcp://no-such-host.invalid:5556: 'no-such-host"):
        bind_is_local("[query] bind", "tcp://no-such-host.invalid:5556")


def test_insecure_check_names_every_exposed_endpoint() -> None:
    config = Config(ingest=IngestConfig(bind="tcp://*:5555"), query=QueryConfig(bind="tcp://0.0.0.0:5556"))
    with pytest.raises(
        InsecureBindError, match=r"\[ingest\] bind = tcp://\*:5555, \[query\] bind = tcp://0.0.0.0:5556"
    ):
        ServerSecurity(zmq.Context.instance(), config)


@pytest.mark.e2e
def test_key_files_this_user_cannot_read_refuse_to_start_with_the_command_that_lets_it() -> None:
    # Root reads every file, so as root the daemon runs as nobody (as under systemd's DynamicUser),
    # in a folder it may enter; as anyone else, the modes below shut the daemon's own user out.
    as_user, me = unprivileged()
    as_root = os.geteuid() == 0
    if as_root and shutil.which("setpriv") is None:
        pytest.skip("as root, this needs setpriv to run the daemon as another user")
    home = Path(tempfile.mkdtemp(prefix="eventagg-keys-"))
    folder, authorized = home / "keys", home / "authorized"
    secret = folder / "server.key_secret"
    try:
        home.chmod(0o755)
        for args in (("server", str(folder)), ("client", "alice", str(folder), "--authorize", str(authorized))):
            made = run_script("keys.py", *args, timeout=30)
            assert made.returncode == 0, made.stderr
        ports = {name: f"tcp://127.0.0.1:{free_port()}" for name in ("ingest", "ack", "query", "subscribe")}
        config = write_config(
            home / "config.toml",
            {
                "ingest": {"bind": ports["ingest"], "ack_bind": ports["ack"]},
                "query": {"bind": ports["query"]},
                "subscribe": {"bind": ports["subscribe"]},
                "storage": {"path": "events.db"},
                "security": {"curve_secret_key": str(secret), "authorized_keys": str(authorized)},
            },
        )

        def refusal() -> str:
            command = [*as_user, sys.executable, str(SCRIPTS / "aggregatord.py"), "--config", str(config)]
            result = subprocess.run(command, capture_output=True, text=True, timeout=10, cwd=home)
            assert result.returncode == 2, result.stderr
            return result.stderr

        if not as_root:
            folder.chmod(0o600)  # keys.py made it owner-only: as root, already closed to nobody
        assert (
            f"[security] curve_secret_key {secret} is out of this user's reach (uid {me}): it may not enter "
            f"{folder}; run `chown {me} {folder}`" in refusal()
        )
        folder.chmod(0o755)
        if not as_root:
            secret.chmod(0)
        fix = f"chown {me} {secret}" if as_root else f"chmod u+r {secret}"
        assert f"[security] curve_secret_key {secret} is not readable by this user (uid {me}); run `{fix}`" in refusal()
        if as_root:
            os.chown(secret, me, me)
            authorized.chmod(0o700)
        else:
            secret.chmod(0o600)
            authorized.chmod(0o300)
        fix = f"chown {me} {authorized}" if as_root else f"chmod u+rx {authorized}"
        expected = (
            f"[security] authorized_keys folder {authorized} is not readable by this user (uid {me}); run `{fix}`"
        )
        assert expected in refusal()  # not "holds no '*.key' certificates", then every client refused
        # A folder above authorized_keys that the user may not enter is named, not "not a folder".
        authorized.chmod(0o755 if as_root else 0o700)
        gate = home / "gate"
        gate.mkdir(mode=0o700 if as_root else 0o600)
        moved = authorized.rename(gate / "authorized")
        config.write_text(config.read_text().replace(str(authorized), str(moved)))
        assert (
            f"[security] authorized_keys folder {moved} is out of this user's reach (uid {me}): it may not enter "
            f"{gate}; run `chown {me} {gate}`" in refusal()
        )
        assert not (home / "events.db").exists()
    finally:
        with contextlib.suppress(OSError):
            (home / "gate").chmod(0o700)
        for path in (folder, authorized):
            with contextlib.suppress(OSError):
                path.chmod(0o700)
        shutil.rmtree(home)


@pytest.mark.e2e
def test_the_authorized_folder_is_listed_as_named_and_what_is_checked_is_what_is_loaded(
    daemon_factory: Callable[..., Daemon], keys: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A folder named like a glob pattern: "auth[1]/*.key" as a glob reads auth1, never checked.
    named = tmp_path / "auth[1]"
    keys["authorized"].rename(named)
    other = tmp_path / "auth1"
    other.mkdir()
    shutil.copy(keys["mallory"].with_suffix(".key"), other / "mallory.key")
    daemon = daemon_factory(
        security={"curve_secret_key": str(keys["server_secret"]), "authorized_keys": str(named)}
    ).start(wait=False)
    wait_ready(daemon, curve_client(keys["server_public"], keys["alice"]), timeout=15)
    with pytest.raises(NoAnswer):
        ask(daemon, {"op": "stats"}, curve_client(keys["server_public"], keys["mallory"]), timeout=1.0)
    assert f"1 authorized client keys in {named}" in daemon.log()
    assert daemon.terminate() == 0

    # A hidden certificate is neither checked nor loaded, and not counted either: a folder
    # holding only one warns that every client is refused.
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    shutil.copy(keys["mallory"].with_suffix(".key"), hidden / ".mallory.key")
    os.chmod(hidden / ".mallory.key", 0o666)  # would be refused, were it checked
    config = Config(security=SecurityConfig(str(keys["server_secret"]), str(hidden)))
    with caplog.at_level("WARNING", logger="transport.security"):
        ServerSecurity(zmq.Context.instance(), config).stop()
    assert f"[security] authorized_keys {hidden} holds no '*.key' certificates" in caplog.text


@pytest.mark.e2e
def test_a_key_that_is_not_a_regular_file_is_refused_not_waited_on(
    daemon_factory: Callable[..., Daemon], keys: dict[str, Path], tmp_path: Path
) -> None:
    # Opening a FIFO waits for a writer: before, the daemon hung at start, then ignored SIGTERM.
    fifo = tmp_path / "secret.fifo"
    os.mkfifo(fifo, 0o600)
    refused = daemon_factory(
        "fifo-secret", security={"curve_secret_key": str(fifo), "authorized_keys": str(keys["authorized"])}
    ).start(wait=False)
    assert refused.proc is not None and refused.proc.wait(15) == 2
    assert f"[security] curve_secret_key {fifo} is not a regular file" in refused.log()
    client_fifo = keys["authorized"] / "x.key"
    os.mkfifo(client_fifo, 0o644)
    secure = {"curve_secret_key": str(keys["server_secret"]), "authorized_keys": str(keys["authorized"])}
    refused = daemon_factory("fifo-client", security=secure).start(wait=False)
    assert refused.proc is not None and refused.proc.wait(15) == 2
    assert f"authorized client certificate {client_fifo} is not a regular file" in refused.log()
    as_fifo = ("--server-key", str(keys["server_public"]), "--client-cert", str(fifo))
    stats = run_script("stats.py", "--endpoint", "tcp://127.0.0.1:1", "--timeout", "1", *as_fifo, timeout=15)
    assert stats.returncode == 2 and f"client certificate {fifo} is not a regular file" in stats.stderr

    # One appearing in the folder before a SIGHUP: refused (a new file, so it adds no key), the
    # other keys stay, SIGTERM still works.
    client_fifo.unlink()
    alice = curve_client(keys["server_public"], keys["alice"])
    daemon = curve_daemon(daemon_factory, keys).start(wait=False)
    wait_ready(daemon, alice)
    os.mkfifo(client_fifo, 0o644)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    eventually(lambda: f"{client_fifo} is not a regular file" in daemon.log(), 10, "the FIFO to be refused")
    eventually(lambda: "reloaded 1 authorized client keys" in daemon.log(), 10, "the other keys to be reloaded")
    assert "it authorizes no client until the file is fixed" in daemon.log()
    assert "error" not in ask(daemon, {"op": "stats"}, alice, timeout=5.0)
    assert daemon.terminate(timeout=15) == 0


def with_key(path: Path, line: str, key: bytes, to: Path) -> Path:
    """A copy of certificate ``path`` at ``to`` (same mode) whose ``line`` (``public-key`` or
    ``secret-key``) holds ``key``."""
    text = b"".join(
        f'    {line} = "'.encode() + key + b'"\n' if row.strip().startswith(line.encode()) else row
        for row in path.read_bytes().splitlines(keepends=True)
    )
    to.write_bytes(text)
    os.chmod(to, path.stat().st_mode & 0o777)
    return to


def key_of(path: Path, line: str) -> bytes:
    return next(row.split(b'"')[1] for row in path.read_bytes().splitlines() if row.strip().startswith(line.encode()))


@pytest.mark.e2e
def test_keys_that_are_not_z85_or_whose_halves_do_not_match_are_refused_naming_the_file(
    daemon_factory: Callable[..., Daemon], keys: dict[str, Path], tmp_path: Path
) -> None:
    # '~' is not Z85: libzmq refused the key only at bind ("Invalid argument", exit 1, restarted).
    secret = key_of(keys["server_secret"], "secret-key")
    bad = with_key(keys["server_secret"], "secret-key", b"~" + secret[1:], tmp_path / "bad.key_secret")
    refused = daemon_factory(
        "not-z85", security={"curve_secret_key": str(bad), "authorized_keys": str(keys["authorized"])}
    ).start(wait=False)
    assert refused.proc is not None and refused.proc.wait(15) == 2
    assert f"[security] curve_secret_key {bad}: its secret-key holds characters outside the Z85 alphabet ('~')" in (
        refused.log()
    )
    # A client certificate: stats said so with a traceback.
    alice = key_of(keys["alice"], "secret-key")
    bad_alice = with_key(keys["alice"], "secret-key", b"~" + alice[1:], tmp_path / "alice.key_secret")
    as_bad = ("--server-key", str(keys["server_public"]), "--client-cert", str(bad_alice))
    stats = run_script("stats.py", "--endpoint", "tcp://127.0.0.1:1", "--timeout", "1", *as_bad, timeout=15)
    assert stats.returncode == 2 and "Traceback" not in stats.stderr, stats.stderr
    assert f"client certificate {bad_alice}: its secret-key holds characters outside the Z85 alphabet" in stats.stderr
    # Z85 characters, but a group of five beyond 32 bits ("#" is the alphabet's last).
    with pytest.raises(KeyFileError, match=r"its secret-key holds '#####', which is beyond Z85's range"):
        curve_client(keys["server_public"], with_key(keys["alice"], "secret-key", b"#####" + alice[5:], bad_alice))
    # A public key that is not the secret key's half.
    other = key_of(keys["mallory"], "public-key")
    mixed = with_key(keys["alice"], "public-key", other, tmp_path / "mixed.key_secret")
    with pytest.raises(KeyFileError, match=r"mixed.key_secret: its public-key is not the public half of its secret"):
        curve_client(keys["server_public"], mixed)
    # An authorized key, too, at start (and so at every SIGHUP).
    public = keys["authorized"] / "alice.key"
    with_key(public, "public-key", key_of(public, "public-key")[:-1] + b"~", public)
    config = Config(security=SecurityConfig(str(keys["server_secret"]), str(keys["authorized"])))
    with pytest.raises(KeyFileError, match=r"alice.key: its public-key holds characters outside the Z85 alphabet"):
        ServerSecurity(zmq.Context.instance(), config)


@pytest.mark.e2e
def test_a_secret_certificate_in_the_authorized_folder_is_refused(keys: dict[str, Path]) -> None:
    # The daemon needs only the public half; a secret one there is a secret others can read.
    (keys["authorized"] / "alice.key").unlink()
    shutil.copy(keys["mallory"], keys["authorized"] / "mallory.key")
    config = Config(security=SecurityConfig(str(keys["server_secret"]), str(keys["authorized"])))
    with pytest.raises(KeyFileError, match=r"mallory.key holds a secret key: .* copy the client's public '.key' file"):
        ServerSecurity(zmq.Context.instance(), config)


def test_a_client_name_ending_in_a_newline_is_refused(tmp_path: Path) -> None:
    made = run_script("keys.py", "client", "alice\n", str(tmp_path / "keys"), timeout=30)
    assert made.returncode == 2 and "name 'alice\\n' must be letters, digits" in made.stderr, made.stderr
    assert not (tmp_path / "keys").exists() or not list((tmp_path / "keys").iterdir())


@pytest.mark.e2e
def test_sighup_says_a_new_authorized_keys_folder_needs_a_restart(
    daemon_factory: Callable[..., Daemon], keys: dict[str, Path], tmp_path: Path
) -> None:
    alice = curve_client(keys["server_public"], keys["alice"])
    daemon = curve_daemon(daemon_factory, keys).start(wait=False)
    wait_ready(daemon, alice)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    daemon.config_path.write_text(daemon.config_path.read_text().replace(str(keys["authorized"]), str(elsewhere)))
    sighup(daemon)
    assert (
        f"SIGHUP: [security] authorized_keys changed from '{keys['authorized']}' to '{elsewhere}': that needs a "
        "restart (until then the old setting stays in force)" in daemon.log()
    )
    assert "error" not in ask(daemon, {"op": "stats"}, alice, timeout=5.0)  # from the old folder, as it says
    assert daemon.terminate() == 0


@pytest.mark.e2e
def test_sighup_rechecks_the_secret_key_file(daemon_factory: Callable[..., Daemon], keys: dict[str, Path]) -> None:
    alice = curve_client(keys["server_public"], keys["alice"])
    daemon = curve_daemon(daemon_factory, keys).start(wait=False)
    wait_ready(daemon, alice)
    os.chmod(keys["server_secret"], 0o644)
    sighup(daemon)
    assert (
        f"SIGHUP: [security] curve_secret_key {keys['server_secret']} has loose permissions (-rw-r--r--)"
        in daemon.log()
    )
    assert "(the daemon goes on with the key it read at start)" in daemon.log()
    assert "error" not in ask(daemon, {"op": "stats"}, alice, timeout=5.0)
    assert daemon.terminate() == 0


@pytest.mark.e2e
def test_sighup_says_a_replaced_server_key_needs_a_restart(
    daemon_factory: Callable[..., Daemon], keys: dict[str, Path], tmp_path: Path
) -> None:
    """A new server certificate written over ``curve_secret_key`` (a key rotation) and SIGHUP:
    the daemon went on with the old key, saying nothing, while clients given the new
    ``server.key`` were refused ("the security handshake failed")."""
    alice = curve_client(keys["server_public"], keys["alice"])
    daemon = curve_daemon(daemon_factory, keys).start(wait=False)
    wait_ready(daemon, alice)
    rotated = tmp_path / "rotated"
    made = run_script("keys.py", "server", str(rotated), timeout=30)
    assert made.returncode == 0, made.stderr
    keys["server_secret"].write_bytes((rotated / "server.key_secret").read_bytes())
    sighup(daemon)
    assert (
        f"SIGHUP: [security] curve_secret_key {keys['server_secret']} now holds another key pair: the daemon "
        "goes on with the one it read at start until it is restarted" in daemon.log()
    )
    assert "error" not in ask(daemon, {"op": "stats"}, alice, timeout=5.0)  # the old key, as it says
    assert daemon.terminate() == 0
