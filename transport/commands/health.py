"""``eventagg health`` (and ``scripts/health.py``): is the daemon well, and if not, why.

``health [--endpoint URL | --config PATH] [--json] [--timeout S]``.

Asks the daemon's ``health`` query (docs/protocol.md): whether every actor answers a ping and
the database takes writes. Prints ``ok`` or the daemon's own sentence saying what is wrong (a
failing commit, a full disk, an actor that stopped answering, a storage server that is down),
then the actors, the database and the endpoints. Exit status 0 when the daemon is well, 1 when
it reports a problem or does not answer, 2 for a bad flag or config: fit for a monitoring check.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from transport.commands.client_flags import add_endpoint_args, query_daemon, run_command


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Say whether the eventagg daemon is well, and why not.")
    add_endpoint_args(parser)
    parser.add_argument("--json", action="store_true", help="print the daemon's health reply as one JSON document")
    args = parser.parse_args(argv)
    endpoint, reply = query_daemon(args, "health", lambda client: client.request({"op": "health"}))
    if args.json:
        print(json.dumps(reply, sort_keys=True))
    else:
        print("\n".join(report(endpoint, reply)))
    return 1 if "error" in reply else 0


def report(endpoint: str, reply: dict[str, Any]) -> list[str]:
    """The health reply as lines: the verdict first, then what it is made of."""
    verdict = f"PROBLEM: {reply['error']}" if "error" in reply else str(reply.get("status", "ok"))
    lines = [f"eventagg at {endpoint}: {verdict}"]
    actors = reply.get("actors")
    if isinstance(actors, dict):
        lines.append(
            "  actors    " + ", ".join(f"{name} {'ok' if ok else 'NOT ANSWERING'}" for name, ok in actors.items())
        )
    for key in ("database", "decoding"):
        if key in reply:
            lines.append(f"  {key:<9} {reply[key]}")
    endpoints = reply.get("endpoints")
    if isinstance(endpoints, dict):
        lines.append("  endpoints " + ", ".join(f"{kind} {where}" for kind, where in endpoints.items()))
    return lines


if __name__ == "__main__":
    sys.exit(run_command(main))
