"""Facts about this machine's network interfaces that the proxy needs once, at start.

Envoy appends "the local address" to x-forwarded-for when a request arrives from a loopback
peer with use_remote_address set: the first non-loopback address of the host (Envoy's
``Network::Utility::getLocalAddress``). This module finds that address the same way, through
the interface list, and caches it.
"""

from __future__ import annotations

import fcntl
import functools
import socket
import struct

_SIOCGIFADDR = 0x8915


def _interface_ipv4(name: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


@functools.lru_cache(maxsize=1)
def first_non_loopback_ipv4() -> str:
    """The first IPv4 address of a non-loopback interface, or 127.0.0.1 when there is none."""
    for _, name in socket.if_nameindex():
        addr = _interface_ipv4(name)
        if addr is not None and not addr.startswith("127."):
            return addr
    return "127.0.0.1"
