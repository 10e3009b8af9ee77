#!/usr/bin/env python3
"""Run the daemon in the foreground: ``eventagg run`` (actors/run.py), same flags.

Runs with the python where eventagg is installed (the project's .venv, or /opt/eventagg/venv).
"""

import sys

try:
    from actors.run import main
except KeyboardInterrupt:  # Ctrl-C while the daemon loads: nothing began
    sys.exit(130)
except ModuleNotFoundError as exc:  # a python without eventagg, such as plain python3 on a fresh checkout
    sys.exit(
        f"aggregatord.py: {exc}: run it with the python eventagg is installed in, or run `eventagg run`"
        " from there: .venv/bin/eventagg run (python3 scripts/dev.py run makes .venv)"
        " or /opt/eventagg/venv/bin/eventagg run"
    )

if __name__ == "__main__":
    sys.exit(main())
