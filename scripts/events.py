#!/usr/bin/env python3
"""List stored events as JSON Lines: ``eventagg events`` (transport/commands/events.py), same flags.

Runs with the python where eventagg is installed (the project's .venv, or /opt/eventagg/venv).
"""

import sys

from transport.commands.client_flags import run_command
from transport.commands.events import main

if __name__ == "__main__":
    sys.exit(run_command(main))
