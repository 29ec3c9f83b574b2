"""An upstream host: one resolved endpoint of a cluster, with its live per-host state.

The load balancer reads ``weight``, ``priority``, ``healthy`` and ``active_requests``; the HTTP
router owns ``pool`` (its HTTP/1.1 connection pool for this host) and keeps ``active_requests``
up to date (incremented when a request is sent to the host, decremented when it ends), which
LEAST_REQUEST needs.
"""

from __future__ import annotations

from typing import Any

from ubimesh.proxy.snapshot.types import Locality, SocketAddress
from ubimesh.proxy.upstream.outlier import HostMonitor


class Host:
    __slots__ = (
        "active_requests",
        "address",
        "cluster_name",
        "healthy",
        "hostname",
        "locality",
        "locality_weight",
        "outlier",
        "pool",
        "priority",
        "weight",
    )

    def __init__(
        self,
        address: SocketAddress,
        *,
        cluster_name: str = "",
        hostname: str = "",
        weight: int = 1,
        priority: int = 0,
        locality: Locality | None = None,
        locality_weight: int | None = None,
        healthy: bool = True,
    ) -> None:
        self.address = address
        """Resolved IP address and port (never a DNS name)."""
        self.cluster_name = cluster_name
        self.hostname = hostname
        """The endpoint's hostname (DNS name it came from, or endpoint.hostname)."""
        self.weight = weight
        self.priority = priority
        self.locality = locality or Locality()
        self.locality_weight = locality_weight
        self.healthy = healthy
        self.active_requests = 0
        self.pool: Any = None
        self.outlier: HostMonitor | None = None
        """Outlier detection's monitor of this host (see ``outlier.py``); None when off."""

    def __repr__(self) -> str:
        return f"Host({self.cluster_name}:{self.address})"
