#!/usr/bin/env python3
"""List stored events: ``events.py [TOPIC] [--after S] [--limit N] [--endpoint URL | --config PATH]``.

Without a topic, every topic in commit order. Pages through the daemon with the cursor and
prints one JSON object per line (JSON Lines), so the output pipes into jq or a file. Values JSON
has no type for (bytes, non-string map keys, NaN, ...) are tagged as docs/storage-and-queries.md says.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import _bootstrap  # noqa: F401
from stats import add_endpoint_args, curve_from_args, endpoint_from_args, run_command

from transport.client import QueryClient, QueryClientError
from transport.config import ConfigError
from transport.jsonlines import to_json_line
from transport.security import SecurityError


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of ``minimum`` or more, refused by argparse with the flag's name otherwise."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, not {value}")
        return value

    return whole_number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="List a topic's stored events as JSON Lines.")
    parser.add_argument("topic", nargs="?", help="the topic (default: every topic, in commit order)")
    parser.add_argument(
        "--after", type=at_least(0), default=0, metavar="S", help="start after this seq (or commit position)"
    )
    parser.add_argument("--limit", type=at_least(0), default=None, metavar="N", help="print at most N events")
    parser.add_argument("--page", type=at_least(1), default=1000, metavar="N", help="events per request (default 1000)")
    add_endpoint_args(parser)
    args = parser.parse_args(argv)
    try:
        endpoint = endpoint_from_args(args)
        secure = curve_from_args(args)
    except (ConfigError, SecurityError) as exc:
        print(f"events: {exc}", file=sys.stderr)
        return 2
    if args.limit == 0:
        return 0
    page = args.page if args.limit is None else min(args.page, args.limit)
    printed = 0
    try:
        with QueryClient(endpoint, timeout=args.timeout, configure=secure) as client:
            for event in client.iter_events(args.topic, args.after, page):
                print(to_json_line(event))  # lossless for bytes, non-string keys, NaN, any depth
                printed += 1
                if args.limit is not None and printed >= args.limit:
                    break
    except QueryClientError as exc:
        print(f"events: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
