"""A real Prometheus scrapes a ubimesh proxy's /stats/prometheus, and PromQL answers match the
traffic sent: Istio's request counts per destination service, the response code and response
flag split, the caller's identity, and a latency quantile from Istio's duration histogram.

The proxy plays one workload's sidecar: inbound listener ``a`` (mutual TLS, service ``a`` behind
it answers after 30 ms), inbound listener ``b`` (plaintext, service ``b`` is down: 503 UF), and
an outbound listener reporting as ``source`` to service ``a``. Prometheus comes from the Debian
package ``prometheus`` (scripts/setup installs it); without it the test is skipped, except in
CI, where it must run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.support.bootstrap import HCM, ROUTER, address, static_cluster
from tests.support.pki import Pki
from tests.support.procs import (
    LOOPBACK,
    ManagedProcess,
    admin_get,
    free_ports,
    start_ubimesh,
)
from tests.support.upstreams import ScriptedUpstream

TLS_DOWN = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
META = "ubimesh.telemetry"
WEB = "spiffe://example.org/ns/shop/sa/web"
SVC_A = "a.shop.svc.cluster.local"
SVC_B = "b.shop.svc.cluster.local"
DELAY_MS = 30
SENT_A, SENT_B, SENT_OUT = 30, 10, 5

PROMETHEUS = shutil.which("prometheus")
if PROMETHEUS is None and os.environ.get("CI"):
    raise RuntimeError("prometheus is not installed; scripts/setup installs it (Debian package)")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="no prometheus binary (run scripts/setup: Debian package prometheus)"
)


def _hcm(prefix: str, cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM,
            "stat_prefix": prefix,
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}],
                    }
                ]
            },
            "http_filters": [
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
            ],
        },
    }


def _cluster(name: str, port: int, meta: dict[str, str] | None = None) -> dict[str, Any]:
    out = static_cluster(name, [port], connect_timeout="1s")
    if meta is not None:
        out["metadata"] = {"filter_metadata": {META: meta}}
    return out


def bootstrap(ports: dict[str, int], app: int, dead: int, files: dict[str, Path]) -> Any:
    own = {"workload": "api-1", "namespace": "shop", "app": "api", "cluster": "site-1"}

    def inbound(service: str) -> dict[str, Any]:
        return {
            **own,
            "reporter": "destination",
            "principal": "spiffe://example.org/ns/shop/sa/api",
            "service": f"{service}.shop.svc.cluster.local",
            "service_name": service,
            "service_namespace": "shop",
            "peers": {WEB: "web-1"},
        }

    mtls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TLS_DOWN,
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(files["server"])},
                        "private_key": {"filename": str(files["server_key"])},
                    }
                ],
                "validation_context": {"trusted_ca": {"filename": str(files["bundle"])}},
            },
        },
    }
    return {
        "admin": {"address": address(ports["admin"])},
        "static_resources": {
            "listeners": [
                {
                    "name": "a",
                    "address": address(ports["a"]),
                    "filter_chains": [{"filters": [_hcm("a", "a")], "transport_socket": mtls}],
                    "metadata": {"filter_metadata": {META: inbound("a")}},
                },
                {
                    "name": "b",
                    "address": address(ports["b"]),
                    "filter_chains": [{"filters": [_hcm("b", "b")]}],
                    "metadata": {"filter_metadata": {META: inbound("b")}},
                },
                {
                    "name": "out",
                    "address": address(ports["out"]),
                    "filter_chains": [{"filters": [_hcm("out", "outbound_a")]}],
                    "metadata": {
                        "filter_metadata": {META: {**own, "reporter": "source", "principal": WEB}}
                    },
                },
            ],
            "clusters": [
                _cluster("a", app),
                _cluster("b", dead),
                _cluster(
                    "outbound_a",
                    app,
                    {"service": SVC_A, "service_name": "a", "service_namespace": "shop"},
                ),
            ],
        },
    }


class Prometheus:
    """A Prometheus server on 127.0.0.1, scraping ``targets`` every second."""

    def __init__(self, work: Path, port: int, targets: list[str]) -> None:
        config = work / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "ubimesh",
                            "metrics_path": "/stats/prometheus",
                            "static_configs": [{"targets": targets}],
                        }
                    ],
                }
            )
        )
        assert PROMETHEUS is not None
        self.base = f"http://{LOOPBACK}:{port}"
        self.proc = ManagedProcess(
            "prometheus",
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'tsdb'}",
                f"--web.listen-address={LOOPBACK}:{port}",
                "--log.level=warn",
            ],
            work / "prometheus.log",
            work,
        )

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.alive:
                raise RuntimeError(self.proc.describe())
            try:
                with urllib.request.urlopen(self.base + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready in {timeout}s\n{self.proc.describe()}")

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector ``promql`` evaluates to now."""
        url = self.base + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def by(self, promql: str, *labels: str) -> dict[tuple[str, ...], float]:
        return {
            tuple(s["metric"].get(n, "") for n in labels): float(s["value"][1])
            for s in self.query(promql)
        }


@dataclass
class Mesh:
    prom: Prometheus
    ports: dict[str, int]
    files: dict[str, Path]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    work = tmp_path_factory.mktemp("prometheus-mesh")
    pki = Pki("example.org")
    files: dict[str, Path] = {"bundle": work / "bundle.pem"}
    files["bundle"].write_bytes(pki.bundle_pem)
    for name, sid in (("server", "spiffe://example.org/ns/shop/sa/api"), ("web", WEB)):
        files[name], files[name + "_key"] = pki.write_leaf(work, name, pki.leaf(sid))
    app = ScriptedUpstream("app")
    admin, a, b, out, dead, prom_port = free_ports(6)
    ports = {"admin": admin, "a": a, "b": b, "out": out}
    prom = Prometheus(work, prom_port, [f"{LOOPBACK}:{admin}"])
    proxy: ManagedProcess | None = None
    try:
        path = work / "ubimesh.json"
        path.write_text(json.dumps(bootstrap(ports, app.port, dead, files)))
        proxy = start_ubimesh(path, admin, [a, b, out], work)
        prom.wait_ready()
        yield Mesh(prom, ports, files)
    finally:
        if proxy is not None:
            proxy.stop()
        prom.proc.stop()
        app.stop()


def _get_many(sock: socket.socket, path: str, count: int) -> list[int]:
    """``count`` GETs of ``path`` one after the other on one keep-alive connection."""
    statuses = []
    reader = sock.makefile("rb")
    for _ in range(count):
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: svc\r\n\r\n".encode())
        status = int(reader.readline().split()[1])
        length = 0
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        reader.read(length)
        statuses.append(status)
    return statuses


def test_promql_answers_match_the_traffic(mesh: Mesh) -> None:
    prom, ports, files = mesh.prom, mesh.ports, mesh.files
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(files["web"]), str(files["web_key"]))
    with ctx.wrap_socket(socket.create_connection((LOOPBACK, ports["a"]), timeout=5)) as tls:
        assert _get_many(tls, f"/delay/{DELAY_MS}", SENT_A) == [200] * SENT_A
    with socket.create_connection((LOOPBACK, ports["b"]), timeout=5) as s:
        assert _get_many(s, "/", SENT_B) == [503] * SENT_B
    with socket.create_connection((LOOPBACK, ports["out"]), timeout=5) as s:
        assert _get_many(s, "/delay/1", SENT_OUT) == [200] * SENT_OUT

    # Wait (bounded) until Prometheus has scraped everything sent.
    total = "sum(istio_requests_total)"
    deadline = time.monotonic() + 20
    seen: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        seen = prom.query(total)
        if seen and float(seen[0]["value"][1]) == SENT_A + SENT_B + SENT_OUT:
            break
        time.sleep(0.25)
    else:
        _, page = admin_get(ports["admin"], "/stats/prometheus")
        pytest.fail(f"Prometheus saw {seen}; the proxy serves:\n{page.decode()[:3000]}")

    dest = 'istio_requests_total{reporter="destination"}'
    assert prom.by(f"sum by (destination_service) ({dest})", "destination_service") == {
        (SVC_A,): SENT_A,
        (SVC_B,): SENT_B,
    }
    split = prom.by(
        f"sum by (destination_service, response_code, response_flags) ({dest})",
        "destination_service",
        "response_code",
        "response_flags",
    )
    assert split == {(SVC_A, "200", "-"): SENT_A, (SVC_B, "503", "UF"): SENT_B}
    callers = prom.by(
        f"sum by (destination_service, source_principal, source_workload,"
        f" connection_security_policy) ({dest})",
        "destination_service",
        "source_principal",
        "source_workload",
        "connection_security_policy",
    )
    assert callers == {
        (SVC_A, WEB, "web-1", "mutual_tls"): SENT_A,
        (SVC_B, "unknown", "unknown", "none"): SENT_B,
    }
    source = prom.by(
        "sum by (destination_service, source_workload, response_code) "
        '(istio_requests_total{reporter="source"})',
        "destination_service",
        "source_workload",
        "response_code",
    )
    assert source == {(SVC_A, "api-1", "200"): SENT_OUT}

    # The 30 ms requests all fall in Istio's (25, 50] ms bucket: the median is inside it.
    ((p50,),) = [
        (float(s["value"][1]),)
        for s in prom.query(
            "histogram_quantile(0.5, sum by (le) (istio_request_duration_milliseconds_bucket"
            f'{{reporter="destination",destination_service="{SVC_A}"}}))'
        )
    ]
    assert 25 < p50 <= 50, p50
    counts = prom.by(
        f'sum(istio_request_duration_milliseconds_count{{destination_service="{SVC_A}"}})'
    )
    assert counts == {(): SENT_A + SENT_OUT}
    # Response bytes were counted per request, and Envoy's own stats sit beside Istio's.
    assert prom.by(f'sum(istio_response_bytes_count{{destination_service="{SVC_B}"}})') == {
        (): SENT_B
    }
    assert prom.by(
        'sum by (envoy_cluster_name) (envoy_cluster_upstream_rq_total{envoy_cluster_name="a"})',
        "envoy_cluster_name",
    ) == {("a",): SENT_A}
