"""``eventagg gateway`` (and ``scripts/gateway.py``): run the HTTP gateway in the foreground, ``--config PATH``.

It reads the daemon's config file: ``[http]`` for where to listen and its limits, ``[ingest]
ack_bind`` and ``[query] bind`` for where the daemon is, ``[security]`` for CURVE, ``[log]``
for how much to say. Needs the ``gateway`` extra (``pip install 'eventagg[gateway]'``).
SIGINT or SIGTERM stop it: requests in progress finish, then it exits 0. See docs/gateway.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from transport.config import ConfigError, load_config
from transport.logs import setup_logging
from transport.security import SecurityError

# Requests in progress get this long to finish at shutdown; a publish waits at most its timeout.
GRACEFUL_SHUTDOWN_S = 10


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Run eventagg's HTTP gateway in the foreground.")
    parser.add_argument("--config", metavar="PATH", required=True, help="the daemon's config file, with [http]")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from transport.gateway import CONFIG_ENV, create_app
    except ImportError as exc:
        print(
            f"gateway: {exc.name} is missing: install the gateway extra, pip install 'eventagg[gateway]'",
            file=sys.stderr,
        )
        return 2
    setup_logging(config.log.level)
    try:
        app = create_app(config)  # made here even for workers: a bad key file fails now, with one message
    except (ConfigError, SecurityError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    options: dict[str, Any] = {
        "host": config.http.host,
        "port": config.http.port,
        "log_config": None,  # keep transport.logs' format
        "access_log": False,
        "server_header": False,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
    }
    if config.http.workers > 1:
        # Several processes on one listening socket, each with its own connections to the daemon:
        # a gateway process is bound by its GIL. Workers import the app by name.
        os.environ[CONFIG_ENV] = str(config.source)
        uvicorn.run("transport.gateway:app_from_environment", factory=True, workers=config.http.workers, **options)
        return 0
    server = uvicorn.Server(uvicorn.Config(app, **options))
    server.run()
    if not server.started:
        logging.getLogger("gateway").critical("cannot listen on %s", config.http.bind)
        return 1
    return 0
