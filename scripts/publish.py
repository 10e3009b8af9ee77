#!/usr/bin/env python3
"""Send a deterministic stream of events: ``eventagg publish`` (transport/commands/publish.py), same flags.

Runs with the python where eventagg is installed (the project's .venv, or /opt/eventagg/venv).
"""

import sys

from transport.commands.publish import main

if __name__ == "__main__":
    sys.exit(main())
