"""The daemon: Pykka actors that order, deduplicate, store and report events.

The walk of a batch: ``ingest`` (a thread; frames decoded by the ``decoder`` process) →
``router`` (by topic) → ``ordering`` (copies set aside, reorder window, seqs; ``reorder``) →
``dedup`` (the only SQLite writer; ``store`` has the schema, writer and read side) → acks.
Beside it, ``query_server`` asks ``stats``. ``daemon`` is the composition root, ``watchdog``
its liveness pings, ``run`` the ``eventagg run`` command and ``cli`` the ``eventagg`` command.
"""
