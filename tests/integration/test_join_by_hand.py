"""A sidecar started by hand (no ``ubimesh up``) joins a mesh whose mTLS is on by default.

The operator's steps, with the CLI: ``ubimesh token create --identity ID`` on the control
plane's side, then ``ubimesh bootstrap --node N --identity ID --control-api URL
--join-token-file F`` and ``ubimesh proxy -c`` on the workload's machine. The Mesh says nothing
of mTLS, so it is STRICT: the sidecar's inbound listener takes only mTLS from a mesh identity and
hands the application the caller's SPIFFE ID in x-forwarded-client-cert. A sidecar bootstrapped
without an identity cannot serve that configuration and says so in its log.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import http.server
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tests.support.control import ControlReplica, control_plane, wait_for
from tests.support.procs import LOOPBACK, ManagedProcess, free_ports, wait_ready

from ubimesh.identity.workload import WorkloadIdentity

API = "spiffe://cluster.local/ns/default/sa/api"
CLIENT = "spiffe://cluster.local/ns/default/sa/client"


def mesh(app: int, inbound: int, admin: int, idle_inbound: int, idle_app: int) -> str:
    return f"""
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {{name: api}}
spec:
  ports: [{{name: http, port: 80, protocol: http}}]
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {{name: api-1}}
spec:
  service: api
  address: {LOOPBACK}
  ports: {{http: {app}}}
  sidecar: {{inboundPorts: {{http: {inbound}}}, adminPort: {admin}}}
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {{name: api-2}}
spec:
  service: api
  address: {LOOPBACK}
  ports: {{http: {idle_app}}}
  sidecar: {{inboundPorts: {{http: {idle_inbound}}}}}
---
# Default-deny: the client (sa/client) may call api.
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {{name: api-port}}
spec: {{matches: {{ports: [80]}}}}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {{name: client-to-api}}
spec:
  destination: {{kind: ServiceAccount, name: api}}
  rules: [{{kind: TCPRoute, name: api-port}}]
  sources: [{{kind: ServiceAccount, name: client}}]
"""


class EchoCaller(http.server.BaseHTTPRequestHandler):
    """Answers with the x-forwarded-client-cert it was given."""

    def do_GET(self) -> None:
        body = (self.headers.get("x-forwarded-client-cert") or "-").encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "ubimesh.cli.main", *args], capture_output=True,
                          text=True, timeout=60, env=env, check=False)
    assert done.returncode == 0, (args, done.stderr)
    return done



@pytest.fixture
def control(tmp_path: Path) -> Iterator[ControlReplica]:
    with control_plane(tmp_path) as replica:
        yield replica


def test_a_sidecar_joined_by_hand_serves_strict_mtls_by_default(
    tmp_path: Path, control: ControlReplica
) -> None:
    app_server = http.server.ThreadingHTTPServer((LOOPBACK, 0), EchoCaller)
    threading.Thread(target=app_server.serve_forever, daemon=True).start()
    procs: list[ManagedProcess] = []
    try:
        app = app_server.server_address[1]
        inbound, admin, idle_inbound, idle_admin, idle_app = free_ports(5)
        (tmp_path / "mesh.yaml").write_text(mesh(app, inbound, admin, idle_inbound, idle_app))
        env = {k: v for k, v in os.environ.items() if not k.startswith("UBIMESH_")}
        env.update(UBIMESH_SERVER=control.api,
                   UBIMESH_TOKEN_FILE=str(control.data_dir / "admin-token"))
        cli("apply", "-f", str(tmp_path / "mesh.yaml"), env=env)
        made = cli("token", "create", "--identity", API, "--ttl", "10m", env=env)
        (tmp_path / "api.token").write_text(made.stdout)
        cli("bootstrap", "--node", "api-1.default", "--xds", control.xds, "--admin-port",
            str(admin), "--identity", API, "--control-api", control.api, "--join-token-file",
            str(tmp_path / "api.token"), "-o", str(tmp_path / "api-1.yaml"))
        cli("bootstrap", "--node", "api-2.default", "--xds", control.xds, "--admin-port",
            str(idle_admin), "-o", str(tmp_path / "api-2.yaml"))
        for name in ("api-1", "api-2"):
            procs.append(ManagedProcess(
                name, [sys.executable, "-m", "ubimesh.cli.main", "proxy", "-c",
                       str(tmp_path / f"{name}.yaml"), "--drain-time-s", "0",
                       "--xds-cache-dir", str(tmp_path / f"cache-{name}")],
                tmp_path / f"{name}.log", tmp_path))
        wait_ready(procs[0], admin, [inbound], 30.0)

        # A mesh client with its own certificate from the same CA.
        client = asyncio.run(
            WorkloadIdentity(control.api, CLIENT, control.join_token(CLIENT)).obtain()
        )
        for name, data in (("c.pem", client.chain_pem), ("c.key", client.key_pem),
                           ("ca.pem", client.bundle_pem)):
            (tmp_path / name).write_bytes(data)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(cafile=str(tmp_path / "ca.pem"))
        context.load_cert_chain(str(tmp_path / "c.pem"), str(tmp_path / "c.key"))
        conn = http.client.HTTPSConnection(LOOPBACK, inbound, timeout=5, context=context)
        conn.request("GET", "/", headers={"Host": "api",
                                          "x-forwarded-client-cert": "By=forged;URI=forged"})
        response = conn.getresponse()
        assert response.status == 200
        # Envoy's SANITIZE_SET: By and Hash always, then the URI asked for; the forged
        # header is gone.
        leaf = x509.load_pem_x509_certificates(client.chain_pem)[0]
        digest = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
        assert response.read().decode() == f"By={API};Hash={digest};URI={CLIENT}"
        conn.close()

        # Plaintext is refused: STRICT is the default.
        plain = http.client.HTTPConnection(LOOPBACK, inbound, timeout=5)
        with pytest.raises((OSError, http.client.HTTPException)):
            plain.request("GET", "/", headers={"Host": "api"})
            plain.getresponse().read()

        # The sidecar with no identity waits, and its log says what to do.
        wait_for("the no-identity warning",
                 lambda: "node has no ubimesh.identity" in procs[1].log_tail(20_000),
                 timeout=20, interval=0.2)
        assert "ubimesh bootstrap --identity" in procs[1].log_tail(20_000)
    finally:
        for proc in procs:
            proc.stop()
        app_server.shutdown()
        app_server.server_close()
