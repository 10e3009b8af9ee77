#!/usr/bin/env python3
"""Create CURVE certificates: ``eventagg keys`` (transport/commands/keys.py), same flags.

Runs with the python where eventagg is installed (the project's .venv, or /opt/eventagg/venv).
"""

import sys

from transport.commands.keys import main

if __name__ == "__main__":
    sys.exit(main())
