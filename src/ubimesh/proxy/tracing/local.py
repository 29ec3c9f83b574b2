"""Who reports the spans: this process's node (Envoy's LocalInfo).

Kept apart from the span code so that the server can record the node without loading tracing.
"""

from __future__ import annotations

from ubimesh.proxy.snapshot.types import NodeInfo
from ubimesh.runtime.netinfo import first_non_loopback_ipv4


class LocalInfo:
    """Who reports the spans: the node (Envoy's LocalInfo) and the address spans carry."""

    __slots__ = ("ipv4", "node_id", "service", "zone")

    def __init__(self, node_id: str = "", service: str = "", zone: str = "") -> None:
        self.node_id = node_id
        self.service = service
        """The local service name: node.cluster (``--service-cluster``), as Envoy's."""
        self.zone = zone
        self.ipv4 = ""


LOCAL = LocalInfo()


def set_local_node(node: NodeInfo) -> None:
    """Record this process's node (the server calls it with each snapshot)."""
    LOCAL.node_id = node.id
    LOCAL.service = node.cluster


def local_ipv4() -> str:
    """The address spans report for this proxy (Envoy's: the first non-loopback IPv4)."""
    if not LOCAL.ipv4:
        LOCAL.ipv4 = first_non_loopback_ipv4()
    return LOCAL.ipv4
