"""The client commands of ``eventagg`` (``stats``, ``health``, ``events``, ``publish``, ``keys``,
``gateway``): argument parsing and output.

Each module has ``main(argv, prog)``; ``actors.cli`` dispatches to it and ``scripts/<name>.py``
is a thin wrapper around it, so both take the same flags and behave the same.
"""
