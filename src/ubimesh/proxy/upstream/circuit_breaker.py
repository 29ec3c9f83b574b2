"""Circuit breakers at run time: one ``ResourceManager`` per cluster and routing priority.

Contract used by the router, the connection pool and the TCP proxy (Envoy's ResourceManager):
before taking a resource call ``can_create()``; when it says False the caller fails fast (503,
flag UO; the TCP proxy closes the connection) and counts the overflow; otherwise ``inc()`` now
and ``dec()`` exactly once, on the same ``Resource`` object, when the resource ends. Who takes
what:

============================ =================================================================
resource                     taken by
============================ =================================================================
``connections``              the HTTP pool (from the start of a connect to the close) and the
                             TCP proxy (each upstream connection), across all hosts
``pending_requests``         the HTTP pool: a request waiting for a connection
``requests``                 the router: a request in flight
``retries``                  the router: a retry in flight
``connection_pools``         ``pool_for``: one per host pool (no limit: max_connection_pools
                             is refused by the translator)
============================ =================================================================

Stats (Envoy's names, ``cluster.<name>.circuit_breakers.<default|high>.``): the gauges
``cx_open``, ``cx_pool_open``, ``rq_pending_open``, ``rq_open``, ``rq_retry_open`` are 1 while
the resource is at its maximum; with ``track_remaining`` also ``remaining_cx``,
``remaining_cx_pools``, ``remaining_pending``, ``remaining_rq`` and ``remaining_retries`` (0
with a retry budget, as in Envoy). They are written on ``inc``/``dec`` only, never read on the
request path.

Each worker process has its own resource managers (Envoy shares one per cluster between its
threads): with ``--concurrency N`` a cluster admits up to N times its limits in total.
"""

from __future__ import annotations

import weakref

from ubimesh.proxy.snapshot.circuit_breakers import CircuitBreakers, RetryBudget, Thresholds
from ubimesh.telemetry.stats import Gauge, Store

#: Envoy's value for a limit that is not set (max_connection_pools): the largest uint64.
UNLIMITED = 2**64 - 1


class Resource:
    """A counted resource with a maximum (connections, pending requests, requests, retries).

    ``open`` is the ``*_open`` gauge (1 while ``count >= max``); ``remaining`` the
    ``remaining_*`` gauge, or None without ``track_remaining``.
    """

    __slots__ = ("count", "max", "open", "remaining")

    def __init__(
        self, maximum: int, open_gauge: Gauge | None = None, remaining: Gauge | None = None
    ) -> None:
        self.max = maximum
        self.count = 0
        self.open: Gauge = open_gauge if open_gauge is not None else Gauge()
        self.open.value = 0
        self.remaining = remaining
        if remaining is not None:
            remaining.value = maximum

    def can_create(self) -> bool:
        return self.count < self.max

    def inc(self) -> None:
        count = self.count = self.count + 1
        if count >= self.max:
            self.open.value = 1
        remaining = self.remaining
        if remaining is not None:
            remaining.value = self.max - count if count < self.max else 0

    def dec(self) -> None:
        count = self.count = self.count - 1
        if count < self.max:
            gauge = self.open
            if gauge.value:
                gauge.value = 0
        remaining = self.remaining
        if remaining is not None:
            remaining.value = self.max - count if count < self.max else 0

    def detach(self) -> None:
        """Stop writing the shared gauges (a newer manager of the same cluster owns them)."""
        self.open = Gauge()
        if self.remaining is not None:
            self.remaining = Gauge()


class RetryBudgetResource(Resource):
    """``retries`` under a retry budget: a retry may start while active retries are fewer than
    max(``min_retry_concurrency``, ``budget_percent`` % of (active + pending requests)), the
    product rounded down (Envoy's ``RetryBudgetImpl``). ``max`` stays ``max_retries``, which
    only drives the ``rq_retry_open`` gauge, as in Envoy; ``remaining_retries`` is 0."""

    __slots__ = ("fraction", "min_concurrency", "pending", "requests")

    def __init__(
        self,
        budget: RetryBudget,
        max_retries: int,
        requests: Resource,
        pending: Resource,
        open_gauge: Gauge | None = None,
        remaining: Gauge | None = None,
    ) -> None:
        super().__init__(max_retries, open_gauge, None)
        if remaining is not None:
            remaining.value = 0
        self.fraction = budget.budget_percent / 100.0
        self.min_concurrency = budget.min_retry_concurrency
        self.requests = requests
        self.pending = pending

    def limit(self) -> int:
        """The number of retries allowed now (it moves with the traffic)."""
        budget = int(self.fraction * (self.requests.count + self.pending.count))
        return max(budget, self.min_concurrency)

    def can_create(self) -> bool:
        return self.count < self.limit()


def _gauge(store: Store | None, name: str) -> Gauge | None:
    return store.gauge(name) if store is not None else None


class ResourceManager:
    """The resources of one cluster at one routing priority. Without a ``store`` (unit tests)
    the gauges are private."""

    __slots__ = ("connection_pools", "connections", "pending_requests", "requests", "retries")

    def __init__(
        self, thresholds: Thresholds, store: Store | None = None, prefix: str = ""
    ) -> None:
        track = store if thresholds.track_remaining else None
        self.connections = Resource(
            thresholds.max_connections,
            _gauge(store, prefix + "cx_open"),
            _gauge(track, prefix + "remaining_cx"),
        )
        self.pending_requests = Resource(
            thresholds.max_pending_requests,
            _gauge(store, prefix + "rq_pending_open"),
            _gauge(track, prefix + "remaining_pending"),
        )
        self.requests = Resource(
            thresholds.max_requests,
            _gauge(store, prefix + "rq_open"),
            _gauge(track, prefix + "remaining_rq"),
        )
        budget = thresholds.retry_budget
        retry_open = _gauge(store, prefix + "rq_retry_open")
        retry_remaining = _gauge(track, prefix + "remaining_retries")
        self.retries: Resource
        if budget is None:
            self.retries = Resource(thresholds.max_retries, retry_open, retry_remaining)
        else:
            self.retries = RetryBudgetResource(
                budget,
                thresholds.max_retries,
                self.requests,
                self.pending_requests,
                retry_open,
                retry_remaining,
            )
        self.connection_pools = Resource(
            UNLIMITED,
            _gauge(store, prefix + "cx_pool_open"),
            _gauge(track, prefix + "remaining_cx_pools"),
        )

    def detach(self) -> None:
        for r in (
            self.connections,
            self.pending_requests,
            self.requests,
            self.retries,
            self.connection_pools,
        ):
            r.detach()


#: The newest ClusterResources per stats store and cluster name: a rebuilt cluster (new
#: thresholds, or any other change) takes the gauges over from its predecessor, whose requests
#: and connections may still be ending.
_owners: weakref.WeakKeyDictionary[Store, dict[str, ClusterResources]] = weakref.WeakKeyDictionary()


class ClusterResources:
    """``default`` and ``high``: the resource managers of routing priorities DEFAULT and HIGH.

    With a ``store``, the gauges are ``cluster.<name>.circuit_breakers.<priority>.*``. A new
    ClusterResources for the same store and cluster name takes the gauges over; the previous
    one keeps counting what it admitted (its ``dec()`` calls still arrive) but stops writing
    them.
    """

    __slots__ = ("default", "high")

    def __init__(self, config: CircuitBreakers, store: Store | None = None, name: str = "") -> None:
        base = f"cluster.{name}.circuit_breakers."
        self.default = ResourceManager(config.default, store, base + "default.")
        self.high = ResourceManager(config.high, store, base + "high.")
        if store is not None:
            owners = _owners.get(store)
            if owners is None:
                owners = _owners[store] = {}
            previous = owners.get(name)
            if previous is not None:
                previous.detach()
            owners[name] = self

    def detach(self) -> None:
        self.default.detach()
        self.high.detach()
