"""``eventagg topics`` (and ``scripts/topics.py``): every topic with its counts.

``topics [--endpoint URL | --config PATH] [--json] [--timeout S]``.

Asks the daemon's ``topics`` query (docs/protocol.md) and prints one line a topic, by name:
how many of its events are stored now, the seqs they run from and to, and what it received,
dropped as duplicates, stored late and lost to retention. With ``--json``, stdout holds exactly
one JSON document, the daemon's reply. Exits 0, 1 when no daemon answers, 2 for a bad flag.
"""

from __future__ import annotations

import argparse
import json
import sys

from transport.commands.client_flags import add_endpoint_args, query_daemon, run_command
from transport.commands.tables import table

COLUMNS = ("topic", "count", "first_seq", "last_seq", "received", "duplicate_dropped", "late", "expired")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="List every topic with its counts.")
    add_endpoint_args(parser)
    parser.add_argument("--json", action="store_true", help="print the daemon's reply as one JSON document")
    args = parser.parse_args(argv)
    endpoint, reply = query_daemon(args, "topics", lambda client: client.call({"op": "topics"}))
    if args.json:
        print(json.dumps(reply, sort_keys=True))
        return 0
    topics = reply.get("topics", [])
    print(f"eventagg at {endpoint}: {len(topics):,} topic{'' if len(topics) == 1 else 's'}")
    if topics:
        print("\n".join(table(topics, COLUMNS)))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
