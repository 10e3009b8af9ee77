#!/usr/bin/env python3
"""Say whether the daemon is well: ``eventagg health`` (transport/commands/health.py), same flags.

Runs with the python where eventagg is installed (the project's .venv, or /opt/eventagg/venv).
"""

import sys

try:
    from transport.commands.client_flags import run_command
    from transport.commands.health import main
except ModuleNotFoundError as exc:  # a python without eventagg, such as plain python3 on a fresh checkout
    sys.exit(
        f"health.py: {exc}: run it with the python eventagg is installed in, or run `eventagg health`"
        " from there: .venv/bin/eventagg health (python3 scripts/dev.py run makes .venv)"
        " or /opt/eventagg/venv/bin/eventagg health"
    )
except KeyboardInterrupt:  # Ctrl-C while it loads: nothing began
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(run_command(main))
