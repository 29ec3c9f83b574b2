"""The compiler's authorization output run by real proxies: Envoy 1.40 and ``ubimesh proxy``.

A STRICT mesh (api with an HTTP and a TCP port, web calling it through its sidecar, external
services on 127.0.0.1) is compiled with ``compile_all``; the sidecars of ``api-1`` and
``web-1`` are turned into static bootstraps (RDS and EDS inlined, the SDS secrets ``default``
and ``ROOTCA`` made static from a test PKI) and run by each proxy in turn, unchanged
otherwise. Clients hold certificates of several identities. Checked: what TrafficTargets allow
gets through (200 from the upstream), a caller that is not a source, or a source on a route
or port it is not given, gets 403 (and the upstream sees nothing); TCP connections from
callers not allowed are closed; egress through web's sidecar reaches only the allowed routes
of the allowed ExternalService, and anything else (another ExternalService, an unknown Host,
a forbidden upstream listener) is refused with ``x-ubimesh-denied-by: egress``, and the
ubimesh proxy logs the denial (``ubimesh.rbac``).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from tests.support.echo_upstream import EchoServerPool
from tests.support.pki import Pki
from tests.support.procs import (
    ManagedProcess,
    ProcessStartError,
    envoy_binary,
    free_ports,
    start_envoy,
    start_ubimesh,
    ubimesh_available,
)

from ubimesh.control.compiler import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    XdsSet,
    compile_all,
)
from ubimesh.control.resources import parse_documents, validate_set

pytestmark = [pytest.mark.envoy]

TD = "example.org"
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)


def sa(ns: str, name: str) -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{name}"


MESH = """
apiVersion: ubimesh.io/v1alpha1
kind: Mesh
metadata: {name: default}
spec: {trustDomain: example.org, mtls: {mode: STRICT}}
---
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  ports:
  - {name: http, port: 8080, protocol: http}
  - {name: db, port: 5432, protocol: tcp}
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: api-1, namespace: shop}
spec:
  service: api
  address: 127.0.0.1
  ports: {http: $API_APP, db: $DB_APP}
  sidecar: {inboundPorts: {http: $API_IN, db: $DB_IN}}
---
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports: [{name: http, port: 80, protocol: http}]
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: web-1, namespace: shop}
spec:
  service: web
  address: 127.0.0.1
  ports: {http: $WEB_APP}
  sidecar:
    inboundPorts: {http: $WEB_IN}
    outboundPort: $WEB_OUT
    upstreams:
    - {service: mail, localPort: $MAIL_UP}
    - {service: vault, localPort: $VAULT_UP}
---
apiVersion: ubimesh.io/v1alpha1
kind: ExternalService
metadata: {name: pay, namespace: shop}
spec: {host: pay.example.com, port: $PAY_PORT, protocol: http, addresses: [127.0.0.1]}
---
apiVersion: ubimesh.io/v1alpha1
kind: ExternalService
metadata: {name: mail, namespace: shop}
spec: {host: mail.example.com, port: $MAIL_PORT, protocol: http, addresses: [127.0.0.1]}
---
apiVersion: ubimesh.io/v1alpha1
kind: ExternalService
metadata: {name: vault, namespace: shop}
spec: {host: vault.example.com, port: $VAULT_PORT, protocol: tcp, addresses: [127.0.0.1]}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: api-routes, namespace: shop}
spec:
  matches:
  - {name: read, pathRegex: "/api/v1/items", methods: [GET, HEAD]}
  - {name: admin, pathRegex: "/admin", methods: ["*"]}
  - {name: beta, headers: [{x-beta: "true"}]}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: pay-routes, namespace: shop}
spec:
  matches:
  - {name: charges, pathRegex: "/v1/charges", methods: [GET]}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: db-port, namespace: shop}
spec: {matches: {ports: [5432]}}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: http-port, namespace: shop}
spec: {matches: {ports: [8080]}}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: web-to-api, namespace: shop}
spec:
  destination: {kind: ServiceAccount, name: api}
  rules:
  - {kind: TCPRoute, name: http-port}
  - {kind: HTTPRouteGroup, name: api-routes, matches: [read, beta]}
  sources: [{kind: ServiceAccount, name: web}]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: ops-admin, namespace: shop}
spec:
  destination: {kind: ServiceAccount, name: api}
  rules: [{kind: HTTPRouteGroup, name: api-routes, matches: [admin]}]
  sources: [{kind: ServiceAccount, name: ops, namespace: infra}]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: batch-db, namespace: shop}
spec:
  destination: {kind: ServiceAccount, name: api}
  rules: [{kind: TCPRoute, name: db-port}]
  sources: [{kind: ServiceAccount, name: batch, namespace: jobs}]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: web-to-pay, namespace: shop}
spec:
  destination: {kind: ExternalService, name: pay}
  rules: [{kind: HTTPRouteGroup, name: pay-routes}]
  sources: [{kind: ServiceAccount, name: web}]
"""

PORT_NAMES = ("API_IN", "DB_IN", "WEB_IN", "WEB_OUT", "MAIL_UP", "VAULT_UP",
              "API_ADMIN", "WEB_ADMIN")


# -- Compiled xDS -> a static bootstrap ------------------------------------------------------


def _walk(node: Any, fix: Callable[[dict[str, Any]], None]) -> None:
    if isinstance(node, dict):
        fix(node)
        for value in node.values():
            _walk(value, fix)
    elif isinstance(node, list):
        for value in node:
            _walk(value, fix)


def static_bootstrap(
    node: str, xds: XdsSet, admin_port: int, cert: tuple[bytes, bytes], bundle: bytes
) -> dict[str, Any]:
    """The proxy's compiled resources as one static bootstrap: each HCM's RDS route
    configuration inlined, EDS clusters made STATIC with their assignment, the SDS secrets
    ``default`` and ``ROOTCA`` static (their references keep their names, lose ``sds_config``).
    Nothing else changes."""
    def as_dict(msg: Any) -> dict[str, Any]:
        out: dict[str, Any] = json_format.MessageToDict(msg, preserving_proto_field_name=True)
        return out

    routes = {n: as_dict(m) for n, m in xds.resources[ROUTE_TYPE].items()}
    listeners = [as_dict(m) for m in xds.resources[LISTENER_TYPE].values()]
    clusters = []
    for name, msg in xds.resources[CLUSTER_TYPE].items():
        cluster = as_dict(msg)
        if cluster.get("type") == "EDS":
            cluster["type"] = "STATIC"
            del cluster["eds_cluster_config"]
            cluster["load_assignment"] = as_dict(xds.resources[ENDPOINT_TYPE][name])
        clusters.append(cluster)

    def fix(d: dict[str, Any]) -> None:
        if d.get("@type") == HCM_TYPE and "rds" in d:
            d["route_config"] = routes[d.pop("rds")["route_config_name"]]
        for key in ("tls_certificate_sds_secret_configs",):
            for ref in d.get(key, []):
                ref.pop("sds_config", None)
        if "validation_context_sds_secret_config" in d:
            d["validation_context_sds_secret_config"].pop("sds_config", None)

    _walk(listeners, fix)
    _walk(clusters, fix)
    chain, key = cert
    return {
        "node": {"id": node, "cluster": node},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "static_resources": {
            "listeners": listeners,
            "clusters": clusters,
            "secrets": [
                {"name": "default", "tls_certificate": {
                    "certificate_chain": {"inline_string": chain.decode()},
                    "private_key": {"inline_string": key.decode()}}},
                {"name": "ROOTCA", "validation_context": {
                    "trusted_ca": {"inline_string": bundle.decode()}}},
            ],
        },
    }


# -- The running mesh -------------------------------------------------------------------------


class Mesh:
    def __init__(self, kind: str, tmp: Path, pki: Pki, echo: EchoServerPool,
                 ports: dict[str, int], procs: list[ManagedProcess]) -> None:
        self.kind, self.tmp, self.pki, self.echo = kind, tmp, pki, echo
        self.ports, self.procs = ports, procs
        self._contexts: dict[str, ssl.SSLContext] = {}

    def context(self, identity: str) -> ssl.SSLContext:
        if identity not in self._contexts:
            chain, key = self.pki.leaf(identity)
            stem = identity.rsplit("/", 1)[-1] + str(len(self._contexts))
            (self.tmp / f"{stem}.crt").write_bytes(chain)
            (self.tmp / f"{stem}.key").write_bytes(key)
            (self.tmp / "bundle.pem").write_bytes(self.pki.bundle_pem)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False  # the server's name is its SPIFFE ID (URI SAN)
            ctx.load_verify_locations(str(self.tmp / "bundle.pem"))
            ctx.load_cert_chain(str(self.tmp / f"{stem}.crt"), str(self.tmp / f"{stem}.key"))
            self._contexts[identity] = ctx
        return self._contexts[identity]

    def inbound(self, identity: str, method: str, path: str,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", self.ports["API_IN"], timeout=5,
                                           context=self.context(identity))
        try:
            conn.request(method, path, headers=headers or {})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, \
                response.read()
        finally:
            conn.close()

    def outbound(self, port: int, host: str, method: str, path: str
                 ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request(method, path, headers={"Host": host})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, \
                response.read()
        finally:
            conn.close()

    def tcp_exchange(self, port: int, identity: str | None) -> bytes:
        """Send an HTTP request over a TCP connection (TLS with ``identity``'s certificate,
        or plaintext) and return what comes back before the connection closes."""
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock: socket.socket = raw
        try:
            if identity is not None:
                sock = self.context(identity).wrap_socket(raw)
            sock.sendall(b"GET /db HTTP/1.1\r\nHost: db\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                try:
                    chunk = sock.recv(65536)
                except (ConnectionResetError, ssl.SSLError):
                    break
                if not chunk:
                    break
                data += chunk
            return data
        finally:
            sock.close()


PROXIES = ["envoy", "ubimesh"]


@pytest.fixture(params=PROXIES, scope="module")
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Mesh]:
    kind = str(request.param)
    if kind == "envoy" and envoy_binary() is None:
        pytest.skip("no envoy binary on PATH")
    if kind == "ubimesh":
        ok, why = ubimesh_available()
        if not ok:
            pytest.skip(why)
    tmp = tmp_path_factory.mktemp(f"authz-{kind}")
    pki = Pki(TD)
    with EchoServerPool() as echo:
        apps = {"API_APP": echo.port("api"), "DB_APP": echo.port("db"),
                "WEB_APP": echo.port("web"), "PAY_PORT": echo.port("pay"),
                "MAIL_PORT": echo.port("mail"), "VAULT_PORT": echo.port("vault")}
        for attempt in range(3):
            ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
            text = MESH
            for name, value in {**apps, **ports}.items():
                text = text.replace(f"${name}", str(value))
            resources = parse_documents(text, "mesh.yaml")
            validate_set(resources)
            compiled = compile_all(resources)
            procs: list[ManagedProcess] = []
            try:
                for node, account, admin, listen in (
                    ("api-1.shop", "api", "API_ADMIN", ("API_IN", "DB_IN")),
                    ("web-1.shop", "web", "WEB_ADMIN", ("WEB_IN", "WEB_OUT", "MAIL_UP",
                                                        "VAULT_UP")),
                ):
                    boot = static_bootstrap(node, compiled[node], ports[admin],
                                            pki.leaf(sa("shop", account)), pki.bundle_pem)
                    path = tmp / f"{node}-{attempt}.yaml"
                    path.write_text(json.dumps(boot, indent=1))
                    start = start_envoy if kind == "envoy" else start_ubimesh
                    procs.append(start(path, ports[admin], [ports[p] for p in listen], tmp,
                                       name=f"{kind}-{node}-{attempt}"))
            except ProcessStartError:
                for proc in procs:
                    proc.stop()
                if attempt == 2:
                    raise
                continue
            break
        m = Mesh(kind, tmp, pki, echo, {**apps, **ports}, procs)
        try:
            yield m
        finally:
            for proc in procs:
                proc.stop()


WEB, OPS, BATCH, STRANGER = sa("shop", "web"), sa("infra", "ops"), sa("jobs", "batch"), \
    sa("shop", "stranger")

#: (caller, method, path, headers, allowed, deciding policy when allowed)
HTTP_CASES = [
    (WEB, "GET", "/api/v1/items", {}, True),
    (WEB, "HEAD", "/api/v1/items/7", {}, True),
    (WEB, "GET", "/api/v1/itemsXYZ", {}, True),  # anchored at the start only
    (WEB, "POST", "/api/v1/items", {}, False),  # method not given
    (WEB, "GET", "/admin", {}, False),  # route not given to web
    (WEB, "POST", "/anything", {"x-beta": "true"}, True),
    (WEB, "POST", "/anything", {"x-beta": "false"}, False),
    (OPS, "DELETE", "/admin/users/1", {}, True),
    (OPS, "GET", "/api/v1/items", {}, False),
    (BATCH, "GET", "/api/v1/items", {}, False),  # a TCPRoute on another port
    (STRANGER, "GET", "/api/v1/items", {}, False),  # not a source
    (sa("other", "web"), "GET", "/api/v1/items", {}, False),  # same name, other namespace
]


@pytest.mark.parametrize(("caller", "method", "path", "headers", "allowed"), HTTP_CASES)
def test_inbound_http(mesh: Mesh, caller: str, method: str, path: str,
                      headers: dict[str, str], allowed: bool) -> None:
    cursor = mesh.echo.cursor()
    status, got_headers, body = mesh.inbound(caller, method, path, headers)
    reached = [r for r in mesh.echo.records_since(cursor, timeout=0.2) if r.name == "api"]
    if allowed:
        assert status == 200, body
        assert len(reached) == 1
    else:
        assert status == 403, body
        assert body == b"RBAC: access denied" or method == "HEAD"
        assert not reached, "a denied request reached the upstream"
        if mesh.kind == "ubimesh":  # a mesh caller (verified certificate) is told why
            assert got_headers.get("x-ubimesh-denied-by") == "none"


@pytest.mark.parametrize(("caller", "allowed"), [(BATCH, True), (WEB, False), (STRANGER, False)])
def test_inbound_tcp(mesh: Mesh, caller: str, allowed: bool) -> None:
    data = mesh.tcp_exchange(mesh.ports["DB_IN"], caller)
    if allowed:
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        assert b'"name": "db"' in data or b'"name":"db"' in data
    else:
        assert data == b"", data[:200]


def _rbac_log(mesh: Mesh) -> str:
    web = next(p for p in mesh.procs if "web-1" in p.name)
    return web.log_path.read_text(errors="replace")


@pytest.mark.parametrize(
    ("host", "method", "path", "allowed"),
    [
        ("pay.example.com", "GET", "/v1/charges/ch_1", True),
        ("pay.shop.external", "GET", "/v1/charges", True),
        ("pay.example.com", "POST", "/v1/charges", False),  # method not given
        ("pay.example.com", "GET", "/v1/refunds", False),  # route not given
        ("mail.example.com", "GET", "/", False),  # an ExternalService web is not given
        ("c2.attacker.example", "GET", "/beacon", False),  # not in the mesh at all
    ],
)
def test_egress_through_the_outbound_listener(mesh: Mesh, host: str, method: str, path: str,
                                              allowed: bool) -> None:
    cursor = mesh.echo.cursor()
    status, headers, body = mesh.outbound(mesh.ports["WEB_OUT"], host, method, path)
    reached = [r.name for r in mesh.echo.records_since(cursor, timeout=0.2)]
    if allowed:
        assert status == 200, body
        assert reached == ["pay"]
        return
    assert status == 403, body
    assert headers.get("x-ubimesh-denied-by") == "egress"
    assert reached == [], "a refused request left the sidecar"
    if mesh.kind == "ubimesh":
        deadline = time.monotonic() + 3
        needle = host.split(":")[0]
        while time.monotonic() < deadline:
            lines = [ln for ln in _rbac_log(mesh).splitlines()
                     if "ubimesh.rbac" in ln and needle in ln and "egress" in ln]
            if lines:
                break
            time.sleep(0.1)
        assert lines, f"no ubimesh.rbac denial logged for {host}:\n{_rbac_log(mesh)[-2000:]}"


def test_egress_upstream_listeners(mesh: Mesh) -> None:
    # an HTTP upstream to mail would be refused too; vault is TCP: the connection is closed
    cursor = mesh.echo.cursor()
    data = mesh.tcp_exchange(mesh.ports["VAULT_UP"], None)
    assert data == b""
    status, headers, _ = mesh.outbound(mesh.ports["MAIL_UP"], "mail.example.com", "GET", "/")
    assert (status, headers.get("x-ubimesh-denied-by")) == (403, "egress")
    assert mesh.echo.records_since(cursor, timeout=0.2) == []


def test_web_calls_api_through_both_sidecars(mesh: Mesh) -> None:
    """web's outbound listener -> mTLS with web's identity -> api's RBAC: the mesh path."""
    status, _, body = mesh.outbound(mesh.ports["WEB_OUT"], "api.shop", "GET", "/api/v1/items")
    assert status == 200, body
    echoed = json.loads(body)
    xfcc = dict(echoed["headers"]).get("x-forwarded-client-cert", "")
    assert f"URI={WEB}" in xfcc
    status, _, body = mesh.outbound(mesh.ports["WEB_OUT"], "api.shop", "DELETE", "/admin")
    assert status == 403, body
