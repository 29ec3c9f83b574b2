"""Istio's mesh metrics: the ``ubimesh.telemetry`` metadata as the translator reads it, the
label sets and their order, and the Prometheus page those series make (the request path is
exercised against a real Prometheus in tests/integration/test_prometheus_mesh.py)."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from ubimesh.proxy.snapshot.types import (
    Cluster,
    DiscoveryType,
    HttpConnectionManagerConfig,
    TcpProxyConfig,
    TelemetryMeta,
)
from ubimesh.proxy.tls.peer import PeerInfo
from ubimesh.proxy.upstream.cluster import UpstreamCluster
from ubimesh.proxy.upstream.cluster_manager import ClusterManager
from ubimesh.proxy.xds import ConfigErrors, load_bootstrap_dict
from ubimesh.telemetry import prometheus
from ubimesh.telemetry.mesh_metrics import (
    BYTES_BUCKETS,
    HTTP_LABELS,
    TCP_LABELS,
    MeshMetrics,
    label_text,
    namespace_of,
)
from ubimesh.telemetry.stats import Store, merge_snapshots

CONFIGS = Path(__file__).parent / "configs"
META = "ubimesh.telemetry"
WEB = "spiffe://example.org/ns/shop/sa/web"

# Istio's standard labels, in the order its stats filter writes them.
ISTIO_HTTP_LABELS = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
]


def base() -> dict[str, Any]:
    loaded = yaml.safe_load((CONFIGS / "minimal.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def with_listener_meta(meta: dict[str, Any]) -> dict[str, Any]:
    d = base()
    d["static_resources"]["listeners"][0]["metadata"] = {"filter_metadata": {META: meta}}
    return d


def errors_of(d: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap_dict(d)
    return [(e.path, e.message) for e in info.value.errors]


# -- metadata ------------------------------------------------------------------------------------


def test_listener_metadata_reaches_the_terminal_filter() -> None:
    snap = load_bootstrap_dict(
        with_listener_meta(
            {
                "reporter": "destination",
                "workload": "api-1",
                "namespace": "shop",
                "service": "api.shop.svc.cluster.local",
                "peers": {WEB: "web-1"},
            }
        )
    )
    hcm = snap.listeners[0].filter_chains[0].filters[0]
    assert isinstance(hcm, HttpConnectionManagerConfig)
    assert hcm.mesh_telemetry == TelemetryMeta(
        reporter="destination",
        workload="api-1",
        namespace="shop",
        service="api.shop.svc.cluster.local",
        peers=((WEB, "web-1"),),
    )


def test_no_metadata_no_mesh_metrics() -> None:
    snap = load_bootstrap_dict(base())
    hcm = snap.listeners[0].filter_chains[0].filters[0]
    assert isinstance(hcm, HttpConnectionManagerConfig)
    assert hcm.mesh_telemetry is None


def test_bad_listener_metadata_is_refused_with_its_path() -> None:
    path = f'static_resources.listeners[0].metadata.filter_metadata["{META}"]'
    errors = errors_of(with_listener_meta({"workload": 3, "colour": "blue"}))
    paths = dict(errors)
    assert set(paths) == {f'{path}["workload"]', f'{path}["colour"]', f'{path}["reporter"]'}
    messages = " | ".join(paths.values())
    assert "must be a string" in messages
    assert "unknown key 'colour'" in messages
    assert "is required: source or destination" in messages


def test_cluster_metadata_describes_the_destination() -> None:
    d = base()
    d["static_resources"]["clusters"][0]["metadata"] = {
        "filter_metadata": {
            META: {"service": "api.shop.svc.cluster.local", "service_name": "api"},
            "istio": {"anything": "goes"},  # other namespaces are ignored, as Envoy does
        }
    }
    snap = load_bootstrap_dict(d)
    name = d["static_resources"]["clusters"][0]["name"]
    assert snap.clusters[name].telemetry == TelemetryMeta(
        service="api.shop.svc.cluster.local", service_name="api"
    )
    bad = copy.deepcopy(d)
    bad["static_resources"]["clusters"][0]["metadata"]["filter_metadata"][META] = {
        "reporter": "source"
    }
    ((path, message),) = errors_of(bad)
    assert path == f'static_resources.clusters[0].metadata.filter_metadata["{META}"]["reporter"]'
    assert "unknown key 'reporter'" in message


# -- labels --------------------------------------------------------------------------------------


def test_label_names_are_istios_in_istios_order() -> None:
    assert list(HTTP_LABELS) == ISTIO_HTTP_LABELS
    assert list(TCP_LABELS) == [
        n for n in ISTIO_HTTP_LABELS if n not in ("response_code", "grpc_response_status")
    ]


def test_namespace_of_a_spiffe_id() -> None:
    assert namespace_of(WEB) == "shop"
    assert namespace_of("spiffe://example.org") == ""


def test_label_text_fills_unknown_and_escapes() -> None:
    text = label_text(("a", "b", "grpc_response_status"), {"a": 'x"y\\'})
    assert text == 'a="x\\"y\\\\",b="unknown",grpc_response_status=""'


def labels_of(series_name: str) -> dict[str, str]:
    inner = series_name[series_name.index("{") + 1 : -1]
    out = {}
    for part in inner.split('",'):
        k, _, v = part.partition('="')
        out[k] = v.rstrip('"')
    return out


def _cluster(store: Store, meta: TelemetryMeta | None) -> UpstreamCluster:
    async def make() -> UpstreamCluster:
        spec = Cluster("api", DiscoveryType.STATIC, telemetry=meta)
        cluster = ClusterManager({"api": spec}, store).get("api")
        assert cluster is not None
        return cluster

    return asyncio.run(make())


def test_inbound_labels_from_the_peer_certificate() -> None:
    store = Store()
    own = TelemetryMeta(
        reporter="destination",
        workload="api-1",
        namespace="shop",
        principal="spiffe://example.org/ns/shop/sa/api",
        app="api",
        service="api.shop.svc.cluster.local",
        service_name="api",
        service_namespace="shop",
        peers=((WEB, "web-1"),),
    )
    mm = MeshMetrics(own, store)
    mm.tcp_series(PeerInfo(presented=True, spiffe_id=WEB), None, "").opened.value += 1
    mm.tcp_series(None, None, "UF,URX").opened.value += 1
    names = sorted(n for n in store.counters if n.startswith("istio_tcp_connections_opened"))
    assert len(names) == 2
    by_csp = {labels_of(n)["connection_security_policy"]: labels_of(n) for n in names}
    mtls = by_csp["mutual_tls"]
    assert list(mtls) == list(TCP_LABELS)
    assert mtls["reporter"] == "destination"
    assert mtls["source_principal"] == WEB
    assert mtls["source_workload"] == "web-1"
    assert mtls["source_workload_namespace"] == "shop"
    assert mtls["destination_workload"] == "api-1"
    assert mtls["destination_principal"] == "spiffe://example.org/ns/shop/sa/api"
    assert mtls["destination_service"] == "api.shop.svc.cluster.local"
    assert mtls["destination_canonical_revision"] == "latest"
    assert mtls["request_protocol"] == "tcp"
    assert mtls["response_flags"] == "-"
    plain = by_csp["none"]
    assert plain["source_principal"] == "unknown"
    assert plain["source_workload"] == "unknown"
    assert plain["response_flags"] == "UF,URX"


def test_outbound_labels_from_the_cluster_metadata() -> None:
    store = Store()
    own = TelemetryMeta(reporter="source", workload="web-1", namespace="shop", principal=WEB)
    dest = TelemetryMeta(
        service="api.shop.svc.cluster.local",
        service_name="api",
        service_namespace="shop",
        principal="spiffe://example.org/ns/shop/sa/api",
    )
    mm = MeshMetrics(own, store)
    series = mm.tcp_series(None, _cluster(store, dest), "")
    assert mm.tcp_series(None, _cluster(store, dest), "") is series  # one series per key
    (name,) = [n for n in store.counters if n.startswith("istio_tcp_sent_bytes_total")]
    labels = labels_of(name)
    assert labels["reporter"] == "source"
    assert labels["source_workload"] == "web-1"
    assert labels["source_principal"] == WEB
    assert labels["destination_service"] == "api.shop.svc.cluster.local"
    assert labels["destination_service_name"] == "api"
    assert labels["destination_workload"] == "unknown"
    assert labels["destination_workload_namespace"] == "shop"
    assert labels["destination_principal"] == "spiffe://example.org/ns/shop/sa/api"
    assert labels["connection_security_policy"] == "unknown"


# -- exposition ----------------------------------------------------------------------------------


def test_series_render_as_istio_metrics_and_merge_across_workers() -> None:
    labels = 'reporter="destination",response_code="200"'
    stores = [Store(), Store()]
    for i, store in enumerate(stores):
        store.counter(f"istio_requests_total{{{labels}}}").value += 1 + i
        store.histogram(f"istio_request_bytes{{{labels}}}", BYTES_BUCKETS).record(150.0)
        store.counter("cluster.api.upstream_rq_total").value += 1
    page = prometheus.render(merge_snapshots([s.snapshot() for s in stores]))
    assert "# TYPE istio_requests_total counter\n" in page
    assert f"istio_requests_total{{{labels}}} 3\n" in page
    assert "# TYPE istio_request_bytes histogram\n" in page
    assert f'istio_request_bytes_bucket{{{labels},le="100"}} 0\n' in page
    assert f'istio_request_bytes_bucket{{{labels},le="1000"}} 2\n' in page
    assert f'istio_request_bytes_bucket{{{labels},le="+Inf"}} 2\n' in page
    assert f"istio_request_bytes_count{{{labels}}} 2\n" in page
    # Envoy's own stats keep Envoy's tag extraction beside them.
    assert 'envoy_cluster_upstream_rq_total{envoy_cluster_name="api"} 2\n' in page


def test_a_tcp_proxy_config_carries_the_listener_metadata() -> None:
    d = base()
    lst = d["static_resources"]["listeners"][0]
    lst["filter_chains"][0]["filters"][0] = {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "t",
            "cluster": d["static_resources"]["clusters"][0]["name"],
        },
    }
    lst["metadata"] = {"filter_metadata": {META: {"reporter": "source", "workload": "w"}}}
    tcp = load_bootstrap_dict(d).listeners[0].filter_chains[0].filters[0]
    assert isinstance(tcp, TcpProxyConfig)
    assert tcp.mesh_telemetry == TelemetryMeta(reporter="source", workload="w")
