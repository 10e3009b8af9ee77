#!/usr/bin/env python3
"""List stored events as JSON Lines: ``eventagg events`` (transport/commands/events.py), same flags.

Runs with the python where eventagg is installed (the project's .venv, or /opt/eventagg/venv).
"""

import sys

try:
    from transport.commands.client_flags import run_command
    from transport.commands.events import main
except ModuleNotFoundError as exc:  # a python without eventagg, such as plain python3 on a fresh checkout
    sys.exit(
        f"events.py: {exc}: run it with the python eventagg is installed in, or run `eventagg events`"
        " from there: .venv/bin/eventagg events (python3 scripts/dev.py run makes .venv)"
        " or /opt/eventagg/venv/bin/eventagg events"
    )
except KeyboardInterrupt:  # Ctrl-C while it loads: nothing began
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(run_command(main))
