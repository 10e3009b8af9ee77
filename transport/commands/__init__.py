"""The client commands of ``eventagg`` (``stats``, ``events``, ``publish``, ``keys``): argument parsing and output.

Each module has ``main(argv, prog)``; ``actors.cli`` dispatches to it and ``scripts/<name>.py``
is a thin wrapper around it, so both take the same flags and behave the same.
"""
