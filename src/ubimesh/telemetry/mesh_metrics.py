"""Istio's standard mesh metrics (docs/telemetry.md "Metrics"), kept in the proxy's stats store.

A listener whose metadata has ``ubimesh.telemetry`` (``TelemetryMeta``, ``reporter`` set) gets
one ``MeshMetrics`` per filter chain runtime. It counts, with Istio's names, label names and
label order:

* HTTP, once per stream when it ends (``observe_http``): ``istio_requests_total``,
  ``istio_request_duration_milliseconds``, ``istio_request_bytes``, ``istio_response_bytes``;
* TCP proxy connections (``TcpSeries``): ``istio_tcp_connections_opened_total``,
  ``istio_tcp_connections_closed_total``, ``istio_tcp_sent_bytes_total``,
  ``istio_tcp_received_bytes_total``.

Storage. Each labelled series is an ordinary ``Counter``/``Histogram`` of the ``Store``, named
``<metric>{<Prometheus label text>}``, e.g. ``istio_requests_total{reporter="destination",...}``.
So the workers' snapshots merge by name like every other stat, ``/stats`` lists them, and
``ubimesh.telemetry.prometheus`` writes them as they are (it recognises the ``{`` form and
applies no Envoy tag extraction to it).

Cost. What a request's labels depend on, besides this chain's fixed metadata, is the peer
(reporter ``destination``: the caller's SPIFFE ID from the connection; ``source``: the cluster
the route chose), the response code and the response flags. That triple is the key of a dict
of series; a known key costs one tuple, one dict lookup, one counter bump and three histogram
records. Label text is built only when a key is first seen. A listener without the metadata
has no ``MeshMetrics`` at all: the HCM pays one ``is None`` check per request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ubimesh.proxy.snapshot.types import TelemetryMeta
from ubimesh.telemetry.stats import DEFAULT_BUCKETS_MS, Counter, Histogram, Store

if TYPE_CHECKING:
    from ubimesh.proxy.network.http_manager import ActiveStream
    from ubimesh.proxy.tls.peer import PeerInfo
    from ubimesh.proxy.upstream.cluster import UpstreamCluster

REQUESTS_TOTAL = "istio_requests_total"
REQUEST_DURATION = "istio_request_duration_milliseconds"
REQUEST_BYTES = "istio_request_bytes"
RESPONSE_BYTES = "istio_response_bytes"
TCP_OPENED = "istio_tcp_connections_opened_total"
TCP_CLOSED = "istio_tcp_connections_closed_total"
TCP_SENT = "istio_tcp_sent_bytes_total"
TCP_RECEIVED = "istio_tcp_received_bytes_total"

#: Istio's buckets for request durations (Envoy's defaults), in milliseconds.
DURATION_BUCKETS_MS: tuple[float, ...] = DEFAULT_BUCKETS_MS
#: Buckets of the byte-size histograms: 1 B to 1 GB by powers of ten.
BYTES_BUCKETS: tuple[float, ...] = tuple(float(10**i) for i in range(10))

UNKNOWN = "unknown"

_SIDE = ("workload", "canonical_service", "canonical_revision", "workload_namespace",
         "principal", "app", "version", "cluster")  # fmt: skip
_SOURCE_LABELS = tuple("source_" + n for n in _SIDE)
_DESTINATION_LABELS = (
    "destination_workload", "destination_workload_namespace", "destination_principal",
    "destination_app", "destination_version", "destination_service",
    "destination_canonical_service", "destination_canonical_revision",
    "destination_service_name", "destination_service_namespace", "destination_cluster",
)  # fmt: skip
#: Istio's labels of the HTTP metrics, in Istio's order.
HTTP_LABELS: tuple[str, ...] = (
    "reporter", *_SOURCE_LABELS, *_DESTINATION_LABELS, "request_protocol", "response_code",
    "grpc_response_status", "response_flags", "connection_security_policy",
)  # fmt: skip
#: Istio's labels of the TCP metrics (no response code), in Istio's order.
TCP_LABELS: tuple[str, ...] = tuple(
    n for n in HTTP_LABELS if n not in ("response_code", "grpc_response_status")
)

# The first element of a series key on inbound listeners when the caller is not a verified
# mutual TLS peer (SPIFFE IDs start with "spiffe://", so neither can collide with one).
_PLAINTEXT = ""
_MTLS_NO_ID = "+"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def label_text(names: tuple[str, ...], values: dict[str, str]) -> str:
    """Prometheus label text (``a="x",b="y"``) of ``names`` in order; a missing or empty value
    is ``unknown`` except for ``grpc_response_status``, which Istio leaves empty."""
    parts = []
    for n in names:
        v = values.get(n, "")
        if not v and n != "grpc_response_status":
            v = UNKNOWN
        parts.append(f'{n}="{_escape(v)}"')
    return ",".join(parts)


def namespace_of(spiffe_id: str) -> str:
    """The ``ns`` segment of ``spiffe://<td>/ns/<namespace>/sa/<sa>`` ("" if absent)."""
    parts = spiffe_id.split("/")
    for i in range(3, len(parts) - 1):
        if parts[i] == "ns":
            return parts[i + 1]
    return ""


def _own_side(meta: TelemetryMeta, prefix: str) -> dict[str, str]:
    """This proxy's workload labels (``source_*`` or ``destination_*``) from listener metadata."""
    workload = meta.workload
    return {
        prefix + "workload": workload,
        prefix + "canonical_service": meta.app or meta.service_name or workload,
        prefix + "canonical_revision": meta.version or "latest",
        prefix + "workload_namespace": meta.namespace,
        prefix + "principal": meta.principal,
        prefix + "app": meta.app or workload,
        prefix + "version": meta.version,
        prefix + "cluster": meta.cluster,
    }


def _service(meta: TelemetryMeta | None) -> dict[str, str]:
    if meta is None:
        return {}
    return {
        "destination_service": meta.service,
        "destination_service_name": meta.service_name,
        "destination_service_namespace": meta.service_namespace,
    }


def _destination_from_cluster(meta: TelemetryMeta | None) -> dict[str, str]:
    """Reporter ``source``: the destination workload and service from cluster metadata."""
    out = _service(meta)
    if meta is not None:
        workload = meta.workload
        out.update(
            {
                "destination_workload": workload,
                "destination_workload_namespace": meta.namespace or meta.service_namespace,
                "destination_principal": meta.principal,
                "destination_app": meta.app or workload,
                "destination_version": meta.version,
                "destination_canonical_service": meta.app or meta.service_name or workload,
                "destination_canonical_revision": meta.version or "latest",
                "destination_cluster": meta.cluster,
            }
        )
    return out


class _HttpSeries:
    __slots__ = ("duration", "request_bytes", "requests", "response_bytes")

    def __init__(self, store: Store, labels: str) -> None:
        self.requests: Counter = store.counter(f"{REQUESTS_TOTAL}{{{labels}}}")
        self.duration: Histogram = store.histogram(
            f"{REQUEST_DURATION}{{{labels}}}", DURATION_BUCKETS_MS
        )
        self.request_bytes: Histogram = store.histogram(
            f"{REQUEST_BYTES}{{{labels}}}", BYTES_BUCKETS
        )
        self.response_bytes: Histogram = store.histogram(
            f"{RESPONSE_BYTES}{{{labels}}}", BYTES_BUCKETS
        )


class TcpSeries:
    """The four TCP counters of one label set (one proxied connection holds one)."""

    __slots__ = ("closed", "opened", "received", "sent")

    def __init__(self, store: Store, labels: str) -> None:
        self.opened: Counter = store.counter(f"{TCP_OPENED}{{{labels}}}")
        self.closed: Counter = store.counter(f"{TCP_CLOSED}{{{labels}}}")
        self.sent: Counter = store.counter(f"{TCP_SENT}{{{labels}}}")
        self.received: Counter = store.counter(f"{TCP_RECEIVED}{{{labels}}}")


class MeshMetrics:
    """The mesh metrics of one filter chain (listener metadata ``meta``) into ``store``."""

    __slots__ = (
        "_http",
        "_last_flags",
        "_last_peer",
        "_last_series",
        "_last_status",
        "_tcp",
        "inbound",
        "meta",
        "store",
    )

    def __init__(self, meta: TelemetryMeta, store: Store) -> None:
        self.meta = meta
        self.store = store
        self.inbound = meta.reporter == "destination"
        """Reporter ``destination``: the peer is the downstream caller; else the cluster."""
        self._http: dict[tuple[str, int, str], _HttpSeries] = {}
        self._tcp: dict[tuple[str, str], TcpSeries] = {}
        # The key and series of the last stream observed: consecutive streams nearly always
        # share them, and three compares cost less than building, hashing and freeing a
        # tuple key for the dict.
        self._last_peer = ""
        self._last_status = -1
        self._last_flags = ""
        self._last_series: _HttpSeries | None = None

    # -- keys ---------------------------------------------------------------------------------

    @staticmethod
    def peer_key(tls: PeerInfo | None) -> str:
        """The caller part of a series key on inbound listeners."""
        if tls is None or not tls.presented:
            return _PLAINTEXT
        return tls.spiffe_id or _MTLS_NO_ID

    # -- HTTP ---------------------------------------------------------------------------------

    def observe_http(self, stream: ActiveStream, duration_ms: float) -> None:
        """Count one finished stream. ``stream.status`` is 0 when no response was sent.

        Per request: the key (peer, status, flags) from values at hand, compared with the last
        stream's (else one dict lookup), one counter bump and three histogram records (native
        calls: ``stats`` is compiled too)."""
        cluster: UpstreamCluster | None = None
        if self.inbound:
            tls = stream.conn.tls  # peer_key() inlined
            peer = _PLAINTEXT if tls is None or not tls.presented else tls.spiffe_id or _MTLS_NO_ID
        else:
            up = stream.upstream
            cluster = up.cluster if up is not None else None
            peer = cluster.name if cluster is not None else ""
        status = stream.status
        flags = stream.flags
        series = self._last_series
        if (
            series is None
            or status != self._last_status
            or peer != self._last_peer
            or flags != self._last_flags
        ):
            key = (peer, status, flags)
            series = self._http.get(key)
            if series is None:
                series = self._http[key] = self._new_http(key, cluster)
            self._last_series = series
            self._last_peer = peer
            self._last_status = status
            self._last_flags = flags
        series.requests.value += 1
        series.duration.record(duration_ms)
        series.request_bytes.record(float(stream.bytes_received))
        series.response_bytes.record(float(stream.bytes_sent))

    def _new_http(self, key: tuple[str, int, str], cluster: UpstreamCluster | None) -> _HttpSeries:
        peer, status, flags = key
        values = self._labels(peer, cluster, "http", flags)
        values["response_code"] = str(status)
        return _HttpSeries(self.store, label_text(HTTP_LABELS, values))

    # -- TCP ----------------------------------------------------------------------------------

    def tcp_series(
        self, tls: PeerInfo | None, cluster: UpstreamCluster | None, flags: str
    ) -> TcpSeries:
        """The TCP counters for a connection from ``tls`` (inbound) or to ``cluster``
        (outbound) whose response flags are ``flags``."""
        peer = self.peer_key(tls) if self.inbound else (cluster.name if cluster else "")
        key = (peer, flags)
        series = self._tcp.get(key)
        if series is None:
            values = self._labels(peer, cluster, "tcp", flags)
            series = self._tcp[key] = TcpSeries(self.store, label_text(TCP_LABELS, values))
        return series

    # -- labels -------------------------------------------------------------------------------

    def _labels(
        self, peer: str, cluster: UpstreamCluster | None, protocol: str, flags: str
    ) -> dict[str, str]:
        meta = self.meta
        values: dict[str, str] = {"reporter": meta.reporter}
        if self.inbound:
            values.update(_own_side(meta, "destination_"))
            values.update(_service(meta))
            csp = "none"
            if peer != _PLAINTEXT:
                csp = "mutual_tls"
                if peer != _MTLS_NO_ID:
                    workload = dict(meta.peers).get(peer, "")
                    values["source_principal"] = peer
                    values["source_workload_namespace"] = namespace_of(peer)
                    values["source_workload"] = workload
                    values["source_app"] = workload
                    values["source_canonical_service"] = workload
                    if workload:
                        values["source_canonical_revision"] = "latest"
        else:
            values.update(_own_side(meta, "source_"))
            values.update(_destination_from_cluster(cluster.spec.telemetry if cluster else None))
            csp = UNKNOWN  # Istio's source reporter does not know the connection's policy
        values["request_protocol"] = protocol
        values["response_flags"] = flags or "-"
        values["connection_security_policy"] = csp
        return values
