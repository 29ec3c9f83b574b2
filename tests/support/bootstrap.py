"""Shared pieces for hand-written Envoy-style bootstrap configs in tests."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.procs import LOOPBACK, ManagedProcess, free_ports, start_envoy, start_ubimesh

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


def listener(name: str, port: int, network_filter: dict[str, Any]) -> dict[str, Any]:
    """A listener on loopback ``port`` with one filter chain holding ``network_filter``."""
    return {
        "name": name,
        "address": address(port),
        "filter_chains": [{"filters": [network_filter]}],
    }


@dataclass
class Proxy:
    """One of the pair :func:`proxy_pair` starts: ``envoy`` or ``ubimesh``, its ports by role."""

    name: str
    ports: dict[str, int]
    proc: ManagedProcess


@contextlib.contextmanager
def proxy_pair(
    work: Path,
    listeners: Sequence[str],
    bootstrap: Callable[[str, dict[str, int]], dict[str, Any]],
) -> Iterator[list[Proxy]]:
    """Envoy and ``ubimesh proxy`` on the same bootstrap, each with its own ports; stopped on exit.

    ``bootstrap(name, ports)`` renders one proxy's config; ``ports`` maps ``"admin"`` and each
    of ``listeners`` to a free port.  The proxies started so far are stopped if one fails.
    """
    proxies: list[Proxy] = []
    try:
        for name, start in (("envoy", start_envoy), ("ubimesh", start_ubimesh)):
            ports = dict(zip(("admin", *listeners), free_ports(len(listeners) + 1), strict=True))
            path = work / f"{name}.json"
            path.write_text(json.dumps(bootstrap(name, ports)))
            proc = start(path, ports["admin"], [ports[n] for n in listeners], work)
            proxies.append(Proxy(name, ports, proc))
        yield proxies
    finally:
        for proxy in proxies:
            proxy.proc.stop()
