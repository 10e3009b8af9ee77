"""``eventagg consumers`` (and ``scripts/consumers.py``): the named consumers and how far behind each is.

``consumers [--endpoint URL | --config PATH] [--json] [--timeout S]``.

Asks the daemon's ``consumers`` query (docs/subscribe.md) and prints one line a named consumer:
its topic (``*`` for every topic), the position it acknowledged, its ``lag`` (how far the head
is past that position; negative when the position is past the head) and when it last
acknowledged, in UTC. With ``--json``, stdout holds exactly one JSON document, the daemon's
reply. Exits 0, 1 when no daemon answers, 2 for a bad flag.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from transport.commands.client_flags import add_endpoint_args, query_daemon, run_command
from transport.commands.tables import table

COLUMNS = ("name", "topic", "position", "lag", "acknowledged_at")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="List the named consumers and their lag.")
    add_endpoint_args(parser)
    parser.add_argument("--json", action="store_true", help="print the daemon's reply as one JSON document")
    args = parser.parse_args(argv)
    endpoint, reply = query_daemon(args, "consumers", lambda client: client.call({"op": "consumers"}))
    if args.json:
        print(json.dumps(reply, sort_keys=True))
        return 0
    consumers = reply.get("consumers", [])
    print(f"eventagg at {endpoint}: {len(consumers):,} named consumer{'' if len(consumers) == 1 else 's'}")
    if consumers:
        print("\n".join(table([_shown(consumer) for consumer in consumers], COLUMNS)))
    return 0


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
