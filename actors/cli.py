"""The ``eventagg`` console command: ``eventagg COMMAND [ARGS]``, one subcommand per tool.

Each subcommand is a module with ``main(argv, prog)``: ``run`` is the daemon (:mod:`actors.run`);
the client commands live in :mod:`transport.commands`, which publishers and operators share.
``scripts/<name>.py`` call the same functions, so ``eventagg stats --json`` and
``scripts/stats.py --json`` are one program. A command's module is imported only when it runs,
so ``eventagg stats`` does not load the daemon. To add a command, add a row to :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One subcommand: the module whose ``main(argv, prog)`` runs it, and a line of help."""

    module: str
    help: str
    #: Query commands print as they go; a reader that leaves early (``| head``) ends them quietly.
    quiet_on_broken_pipe: bool = False


COMMANDS: dict[str, Command] = {
    "run": Command("actors.run", "run the daemon in the foreground (scripts/aggregatord.py)"),
    "stats": Command("transport.commands.stats", "print the daemon's stats", quiet_on_broken_pipe=True),
    "health": Command(
        "transport.commands.health", "say whether the daemon is well, and why not", quiet_on_broken_pipe=True
    ),
    "events": Command("transport.commands.events", "list stored events as JSON Lines", quiet_on_broken_pipe=True),
    "topics": Command("transport.commands.topics", "list every topic with its counts", quiet_on_broken_pipe=True),
    "consumers": Command(
        "transport.commands.consumers", "list the named consumers and their lag", quiet_on_broken_pipe=True
    ),
    "publish": Command("transport.commands.publish", "send a deterministic stream of events (load and smoke tests)"),
    "keys": Command("transport.commands.keys", "create CURVE certificates"),
    "migrate": Command("actors.migrate", "migrate a PostgreSQL database's schema, taking as long as it needs"),
    "gateway": Command("transport.commands.gateway", "run the HTTP gateway (needs the gateway extra)"),
}


def parser() -> argparse.ArgumentParser:
    """The top-level parser: it lists the commands; each command parses its own arguments."""
    top = argparse.ArgumentParser(
        prog="eventagg",
        description="eventagg: a ZeroMQ event aggregator. `eventagg COMMAND --help` shows a command's flags.",
    )
    top.add_argument("--version", action="version", version=f"eventagg {_version()}")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        commands.add_parser(name, help=command.help, add_help=False)
    return top


def _version() -> str:
    """The installed package's version (a checkout run without installing says so)."""
    try:
        return importlib.metadata.version("eventagg")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: run `python3 scripts/dev.py run` to make .venv)"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in COMMANDS:
        parser().parse_args(args)  # prints the help, or names the unknown command, and exits
        return 2  # not reached
    name, rest = args[0], args[1:]
    command = COMMANDS[name]
    try:
        module = importlib.import_module(command.module)
    except KeyboardInterrupt:  # Ctrl-C while the command loads: nothing began
        return 130
    prog = f"eventagg {name}"
    if command.quiet_on_broken_pipe:
        from transport.commands.client_flags import run_command

        return run_command(lambda: int(module.main(rest, prog)))
    return int(module.main(rest, prog))


if __name__ == "__main__":
    sys.exit(main())
