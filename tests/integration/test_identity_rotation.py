"""Root rotation end to end: a real ``ubimesh control``, a gateway and a sidecar with STRICT
mesh mTLS between them (compiled from resources), a request loop through both; begin the
rotation, wait until both proxies hold leaves from the new root, finish: zero failed requests.
After the finish a client whose (unexpired) certificate chains to the old root is refused in
a new handshake and when it tries to resume a TLS session made before the finish.

Leaves live 20 s here (node metadata ``ubimesh.cert_ttl``; the CA's floor is 10 s), so each
proxy renews 9 to 11 s after issuance: the file takes about 25 s.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from tests.support.control import ControlReplica, RequestLoop, start_control, wait_for
from tests.support.echo_upstream import EchoServerPool
from tests.support.procs import LOOPBACK, ManagedProcess, admin_get, free_ports, wait_ready

from ubimesh.control.bootstrap import build_bootstrap, parse_address
from ubimesh.identity.workload import WorkloadCertificate, WorkloadIdentity

TD = "spiffe://cluster.local/ns/default/sa/"
EDGE, WEB, PROBE = TD + "edge", TD + "web", TD + "probe"
CERT_TTL = "20s"
#: A 20 s leaf is renewed 9..11 s after issuance; room for a loaded machine.
RENEWAL_WITHIN = 25.0

RESOURCES = """\
apiVersion: ubimesh.io/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  mtls: {mode: STRICT}
---
apiVersion: ubimesh.io/v1alpha1
kind: Gateway
metadata: {name: edge}
spec:
  address: 127.0.0.1
  listeners: [{name: web, port: %(gw)d, protocol: HTTP}]
---
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: web}
spec:
  ports: [{name: http, port: 80, protocol: http}]
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: web}
spec:
  service: web
  address: 127.0.0.1
  ports: {http: %(app)d}
  sidecar: {inboundPorts: {http: %(inbound)d}}
---
# Default-deny: the gateway (sa/edge) and the test's probe client (sa/probe) may call web.
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: everything}
spec:
  matches: [{name: all}]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: edge-to-web}
spec:
  destination: {kind: ServiceAccount, name: web}
  rules: [{kind: HTTPRouteGroup, name: everything}]
  sources: [{kind: ServiceAccount, name: edge}, {kind: ServiceAccount, name: probe}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: edge}
spec:
  parentRefs: [{name: edge}]
  rules:
    - backendRefs: [{name: web, port: 80}]
"""


def join_token(control: ControlReplica, identity: str) -> str:
    answer = control.call("POST", "/api/v1/identity/tokens",
                          json.dumps({"identity": identity, "ttl": "5m"}))
    return str(answer["token"])


def rotate(control: ControlReplica, phase: str, force: bool = False) -> dict[str, Any]:
    answer: dict[str, Any] = control.call(
        "POST", "/api/v1/identity/rotation", json.dumps({"phase": phase, "force": force}))
    return answer


def start_proxy(workdir: Path, control: ControlReplica, node: str, role: str, identity: str,
                port: int) -> tuple[ManagedProcess, int]:
    token_file = workdir / f"{node}.token"
    token_file.write_text(join_token(control, identity) + "\n")
    (admin,) = free_ports(1)
    bootstrap = build_bootstrap(node_id=node, role=role, admin_port=admin,
                                xds=[parse_address(control.xds, what="xds")],
                                identity=identity, control_api=control.api,
                                join_token_file=str(token_file))
    bootstrap["node"]["metadata"]["ubimesh.cert_ttl"] = CERT_TTL
    path = workdir / f"{node}.yaml"
    path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    proc = ManagedProcess(
        node,
        [sys.executable, "-m", "ubimesh.cli.main", "proxy", "-c", str(path), "-l", "info",
         "--drain-time-s", "0", "--xds-cache-dir", str(workdir / f"{node}.xds-cache")],
        workdir / f"{node}.log", workdir,
    )
    try:
        wait_ready(proc, admin, [port], 20.0)
    except BaseException:
        proc.stop()
        raise
    return proc, admin


def client_context(cert: WorkloadCertificate, workdir: Path, name: str,
                   bundle: bytes) -> ssl.SSLContext:
    """A TLS client presenting ``cert`` and trusting ``bundle`` (ssl loads files only)."""
    chain, key, roots = (workdir / f"{name}.{ext}" for ext in ("pem", "key", "roots.pem"))
    chain.write_bytes(cert.chain_pem)
    key.write_bytes(cert.key_pem)
    os.chmod(key, 0o600)
    roots.write_bytes(bundle)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # SPIFFE: the identity is the URI SAN, not a host name
    context.load_verify_locations(cafile=str(roots))
    context.load_cert_chain(str(chain), str(key))
    return context


def tls_get(context: ssl.SSLContext, port: int,
            session: ssl.SSLSession | None = None) -> tuple[int, bool, ssl.SSLSession | None,
                                                            bytes]:
    """One GET over a new TLS connection (resuming ``session`` when given): the status, whether
    the session was reused, the session to resume later, the server's leaf (DER)."""
    raw = socket.create_connection((LOOPBACK, port), timeout=3.0)
    with context.wrap_socket(raw, session=session) as tls:
        reused = tls.session_reused
        der = tls.getpeercert(binary_form=True) or b""
        tls.sendall(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        data = b""
        for _ in range(1000):
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
        # TLS 1.3 tickets arrive after the handshake: the session is complete only now.
        kept = tls.session
    if not data.startswith(b"HTTP/1.1 "):
        raise ConnectionError(f"no HTTP response ({data[:80]!r})")
    return int(data[9:12]), reused, kept, der


def refused(context: ssl.SSLContext, port: int,
            session: ssl.SSLSession | None = None) -> tuple[bool, bool]:
    """Whether a GET over a new connection (resuming ``session``) is refused; and whether the
    session was reused (meaningful when the handshake completed on the client's side)."""
    try:
        status, reused, _, _ = tls_get(context, port, session)
    except (OSError, ssl.SSLError, ConnectionError):
        return True, False
    return status != 200, reused


def issued_serials(control: ControlReplica) -> dict[str, dict[str, Any]]:
    """The latest leaf issued per identity (``/api/v1/identity/status``)."""
    leaves = control.call("GET", "/api/v1/identity/status")["leaves"]
    return {str(leaf["identity"]): leaf for leaf in leaves}


@pytest.fixture
def control(tmp_path: Path) -> Iterator[ControlReplica]:
    replica = start_control(tmp_path)
    try:
        yield replica
    finally:
        replica.stop()


def test_root_rotation_under_load_refuses_the_old_root_after_finish(
    tmp_path: Path, control: ControlReplica
) -> None:
    ca_dir = control.data_dir / "ca"
    old_bundle = (ca_dir / "bundle.pem").read_bytes()
    with EchoServerPool() as pool:
        gw, inbound = free_ports(2)
        control.apply(RESOURCES % {"gw": gw, "inbound": inbound, "app": pool.port("web")})
        # A workload outside the mesh with a 5 minute old-root certificate: still valid after
        # the finish, which must nevertheless refuse it.
        probe = asyncio.run(
            WorkloadIdentity(control.api, PROBE, join_token(control, PROBE), ttl="5m").obtain())
        web, web_admin = start_proxy(tmp_path, control, "web.default", "sidecar", WEB, inbound)
        edge, _ = start_proxy(tmp_path, control, "edge.default", "gateway", EDGE, gw)
        loop = RequestLoop(gw, host="web", max_seconds=90.0, pause=0.01)
        try:
            loop.start()
            wait_for("requests through gateway and sidecar", lambda: loop.sent >= 20, 15.0)
            assert loop.failures == [], [f.error or f.status for f in loop.failures[:5]]

            # The API refuses what makes no sense, naming it.
            with pytest.raises(AssertionError, match="phase"):
                rotate(control, "sideways")
            with pytest.raises(AssertionError, match="none under way"):
                rotate(control, "finish")

            # begin: two roots pushed; new leaves come from the new root.
            status = rotate(control, "begin")
            assert status["rotating"] is True and len(status["roots"]) == 2
            new_root = next(r for r in status["roots"] if r["current"])
            began = dt_parse(new_root["not_before"])
            new_intermediate = x509.load_pem_x509_certificate((ca_dir / "intermediate.pem")
                                                              .read_bytes())
            metrics = urlopen_text(control.api + "/metrics")
            assert metrics.count('ubimesh_ca_cert_expiry_seconds{kind="root"') == 2, metrics
            assert f'ubimesh_issued_leaf_expiry_seconds{{identity="{WEB}"}}' in metrics, metrics

            def renewed(identity: str, node: str) -> bool:
                leaf = issued_serials(control).get(identity)
                if leaf is None or dt_parse(leaf["not_before"]) < began:
                    return False
                log = (tmp_path / f"{node}.log").read_text(errors="replace")
                return f"new certificate ({leaf['serial']}) applied" in log

            wait_for("both proxies holding new-root leaves",
                     lambda: renewed(WEB, "web.default") and renewed(EDGE, "edge.default"),
                     RENEWAL_WITHIN, 0.2)
            # The sidecar presents a leaf of the new intermediate (the probe still gets in:
            # during the rotation both roots are trusted).
            both_roots = (ca_dir / "bundle.pem").read_bytes()
            old_client = client_context(probe, tmp_path, "probe", both_roots)
            status_code, _, session, der = tls_get(old_client, inbound)
            assert status_code == 200
            x509.load_der_x509_certificate(der).verify_directly_issued_by(new_intermediate)
            # Resumption works at all (else the check after the finish would prove nothing).
            status_code, reused, resumed_session, _ = tls_get(old_client, inbound, session)
            assert (status_code, reused) == (200, True)
            assert resumed_session is not None

            # finish is refused while an old-root leaf is live (the probe's), unless forced.
            with pytest.raises(AssertionError, match=r"HTTP 409.*old root"):
                rotate(control, "finish")
            status = rotate(control, "finish", force=True)
            assert status["rotating"] is False and len(status["roots"]) == 1
            assert (ca_dir / "bundle.pem").read_bytes() not in (old_bundle, both_roots)

            # A new handshake with the old-root certificate is refused once the sidecar has
            # the new bundle (pushed at once).
            wait_for("the sidecar refusing the old root",
                     lambda: refused(old_client, inbound)[0], 10.0, 0.1)
            # ... and so is the resumption of the session made before the finish.
            was_refused, reused = refused(old_client, inbound, resumed_session)
            assert was_refused and not reused
            # A client with a new-root certificate gets in.
            fresh = asyncio.run(WorkloadIdentity(control.api, PROBE, join_token(control, PROBE),
                                                 ttl="5m").obtain())
            new_client = client_context(fresh, tmp_path, "fresh", fresh.bundle_pem)
            assert tls_get(new_client, inbound)[0] == 200

            time.sleep(1.0)  # more requests after the finish
            sent = loop.sent
        finally:
            loop.stop()
            stats = admin_get(web_admin, "/stats?filter=cert_expiring")[1].decode()
            web.stop()
            edge.stop()
        assert loop.failures == [], [f.error or f.status for f in loop.failures[:5]]
        assert sent >= 100, sent
        # The proxy's expiry gauges: a 20 s leaf expires today.
        assert "server.days_until_first_cert_expiring: 0" in stats, stats
        seconds = int(stats.split("server.seconds_until_first_cert_expiring: ")[1].split()[0])
        assert 0 < seconds <= 21, stats


def dt_parse(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def urlopen_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5.0) as response:  # no token: public
        assert response.headers["Content-Type"].startswith("text/plain")
        return str(response.read().decode())


def test_rotate_cli_on_files_and_through_the_api(tmp_path: Path,
                                                 control: ControlReplica) -> None:
    """``ubimesh ca rotate`` with --data-dir: through the API of the control plane running
    there; on the files of a data dir with none running."""
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ubimesh.cli.main", "ca", "rotate", *args],
                              capture_output=True, text=True, timeout=30)

    running = cli("begin", "--data-dir", str(control.data_dir))
    assert running.returncode == 0, running.stderr
    assert "root rotation begun" in running.stdout
    assert "changed the files" not in running.stderr  # went through the API
    assert control.call("GET", "/api/v1/identity/status")["rotating"] is True
    again = cli("begin", "--data-dir", str(control.data_dir))
    assert again.returncode == 1 and "already under way" in again.stderr
    done = cli("finish", "--data-dir", str(control.data_dir))
    assert done.returncode == 0, done.stderr
    assert len(control.call("GET", "/api/v1/identity/status")["roots"]) == 1

    offline = tmp_path / "offline"
    init = subprocess.run([sys.executable, "-m", "ubimesh.cli.main", "ca", "init",
                           "--data-dir", str(offline)], capture_output=True, text=True,
                          timeout=30)
    assert init.returncode == 0, init.stderr
    begun = cli("begin", "--data-dir", str(offline))
    assert begun.returncode == 0 and "changed the files" in begun.stderr, begun.stderr
    assert len(x509.load_pem_x509_certificates((offline / "ca" / "bundle.pem")
                                               .read_bytes())) == 2
    finished = cli("finish", "--data-dir", str(offline))
    assert finished.returncode == 0, finished.stderr
    assert len(x509.load_pem_x509_certificates((offline / "ca" / "bundle.pem")
                                               .read_bytes())) == 1
