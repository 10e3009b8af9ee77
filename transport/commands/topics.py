"""``eventagg topics`` (and ``scripts/topics.py``): every topic with its counts.

``topics [--endpoint URL | --config PATH] [--json] [--timeout S] [--after NAME] [--limit N]``.

Asks the daemon's ``topics`` query (docs/protocol.md) and prints one line a topic, by name:
how many of its events are stored now, the seqs they run from and to, and what it received,
dropped as duplicates, stored late and lost to retention. Every topic is read in pages of
10 000 (a daemon from before paged listings is asked for all at once); ``--after`` and
``--limit`` ask for one page, whose ``next`` ``--json`` shows (the table's first line says
``one page; the next: --after NAME``). With ``--json``, stdout holds
exactly one JSON document, ``{"topics": [...]}``. Exits 0, 1 when no daemon answers, 2 for a
bad flag.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from transport.client import QueryClient, QueryClientError
from transport.commands.client_flags import add_endpoint_args, at_least, query_daemon, run_command, utf8_text
from transport.commands.tables import table
from transport.queries import DEFAULT_LIMIT

COLUMNS = ("topic", "count", "first_seq", "last_seq", "received", "duplicate_dropped", "late", "expired")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="List every topic with its counts.")
    add_endpoint_args(parser)
    parser.add_argument("--json", action="store_true", help="print the daemon's reply as one JSON document")
    parser.add_argument(
        "--after", type=utf8_text, metavar="NAME", help="one page: the topics named after NAME (the 'next' of a page)"
    )
    parser.add_argument("--limit", type=at_least(1), metavar="N", help="one page: at most N topics")
    args = parser.parse_args(argv)
    if args.after is not None or args.limit is not None:
        page = {"op": "topics", "after": args.after or "", "limit": args.limit or DEFAULT_LIMIT}
        endpoint, reply = query_daemon(args, "topics", lambda client: client.call(page))
    else:
        endpoint, reply = query_daemon(args, "topics", every_topic)
    if args.json:
        print(json.dumps(reply, sort_keys=True))
        return 0
    topics = reply.get("topics", [])
    # One page (--after/--limit, capped by [query] max_limit) is said to be one, with the way to
    # the next: "3 topics" alone read as every topic there is.
    one_page = f" (one page; the next: --after {reply['next']})" if isinstance(reply.get("next"), str) else ""
    print(f"eventagg at {endpoint}: {len(topics):,} topic{'' if len(topics) == 1 else 's'}{one_page}")
    if topics:
        print("\n".join(table(topics, COLUMNS)))
    return 0


def every_topic(client: QueryClient) -> dict[str, Any]:
    """``{"topics": [...]}``, every topic, read a page at a time."""
    try:
        return {"topics": list(client.iter_topics())}
    except QueryClientError as exc:
        if "unknown field(s) after, limit for op 'topics'" not in str(exc):
            raise
        return client.call({"op": "topics"})  # a daemon from before paged listings


if __name__ == "__main__":
    sys.exit(run_command(main))
