"""Authorization end to end under ``ubimesh up``: a STRICT mesh is default-deny and allows
exactly what its TrafficTargets say (issue 5, Deliver 2 and 5).

The mesh: gateways ``edge`` (HTTP, and a TCP listener to ``db``) and ``intruder`` (HTTP to
web), workloads ``web-1`` (outbound listener, an upstream to ``db``, an upstream to the TCP
ExternalService ``vault``), ``ledger-1`` and ``db-1``, all running examples/mesh/app.py, and
an in-test HTTP server standing for the external host ``pay.example.com`` on 127.0.0.1. The
test plays web's application by calling web's sidecar's loopback listeners.

TrafficTargets: edge -> web (everything); edge and web -> ledger (GET/HEAD /ledger...);
web -> db (TCPRoute, port 5432); web -> ExternalService pay (GET /v1/charges...).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.support.procs import free_ports
from tests.support.up import running_up

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "mesh" / "app.py"

MESH = """\
apiVersion: ubimesh.io/v1alpha1
kind: Gateway
metadata: {name: edge}
spec:
  address: 127.0.0.1
  listeners:
  - {name: web, port: %(gw)d, protocol: HTTP}
  - {name: pg, port: %(gw_tcp)d, protocol: TCP, backend: {service: db, port: db}}
---
apiVersion: ubimesh.io/v1alpha1
kind: Gateway
metadata: {name: intruder}
spec:
  address: 127.0.0.1
  listeners: [{name: web, port: %(intruder)d, protocol: HTTP}]
---
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: web}
spec: {ports: [{name: http, port: 80, protocol: http}]}
---
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: ledger}
spec: {ports: [{name: http, port: 80, protocol: http}]}
---
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: db}
spec: {ports: [{name: db, port: 5432, protocol: tcp}]}
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: web-1}
spec:
  service: web
  address: 127.0.0.1
  ports: {http: %(web_app)d}
  sidecar:
    inboundPorts: {http: %(web_in)d}
    outboundPort: %(web_out)d
    upstreams:
    - {service: db, localPort: %(web_db)d}
    - {service: vault, localPort: %(web_vault)d}
  command: [python, %(app)s]
  env: {CALLS: ledger.default}
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: ledger-1}
spec:
  service: ledger
  address: 127.0.0.1
  ports: {http: %(ledger_app)d}
  sidecar: {inboundPorts: {http: %(ledger_in)d}}
  command: [python, %(app)s]
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: db-1}
spec:
  service: db
  address: 127.0.0.1
  ports: {db: %(db_app)d}
  sidecar: {inboundPorts: {db: %(db_in)d}}
  command: [python, %(app)s]
---
apiVersion: ubimesh.io/v1alpha1
kind: ExternalService
metadata: {name: pay}
spec: {host: pay.example.com, port: %(pay)d, protocol: http, addresses: [127.0.0.1]}
---
apiVersion: ubimesh.io/v1alpha1
kind: ExternalService
metadata: {name: vault}
spec: {host: vault.example.com, port: %(pay)d, protocol: tcp, addresses: [127.0.0.1]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: edge}
spec:
  parentRefs: [{name: edge, sectionName: web}, {name: intruder}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /ledger}}]
    backendRefs: [{name: ledger, port: 80}]
  - backendRefs: [{name: web, port: 80}]
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: everything}
spec: {matches: [{name: all}]}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: ledger-api}
spec: {matches: [{name: read, pathRegex: /ledger, methods: [GET, HEAD]}]}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: pay-api}
spec: {matches: [{name: charges, pathRegex: /v1/charges, methods: [GET]}]}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: db-port}
spec: {matches: {ports: [5432]}}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: edge-to-web}
spec:
  destination: {kind: ServiceAccount, name: web}
  rules: [{kind: HTTPRouteGroup, name: everything}]
  sources: [{kind: ServiceAccount, name: edge}]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: ledger-readers}
spec:
  destination: {kind: ServiceAccount, name: ledger}
  rules: [{kind: HTTPRouteGroup, name: ledger-api, matches: [read]}]
  sources: [{kind: ServiceAccount, name: edge}, {kind: ServiceAccount, name: web}]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: db-clients}
spec:
  destination: {kind: ServiceAccount, name: db}
  rules: [{kind: TCPRoute, name: db-port}]
  sources: [{kind: ServiceAccount, name: web}]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: web-to-pay}
spec:
  destination: {kind: ExternalService, name: pay}
  rules: [{kind: HTTPRouteGroup, name: pay-api}]
  sources: [{kind: ServiceAccount, name: web}]
"""

PORT_NAMES = ["gw", "gw_tcp", "intruder", "web_app", "web_in", "web_out", "web_db", "web_vault",
              "ledger_app", "ledger_in", "db_app", "db_in", "api", "xds"]


class PayHandler(http.server.BaseHTTPRequestHandler):
    """The external host: answers with what it got; the test counts what arrives."""

    seen: list[str] = []

    def _answer(self) -> None:
        PayHandler.seen.append(f"{self.command} {self.path}")
        body = json.dumps({"external": "pay", "path": self.path}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def pay_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PayHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def request(port: int, method: str, path: str, host: str = "web"
            ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, \
            response.read()
    finally:
        conn.close()


def tcp_exchange(port: int) -> bytes:
    """An HTTP/1.1 request over a plain TCP connection; what comes back before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /db HTTP/1.1\r\nHost: db\r\nConnection: close\r\n\r\n")
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
        return data


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, int], Path]]:
    tmp = tmp_path_factory.mktemp("authz-up")
    with pay_server() as pay:
        ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
        text = MESH % {**ports, "pay": pay, "app": APP}
        with running_up(text, tmp, ports["api"], ports["xds"], ready_timeout=50) as run:
            yield {**ports, "pay": pay}, run.data


def eventually(check: Callable[[], None], timeout: float = 15.0) -> None:
    """Retry ``check`` (raising AssertionError) until it passes: a proxy serves once ready, but
    a peer's certificate may come a moment later."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except (AssertionError, OSError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_allowed_pairs_get_through(up: tuple[dict[str, int], Path]) -> None:
    ports, _ = up

    def edge_to_web() -> None:
        status, _, body = request(ports["gw"], "GET", "/")
        assert status == 200, body
        assert json.loads(body)["service"] == "web"

    eventually(edge_to_web)
    status, _, body = request(ports["gw"], "GET", "/ledger/balance")
    assert status == 200, body
    assert json.loads(body)["service"] == "ledger"
    # web's application calls ledger through its sidecar (sa/web is a ledger reader)
    status, _, body = request(ports["gw"], "GET", "/web/ledger")
    assert status == 200, body
    assert json.loads(body)["upstream"]["service"] == "ledger"
    status, _, body = request(ports["web_out"], "HEAD", "/ledger", host="ledger.default")
    assert status == 200


def test_a_source_not_listed_gets_403(up: tuple[dict[str, int], Path]) -> None:
    ports, _ = up

    def intruder_refused() -> None:
        status, headers, body = request(ports["intruder"], "GET", "/")
        assert status == 403, body
        # the intruder gateway is a mesh caller: web's sidecar says no rule allowed it
        assert headers.get("x-ubimesh-denied-by") == "none"

    eventually(intruder_refused)
    status, _, _ = request(ports["intruder"], "GET", "/ledger/balance")
    assert status == 403


def access_log_line(path: Path, *needles: str, timeout: float = 5.0) -> str:
    """The first line of the proxy's output at ``path`` holding every needle, waiting for the
    access log's flush (at most ``timeout``); fails with the file's tail."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        found = [ln for ln in text.splitlines() if all(n in ln for n in needles)]
        if found:
            return found[0]
        assert time.monotonic() < deadline, (needles, text[-3000:])
        time.sleep(0.1)


def test_denials_are_in_the_access_log_with_who_and_why(
    up: tuple[dict[str, int], Path],
) -> None:
    ports, data = up
    # An HTTP denial at web's inbound listener: who called (its identity) and that no rule
    # allowed it, as Envoy's response code details say it.
    def intruder_refused() -> None:
        assert request(ports["intruder"], "GET", "/who")[0] == 403

    eventually(intruder_refused)
    line = access_log_line(data / "logs" / "proxy-web-1.default.log", '"GET /who ', " 403 ",
                           "rbac_access_denied_matched_policy[none]")
    assert "peer=spiffe://cluster.local/ns/default/sa/intruder" in line, line
    # An egress denial at web's outbound listener names the policy and the destination.
    status, _, _ = request(ports["web_out"], "GET", "/beacon2", host="c2.example.net")
    assert status == 403
    line = access_log_line(data / "logs" / "proxy-web-1.default.log", '"GET /beacon2 ',
                           "rbac_access_denied_matched_policy[egress]")
    assert '"c2.example.net"' in line, line
    # A TCP connection to db from a source no TrafficTarget lists: db's sidecar logs the
    # refused connection with the caller's identity.
    assert tcp_exchange(ports["gw_tcp"]) == b""
    line = access_log_line(data / "logs" / "proxy-db-1.default.log",
                           "rbac_access_denied_matched_policy[none]",
                           "peer=spiffe://cluster.local/ns/default/sa/edge")
    assert " tcp " in line, line


def test_a_listed_source_on_a_route_not_given_gets_403(up: tuple[dict[str, int], Path]) -> None:
    ports, _ = up

    def edge_reads_ledger() -> None:
        assert request(ports["gw"], "GET", "/ledger")[0] == 200

    eventually(edge_reads_ledger)
    for method, path in (("POST", "/ledger"), ("DELETE", "/ledger/1")):
        status, headers, body = request(ports["gw"], method, path)
        assert status == 403, (method, path, body)
        assert headers.get("x-ubimesh-denied-by") == "none"
    status, _, _ = request(ports["web_out"], "PUT", "/ledger", host="ledger.default")
    assert status == 403


def test_tcp_route_ports(up: tuple[dict[str, int], Path]) -> None:
    ports, _ = up

    def web_reaches_db() -> None:
        data = tcp_exchange(ports["web_db"])
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        assert b'"service": "db"' in data

    eventually(web_reaches_db)
    # the edge gateway is not a source of db-clients: its TCP listener's connection is closed
    # by db's sidecar before a byte reaches the database
    assert tcp_exchange(ports["gw_tcp"]) == b""


def test_egress_to_an_allowed_external_service(up: tuple[dict[str, int], Path]) -> None:
    ports, _ = up
    before = len(PayHandler.seen)
    status, _, body = request(ports["web_out"], "GET", "/v1/charges/ch_1", host="pay.example.com")
    assert status == 200, body
    assert json.loads(body) == {"external": "pay", "path": "/v1/charges/ch_1"}
    # a route the TrafficTarget does not give: refused by the sidecar, never sent
    status, headers, _ = request(ports["web_out"], "POST", "/v1/charges", host="pay.example.com")
    assert (status, headers.get("x-ubimesh-denied-by")) == (403, "egress")
    assert PayHandler.seen[before:] == ["GET /v1/charges/ch_1"]


def test_egress_to_an_unlisted_host_is_refused_and_logged(
    up: tuple[dict[str, int], Path],
) -> None:
    ports, data = up
    before = len(PayHandler.seen)
    status, headers, body = request(ports["web_out"], "GET", "/beacon", host="c2.example.net")
    assert status == 403, body
    assert headers.get("x-ubimesh-denied-by") == "egress"
    # vault (TCP) is an ExternalService no TrafficTarget gives web: its upstream is closed
    assert tcp_exchange(ports["web_vault"]) == b""
    assert PayHandler.seen[before:] == []
    log = data / "logs" / "proxy-web-1.default.log"
    deadline = time.monotonic() + 5
    while True:
        text = log.read_text(errors="replace")
        lines = [ln for ln in text.splitlines() if "ubimesh.rbac" in ln]
        http_line = [ln for ln in lines if "authority=c2.example.net" in ln]
        tcp_line = [ln for ln in lines if f"listener=upstream_{ports['web_vault']}" in ln]
        if (http_line and tcp_line) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert http_line, text[-3000:]
    assert "policy=egress" in http_line[0] and "path=/beacon" in http_line[0]
    assert tcp_line and "policy=egress" in tcp_line[0], text[-3000:]
