"""``ubimesh proxy`` with a join token: its own certificate from a real ``ubimesh control`` (with
its CA), served on an mTLS listener whose certificate (``default``) and trust bundle
(``ROOTCA``) are SDS secrets; then a renewal at half-life under a request loop.

The proxy's bootstrap is what ``build_bootstrap`` makes with an identity, plus one static
listener whose DownstreamTlsContext names ``default`` and ``ROOTCA`` with
``sds_config: {ads: {}}``: ``ROOTCA`` comes over ADS from the control plane, ``default`` is made
by the proxy's ADS child.  The client is a workload with its own certificate from the same CA.

The certificate lifetime is the CA's minimum (1 minute), so the renewal comes 27 to 33 s after
issuance: this file takes about 35 s.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import ssl
import stat
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from tests.support.bootstrap import HCM, ROUTER
from tests.support.control import ControlReplica, control_plane, wait_for
from tests.support.procs import (
    LOOPBACK,
    ManagedProcess,
    admin_get,
    free_ports,
    port_accepts,
    wait_ready,
)

from ubimesh.control.bootstrap import build_bootstrap, parse_address
from ubimesh.identity.workload import WorkloadCertificate, WorkloadIdentity

WEB = "spiffe://cluster.local/ns/default/sa/web"
CLIENT = "spiffe://cluster.local/ns/default/sa/client"
TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
ADS = {"ads": {}, "resource_api_version": "V3"}
RENEWAL_WITHIN = 15.0  # 20 s lifetime: renewal at 9..11 s after issuance


def mtls_listener(port: int) -> dict[str, Any]:
    return {
        "name": "mtls",
        "address": {"socket_address": {"address": LOOPBACK, "port_value": port}},
        "filter_chains": [
            {
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": TLS,
                        "require_client_certificate": True,
                        "common_tls_context": {
                            "tls_certificate_sds_secret_configs": [
                                {"name": "default", "sds_config": ADS}
                            ],
                            "validation_context_sds_secret_config": {
                                "name": "ROOTCA",
                                "sds_config": ADS,
                            },
                        },
                    },
                },
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": HCM,
                            "stat_prefix": "mtls",
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "all",
                                        "domains": ["*"],
                                        "routes": [
                                            {
                                                "match": {"prefix": "/"},
                                                "direct_response": {
                                                    "status": 200,
                                                    "body": {"inline_string": "hello"},
                                                },
                                            }
                                        ],
                                    }
                                ]
                            },
                            "http_filters": [
                                {"name": "envoy.filters.http.router",
                                 "typed_config": {"@type": ROUTER}}
                            ],
                        },
                    }
                ],
            }
        ],
    }



@dataclass
class Client:
    """A mesh client with its own certificate; every handshake checks the proxy's SVID."""

    cert: WorkloadCertificate
    workdir: Path
    context: ssl.SSLContext = field(init=False)

    def __post_init__(self) -> None:
        # ssl loads certificates from files only: the test's own throwaway key.
        chain, key, bundle = (self.workdir / n for n in ("client.pem", "client.key", "ca.pem"))
        chain.write_bytes(self.cert.chain_pem)
        key.write_bytes(self.cert.key_pem)
        os.chmod(key, 0o600)
        bundle.write_bytes(self.cert.bundle_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # SPIFFE: the identity is the URI SAN, checked below
        context.load_verify_locations(cafile=str(bundle))
        context.load_cert_chain(str(chain), str(key))
        self.context = context

    def connect(self, port: int) -> tuple[http.client.HTTPSConnection, x509.Certificate]:
        conn = http.client.HTTPSConnection(LOOPBACK, port, timeout=3.0, context=self.context)
        conn.connect()
        assert conn.sock is not None
        der = conn.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        assert der is not None
        peer = x509.load_der_x509_certificate(der)
        san = peer.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]
        return conn, peer


def get(conn: http.client.HTTPSConnection) -> tuple[int, bytes]:
    conn.request("GET", "/", headers={"Host": "web"})
    response = conn.getresponse()
    return response.status, response.read()


@pytest.fixture
def control(tmp_path: Path) -> Iterator[ControlReplica]:
    with control_plane(tmp_path) as replica:
        yield replica


def start_proxy(tmp_path: Path, control: ControlReplica, token_file: Path,
                port: int, *, ttl: str = "1m", name: str = "web",
                metadata: dict[str, Any] | None = None) -> tuple[ManagedProcess, int]:
    (admin,) = free_ports(1)
    bootstrap = build_bootstrap(
        node_id="web.default", role="sidecar", admin_port=admin,
        xds=[parse_address(control.xds, what="xds")],
        identity=WEB, control_api=control.api, join_token_file=str(token_file),
    )
    bootstrap["node"]["metadata"]["ubimesh.cert_ttl"] = ttl
    bootstrap["node"]["metadata"].update(metadata or {})
    bootstrap["static_resources"]["listeners"] = [mtls_listener(port)]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    proc = ManagedProcess(
        name,
        [sys.executable, "-m", "ubimesh.cli.main", "proxy", "-c", str(path), "-l", "info",
         "--drain-time-s", "0", "--xds-cache-dir", str(tmp_path / "xds-cache")],
        tmp_path / f"{name}.log", tmp_path,
    )
    try:
        wait_ready(proc, admin, [port], 20.0)
    except BaseException:
        proc.stop()
        raise
    return proc, admin


def test_proxy_gets_its_certificate_serves_mtls_and_renews_without_a_failed_request(
    tmp_path: Path, control: ControlReplica
) -> None:
    token_file = tmp_path / "web.token"
    token_file.write_text(control.join_token(WEB) + "\n")
    client_cert = asyncio.run(
        WorkloadIdentity(control.api, CLIENT, control.join_token(CLIENT), ttl="5m").obtain()
    )
    client = Client(client_cert, tmp_path)
    (port,) = free_ports(1)
    proc, admin = start_proxy(tmp_path, control, token_file, port, ttl="20s")
    try:
        conn, first = client.connect(port)
        assert get(conn) == (200, b"hello")
        # `ubimesh certs status` can say which proxy holds the leaf.
        leaves = control.call("GET", "/api/v1/identity/status")["leaves"]
        assert any(leaf.get("node") == "web.default" for leaf in leaves), leaves
        # /config_dump never shows the proxy's private key (as PEM or base64 PEM).
        dump = admin_get(admin, "/config_dump")[1]
        assert b"PRIVATE KEY" not in dump
        assert b"LS0tLS1CRUdJTiBFQyBQUklWQVRFIEtFWS" not in dump  # "-----BEGIN EC PRIVATE KEY"
        assert b"LS0tLS1CRUdJTiBQUklWQVRFIEtFWS" not in dump  # "-----BEGIN PRIVATE KEY"
        kept = conn.sock
        lifetime = first.not_valid_after_utc - first.not_valid_before_utc
        assert lifetime.total_seconds() <= 81  # the 20 s asked (+1 min backdating)

        # A client without a certificate is refused in the handshake.
        anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        anonymous.check_hostname = False
        anonymous.load_verify_locations(cafile=str(tmp_path / "ca.pem"))
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            bare = http.client.HTTPSConnection(LOOPBACK, port, timeout=3.0, context=anonymous)
            bare.request("GET", "/")
            bare.getresponse().read()

        # A loop of new handshakes, plus the connection opened before the renewal kept alive.
        failures: list[str] = []
        serials: list[int] = []
        stop = threading.Event()

        def loop() -> None:
            deadline = time.monotonic() + RENEWAL_WITHIN + 10
            for _ in range(20_000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    c, peer = client.connect(port)
                    status, body = get(c)
                    c.close()
                    if (status, body) != (200, b"hello"):
                        failures.append(f"{status} {body[:80]!r}")
                    if not serials or serials[-1] != peer.serial_number:
                        serials.append(peer.serial_number)
                except (OSError, ssl.SSLError, http.client.HTTPException, AssertionError) as e:
                    failures.append(f"{type(e).__name__}: {e}")
                stop.wait(0.05)

        worker = threading.Thread(target=loop, daemon=True)
        worker.start()
        try:
            wait_for("the renewed certificate on new handshakes",
                     lambda: len(serials) >= 2 or not worker.is_alive(),
                     timeout=RENEWAL_WITHIN + 5, interval=0.2)
            assert len(serials) >= 2, f"no renewal seen; {proc.log_tail()}"
            assert serials[0] == first.serial_number
            # The connection opened under the old certificate still serves (the same socket:
            # http.client would silently reconnect had the proxy closed it).
            assert get(conn) == (200, b"hello")
            assert conn.sock is kept
            time.sleep(1.0)  # some more requests after the swap
        finally:
            stop.set()
            worker.join(10)
        conn.close()
        assert failures == [], failures[:5]
        assert proc.alive, proc.describe()
        log = (tmp_path / "web.log").read_text()
        assert "new certificate" in log and "applied" in log
        # The ADS cache holds the trust bundle but never the key (nor the certificate).
        cached = (tmp_path / "xds-cache" / "ads-cache.json").read_text()
        assert "ROOTCA" in cached
        assert "tls_certificate" not in cached and "PRIVATE" not in cached
    finally:
        proc.stop()


def test_a_killed_proxy_comes_back_with_its_identity_and_no_new_token(
    tmp_path: Path, control: ControlReplica
) -> None:
    """The token is single-use; the proxy's stored credential (cache dir, 0600) carries its
    identity across a SIGKILL, and the restarted proxy renews with it."""
    token_file = tmp_path / "web.token"
    token_file.write_text(control.join_token(WEB) + "\n")
    client = Client(asyncio.run(
        WorkloadIdentity(control.api, CLIENT, control.join_token(CLIENT), ttl="5m").obtain()
    ), tmp_path)
    (port,) = free_ports(1)
    proc, _ = start_proxy(tmp_path, control, token_file, port, ttl="10m", name="first")
    try:
        conn, first = client.connect(port)
        assert get(conn) == (200, b"hello")
        conn.close()
        stored = tmp_path / "xds-cache" / "identity" / "svid.json"
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    finally:
        proc._signal(signal.SIGKILL)
        proc.stop()
    # The same (used) token file: only the stored credential can bring the identity back.
    proc, _ = start_proxy(tmp_path, control, token_file, port, ttl="10m", name="second")
    try:
        def renewed() -> bool:
            c, peer = client.connect(port)
            ok = get(c) == (200, b"hello") and peer.serial_number != first.serial_number
            c.close()
            return ok

        # Served at once with the stored certificate, then with its renewal.
        wait_for("the renewed certificate after the restart", renewed, timeout=15,
                 interval=0.2)
        log = (tmp_path / "second.log").read_text()
        assert "restored from" in log and "renewed" in log, proc.log_tail()
        assert "HTTP 4" not in log  # the used token was never sent again
    finally:
        proc.stop()


def test_persist_identity_false_keeps_the_key_off_the_disk(
    tmp_path: Path, control: ControlReplica
) -> None:
    token_file = tmp_path / "web.token"
    token_file.write_text(control.join_token(WEB) + "\n")
    (port,) = free_ports(1)
    proc, _ = start_proxy(tmp_path, control, token_file, port, ttl="10m",
                          metadata={"ubimesh.persist_identity": False})
    try:
        assert port_accepts(port)
        assert not (tmp_path / "xds-cache" / "identity").exists()
    finally:
        proc.stop()
