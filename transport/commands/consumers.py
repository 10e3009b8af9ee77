"""``eventagg consumers`` (and ``scripts/consumers.py``): the named consumers and how far behind each is.

``consumers [--endpoint URL | --config PATH] [--json] [--timeout S] [--forget NAME]``.

Asks the daemon's ``consumers`` query (docs/subscribe.md) and prints one line a named consumer:
its topic (``*`` for every topic), the position it acknowledged, its ``lag`` (how far the head
is past that position; negative when the position is past the head) and when it last
acknowledged, in UTC. With ``--json``, stdout holds exactly one JSON document, the daemon's
reply.

``--forget NAME`` deletes a consumer's stored position (one that is gone for good, or a name to
use for another topic): it subscribes under that name on the subscribe endpoint and
unsubscribes with ``forget``, which the daemon answers once the deletion is committed. A
consumer still following under that name is ended (it is told ``replaced``).

Exits 0, 1 when no daemon answers (or NAME is not a named consumer), 2 for a bad flag.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

import msgpack
import zmq

from transport.client import QueryClient
from transport.commands.client_flags import (
    add_endpoint_args,
    add_subscribe_endpoint_arg,
    asks_subscribe_endpoint,
    curve_from_args,
    query_daemon,
    run_command,
    subscribe_endpoint_from_args,
    subscribe_endpoint_of,
    utf8_text,
)
from transport.commands.tables import table
from transport.config import ConfigError
from transport.security import SecurityError, SocketHook
from transport.subscriber import name_problem

COLUMNS = ("name", "topic", "position", "lag", "acknowledged_at")


class ForgetFailed(Exception):
    """The daemon did not forget the consumer; the message says why."""


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="List the named consumers and their lag.")
    add_endpoint_args(parser)
    parser.add_argument("--json", action="store_true", help="print the daemon's reply as one JSON document")
    parser.add_argument(
        "--forget",
        type=utf8_text,
        metavar="NAME",
        help="delete this named consumer's stored position (one following under it now is ended)",
    )
    add_subscribe_endpoint_arg(parser, "--forget")
    args = parser.parse_args(argv)
    forgetting = args.forget is not None
    if args.subscribe_endpoint and not forgetting:
        parser.error("--subscribe-endpoint goes with --forget")
    if forgetting and (problem := name_problem(args.forget)) is not None:
        parser.error(f"--forget: {problem}")

    def ask(client: QueryClient) -> tuple[dict[str, Any], str | None]:
        reply = client.call({"op": "consumers"})
        where = None
        if forgetting and asks_subscribe_endpoint(args):
            where = subscribe_endpoint_of(client)
        return reply, where

    endpoint, (reply, asked_where) = query_daemon(args, "consumers", ask)
    consumers = reply.get("consumers", [])
    if forgetting:
        return forget_command(args, consumers, asked_where)
    if args.json:
        print(json.dumps(reply, sort_keys=True))
        return 0
    print(f"eventagg at {endpoint}: {len(consumers):,} named consumer{'' if len(consumers) == 1 else 's'}")
    if consumers:
        print("\n".join(table([_shown(consumer) for consumer in consumers], COLUMNS)))
    return 0


def forget_command(args: argparse.Namespace, consumers: list[dict[str, Any]], asked_where: str | None) -> int:
    """``--forget NAME``: find it in ``consumers``, forget it, say so."""
    name = args.forget
    found = next((consumer for consumer in consumers if consumer.get("name") == name), None)
    if found is None:
        print(f"consumers: no named consumer {name!r} is stored (eventagg consumers lists them)", file=sys.stderr)
        return 1
    try:
        secure = curve_from_args(args)
        where = asked_where or subscribe_endpoint_from_args(args)
    except (ConfigError, SecurityError) as exc:
        print(f"consumers: {exc}", file=sys.stderr)
        return 2
    try:
        forget(where, name, found.get("topic"), args.timeout, secure)
    except ForgetFailed as exc:
        print(f"consumers: {name!r} not forgotten: {exc}", file=sys.stderr)
        return 1
    print(f"forgot named consumer {name!r} (it was at position {found.get('position')}, lag {found.get('lag')})")
    return 0


def forget(endpoint: str, name: str, topic: str | None, timeout: float, secure: SocketHook | None = None) -> None:
    """Delete ``name``'s stored position through the subscribe endpoint: subscribe under it (with
    its stored ``topic`` and no credit, so no event is sent), then unsubscribe with ``forget``.
    Raises :class:`ForgetFailed` on an error reply or no reply within ``timeout`` seconds."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if secure is not None:
        secure(sock)
    sock.connect(endpoint)
    deadline = time.monotonic() + timeout
    try:
        # after 0: a stored position past the head (see lag) would refuse the subscribe
        subscribe: dict[str, Any] = {"op": "subscribe", "name": name, "after": 0, "credit": 0}
        if topic is not None:
            subscribe["topic"] = topic
        sock.send(msgpack.packb(subscribe))
        _await(sock, "subscribed", deadline, endpoint)
        sock.send(msgpack.packb({"op": "unsubscribe", "forget": True}))
        _await(sock, "unsubscribed", deadline, endpoint)
    finally:
        sock.close()
        context.term()


def _await(sock: zmq.Socket[bytes], op: str, deadline: float, endpoint: str) -> dict[str, Any]:
    """The next message whose op is ``op`` (heartbeats and the like pass by); an error raises."""
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000) + 1, zmq.POLLIN):
            break
        try:
            message = msgpack.unpackb(sock.recv(), raw=False)
        except ValueError as exc:  # msgpack's errors derive from it
            raise ForgetFailed(f"{endpoint} sent a reply that is not msgpack ({exc})") from None
        if not isinstance(message, dict):
            continue
        if message.get("op") == "error":
            raise ForgetFailed(f"{message.get('code')}: {message.get('error')}")
        if message.get("op") == op:
            return message
    raise ForgetFailed(f"no {op!r} from {endpoint} in time: is this the daemon's subscribe endpoint?")


def _shown(consumer: dict[str, Any]) -> dict[str, Any]:
    updated = consumer.get("updated_at")
    at = (
        datetime.fromtimestamp(updated, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        if isinstance(updated, (int, float))
        else None
    )
    topic = consumer.get("topic")
    return {**consumer, "topic": "*" if topic is None else topic, "acknowledged_at": at}


if __name__ == "__main__":
    sys.exit(run_command(main))
