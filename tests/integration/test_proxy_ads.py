"""The ubimesh proxy as an ADS client, against a real gRPC ADS server written here.

The server (``FakeAds``) serves hand-built Listener / RouteConfiguration / Cluster /
ClusterLoadAssignment protos over state-of-the-world ADS and records every request it gets, so
the tests can check what the proxy ACKed and NACKed. It answers a request only when it opens a
type or changes the subscription, and pushes on ``set``, as a control plane does.
"""

from __future__ import annotations

import http.client
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, json_format
from tests.support.echo_upstream import EchoServerPool
from tests.support.procs import ManagedProcess, admin_get, free_ports, port_accepts, wait_ready

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LOOPBACK = "127.0.0.1"


# ---------------------------------------------------------------------------------------------
# The ADS server


class FakeAds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """A small SotW ADS server: one version per type, a fresh nonce per response."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.resources: dict[str, tuple[str, list[Any]]] = {}
        self.requests: list[discovery_pb2.DiscoveryRequest] = []
        self.streams: list[_Stream] = []
        self.nonce = 0
        self.server: grpc.Server | None = None
        self.port = 0

    # -- control ----------------------------------------------------------------------------

    def start(self, port: int = 0) -> int:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)
        with self.lock:
            self.requests.clear()
        self.port = server.add_insecure_port(f"{LOOPBACK}:{port}")
        server.start()
        self.server = server
        return self.port

    def stop(self) -> None:
        with self.lock:
            for stream in self.streams:
                stream.out.put(None)
            self.streams.clear()
        if self.server is not None:
            self.server.stop(0).wait(5)
            self.server = None

    def set(self, type_url: str, version: str, msgs: list[Any]) -> None:
        """Replace a type's resources and push them to every stream that asked for it."""
        with self.lock:
            self.resources[type_url] = (version, msgs)
            for stream in self.streams:
                if type_url in stream.names:
                    self._send(stream, type_url)

    def requests_of(self, type_url: str) -> list[discovery_pb2.DiscoveryRequest]:
        with self.lock:
            return [r for r in self.requests if r.type_url == type_url]

    def wait_request(self, what: Any, timeout: float = 10.0) -> discovery_pb2.DiscoveryRequest:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for r in self.requests:
                    if what(r):
                        return r
            time.sleep(0.02)
        raise AssertionError(f"no such request; got {self.summary()}")

    def summary(self) -> list[tuple[str, str, str, bool]]:
        with self.lock:
            return [
                (r.type_url.rsplit(".", 1)[-1], r.version_info, r.response_nonce,
                 r.HasField("error_detail"))
                for r in self.requests
            ]  # fmt: skip

    # -- the service --------------------------------------------------------------------------

    def _send(self, stream: _Stream, type_url: str) -> None:
        if type_url not in self.resources:
            return  # nothing for this type yet: the request waits, as with a real server
        version, msgs = self.resources[type_url]
        wanted = stream.names.get(type_url)
        response = discovery_pb2.DiscoveryResponse(type_url=type_url, version_info=version)
        for msg in msgs:
            name = msg.cluster_name if type_url == EDS else msg.name
            if wanted and name not in wanted:
                continue
            a = any_pb2.Any()
            a.Pack(msg)
            response.resources.append(a)
        self.nonce += 1
        response.nonce = f"n{self.nonce}"
        stream.out.put(response)

    def StreamAggregatedResources(self, request_iterator: Any, context: Any) -> Any:
        stream = _Stream()
        with self.lock:
            self.streams.append(stream)

        def read() -> None:
            try:
                for req in request_iterator:
                    with self.lock:
                        self.requests.append(req)
                        names = frozenset(req.resource_names)
                        new = req.type_url not in stream.names
                        if new or names != stream.names[req.type_url]:
                            stream.names[req.type_url] = names
                            self._send(stream, req.type_url)
            except grpc.RpcError:
                pass
            stream.out.put(None)

        threading.Thread(target=read, daemon=True).start()
        while context.is_active():
            try:
                item = stream.out.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is None:
                return
            yield item


class _Stream:
    def __init__(self) -> None:
        self.names: dict[str, frozenset[str]] = {}
        self.out: queue.Queue[discovery_pb2.DiscoveryResponse | None] = queue.Queue(100)


# ---------------------------------------------------------------------------------------------
# Resources


def listener(name: str, port: int, route_name: str) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix="ingress")
    hcm.rds.route_config_name = route_name
    hcm.rds.config_source.ads.SetInParent()
    hcm.rds.config_source.resource_api_version = 2  # V3
    router = hcm.http_filters.add(name="envoy.filters.http.router")
    router.typed_config.Pack(router_pb2.Router())
    lst = listener_pb2.Listener(name=name)
    lst.address.socket_address.address = LOOPBACK
    lst.address.socket_address.port_value = port
    flt = lst.filter_chains.add().filters.add(name="envoy.filters.network.http_connection_manager")
    flt.typed_config.Pack(hcm)
    return lst


def route_config(name: str, cluster: str, **action: Any) -> route_pb2.RouteConfiguration:
    return json_format.ParseDict(
        {
            "name": name,
            "virtual_hosts": [{
                "name": "all", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster, **action}}],
            }],
        },
        route_pb2.RouteConfiguration(),
    )  # fmt: skip


def eds_cluster(name: str) -> cluster_pb2.Cluster:
    return json_format.ParseDict(
        {
            "name": name, "type": "EDS", "connect_timeout": "1s",
            "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
        },
        cluster_pb2.Cluster(),
    )  # fmt: skip


def assignment(name: str, port: int) -> endpoint_pb2.ClusterLoadAssignment:
    return json_format.ParseDict(
        {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": LOOPBACK, "port_value": port}}}}]}],
        },
        endpoint_pb2.ClusterLoadAssignment(),
    )  # fmt: skip


def bootstrap(admin_port: int, ads_port: int) -> dict[str, Any]:
    return {
        "node": {"id": "web-1.shop", "cluster": "web", "metadata": {"ubimesh.role": "sidecar"}},
        "admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC", "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [{
            "name": "xds", "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3"
                             ".HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                },
            },
            "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": LOOPBACK, "port_value": ads_port}}}}]}]},
        }]},
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


class Mesh:
    """The fake control plane, two echo upstreams and the proxies started against them."""

    def __init__(self, tmp: Path, echo: EchoServerPool) -> None:
        self.tmp = tmp
        self.echo = echo
        self.ads = FakeAds()
        self.ads_port = self.ads.start()
        self.listen_port, self.admin_port = free_ports(2)
        self.procs: list[ManagedProcess] = []
        self.cache = tmp / "cache"

    def serve_initial(self) -> None:
        ads = self.ads
        ads.set(CDS, "c1", [eds_cluster("a"), eds_cluster("b")])
        ads.set(EDS, "e1", [assignment("a", self.echo.port("a")),
                            assignment("b", self.echo.port("b"))])
        ads.set(LDS, "l1", [listener("main", self.listen_port, "routes")])
        ads.set(RDS, "r1", [route_config("routes", "a")])

    def start_proxy(self, *, ready: bool = True) -> ManagedProcess:
        n = len(self.procs)
        config = self.tmp / f"bootstrap{n}.yaml"
        config.write_text(yaml.safe_dump(bootstrap(self.admin_port, self.ads_port)))
        argv = ["ubimesh", "proxy", "-c", str(config), "-l", "info",
                "--xds-cache-dir", str(self.cache)]  # fmt: skip
        proc = ManagedProcess(f"ads{n}", argv, self.tmp / f"ads{n}.log", self.tmp)
        self.procs.append(proc)
        if ready:
            wait_ready(proc, self.admin_port, [self.listen_port], timeout=20)
        return proc

    def get(self, path: str = "/", timeout: float = 5.0) -> tuple[int, str]:
        """One request on a new connection: (status, the echo upstream that answered)."""
        conn = http.client.HTTPConnection(LOOPBACK, self.listen_port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            return resp.status, resp.getheader("x-echo-upstream") or ""
        finally:
            conn.close()

    def wait_upstream(self, name: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.get()
                if last == (200, name):
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.05)
        raise AssertionError(f"traffic never reached {name!r}: last {last}")

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()
        self.ads.stop()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    echo = EchoServerPool()
    m = Mesh(tmp_path, echo)
    yield m
    m.close()
    echo.close()


def acked(r: discovery_pb2.DiscoveryRequest, type_url: str, version: str) -> bool:
    return (
        r.type_url == type_url
        and r.version_info == version
        and bool(r.response_nonce)
        and not r.HasField("error_detail")
    )


# ---------------------------------------------------------------------------------------------
# Tests


def test_not_ready_until_the_first_configuration_then_serves_and_acks(mesh: Mesh) -> None:
    proc = mesh.start_proxy(ready=False)
    first = mesh.ads.wait_request(lambda r: r.type_url == CDS)
    # The node goes on the first request, metadata included.
    assert first.node.id == "web-1.shop" and first.node.cluster == "web"
    assert first.node.metadata.fields["ubimesh.role"].string_value == "sidecar"
    assert list(first.resource_names) == [] and first.response_nonce == ""
    status, body = admin_get(mesh.admin_port, "/ready")
    assert status == 503 and b"INITIALIZING" in body, (status, body, proc.describe())
    assert not port_accepts(mesh.listen_port)

    mesh.serve_initial()
    wait_ready(proc, mesh.admin_port, [mesh.listen_port], timeout=20)
    assert mesh.get() == (200, "a")
    # Each response is ACKed with its version and nonce; EDS and RDS were subscribed by name.
    for type_url, version in ((CDS, "c1"), (EDS, "e1"), (LDS, "l1"), (RDS, "r1")):
        mesh.ads.wait_request(lambda r, t=type_url, v=version: acked(r, t, v))
    eds = mesh.ads.requests_of(EDS)
    assert set(eds[0].resource_names) == {"a", "b"}
    assert list(mesh.ads.requests_of(RDS)[0].resource_names) == ["routes"]
    # /config_dump shows the dynamic resources with their versions.
    status, body = admin_get(mesh.admin_port, "/config_dump")
    assert status == 200 and b'"dynamic_route_configs"' in body and b'"r1"' in body


def test_live_update_invalid_update_nack_and_cache(mesh: Mesh) -> None:
    mesh.serve_initial()
    mesh.start_proxy()
    mesh.wait_upstream("a")

    # A routing change while a client keeps sending: no request fails.
    results: list[Any] = []
    stop = threading.Event()

    def client() -> None:
        for _ in range(2000):
            if stop.is_set():
                return
            try:
                results.append(mesh.get())
            except OSError as exc:
                results.append(exc)

    t = threading.Thread(target=client)
    t.start()
    time.sleep(0.3)
    mesh.ads.set(RDS, "r2", [route_config("routes", "b")])
    mesh.wait_upstream("b")
    time.sleep(0.3)
    stop.set()
    t.join(30)
    assert results and all(isinstance(r, tuple) and r[0] == 200 for r in results), [
        r for r in results if not (isinstance(r, tuple) and r[0] == 200)
    ][:5]
    assert {r[1] for r in results} == {"a", "b"}
    ack = mesh.ads.wait_request(lambda r: acked(r, RDS, "r2"))
    assert ack.response_nonce

    # An update ubimesh refuses is NACKed with the field's path; the old routing stays.
    mesh.ads.set(RDS, "r3", [route_config("routes", "a", hedge_policy={"initial_requests": 2})])
    nack = mesh.ads.wait_request(lambda r: r.type_url == RDS and r.HasField("error_detail"))
    assert nack.version_info == "r2"
    assert nack.error_detail.code == 3
    assert "rds[routes].virtual_hosts[0].routes[0].route.hedge_policy" in nack.error_detail.message
    assert "not supported by ubimesh" in nack.error_detail.message
    assert mesh.get() == (200, "b")

    # The control plane goes away: traffic keeps flowing.
    mesh.ads.stop()
    for _ in range(20):
        assert mesh.get() == (200, "b")

    # A new proxy while the control plane is down serves from the disk cache.
    assert (mesh.cache / "ads-cache.json").exists()
    mesh.procs[0].stop()
    mesh.start_proxy()
    assert mesh.get() == (200, "b")

    # The control plane comes back: the proxy reconnects, with the versions it serves, and
    # follows a new update.
    mesh.ads.start(mesh.ads_port)
    mesh.serve_initial()
    reconnect = mesh.ads.wait_request(lambda r: r.type_url == CDS, timeout=20)
    assert reconnect.version_info == "c1" and reconnect.response_nonce == ""
    mesh.wait_upstream("a", timeout=20)
