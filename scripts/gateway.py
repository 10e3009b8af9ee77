#!/usr/bin/env python3
"""Run the HTTP gateway: ``eventagg gateway`` (transport/commands/gateway.py), same flags.

Runs with the python where eventagg is installed with its gateway extra.
"""

import sys

from transport.commands.gateway import main

if __name__ == "__main__":
    sys.exit(main())
