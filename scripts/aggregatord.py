#!/usr/bin/env python3
"""Run the daemon in the foreground: ``eventagg run`` (actors/run.py), same flags.

Runs with the python where eventagg is installed (the project's .venv, or /opt/eventagg/venv).
"""

import sys

from actors.run import main

if __name__ == "__main__":
    sys.exit(main())
