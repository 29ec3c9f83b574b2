"""/stats/prometheus against Envoy 1.40: the same bootstrap (an HCM listener, a tcp_proxy
listener, a cluster that answers and one that refuses connections) run by the real ``envoy``
and by ``ubimesh proxy``, the same traffic to both; then every metric family ubimesh writes
must exist in Envoy's page with the same type and the same label names, and the families that
dashboards read most must carry the same values. Only names are compared in general: Envoy has
many stats ubimesh does not keep (server, runtime, listener manager, ...), listed on the right
side only. Istio's ``istio_*`` families are ubimesh's own here (Envoy has them only with Istio's
stats filter) and are left out.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.bootstrap import HCM, ROUTER, Proxy, address, proxy_pair, static_cluster
from tests.support.echo_upstream import EchoServerPool
from tests.support.procs import LOOPBACK, admin_get, envoy_binary, free_ports, ubimesh_available

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary"),
]

TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
LISTENERS = ("web", "tcp")

#: ubimesh's own stats, which Envoy does not have (the rest must all be Envoy's).
UBIMESH_ONLY = {
    "envoy_http_rq_mirrored",  # requests mirrored by a route's request_mirror_policies
    "envoy_server_config_reload_total",  # SIGHUP reloads of the bootstrap
    "envoy_server_config_reload_failed",
    "envoy_server_seconds_until_first_cert_expiring",  # Envoy has it in days only
}

#: Families whose values (per label set) must be equal after the same traffic.
SAME_VALUES = (
    "envoy_cluster_upstream_rq_total",
    "envoy_cluster_upstream_rq_xx",
    "envoy_cluster_upstream_rq",
    "envoy_cluster_upstream_cx_connect_fail",
    "envoy_cluster_upstream_rq_completed",
    "envoy_http_downstream_rq_total",
    "envoy_http_downstream_rq_xx",
    "envoy_http_downstream_rq_completed",
    "envoy_http_no_route",
    "envoy_tcp_downstream_cx_total",
    "envoy_cluster_upstream_rq_time_count",
    "envoy_http_downstream_rq_time_count",
)


def _cluster(name: str, port: int) -> dict[str, Any]:
    return static_cluster(name, [port], connect_timeout="1s")


def bootstrap(ports: dict[str, int], echo: int, dead: int) -> dict[str, Any]:
    routes = [
        {"match": {"prefix": "/down"}, "route": {"cluster": "dead"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "echo"}},
    ]
    hcm = {
        "@type": HCM,
        "stat_prefix": "ingress",
        "route_config": {
            "virtual_hosts": [{"name": "shop", "domains": ["shop.example"], "routes": routes}]
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
    }
    return {
        "admin": {"address": address(ports["admin"])},
        "static_resources": {
            "listeners": [
                {
                    "name": "web",
                    "address": address(ports["web"]),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                },
                {
                    "name": "tcp",
                    "address": address(ports["tcp"]),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.tcp_proxy",
                                    "typed_config": {
                                        "@type": TCP,
                                        "stat_prefix": "raw",
                                        "cluster": "echo",
                                    },
                                }
                            ]
                        }
                    ],
                },
            ],
            "clusters": [_cluster("echo", echo), _cluster("dead", dead)],
        },
    }


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    ok, why = ubimesh_available()
    if not ok:
        pytest.skip(f"ubimesh proxy does not run: {why}")
    work = tmp_path_factory.mktemp("prometheus-names")
    echo = EchoServerPool()
    (dead,) = free_ports(1)

    def config(name: str, ports: dict[str, int]) -> dict[str, Any]:
        boot = bootstrap(ports, echo.port("echo"), dead)
        if name == "envoy":
            # Envoy publishes histograms to the admin page at each flush (default 5 s).
            boot["stats_flush_interval"] = "0.1s"
        return boot

    try:
        with proxy_pair(work, LISTENERS, config) as proxies:
            for proxy in proxies:
                _traffic(proxy)
            out = {}
            for proxy in proxies:
                status, body = admin_get(proxy.ports["admin"], "/stats/prometheus", timeout=5)
                assert status == 200, body[:500]
                out[proxy.name] = body.decode()
            yield out
    finally:
        echo.close()


def _traffic(proxy: Proxy) -> None:
    """3 x 200, 2 x 404 (no route), 1 x 503 (UF); then one TCP round trip. Every response is
    read to its end before the next request, so both proxies count the same."""
    with socket.create_connection((LOOPBACK, proxy.ports["web"]), timeout=5) as s:
        reader = s.makefile("rb")
        for path, host in (
            [("/", "shop.example")] * 3 + [("/", "other.example")] * 2 + [("/down", "shop.example")]
        ):
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            reader.readline()
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                k, _, v = line.decode("latin-1").partition(":")
                if k.lower() == "content-length":
                    length = int(v)
            reader.read(length)
    with socket.create_connection((LOOPBACK, proxy.ports["tcp"]), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        while s.recv(65536):
            pass
    _settle(proxy)


def _settle(proxy: Proxy, timeout: float = 5.0) -> None:
    """Wait (bounded) until the proxy's page shows the 6 HTTP streams in the request time
    histogram (Envoy publishes histograms at each stats flush)."""
    want = 'envoy_http_downstream_rq_time_count{envoy_http_conn_manager_prefix="ingress"} 6'
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        _, body = admin_get(proxy.ports["admin"], "/stats/prometheus")
        text = body.decode()
        if want in text.splitlines():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{proxy.name} did not count the requests:\n{text[:3000]}")


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass
class Page:
    types: dict[str, str]  # family -> type
    labels: dict[str, set[tuple[str, ...]]]  # sample name -> label name tuples (sorted)
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Page:
    page = Page({}, {}, {})
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            page.types[family] = kind
            continue
        m = _SAMPLE.match(line)
        if not m or line.startswith("#"):
            continue
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        pairs = tuple(sorted(_LABEL.findall(labels)))
        page.labels.setdefault(name, set()).add(tuple(k for k, _ in pairs))
        page.values[(name, pairs)] = float(value)
    return page


def _family(sample: str, types: dict[str, str]) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if sample.endswith(suffix) and sample.removesuffix(suffix) in types:
            return sample.removesuffix(suffix)
    return sample


def test_every_family_is_envoys_with_its_type_and_label_names(pages: dict[str, str]) -> None:
    envoy, ubimesh = parse(pages["envoy"]), parse(pages["ubimesh"])
    ours = {
        f: t
        for f, t in ubimesh.types.items()
        if not f.startswith("istio_") and f not in UBIMESH_ONLY
    }
    assert "envoy_cluster_upstream_rq_total" in ours
    missing = sorted(f for f in ours if f not in envoy.types)
    assert missing == [], f"families Envoy does not have: {missing}"
    wrong_type = {f: (t, envoy.types[f]) for f, t in ours.items() if envoy.types[f] != t}
    assert wrong_type == {}
    wrong_labels = {
        name: (sorted(sets), sorted(envoy.labels.get(name, set())))
        for name, sets in ubimesh.labels.items()
        if _family(name, ubimesh.types) in ours and not sets <= envoy.labels.get(name, set())
    }
    assert wrong_labels == {}


def test_the_main_families_have_envoys_values(pages: dict[str, str]) -> None:
    envoy, ubimesh = parse(pages["envoy"]), parse(pages["ubimesh"])

    def pick(page: Page) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            k: v
            for k, v in page.values.items()
            if k[0] in SAME_VALUES
            and not {"admin", "async-client"} & set(dict(k[1]).values())  # Envoy's own
        }

    ours, theirs = pick(ubimesh), pick(envoy)
    assert {k[0] for k in ours} == set(SAME_VALUES)
    assert ours == theirs
    # The traffic itself: the echo cluster had 3 HTTP requests and the TCP connections (the
    # readiness probe's and the test's), the dead one none (it never had a connection) but was
    # charged the 503 its failure produced.
    tcp = ours[("envoy_tcp_downstream_cx_total", (("envoy_tcp_prefix", "raw"),))]
    assert tcp >= 1
    assert ours[("envoy_cluster_upstream_rq_total", (("envoy_cluster_name", "echo"),))] == 3 + tcp
    assert ours[("envoy_cluster_upstream_rq_total", (("envoy_cluster_name", "dead"),))] == 0
    dead_503 = (("envoy_cluster_name", "dead"), ("envoy_response_code", "503"))
    assert ours[("envoy_cluster_upstream_rq", dead_503)] == 1
