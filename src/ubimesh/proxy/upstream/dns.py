"""Name resolution for STRICT_DNS and LOGICAL_DNS clusters, with Envoy's dns_lookup_family.

Resolution goes through ``loop.getaddrinfo`` (the system resolver in a worker thread, like
Envoy's getaddrinfo resolver), so /etc/hosts and nsswitch apply. Families, as in Envoy:

* V4_ONLY / V6_ONLY: only that family.
* AUTO: IPv6 addresses if there are any, otherwise IPv4.
* V4_PREFERRED: IPv4 addresses if there are any, otherwise IPv6.
* ALL: every address, in the resolver's order.

getaddrinfo does not report TTLs, so ``respect_dns_ttl`` cannot be honoured: clusters are
refreshed every ``dns_refresh_rate``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from ubimesh.proxy.snapshot.types import DnsLookupFamily, SocketAddress


class DnsResolutionError(OSError):
    """A name did not resolve to any address of the requested family."""


def _literal(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return None


async def resolve(
    name: str, port: int, family: DnsLookupFamily, *, timeout: float | None = None
) -> list[SocketAddress]:
    """Addresses of ``name`` for ``family``, deduplicated, in resolver order.

    Raises ``DnsResolutionError`` (an OSError) when nothing usable comes back, ``TimeoutError``
    after ``timeout`` seconds, or the resolver's own ``socket.gaierror``.
    """
    literal = _literal(name)
    if literal is not None:
        if (family is DnsLookupFamily.V4_ONLY and literal.version != 4) or (
            family is DnsLookupFamily.V6_ONLY and literal.version != 6
        ):
            raise DnsResolutionError(f"{name} is not an address of family {family.name}")
        return [SocketAddress(str(literal), port)]
    if family is DnsLookupFamily.V4_ONLY:
        af = socket.AF_INET
    elif family is DnsLookupFamily.V6_ONLY:
        af = socket.AF_INET6
    else:
        af = socket.AF_UNSPEC
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        infos = await loop.getaddrinfo(
            name, port, family=af, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    v4: list[SocketAddress] = []
    v6: list[SocketAddress] = []
    every: list[SocketAddress] = []
    seen: set[str] = set()
    for fam, _, _, _, sockaddr in infos:
        ip = str(sockaddr[0])
        if ip in seen:
            continue
        seen.add(ip)
        addr = SocketAddress(ip, port)
        (v6 if fam == socket.AF_INET6 else v4).append(addr)
        every.append(addr)
    if family is DnsLookupFamily.V4_ONLY:
        out = v4
    elif family is DnsLookupFamily.V6_ONLY:
        out = v6
    elif family is DnsLookupFamily.AUTO:
        out = v6 or v4
    elif family is DnsLookupFamily.V4_PREFERRED:
        out = v4 or v6
    else:
        out = every
    if not out:
        raise DnsResolutionError(f"{name} has no address of family {family.name}")
    return out
