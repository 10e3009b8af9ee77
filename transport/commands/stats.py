"""``eventagg stats`` (and ``scripts/stats.py``): print the daemon's stats.

``stats [--endpoint URL | --config PATH] [--json] [--timeout S]``.

With CURVE on, add ``--server-key server.key --client-cert NAME.key_secret`` (or set
``[security] server_public_key`` and ``client_certificate`` in the file given to ``--config``).

Exits 0 with the stats, or non-zero with a message on stderr within the timeout when no daemon
answers. With ``--json``, stdout holds exactly one JSON document. A problem the daemon's health
reports (a failing commit, a full disk) is said on stderr beside the stats.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from transport.client import NoAnswer, QueryClient
from transport.commands.client_flags import add_endpoint_args, query_daemon, run_command

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
    "in_flight_peak",
    "buffered",
    "commits",
    "decoder_restarts",
    "uptime_s",
)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Print the eventagg daemon's stats.")
    add_endpoint_args(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    args = parser.parse_args(argv)

    def ask(client: QueryClient) -> tuple[dict[str, Any], Any]:
        # The counters alone do not show a daemon in trouble (a failing commit leaves in_flight
        # stuck and nothing else): its health's sentence goes to stderr.
        stats = client.call({"op": "stats"})
        try:
            return stats, client.request({"op": "health"}).get("error")
        except NoAnswer:  # the counters came: print them, and say that health did not
            return stats, f"its health did not answer within {client.timeout:g} s"

    endpoint, (stats, problem) = query_daemon(args, "stats", ask)
    if problem:
        print(f"stats: the daemon reports a problem: {problem} (eventagg health says more)", file=sys.stderr)
    if args.json:
        print(json.dumps(stats, sort_keys=True))
        return 0
    print(f"eventagg at {endpoint}")
    print("\n".join(table(stats)))
    return 0


def table(stats: dict[str, Any], indent: str = "  ") -> list[str]:
    """One line a figure, the known ones first in :data:`ORDER`; a nested map (``cluster`` on
    PostgreSQL) as a titled block of its own, indented one step more."""
    keys = [k for k in ORDER if k in stats] + sorted(k for k in stats if k not in ORDER)
    flat = [k for k in keys if not isinstance(stats[k], dict)]
    width = max((len(k) for k in flat), default=0)
    lines = []
    for key in flat:
        value = stats[key]
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        lines.append(f"{indent}{key:<{width}}  {shown:>14}")
    for key in keys:
        if isinstance(stats[key], dict):
            lines.append(f"{indent}{key}:")
            lines.extend(table(stats[key], indent + "  "))
    return lines


if __name__ == "__main__":
    sys.exit(run_command(main))
