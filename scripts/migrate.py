#!/usr/bin/env python3
"""Migrate a PostgreSQL database's schema, taking as long as it needs: ``eventagg migrate``
(actors/migrate.py), same flags.

Runs with the python where eventagg is installed (the project's .venv, or /opt/eventagg/venv).
"""

import sys

try:
    from actors.migrate import main
except ModuleNotFoundError as exc:  # a python without eventagg, such as plain python3 on a fresh checkout
    sys.exit(
        f"migrate.py: {exc}: run it with the python eventagg is installed in, or run `eventagg migrate`"
        " from there: .venv/bin/eventagg migrate (python3 scripts/dev.py run makes .venv)"
        " or /opt/eventagg/venv/bin/eventagg migrate"
    )
except KeyboardInterrupt:  # Ctrl-C while it loads: nothing began
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
