"""Cluster active health checks (envoy.config.core.v3.HealthCheck): the supported part.

Filled in by the translator (``xds/health_check.py``) and run by ``upstream/health_check.py``.
Durations are float seconds; defaults are Envoy's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HttpHealthCheck:
    """HealthCheck.HttpHealthCheck (HTTP/1.1)."""

    path: str
    host: str = ""
    """The Host header; empty means the cluster's name, as in Envoy."""
    method: str = "GET"
    expected_statuses: tuple[tuple[int, int], ...] = ((200, 201),)
    """Half-open ranges ``[start, end)``; a status in one of them passes."""
    retriable_statuses: tuple[tuple[int, int], ...] = ()
    """Failing statuses that count toward ``unhealthy_threshold`` like network failures
    instead of failing the host at once."""
    receive: tuple[bytes, ...] = ()
    """Payloads that must appear, in this order, in the first ``response_buffer_size`` bytes
    of the body."""
    response_buffer_size: int = 1024


@dataclass(frozen=True, slots=True)
class TcpHealthCheck:
    """HealthCheck.TcpHealthCheck: connect, write ``send``, and expect ``receive`` (each
    payload in order) back; with neither, a connect alone passes."""

    send: bytes = b""
    receive: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class HealthCheck:
    timeout: float
    interval: float
    unhealthy_threshold: int
    healthy_threshold: int
    http: HttpHealthCheck | None = None
    tcp: TcpHealthCheck | None = None
    initial_jitter: float = 0.0
    interval_jitter: float = 0.0
    interval_jitter_percent: int = 0
    no_traffic_interval: float = 60.0
    no_traffic_healthy_interval: float | None = None
    """None: ``no_traffic_interval``."""
    unhealthy_interval: float | None = None
    """None: ``interval``."""
    unhealthy_edge_interval: float | None = None
    """None: ``unhealthy_interval``."""
    healthy_edge_interval: float | None = None
    """None: ``interval``."""
    reuse_connection: bool = True
    alt_port: int = 0
    """Check this port instead of the host's (0: the host's port)."""
