"""An upstream host: one resolved endpoint of a cluster, with its live per-host state.

The load balancer reads ``weight``, ``priority``, ``health_flags`` and ``active_requests``; the
HTTP router owns ``pool`` (its HTTP/1.1 connection pool for this host) and keeps
``active_requests`` up to date (incremented when a request is sent to the host, decremented when
it ends), which LEAST_REQUEST needs.

Health is Envoy's set of health flags (``Host::HealthFlag``): each source of health keeps its own
bit (EDS ``health_status``, active health checking, outlier detection), so one source clearing
its bit never hides another's verdict. A host is *healthy* when no ``FAILED_*`` bit is set,
*degraded* when healthy with a ``DEGRADED_*`` bit, and *excluded* (left out of the load
balancer's percentages, as Envoy does) with ``EXCLUDED_VIA_IMMEDIATE_HC_FAIL`` or
``EDS_STATUS_DRAINING`` (EDS ``health_status: DRAINING``). Whoever changes
a flag calls the cluster's ``refresh()`` so that the balancer is rebuilt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ubimesh.proxy.snapshot.types import Locality, SocketAddress

if TYPE_CHECKING:
    from ubimesh.proxy.upstream.outlier import HostOutlier

# Envoy's Host::HealthFlag bits (envoy/upstream/host_description.h), in Envoy's order: the
# order /clusters prints them in.
FAILED_ACTIVE_HC = 0x1
FAILED_OUTLIER_CHECK = 0x2
FAILED_EDS_HEALTH = 0x4
DEGRADED_ACTIVE_HC = 0x8
DEGRADED_EDS_HEALTH = 0x10
PENDING_DYNAMIC_REMOVAL = 0x20
PENDING_ACTIVE_HC = 0x40
EXCLUDED_VIA_IMMEDIATE_HC_FAIL = 0x80
ACTIVE_HC_TIMEOUT = 0x100
EDS_STATUS_DRAINING = 0x200

FAILED_MASK = FAILED_ACTIVE_HC | FAILED_OUTLIER_CHECK | FAILED_EDS_HEALTH
"""Any of these makes a host unhealthy: it takes no traffic unless its level is in panic."""
DEGRADED_MASK = DEGRADED_ACTIVE_HC | DEGRADED_EDS_HEALTH
EXCLUDED_MASK = PENDING_ACTIVE_HC | EXCLUDED_VIA_IMMEDIATE_HC_FAIL | EDS_STATUS_DRAINING
"""Hosts Envoy leaves out of the balancer and of the health percentages (so of panic)."""
EDS_MASK = FAILED_EDS_HEALTH | DEGRADED_EDS_HEALTH | EDS_STATUS_DRAINING

HEALTH_FLAG_NAMES: tuple[tuple[int, str], ...] = (
    (FAILED_ACTIVE_HC, "failed_active_hc"),
    (FAILED_OUTLIER_CHECK, "failed_outlier_check"),
    (FAILED_EDS_HEALTH, "failed_eds_health"),
    (DEGRADED_ACTIVE_HC, "degraded_active_hc"),
    (DEGRADED_EDS_HEALTH, "degraded_eds_health"),
    (PENDING_DYNAMIC_REMOVAL, "pending_dynamic_removal"),
    (PENDING_ACTIVE_HC, "pending_active_hc"),
    (EXCLUDED_VIA_IMMEDIATE_HC_FAIL, "excluded_via_immediate_hc_fail"),
    (ACTIVE_HC_TIMEOUT, "active_hc_timeout"),
    (EDS_STATUS_DRAINING, "eds_status_draining"),
)

# envoy.config.core.v3.HealthStatus
HEALTH_UNKNOWN = 0
HEALTH_HEALTHY = 1
HEALTH_UNHEALTHY = 2
HEALTH_DRAINING = 3
HEALTH_TIMEOUT = 4
HEALTH_DEGRADED = 5


def eds_flags(status: int) -> int:
    """The health flags Envoy sets for a configured ``health_status`` (EDS or static)."""
    if status in (HEALTH_UNHEALTHY, HEALTH_TIMEOUT):
        return FAILED_EDS_HEALTH
    if status == HEALTH_DRAINING:
        # Envoy 1.40 (exclude_host_in_eds_status_draining, always on): excluded, not failed.
        return EDS_STATUS_DRAINING
    if status == HEALTH_DEGRADED:
        return DEGRADED_EDS_HEALTH
    return 0


class Host:
    __slots__ = (
        "active_requests",
        "address",
        "cluster_name",
        "health_checker",
        "health_flags",
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
        self.health_flags = 0 if healthy else FAILED_EDS_HEALTH
        """Envoy's health flags (the bits above)."""
        self.active_requests = 0
        self.pool: Any = None
        self.outlier: HostOutlier | None = None
        """Outlier detection's monitor of this host (see ``outlier.py``); None when off."""
        self.health_checker: Any = None
        """The active health check session of this host (``health_check.py``); None when the
        cluster has no health checks."""

    @property
    def healthy(self) -> bool:
        """No ``FAILED_*`` flag and not draining: the host may take traffic."""
        return not self.health_flags & (FAILED_MASK | EDS_STATUS_DRAINING)

    @healthy.setter
    def healthy(self, value: bool) -> None:
        """Set or clear the EDS verdict (``FAILED_EDS_HEALTH``); other sources keep theirs."""
        if value:
            self.health_flags &= ~(FAILED_EDS_HEALTH | EDS_STATUS_DRAINING)
        else:
            self.health_flags |= FAILED_EDS_HEALTH

    @property
    def degraded(self) -> bool:
        """Healthy, but marked degraded (by EDS or by an active health check)."""
        f = self.health_flags
        return not f & FAILED_MASK and bool(f & DEGRADED_MASK)

    def set_eds_status(self, status: int) -> None:
        """Replace the EDS bits with those of the configured ``health_status``."""
        self.health_flags = (self.health_flags & ~EDS_MASK) | eds_flags(status)

    def flag_names(self) -> tuple[str, ...]:
        """The set flags by Envoy's names (what /clusters prints), in Envoy's order."""
        f = self.health_flags
        return tuple(name for bit, name in HEALTH_FLAG_NAMES if f & bit)

    def __repr__(self) -> str:
        return f"Host({self.cluster_name}:{self.address})"
