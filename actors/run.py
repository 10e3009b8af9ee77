"""``eventagg run`` (and ``scripts/aggregatord.py``): run the eventagg daemon in the foreground.

``run [--config PATH]``.

Logs go to stderr. SIGINT or SIGTERM stop it cleanly (stop reading, finish what is queued,
commit, close, exit 0); SIGHUP reloads the log level. A configuration it refuses exits 2 (a bad
key or value, an unsafe bind, a key file missing or unsafe, an endpoint this machine cannot bind as
written: a missing ipc:// folder, an address it does not have); a start that failed otherwise (a
port in use, the database) exits 1. Those errors begin with the command as it was typed,
``eventagg run:``, or ``aggregatord:`` for the script.
"""

from __future__ import annotations

import argparse
import logging
import sys

from actors.daemon import ConfigRefused, Daemon, StartupError
from actors.store import StorageError, StorageRefused
from transport.config import ConfigError, expand_environment, load_config
from transport.logs import setup_logging


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Run the eventagg daemon in the foreground.")
    parser.add_argument("--config", metavar="PATH", help="config file (default: built-in defaults, as in config.toml)")
    args = parser.parse_args(argv)
    # The command the operator typed: `eventagg run` passes its prog; the script keeps its old name.
    name = prog or "aggregatord"
    try:
        config = expand_environment(load_config(args.config))
    except ConfigError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log.level)
    daemon = Daemon(config)
    try:
        return daemon.run()
    except (ConfigRefused, StorageRefused) as exc:
        logging.getLogger(name).critical("cannot start: %s", exc)
        return 2  # as for a config that does not parse: systemd does not restart it (RestartPreventExitStatus)
    except (StartupError, StorageError) as exc:
        logging.getLogger(name).critical("cannot start: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
