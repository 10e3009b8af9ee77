"""Whether the daemon's endpoints can be bound, asked before anything is opened.

The sockets themselves are bound late, by the servers that own them, once the actors they feed
are up: so a start that cannot bind would already have created (or migrated) the database. This
check binds and closes a plain socket on each TCP endpoint (with ``SO_REUSEADDR``, as libzmq
does, so a port in TIME_WAIT passes) and looks for each ``ipc://`` path's folder, whether this
user may make the socket file in it, and what is at the path already (libzmq would delete it).
It can miss a port taken a moment later; the real bind still reports that one.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import stat
from pathlib import Path

from transport.config import BindPlace, tcp_host_port
from transport.interfaces import interface_ipv4, interface_names

IPC_PATH_MAX = 107  # a Unix socket's path, as libzmq takes it (sun_path less its NUL)


def _ipc_path_problem(address: str) -> OSError | None:
    """libzmq removes whatever is at an ipc path before it binds there: refuse a file that is not
    a socket (it would be deleted) and a socket something still answers on (another daemon's)."""
    try:
        mode = os.stat(address).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return OSError(exc.errno, f"{os.strerror(exc.errno or 0)} for ipc path {address!r}")
    if not stat.S_ISSOCK(mode):
        return OSError(errno.EEXIST, f"ipc path {address!r} is a file that is not a socket (binding would delete it)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(address)
        except OSError:
            return None  # a socket nobody listens on: left by a daemon that stopped
    return OSError(errno.EADDRINUSE, f"Address already in use (ipc path {address!r} is answered)")


_LOOPBACK = frozenset({"127.0.0.0/8", "::1"})  # every address lo may hold


def interface_hosts(name: str) -> frozenset[str]:
    """The addresses of interface ``name`` (its IPv4 address by ``SIOCGIFADDR``, its IPv6 ones from
    ``/proc/net/if_inet6``), with the name itself; for ``lo``, all of 127.0.0.0/8 and ::1. Empty
    when ``name`` is not an interface of this machine."""
    if name not in interface_names():
        return frozenset()
    hosts = {name}
    if name == "lo":
        hosts |= _LOOPBACK
    ipv4 = interface_ipv4(name)
    if ipv4 is not None:
        hosts.add(ipv4)
    with contextlib.suppress(OSError), open("/proc/net/if_inet6", encoding="ascii") as table:
        for line in table:
            fields = line.split()
            if len(fields) == 6 and fields[5] == name:
                hosts.add(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
    return frozenset(hosts)


def bind_place(endpoint: str) -> BindPlace | None:
    """Where ``endpoint`` would bind, resolved as libzmq would (the address of a host name, every
    address of an interface, the real path of an ipc file, as ``({endpoint}, "")``), for
    :func:`transport.config.colliding_binds`; None when it cannot be told."""
    transport, _, address = endpoint.partition("://")
    if transport == "ipc":
        return frozenset({endpoint if address.startswith("@") else f"ipc://{os.path.realpath(address)}"}), ""
    place = tcp_host_port(endpoint) if transport == "tcp" else None
    if place is None:
        return None
    host, port = place
    if not port.isdigit() or int(port) == 0:
        return None  # an ephemeral port: never the same as another
    if host == "*":
        return frozenset({"*"}), port
    interface = interface_hosts(host)
    if interface:
        # libzmq binds one of these; which one is its choice, so any of them is taken.
        return interface, port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        found = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return None  # cannot be told: the real bind reports it
    address = str(found[0][4][0])
    return frozenset({"*" if address in ("0.0.0.0", "::") else address}), port


def bind_problem(endpoint: str) -> OSError | None:
    """What binding ``endpoint`` would fail with, or None when it looks free (or cannot be told:
    an interface name, an ephemeral port, another transport)."""
    transport, _, address = endpoint.partition("://")
    if transport == "ipc":
        if len(address.encode()) > IPC_PATH_MAX:
            return OSError(errno.ENAMETOOLONG, f"ipc path {address!r} is longer than {IPC_PATH_MAX} bytes")
        folder = Path(address).parent
        if address.startswith("@"):  # Linux's abstract namespace: no folder
            return None
        if not folder.is_dir():
            return OSError(errno.ENOENT, f"No such file or directory for ipc path {address!r}")
        if not os.access(folder, os.W_OK | os.X_OK):  # the socket file is made in it
            return OSError(errno.EACCES, f"Permission denied for ipc path {address!r}")
        return _ipc_path_problem(address)
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
