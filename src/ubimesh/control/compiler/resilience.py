"""Resilience settings compiled to Envoy: route retry policies, and each service cluster's
outlier detection and retry budget.

Settings (docs/resources.md, "Resilience"): Mesh ``spec.defaults.retries`` and
``spec.defaults.outlierDetection``, each field overridable by the destination Service's own
``retries`` / ``outlierDetection``; the schema's defaults apply when there is no Mesh.

Retries (``retries``): ``attempts`` retries after the first try (0: none) on the ``retryOn``
conditions, each try bounded by ``perTryTimeout`` when set; a retry avoids the hosts already
tried (previous_hosts, 3 reselections) and, after two tries in one priority, the priorities
already tried (previous_priorities): the second try goes to another endpoint of the same site,
the third to another site. The destination cluster's ``retry_budget`` caps concurrent retries
at ``budgetPercent`` of its active requests (at least ``minRetryConcurrency``). The proxy
retries a non-idempotent request only when nothing reached the upstream.

Outlier detection (``outlierDetection``, on unless ``enabled: false``): ``consecutiveErrors``
consecutive 5xx, connect failures, resets or timeouts eject an endpoint for
``baseEjectionTime`` times its ejection count; at most ``maxEjectionPercent`` of the endpoints
are ejected at once (Envoy's panic threshold still applies to what is left).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from envoy.config.cluster.v3 import circuit_breaker_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import (
    previous_priorities_config_pb2 as previous_priorities_pb2,
)

from ubimesh.control.compiler.durations import duration
from ubimesh.control.compiler.index import Index, Service, Settings
from ubimesh.control.compiler.model import Message
from ubimesh.control.resources.spec_ubimesh import OUTLIER_DEFAULTS, RETRY_DEFAULTS

PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
PREVIOUS_PRIORITIES = "envoy.retry_priorities.previous_priorities"
#: Reselections to avoid a host already tried (Envoy's host_selection_retry_max_attempts).
HOST_SELECTION_ATTEMPTS = 3
#: Tries in one priority before a retry moves to the next (previous_priorities).
TRIES_PER_PRIORITY = 2


def _merged(
    defaults: dict[str, Any], mesh: Settings, service: Service | None, which: str
) -> dict[str, Any]:
    out = dict(defaults)
    out.update(mesh)
    if service is not None:
        out.update(getattr(service, which))
    return out


def _where(service: Service | None, field: str) -> str:
    if service is None:
        return f"Mesh: spec.defaults.{field}"
    return f"Service {service.namespace}/{service.name}: spec.{field}"


def retry_policy(index: Index, services: Sequence[Service]) -> Message | None:
    """The RetryPolicy of a route to ``services`` (the first one's settings; the mesh's when
    there is none), or None when retries are off (``attempts: 0``)."""
    service = services[0] if services else None
    settings = _merged(RETRY_DEFAULTS, index.mesh.retries, service, "retries")
    attempts = int(settings["attempts"])
    if attempts <= 0:
        return None
    policy = rc.RetryPolicy(
        retry_on=",".join(settings["retryOn"]),
        host_selection_retry_max_attempts=HOST_SELECTION_ATTEMPTS,
    )
    policy.num_retries.value = attempts
    per_try = settings.get("perTryTimeout")
    if per_try:
        where = _where(service if service and service.retries else None, "retries")
        policy.per_try_timeout.CopyFrom(duration(str(per_try), f"{where}.perTryTimeout"))
    predicate = policy.retry_host_predicate.add(name=PREVIOUS_HOSTS)
    predicate.typed_config.Pack(previous_hosts_pb2.PreviousHostsPredicate())
    policy.retry_priority.name = PREVIOUS_PRIORITIES
    policy.retry_priority.typed_config.Pack(
        previous_priorities_pb2.PreviousPrioritiesConfig(update_frequency=TRIES_PER_PRIORITY)
    )
    return policy


def harden_cluster(cluster: Message, index: Index, service: Service) -> None:
    """Add ``service``'s outlier detection and retry budget to its EDS cluster."""
    retries = _merged(RETRY_DEFAULTS, index.mesh.retries, service, "retries")
    if int(retries["attempts"]) > 0:
        threshold = circuit_breaker_pb2.CircuitBreakers.Thresholds(
            priority=base_pb2.RoutingPriority.DEFAULT
        )
        budget = threshold.retry_budget
        budget.budget_percent.value = float(retries["budgetPercent"])
        budget.min_retry_concurrency.value = int(retries["minRetryConcurrency"])
        cluster.circuit_breakers.thresholds.append(threshold)
    od = _merged(OUTLIER_DEFAULTS, index.mesh.outlier_detection, service, "outlier_detection")
    if not od["enabled"]:
        return
    where = _where(service if service.outlier_detection else None, "outlierDetection")
    detection = outlier_detection_pb2.OutlierDetection()
    detection.consecutive_5xx.value = int(od["consecutiveErrors"])
    detection.interval.CopyFrom(duration(str(od["interval"]), f"{where}.interval"))
    detection.base_ejection_time.CopyFrom(
        duration(str(od["baseEjectionTime"]), f"{where}.baseEjectionTime")
    )
    detection.max_ejection_percent.value = int(od["maxEjectionPercent"])
    cluster.outlier_detection.CopyFrom(detection)
