"""Circuit breakers at run time: one ``ResourceManager`` per cluster and routing priority.

Contract used by the router and the connection pool (Envoy's ResourceManager): before taking a
resource call ``can_create()``; when it says False the caller fails fast (503, flag UO) and
counts the overflow; otherwise ``inc()`` now and ``dec()`` exactly once when the resource ends.
"""

from __future__ import annotations

from ubimesh.proxy.snapshot.circuit_breakers import CircuitBreakers, Thresholds


class Resource:
    """A counted resource with a maximum (connections, pending requests, requests, retries)."""

    __slots__ = ("count", "max")

    def __init__(self, maximum: int) -> None:
        self.max = maximum
        self.count = 0

    def can_create(self) -> bool:
        return self.count < self.max

    def inc(self) -> None:
        self.count += 1

    def dec(self) -> None:
        self.count -= 1


class ResourceManager:
    """The four resources of one cluster at one routing priority."""

    __slots__ = ("connections", "pending_requests", "requests", "retries")

    def __init__(self, thresholds: Thresholds) -> None:
        self.connections = Resource(thresholds.max_connections)
        self.pending_requests = Resource(thresholds.max_pending_requests)
        self.requests = Resource(thresholds.max_requests)
        self.retries = Resource(thresholds.max_retries)


class ClusterResources:
    """``default`` and ``high``: the resource managers of routing priorities DEFAULT and HIGH."""

    __slots__ = ("default", "high")

    def __init__(self, config: CircuitBreakers) -> None:
        self.default = ResourceManager(config.default)
        self.high = ResourceManager(config.high)
