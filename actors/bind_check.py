"""Whether the daemon's endpoints can be bound, asked before anything is opened.

The sockets themselves are bound late, by the servers that own them, once the actors they feed
are up: so a start that cannot bind would already have created (or migrated) the database. This
check binds and closes a plain socket on each TCP endpoint (with ``SO_REUSEADDR``, as libzmq
does, so a port in TIME_WAIT passes) and looks for each ``ipc://`` path's folder, and whether
this user may make the socket file in it. It can miss a
port taken a moment later; the real bind still reports that one.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from transport.config import tcp_host_port


def bind_problem(endpoint: str) -> OSError | None:
    """What binding ``endpoint`` would fail with, or None when it looks free (or cannot be told:
    an interface name, an ephemeral port, another transport)."""
    transport, _, address = endpoint.partition("://")
    if transport == "ipc":
        folder = Path(address).parent
        if address.startswith("@"):  # Linux's abstract namespace: no folder
            return None
        if not folder.is_dir():
            return OSError(errno.ENOENT, f"No such file or directory for ipc path {address!r}")
        if not os.access(folder, os.W_OK | os.X_OK):  # the socket file is made in it
            return OSError(errno.EACCES, f"Permission denied for ipc path {address!r}")
        return None
    place = tcp_host_port(endpoint) if transport == "tcp" else None
    if place is None:
        return None
    host, port = place
    if not port.isdigit() or int(port) == 0:
        return None
    # As libzmq without ZMQ_IPV6 (the daemon's sockets): IPv4 for a name or *, IPv6 only for a literal.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        found = socket.getaddrinfo(
            None if host == "*" else host, int(port), family, socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return None  # an interface name: libzmq resolves those itself
    for family, kind, proto, _name, where in found[:1]:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(where)
            except OSError as exc:
                return OSError(exc.errno, f"{os.strerror(exc.errno or 0)} ({endpoint})")
    return None
