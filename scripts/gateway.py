#!/usr/bin/env python3
"""Run the HTTP gateway: ``eventagg gateway`` (transport/commands/gateway.py), same flags.

Runs with the python where eventagg is installed with its gateway extra.
"""

import sys

try:
    from transport.commands.gateway import main
except ModuleNotFoundError as exc:  # a python without eventagg, such as plain python3 on a fresh checkout
    sys.exit(
        f"gateway.py: {exc}: run it with the python eventagg is installed in, or run `eventagg gateway`"
        " from there: .venv/bin/eventagg gateway (python3 scripts/dev.py run makes .venv)"
        " or /opt/eventagg/venv/bin/eventagg gateway"
    )
except KeyboardInterrupt:  # Ctrl-C while it loads: nothing began
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
