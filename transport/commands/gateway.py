"""``eventagg gateway`` (and ``scripts/gateway.py``): run the HTTP gateway in the foreground, ``--config PATH``.

It reads the daemon's config file: ``[http]`` for where to listen and its limits, ``[ingest]
ack_bind`` and ``[query] bind`` for where the daemon is, ``[security]`` for CURVE, ``[log]``
for how much to say. Needs the ``gateway`` extra (``pip install 'eventagg[gateway]'``).
SIGINT or SIGTERM stop it: requests in progress finish, or answer 503 once
``transport.gateway.STOPPING_GRACE_S`` passed, then it exits 0; SIGHUP is logged and ignored. It
exits 1 when it cannot listen on ``[http] bind``, 2 for a bad config (a ``bind`` beyond loopback
without ``[security] allow_insecure`` among them). See docs/gateway.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import tempfile
from typing import Any

from transport.config import ConfigError, load_config
from transport.descriptors import raise_descriptor_limit
from transport.logs import setup_logging
from transport.security import SecurityError

log = logging.getLogger("transport.gateway")

# Requests in progress get this long to finish at shutdown before uvicorn cancels them; the
# gateway's own waits end sooner (transport.gateway.STOPPING_GRACE_S) with a JSON 503.
GRACEFUL_SHUTDOWN_S = 10


class ListenError(Exception):
    """The gateway cannot listen where ``[http] bind`` says; the message says why and what to do."""


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``, ready to hand to uvicorn; :class:`ListenError` if it cannot be.

    Binding here rather than in uvicorn makes a bad address fail before the gateway says it
    serves, with one message naming the config key, the same for one worker or several.
    """
    bind = f"[http] bind {host}:{port}" if ":" not in host else f"[http] bind [{host}]:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ListenError(
            f"cannot listen on {bind}: the host does not resolve ({exc.strerror}); "
            "give an address of this machine, e.g. 127.0.0.1:8080"
        ) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ListenError(
            f"cannot listen on {bind}: {exc.strerror}; stop what uses that port, or set another "
            "[http] bind (an address of this machine and a free port)"
        ) from None
    sock.set_inheritable(True)  # the workers' processes serve on it too
    return sock


def _ignore_sighup(_signum: int = signal.SIGHUP, _frame: Any = None) -> None:
    """SIGHUP: say so and carry on serving.

    The daemon re-reads its log level and keys on SIGHUP, and ``pkill -HUP eventagg`` reaches
    the gateway too; Python's default would end it at once (no shutdown, and systemd does not
    restart a service a SIGHUP ended). uvicorn's own supervisor of several workers would
    restart them, re-reading some of the config and not the rest.
    """
    log.warning("SIGHUP: the gateway re-reads nothing and keeps serving; restart it to apply a changed config")


def _workers_supervisor(config: Any, sock: socket.socket) -> Any:
    """uvicorn's supervisor of several worker processes on ``sock``, its SIGHUP :func:`_ignore_sighup`."""
    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        def handle_hup(self) -> None:
            _ignore_sighup()

    return Supervisor(config, sockets=[sock])


def _ignore_stop_signals() -> None:
    """Make SIGINT and SIGTERM no-ops from now on.

    uvicorn restores the handlers it found once it has shut down, then raises the signal it
    caught again, so that a program embedding it dies by that signal. The gateway promises
    exit 0 after a clean shutdown instead: the signal raised again lands here and does nothing.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: None)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Run eventagg's HTTP gateway in the foreground.")
    parser.add_argument("--config", metavar="PATH", required=True, help="the daemon's config file, with [http]")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGHUP, _ignore_sighup)  # from the start: the imports below take a while
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from transport.gateway import CONFIG_ENV, create_app
        from transport.gateway_stream import STREAMS_FOLDER_ENV
        from transport.http_protocol import IMPORT_PATH as HTTP_PROTOCOL
    except ImportError as exc:
        print(
            f"gateway: {exc.name} is missing: install the gateway extra, pip install 'eventagg[gateway]'",
            file=sys.stderr,
        )
        return 2
    setup_logging(config.log.level)
    raise_descriptor_limit()  # a stream holds about three; worker processes inherit it
    try:
        app = create_app(config)  # made here even for workers: a bad key file fails now, with one message
    except (ConfigError, SecurityError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    try:
        sock = listen_socket(config.http.host, config.http.port)
    except ListenError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    options: dict[str, Any] = {
        "log_config": None,  # keep transport.logs' format
        "access_log": False,
        "server_header": False,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
        "http": HTTP_PROTOCOL,  # httptools with a deadline on request headers
    }
    with sock:
        if config.http.workers > 1:
            # Several processes on one listening socket, each with its own connections to the daemon:
            # a gateway process is bound by its GIL. Workers import the app by name.
            os.environ[CONFIG_ENV] = str(config.source)
            workers = uvicorn.Config(
                "transport.gateway:app_from_environment", factory=True, workers=config.http.workers, **options
            )
            with tempfile.TemporaryDirectory(prefix="eventagg-gateway-streams-") as folder:
                os.environ[STREAMS_FOLDER_ENV] = folder  # each worker's count of open event streams
                _workers_supervisor(workers, sock).run()
            return 0
        server = uvicorn.Server(uvicorn.Config(app, **options))
        _ignore_stop_signals()
        server.run(sockets=[sock])
    return 0 if server.started else 1
