#!/usr/bin/env python3
"""Create CURVE certificates: ``eventagg keys`` (transport/commands/keys.py), same flags.

Runs with the python where eventagg is installed (the project's .venv, or /opt/eventagg/venv).
"""

import sys

try:
    from transport.commands.keys import main
except ModuleNotFoundError as exc:  # a python without eventagg, such as plain python3 on a fresh checkout
    sys.exit(
        f"keys.py: {exc}: run it with the python eventagg is installed in, or run `eventagg keys`"
        " from there: .venv/bin/eventagg keys (python3 scripts/dev.py run makes .venv)"
        " or /opt/eventagg/venv/bin/eventagg keys"
    )
except KeyboardInterrupt:  # Ctrl-C while it loads: nothing began
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
