"""TLS in the ubimesh proxy over real sockets: server TLS, mutual TLS with SPIFFE IDs,
x-forwarded-client-cert, SNI chain selection, upstream TLS with SAN matchers, and the
validation matrix of issue 4 item 7 (every bad client certificate is refused before any
upstream sees a request)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import http.client
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from tests.integration.conftest import Bootstrap, ProxyFactory
from tests.support.control import wait_for
from tests.support.echo_upstream import EchoServerPool
from tests.support.pki import Pki, bad_leaves, good_leaves
from tests.support.procs import LOOPBACK

pytestmark = pytest.mark.ubimesh_only

TLS_SOCKET = "envoy.transport_sockets.tls"
_TLS_V3 = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
DOWNSTREAM_TLS = _TLS_V3 + "DownstreamTlsContext"
UPSTREAM_TLS = _TLS_V3 + "UpstreamTlsContext"
PROXY_ID = "spiffe://example.org/ns/mesh/sa/proxy"
CLIENT_ID = "spiffe://example.org/ns/default/sa/web"
BACKEND_ID = "spiffe://example.org/ns/default/sa/backend"


class TlsBootstrap(Bootstrap):
    """A Bootstrap whose listeners' single filter chain may carry extra fields
    (transport_socket, filter_chain_match)."""

    def __init__(self) -> None:
        super().__init__()
        self.chain_extra: dict[str, dict[str, Any]] = {}
        self.extra_chains: dict[str, list[dict[str, Any]]] = {}

    def render(self, admin_port: int, ports: dict[str, int]) -> dict[str, Any]:
        out = super().render(admin_port, ports)
        for listener in out["static_resources"]["listeners"]:
            chain = listener["filter_chains"][0]
            chain.update(copy.deepcopy(self.chain_extra.get(listener["name"], {})))
            for extra in self.extra_chains.get(listener["name"], []):
                listener["filter_chains"].append(
                    {**copy.deepcopy(extra), "filters": chain["filters"]}
                )
        return out


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki("example.org")


@pytest.fixture(scope="module")
def other() -> Pki:
    return Pki("other.org")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, pki: Pki, other: Pki) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    out: dict[str, Path] = {}
    out["bundle"] = d / "bundle.pem"
    out["bundle"].write_bytes(pki.bundle_pem)
    out["both"] = d / "both.pem"
    out["both"].write_bytes(pki.bundle_pem + other.bundle_pem)
    for name, sid in (("proxy", PROXY_ID), ("client", CLIENT_ID), ("backend", BACKEND_ID)):
        out[name], out[name + "_key"] = pki.write_leaf(d, name, pki.leaf(sid))
    out["alt"], out["alt_key"] = pki.write_leaf(
        d, "alt", pki.leaf("spiffe://example.org/ns/default/sa/alt", dns=["b.example"])
    )
    return out


def tls_socket(files: dict[str, Path], name: str, *, server: bool, **extra: Any) -> dict[str, Any]:
    """A transport_socket with the certificate ``name`` (files) and the extra context fields."""
    common: dict[str, Any] = {
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(files[name])},
                "private_key": {"filename": str(files[name + "_key"])},
            }
        ]
    }
    common.update(extra.pop("common", {}))
    config: dict[str, Any] = {
        "@type": DOWNSTREAM_TLS if server else UPSTREAM_TLS,
        "common_tls_context": common,
        **extra,
    }
    return {"name": TLS_SOCKET, "typed_config": config}


def validation(bundle: Path, *sans: dict[str, Any]) -> dict[str, Any]:
    return {"trusted_ca": {"filename": str(bundle)}, "match_typed_subject_alt_names": list(sans)}


def uri_exact(value: str) -> dict[str, Any]:
    return {"san_type": "URI", "matcher": {"exact": value}}


def client_context(
    roots: bytes, chain_key: tuple[bytes, bytes] | None, tmp: Path
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=roots.decode())
    if chain_key is not None:
        cert, key = tmp / "c.pem", tmp / "c.key"
        cert.write_bytes(chain_key[0])
        key.write_bytes(chain_key[1])
        ctx.load_cert_chain(cert, key)
    return ctx


def tls_get(
    port: int,
    ctx: ssl.SSLContext,
    *,
    sni: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, ssl.SSLSocket | None]:
    """One GET over TLS; raises ssl.SSLError / OSError / http.client errors on refusal."""
    raw = socket.create_connection((LOOPBACK, port), timeout=5)
    s = ctx.wrap_socket(raw, server_hostname=sni)
    try:
        head = "GET / HTTP/1.1\r\nHost: svc\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        s.sendall((head + "\r\n").encode())
        resp = http.client.HTTPResponse(s)  # type: ignore[arg-type]
        resp.begin()
        body = resp.read()
        der = s.getpeercert(binary_form=True)
        return resp.status, body, der  # type: ignore[return-value]
    finally:
        s.close()


def header(record: Any, name: str) -> list[str]:
    return [v for k, v in record.headers if k.lower() == name]


def sha256_of_leaf(chain_pem: bytes) -> str:
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    return hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls_proxy(
    module_proxy_factory: ProxyFactory, module_echo: EchoServerPool, files: dict[str, Path]
) -> Iterator[Any]:
    """Listener "tls": server TLS only. Listener "mtls": client certificate required, exact
    URI SAN matcher, SANITIZE_SET with URI. Listener "matrix": the same, trusting two trust
    domains' roots."""
    b = TlsBootstrap()
    b.add_cluster("echo", [module_echo.port("tls-echo")])
    route = [{"match": {"prefix": "/"}, "route": {"cluster": "echo"}}]
    b.add_listener("tls", routes=route)
    b.chain_extra["tls"] = {"transport_socket": tls_socket(files, "proxy", server=True)}
    for name, bundle in (("mtls", files["bundle"]), ("matrix", files["both"])):
        b.add_listener(
            name,
            routes=route,
            forward_client_cert_details="SANITIZE_SET",
            set_current_client_cert_details={"uri": True},
        )
        b.chain_extra[name] = {
            "transport_socket": tls_socket(
                files,
                "proxy",
                server=True,
                require_client_certificate=True,
                common={"validation_context": validation(bundle, uri_exact(CLIENT_ID))},
            )
        }
    yield module_proxy_factory.start(b, log_level="info")


def test_a_tls_listener_serves_a_python_tls_client(
    mtls_proxy: Any, module_echo: EchoServerPool, pki: Pki, tmp_path: Path
) -> None:
    cursor = module_echo.cursor()
    ctx = client_context(pki.bundle_pem, None, tmp_path)
    status, _, der = tls_get(
        mtls_proxy.port("tls"), ctx, headers={"x-forwarded-client-cert": "URI=spiffe://evil/x"}
    )
    assert status == 200
    cert = x509.load_der_x509_certificate(der)  # type: ignore[arg-type]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [PROXY_ID]
    (record,) = module_echo.records_since(cursor, at_least=1)
    # A client-sent certificate header never passes a connection without a client certificate.
    assert header(record, "x-forwarded-client-cert") == []
    assert header(record, "x-forwarded-proto") == ["https"]


def test_plaintext_to_a_tls_listener_is_refused(
    mtls_proxy: Any, module_echo: EchoServerPool
) -> None:
    cursor = module_echo.cursor()
    with socket.create_connection((LOOPBACK, mtls_proxy.port("tls")), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        with contextlib.suppress(OSError):
            data = s.recv(1024)
            assert not data.startswith(b"HTTP/")
    assert module_echo.records_since(cursor, timeout=0.2) == []


def test_mtls_without_a_client_certificate_is_refused(
    mtls_proxy: Any, module_echo: EchoServerPool, pki: Pki, tmp_path: Path
) -> None:
    cursor = module_echo.cursor()
    ctx = client_context(pki.bundle_pem, None, tmp_path)
    with pytest.raises((OSError, http.client.HTTPException)):
        tls_get(mtls_proxy.port("mtls"), ctx)
    assert module_echo.records_since(cursor, timeout=0.2) == []


def test_mtls_with_a_good_spiffe_client_forwards_the_identity(
    mtls_proxy: Any, module_echo: EchoServerPool, pki: Pki, tmp_path: Path
) -> None:
    cursor = module_echo.cursor()
    chain_key = pki.leaf(CLIENT_ID)
    ctx = client_context(pki.bundle_pem, chain_key, tmp_path)
    status, _, _ = tls_get(
        mtls_proxy.port("mtls"), ctx, headers={"x-forwarded-client-cert": "URI=spiffe://evil/x"}
    )
    assert status == 200
    (record,) = module_echo.records_since(cursor, at_least=1)
    assert header(record, "x-forwarded-client-cert") == [
        f"By={PROXY_ID};Hash={sha256_of_leaf(chain_key[0])};URI={CLIENT_ID}"
    ]
    stats = mtls_proxy.stats()
    assert any(k.endswith("ssl.handshake") and v > 0 for k, v in stats.items())


def test_validation_matrix_every_bad_client_certificate_is_refused(
    mtls_proxy: Any, module_echo: EchoServerPool, pki: Pki, other: Pki, tmp_path: Path
) -> None:
    roots = pki.bundle_pem + other.bundle_pem
    port = mtls_proxy.port("matrix")
    for name, chain_key in good_leaves(pki, CLIENT_ID).items():
        status, _, _ = tls_get(port, client_context(roots, chain_key, tmp_path))
        assert status == 200, name
    cursor = module_echo.cursor()
    accepted = []
    cases = bad_leaves(pki, other, CLIENT_ID)
    assert len(cases) == 15
    for name, chain_key in cases.items():
        try:
            tls_get(port, client_context(roots, chain_key, tmp_path))
        except (OSError, http.client.HTTPException):
            continue
        accepted.append(name)
    assert accepted == []
    assert module_echo.records_since(cursor, timeout=0.3) == [], "an upstream saw a request"


def test_sni_selects_the_filter_chain_and_its_certificate(
    proxy_factory: ProxyFactory, echo: EchoServerPool, files: dict[str, Path], pki: Pki,
    tmp_path: Path,
) -> None:
    b = TlsBootstrap()
    b.add_cluster("echo", [echo.port("sni")])
    b.add_listener(
        "main",
        routes=[{"match": {"prefix": "/"}, "route": {"cluster": "echo"}}],
        listener_extra={
            "listener_filters": [
                {
                    "name": "envoy.filters.listener.tls_inspector",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.listener"
                        ".tls_inspector.v3.TlsInspector"
                    },
                }
            ]
        },
    )
    b.chain_extra["main"] = {
        "filter_chain_match": {"server_names": ["a.example"]},
        "transport_socket": tls_socket(files, "proxy", server=True),
    }
    b.extra_chains["main"] = [
        {
            "filter_chain_match": {"server_names": ["b.example"]},
            "transport_socket": tls_socket(files, "alt", server=True),
        }
    ]
    proxy = proxy_factory.start(b)
    ctx = client_context(pki.bundle_pem, None, tmp_path)
    seen = {}
    for sni in ("a.example", "b.example"):
        status, _, der = tls_get(proxy.port(), ctx, sni=sni)
        assert status == 200
        cert = x509.load_der_x509_certificate(der)  # type: ignore[arg-type]
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        seen[sni] = san.get_values_for_type(x509.UniformResourceIdentifier)
    alt = "spiffe://example.org/ns/default/sa/alt"
    assert seen == {"a.example": [PROXY_ID], "b.example": [alt]}
    with pytest.raises((OSError, http.client.HTTPException)):
        tls_get(proxy.port(), ctx, sni="c.example")


# ---------------------------------------------------------------------------------------------
# Upstream TLS


class TlsUpstream:
    """A TLS HTTP/1.1 server requiring a client certificate; records each request's peer ID."""

    def __init__(self, files: dict[str, Path], name: str, bundle: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(files[name], files[name + "_key"])
        self.ctx.load_verify_locations(bundle)
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.sock = socket.create_server((LOOPBACK, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        self.handshakes = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as s:
                self.handshakes += 1
                der = s.getpeercert(binary_form=True)
                cert = x509.load_der_x509_certificate(der)  # type: ignore[arg-type]
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                peer = san.get_values_for_type(x509.UniformResourceIdentifier)[0]
                for _ in range(100):
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = s.recv(4096)
                        if not chunk:
                            return
                        data += chunk
                    self.requests.append(peer)
                    body = peer.encode()
                    s.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
                    )
        except (OSError, ssl.SSLError):
            return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.mark.parametrize(
    ("expected_id", "good"), [(BACKEND_ID, True), ("spiffe://example.org/ns/default/sa/db", False)]
)
def test_an_upstream_tls_cluster_verifies_the_server_identity(
    proxy_factory: ProxyFactory, files: dict[str, Path], expected_id: str, good: bool
) -> None:
    upstream = TlsUpstream(files, "backend", files["bundle"])
    try:
        b = TlsBootstrap()
        b.add_cluster(
            "backend",
            [upstream.port],
            transport_socket=tls_socket(
                files,
                "proxy",
                server=False,
                sni="backend.default",
                common={"validation_context": validation(files["bundle"], uri_exact(expected_id))},
            ),
        )
        b.add_listener("main", routes=[{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}])
        proxy = proxy_factory.start(b)
        conn = http.client.HTTPConnection(LOOPBACK, proxy.port(), timeout=5)
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        if good:
            assert (resp.status, body) == (200, PROXY_ID.encode())
            assert upstream.requests == [PROXY_ID]
        else:
            assert resp.status == 503
            # The upstream's thread counts the handshake once it has the proxy's Finished,
            # which may be after the proxy refused the SAN and answered.
            wait_for("the upstream to count the handshake", lambda: upstream.handshakes >= 1, 5.0)
            assert upstream.requests == []
            stats = proxy.stats()
            assert stats.get("cluster.backend.ssl.fail_verify_san", 0) >= 1
    finally:
        upstream.close()
