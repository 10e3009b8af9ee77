"""The daemon's inside: Pykka actors that route, order, deduplicate, store and report events."""
