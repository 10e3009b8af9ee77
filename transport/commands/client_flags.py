"""The flags the client commands share, and how a client command ends.

Where the daemon is (``--endpoint``, or the query endpoint of ``--config``), how long to wait
(``--timeout``), and CURVE (``--server-key``/``--client-cert``, or ``--config``'s ``[security]``);
for the commands that also use the subscribe endpoint, where that is (``--subscribe-endpoint``,
``--config``'s, or asked of the daemon ``--endpoint`` names).
``run_command`` ends a command quietly when its reader goes away (``eventagg events | head``).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import zmq

from transport.client import MAX_TIMEOUT_S, NoAnswer, QueryClient, QueryClientError, connectable
from transport.config import Config, ConfigError, QueryConfig, endpoint_problem, load_config
from transport.handshake import probe
from transport.security import SecurityError, SocketHook, curve_client, curve_client_from_config

PROBE_TIMEOUT_S = 1.0
T = TypeVar("T")


def endpoint_from_args(args: argparse.Namespace) -> str:
    """The query endpoint from --endpoint, --config, or the default."""
    if args.endpoint:
        return str(args.endpoint)
    if args.config:
        return connectable(load_config(args.config).query.bind)
    return connectable(QueryConfig().bind)


def utf8_text(text: str) -> str:
    """An argparse type: text as given, refused when its bytes are not UTF-8.

    Python hands such bytes over as lone surrogates (``\\udcff``), which no request can carry:
    taken, they failed at the first send, with msgpack's traceback or its words.
    """
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} holds a byte that is not UTF-8 (character {exc.start + 1}); give it in UTF-8"
        ) from None
    return text


def endpoint_url(text: str) -> str:
    """An argparse type: a ZeroMQ endpoint to connect to, refused with the reason otherwise."""
    problem = endpoint_problem(utf8_text(text))
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def seconds(text: str) -> float:
    """An argparse type: a number of seconds above 0 (a client waits that long at most, never for ever)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0 and at most {MAX_TIMEOUT_S}, not {text}")
    return value


def add_endpoint_args(parser: argparse.ArgumentParser) -> None:
    """The --endpoint/--config/--timeout flags shared by the query scripts."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--endpoint", type=endpoint_url, metavar="URL", help="query endpoint, e.g. tcp://127.0.0.1:5556")
    where.add_argument("--config", metavar="PATH", help="read the query endpoint from this config file")
    parser.add_argument(
        "--timeout", type=seconds, default=5.0, metavar="S", help="seconds to wait for an answer (default 5)"
    )
    parser.add_argument("--server-key", metavar="PATH", help="CURVE: the daemon's public certificate (server.key)")
    parser.add_argument(
        "--client-cert", metavar="PATH", help="CURVE: this client's secret certificate (NAME.key_secret)"
    )


def add_subscribe_endpoint_arg(parser: argparse.ArgumentParser, goes_with: str) -> None:
    """``--subscribe-endpoint``, for the commands that use the subscribe endpoint with ``goes_with``."""
    parser.add_argument(
        "--subscribe-endpoint",
        type=endpoint_url,
        metavar="URL",
        help=f"with {goes_with} (default: from --config; with --endpoint, asked of that daemon; else :5558)",
    )


def subscribe_endpoint_from_args(args: argparse.Namespace) -> str:
    """The subscribe endpoint from --subscribe-endpoint, --config, or the default; with only
    ``--endpoint`` given, :func:`subscribe_endpoint_of` asks that daemon instead.

    Raises :class:`ConfigError` for a bad config file.
    """
    if args.subscribe_endpoint:
        return str(args.subscribe_endpoint)
    return connectable((load_config(args.config) if args.config else Config()).subscribe.bind)


def asks_subscribe_endpoint(args: argparse.Namespace) -> bool:
    """Whether the subscribe endpoint must be asked of the daemon: only ``--endpoint`` names it."""
    return bool(args.endpoint) and not args.subscribe_endpoint


def subscribe_endpoint_of(client: QueryClient) -> str:
    """The subscribe endpoint of the daemon ``client`` queries, from its health reply: a wildcard
    host (``*``, 0.0.0.0, ``[::]``) becomes the host this client reached it by."""
    endpoints = client.request({"op": "health"}).get("endpoints")
    bind = endpoints.get("subscribe") if isinstance(endpoints, dict) else None
    if not isinstance(bind, str):
        raise QueryClientError(f"{client.endpoint} did not say its subscribe endpoint: pass --subscribe-endpoint")
    host, _, port = bind.removeprefix("tcp://").rpartition(":")
    if bind.startswith("tcp://") and host in ("*", "0.0.0.0", "[::]"):
        asked = client.endpoint
        reached = asked.removeprefix("tcp://").rpartition(":")[0] if asked.startswith("tcp://") else "127.0.0.1"
        return f"tcp://{reached}:{port}"
    return bind


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


def at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number of ``minimum`` or more (and at most ``maximum``, if given),
    refused by argparse with the flag's name otherwise (exit status 2)."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if maximum is not None and not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be from {minimum} to {maximum}, not {value}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, not {value}")
        return value

    return whole_number


def query_daemon(args: argparse.Namespace, command: str, ask: Callable[[QueryClient], T]) -> tuple[str, T]:
    """``ask`` a client for the daemon the flags name; returns the endpoint and the answer.

    As every query command does, a bad config or key file ends the command with 2, and no
    answer with 1, each after a line on stderr that begins with ``command`` and says why.
    """
    try:
        endpoint = endpoint_from_args(args)
        secure = curve_from_args(args)
    except (ConfigError, SecurityError) as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        with QueryClient(endpoint, timeout=args.timeout, configure=secure) as client:
            return endpoint, ask(client)
    except QueryClientError as exc:
        print(f"{command}: {explain(exc, endpoint, secure)}", file=sys.stderr)
        raise SystemExit(1) from None


def explain(exc: QueryClientError, endpoint: str, configure: SocketHook | None) -> str:
    """The error to print for a failed query: for no answer, whether the daemon refused this
    client's CURVE handshake or took no connection at all (its answer alone cannot tell)."""
    if isinstance(exc, NoAnswer):
        problem = probe(endpoint, zmq.REQ, configure, PROBE_TIMEOUT_S)
        if problem is not None:
            return f"no answer from {endpoint}: it {problem}"
    return str(exc)


def prefix_library_logs(command: str) -> None:
    """Print the client library's warnings (a subscriber reconnecting, a reply it ignores) as the
    command's own lines, ``command: message``, not bare as Python's fallback prints them."""
    logging.basicConfig(format=f"{command}: %(message)s", level=logging.WARNING)


def run_command(main: Callable[[], int], closed_pipe_status: int = 0) -> int:
    """Run a command's ``main``; a reader that goes away early (``| head``) ends it quietly with
    ``closed_pipe_status`` (0), and Ctrl-C with 130.

    Without this, the first write after the reader has gone raises BrokenPipeError: a traceback
    where ``cat`` would say nothing. Output to a full disk ends with a line saying so and 1.
    """
    try:
        code = main()
        sys.stdout.flush()  # here, where the error can be caught, rather than at exit
    except KeyboardInterrupt:
        return 130  # Ctrl-C: end quietly with the status a shell gives SIGINT, not a traceback
    except BrokenPipeError:
        # Python flushes stdout once more on its way out: point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return closed_pipe_status
    except OSError as exc:
        if exc.errno not in _CANNOT_WRITE:
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"cannot write the output: {exc.strerror}; free some space or write elsewhere", file=sys.stderr)
        return 1
    return code


def write_output(write: Callable[[], None], status: int) -> int:
    """Print a command's output with ``write`` once its work is done, and return its ``status``:
    a reader gone (``| head``) does not change it (the work is done), a full disk makes it 1."""

    def written() -> int:
        write()
        return status

    return run_command(written, closed_pipe_status=status)


# SIGTERM (a service manager, `timeout`) and SIGHUP (a closing terminal): a command ends on them
# as on Ctrl-C, printing what it would then.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
stopped_by: list[int] = []  # the first stop signal (SIGINT included) this process got


def interrupt_on_stop(signum: int, frame: Any) -> None:
    """A handler for :data:`STOP_SIGNALS` that raises KeyboardInterrupt, as Ctrl-C does, once:
    systemd sends SIGTERM and SIGHUP together, and a second interrupt landing in the command's
    clean-up (a named consumer's last acknowledgement, a summary) would lose it."""
    if not stopped_by:
        stopped_by.append(signum)
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    raise KeyboardInterrupt


# A write that failed for want of room: said in a line, not a traceback.
_CANNOT_WRITE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
