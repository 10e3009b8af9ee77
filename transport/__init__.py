"""The daemon's edges: wire format, event schema, sockets, configuration and client libraries."""
