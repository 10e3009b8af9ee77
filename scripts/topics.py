#!/usr/bin/env python3
"""List every topic with its counts: ``eventagg topics`` (transport/commands/topics.py), same flags.

Runs with the python where eventagg is installed (the project's .venv, or /opt/eventagg/venv).
"""

import sys

from transport.commands.client_flags import run_command
from transport.commands.topics import main

if __name__ == "__main__":
    sys.exit(run_command(main))
