#!/usr/bin/env python3
"""Print the daemon's stats: ``stats.py [--endpoint URL | --config PATH] [--json] [--timeout S]``.

With CURVE on, add ``--server-key server.key --client-cert NAME.key_secret`` (or set
``[security] server_public_key`` and ``client_certificate`` in the file given to ``--config``).

Exits 0 with the stats, or non-zero with a message on stderr within the timeout when no daemon
answers. With ``--json``, stdout holds exactly one JSON document.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import _bootstrap  # noqa: F401

from transport.client import QueryClient, QueryClientError, connectable
from transport.config import ConfigError, QueryConfig, load_config
from transport.security import SecurityError, SocketHook, curve_client, curve_client_from_config

ORDER = (
    "received",
    "unique_processed",
    "duplicate_dropped",
    "rejected",
    "refused",
    "late",
    "stored",
    "expired",
    "conflicting_duplicates",
    "topic_count",
    "in_flight",
    "in_flight_bytes",
    "buffered",
    "commits",
    "decoder_restarts",
    "uptime_s",
)


def endpoint_from_args(args: argparse.Namespace) -> str:
    """The query endpoint from --endpoint, --config, or the default."""
    if args.endpoint:
        return str(args.endpoint)
    if args.config:
        return connectable(load_config(args.config).query.bind)
    return connectable(QueryConfig().bind)


def seconds(text: str) -> float:
    """An argparse type: a number of seconds above 0 (a client waits that long at most, never for ever)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text}")
    return value


def add_endpoint_args(parser: argparse.ArgumentParser) -> None:
    """The --endpoint/--config/--timeout flags shared by the query scripts."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--endpoint", metavar="URL", help="query endpoint, e.g. tcp://127.0.0.1:5556")
    where.add_argument("--config", metavar="PATH", help="read the query endpoint from this config file")
    parser.add_argument(
        "--timeout", type=seconds, default=5.0, metavar="S", help="seconds to wait for an answer (default 5)"
    )
    parser.add_argument("--server-key", metavar="PATH", help="CURVE: the daemon's public certificate (server.key)")
    parser.add_argument(
        "--client-cert", metavar="PATH", help="CURVE: this client's secret certificate (NAME.key_secret)"
    )


def curve_from_args(args: argparse.Namespace) -> SocketHook | None:
    """The CURVE client hook from --server-key/--client-cert, else from --config's [security], else None.

    Raises :class:`SecurityError` for a missing or unsafe key file, or only one of the two flags.
    """
    if args.server_key or args.client_cert:
        if not (args.server_key and args.client_cert):
            raise SecurityError("CURVE needs both --server-key and --client-cert")
        return curve_client(Path(args.server_key), Path(args.client_cert))
    if args.config:
        return curve_client_from_config(load_config(args.config))
    return None


def run_command(main: Callable[[], int]) -> int:
    """Run a query script's ``main``; a reader that goes away early (``| head``) ends it quietly with 0.

    Without this, the first write after the reader has gone raises BrokenPipeError: a traceback
    where ``cat`` would say nothing.
    """
    try:
        code = main()
        sys.stdout.flush()  # here, where the error can be caught, rather than at exit
    except BrokenPipeError:
        # Python flushes stdout once more on its way out: point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the eventagg daemon's stats.")
    add_endpoint_args(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    args = parser.parse_args(argv)
    try:
        endpoint = endpoint_from_args(args)
        secure = curve_from_args(args)
    except (ConfigError, SecurityError) as exc:
        print(f"stats: {exc}", file=sys.stderr)
        return 2
    try:
        with QueryClient(endpoint, timeout=args.timeout, configure=secure) as client:
            stats = client.call({"op": "stats"})
    except QueryClientError as exc:
        print(f"stats: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(stats, sort_keys=True))
        return 0
    keys = [k for k in ORDER if k in stats] + sorted(k for k in stats if k not in ORDER)
    width = max(len(k) for k in keys)
    print(f"eventagg at {endpoint}")
    for key in keys:
        value = stats[key]
        shown = f"{value:,}" if isinstance(value, int) else str(value)
        print(f"  {key:<{width}}  {shown:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
