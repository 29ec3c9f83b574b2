"""Shared pieces for hand-written Envoy-style bootstrap configs in tests."""

from __future__ import annotations

from typing import Any

from tests.support.procs import LOOPBACK

HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
    ".HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
FILE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


def address(port: int, host: str = LOOPBACK) -> dict[str, Any]:
    """A ``socket_address`` for ``host:port``."""
    return {"socket_address": {"address": host, "port_value": port}}


def static_cluster(
    name: str,
    endpoints: list[tuple[str, int]] | list[int],
    connect_timeout: str = "0.25s",
    **extra: Any,
) -> dict[str, Any]:
    """A STATIC cluster with one locality holding ``endpoints``.

    Each endpoint is a port on loopback or a ``(host, port)`` pair; ``extra`` adds
    further cluster fields (``lb_policy``, ``circuit_breakers``, ...).
    """
    hosts = [address(e) if isinstance(e, int) else address(e[1], e[0]) for e in endpoints]
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": a}} for a in hosts]}],
        },
        **extra,
    }
