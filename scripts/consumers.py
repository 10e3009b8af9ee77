#!/usr/bin/env python3
"""List the named consumers and their lag: ``eventagg consumers`` (transport/commands/consumers.py), same flags.

Runs with the python where eventagg is installed (the project's .venv, or /opt/eventagg/venv).
"""

import sys

try:
    from transport.commands.client_flags import run_command
    from transport.commands.consumers import main
except ModuleNotFoundError as exc:  # a python without eventagg, such as plain python3 on a fresh checkout
    sys.exit(
        f"consumers.py: {exc}: run it with the python eventagg is installed in, or run `eventagg consumers`"
        " from there: .venv/bin/eventagg consumers (python3 scripts/dev.py run makes .venv)"
        " or /opt/eventagg/venv/bin/eventagg consumers"
    )
except KeyboardInterrupt:  # Ctrl-C while it loads: nothing began
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(run_command(main))
