"""What publishers and clients share with the daemon: wire format, event schema, config, the publisher
library, the query client, CURVE, and the client commands (``transport.commands``). It never imports ``actors``.
"""
