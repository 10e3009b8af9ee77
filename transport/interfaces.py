"""This machine's network interfaces by name, as a ZeroMQ bind may give one (``tcp://eth0:5555``).

A bind takes an interface's name where a client cannot connect to it: :func:`interface_ipv4`
gives the address a client connects to instead (Linux's ``SIOCGIFADDR``; None elsewhere, or for
a name that is no interface here).
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct

_SIOCGIFADDR = 0x8915  # Linux: an interface's (first) IPv4 address


def interface_names() -> frozenset[str]:
    """The names of this machine's network interfaces (empty where the system cannot say)."""
    try:
        return frozenset(name for _index, name in socket.if_nameindex())
    except OSError:
        return frozenset()


def interface_ipv4(name: str) -> str | None:
    """The IPv4 address of interface ``name``, or None (no such interface, none held, not Linux)."""
    if name not in interface_names():
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe, contextlib.suppress(OSError):
        answer = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        return socket.inet_ntoa(answer[20:24])
    return None
