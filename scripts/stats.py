#!/usr/bin/env python3
"""Print the daemon's stats: ``eventagg stats`` (transport/commands/stats.py), same flags.

Runs with the python where eventagg is installed (the project's .venv, or /opt/eventagg/venv).
"""

import sys

try:
    from transport.commands.client_flags import run_command
    from transport.commands.stats import main
except ModuleNotFoundError as exc:  # a python without eventagg, such as plain python3 on a fresh checkout
    sys.exit(
        f"stats.py: {exc}: run it with the python eventagg is installed in, or run `eventagg stats`"
        " from there: .venv/bin/eventagg stats (python3 scripts/dev.py run makes .venv)"
        " or /opt/eventagg/venv/bin/eventagg stats"
    )
except KeyboardInterrupt:  # Ctrl-C while it loads: nothing began
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(run_command(main))
