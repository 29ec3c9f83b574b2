"""A sidecar pair with mutual TLS between two real ubimesh proxies (the mtls-pair benchmark's
layout), checked for what the TLS read path changes of tls/buffered.py and the per-connection
x-forwarded-client-cert element must not break, and for the cost they remove:

    client --HTTP--> outbound --mTLS (UpstreamTlsContext)--> inbound (DownstreamTlsContext,
    SANITIZE_SET) --HTTP--> upstreams

* bodies of several MiB cross both TLS hops whole and in order, both ways;
* every request on a kept-alive connection carries the caller's identity in
  x-forwarded-client-cert, and a client-sent one never passes;
* at steady state neither proxy takes page faults per request (the loops' copied TLS read path
  made glibc map, fault in and unmap 256 KiB per read).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from tests.integration.conftest import Bootstrap, ClientConnection, ProxyFactory
from tests.support.echo_upstream import EchoServerPool
from tests.support.pki import Pki
from tests.support.upstreams import BulkUpstream

pytestmark = pytest.mark.ubimesh_only

_TLS_V3 = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
CLIENT_ID = "spiffe://example.org/ns/default/sa/client"
SERVER_ID = "spiffe://example.org/ns/default/sa/server"
BIG = 3 * 1024 * 1024 + 5


def tls_socket(chain: Path, key: Path, bundle: Path, peer_id: str, server: bool) -> dict[str, Any]:
    typed: dict[str, Any] = {
        "@type": _TLS_V3 + ("DownstreamTlsContext" if server else "UpstreamTlsContext"),
        "common_tls_context": {
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(chain)},
                    "private_key": {"filename": str(key)},
                }
            ],
            "validation_context": {
                "trusted_ca": {"filename": str(bundle)},
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"exact": peer_id}}
                ],
            },
        },
    }
    if server:
        typed["require_client_certificate"] = True
    return {"name": "envoy.transport_sockets.tls", "typed_config": typed}


class ChainSocketBootstrap(Bootstrap):
    """A Bootstrap whose listeners' filter chain carries ``chain_socket`` (a transport_socket)."""

    def __init__(self, chain_socket: dict[str, Any]) -> None:
        super().__init__()
        self.chain_socket = chain_socket

    def render(self, admin_port: int, ports: dict[str, int]) -> dict[str, Any]:
        out = super().render(admin_port, ports)
        for listener in out["static_resources"]["listeners"]:
            listener["filter_chains"][0]["transport_socket"] = self.chain_socket
        return out


class Pair:
    def __init__(self, outbound: Any, inbound: Any, client_chain: bytes) -> None:
        self.outbound = outbound
        self.inbound = inbound
        leaf = x509.load_pem_x509_certificates(client_chain)[0]
        self.client_hash = hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()


@pytest.fixture(scope="module")
def bulk() -> Iterator[BulkUpstream]:
    upstream = BulkUpstream()
    yield upstream
    upstream.stop()


def start_pair(factory: ProxyFactory, echo_port: int, bulk_port: int, d: Path) -> Pair:
    """Certificates into ``d``, then the inbound proxy, then the outbound one pointing at it."""
    pki = Pki("example.org")
    bundle = d / "bundle.pem"
    bundle.write_bytes(pki.bundle_pem)
    client = pki.leaf(CLIENT_ID)
    client_chain, client_key = pki.write_leaf(d, "client", client)
    server_chain, server_key = pki.write_leaf(d, "server", pki.leaf(SERVER_ID))

    inbound_cfg = ChainSocketBootstrap(
        tls_socket(server_chain, server_key, bundle, CLIENT_ID, server=True)
    )
    inbound_cfg.add_cluster("echo", [echo_port])
    inbound_cfg.add_cluster("bulk", [bulk_port])
    inbound_cfg.add_listener(
        "mtls",
        routes=[
            {"match": {"prefix": "/echo"}, "route": {"cluster": "echo"}},
            {"match": {"prefix": "/"}, "route": {"cluster": "bulk"}},
        ],
        forward_client_cert_details="SANITIZE_SET",
        set_current_client_cert_details={"uri": True},
    )
    inbound = factory.start(inbound_cfg)

    outbound_cfg = Bootstrap()
    outbound_cfg.add_cluster(
        "inbound",
        [inbound.port("mtls")],
        transport_socket=tls_socket(client_chain, client_key, bundle, SERVER_ID, server=False),
    )
    outbound_cfg.add_listener(
        "main", routes=[{"match": {"prefix": "/"}, "route": {"cluster": "inbound"}}]
    )
    outbound = factory.start(outbound_cfg)
    return Pair(outbound, inbound, client[0])


@pytest.fixture(scope="module")
def pair(
    module_proxy_factory: ProxyFactory,
    module_echo: EchoServerPool,
    bulk: BulkUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Pair:
    return start_pair(
        module_proxy_factory,
        module_echo.port("pair-echo"),
        bulk.port,
        tmp_path_factory.mktemp("pair-pki"),
    )


def test_large_bodies_cross_both_tls_hops_whole_and_in_order(
    pair: Pair, bulk: BulkUpstream, connect: Any
) -> None:
    conn: ClientConnection = connect(pair.outbound.port())
    body = b"".join(bulk.pattern.chunks(BIG))
    resp = conn.request("GET", f"/source/{BIG}", timeout=30)
    assert resp.error is None and resp.status == 200
    assert resp.body == body
    resp = conn.request("POST", "/sink", body=body, timeout=30)
    assert resp.error is None and resp.status == 200
    sink = json.loads(resp.body)
    assert (sink["received"], sink["first_mismatch"]) == (BIG, None)


def test_every_request_of_a_connection_carries_the_callers_identity(
    pair: Pair, module_echo: EchoServerPool, connect: Any
) -> None:
    expected = f"By={SERVER_ID};Hash={pair.client_hash};URI={CLIENT_ID}"
    conn: ClientConnection = connect(pair.outbound.port())
    cursor = module_echo.cursor()
    for i in range(3):
        headers = [("Host", "svc"), ("x-forwarded-client-cert", f"URI=spiffe://evil/{i}")]
        resp = conn.request("GET", f"/echo/{i}", headers=headers)
        assert resp.status == 200, resp.error
    records = module_echo.records_since(cursor, at_least=3)
    assert [
        [v for k, v in r.headers if k.lower() == "x-forwarded-client-cert"] for r in records
    ] == [[expected]] * 3


def _minor_faults(pid: int) -> int:
    """The process's minor page faults (/proc/<pid>/stat field 10; psutil has no fault count
    on Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7])


def test_steady_state_requests_take_no_page_faults_in_either_proxy(
    proxy_factory: ProxyFactory,
    module_echo: EchoServerPool,
    bulk: BulkUpstream,
    tmp_path: Path,
    connect: Any,
) -> None:
    # A fresh pair: after a large transfer glibc raises its mmap threshold, which hides the
    # cost of the copied read path (a proxy that only ever saw small requests pays it).
    pair = start_pair(proxy_factory, module_echo.port("pair-echo"), bulk.port, tmp_path)
    conns: list[ClientConnection] = [connect(pair.outbound.port()) for _ in range(4)]
    pids = [pair.outbound.pid, pair.inbound.pid]
    assert all(psutil.pid_exists(pid) for pid in pids)

    def burst(n: int) -> None:
        for i in range(n):
            resp = conns[i % len(conns)].request("GET", "/source/1024")
            assert resp.status == 200 and len(resp.body) == 1024, resp.error

    burst(200)  # connections, pools and heaps reach their steady state
    time.sleep(0.2)
    before = [_minor_faults(pid) for pid in pids]
    requests = 600
    burst(requests)
    after = [_minor_faults(pid) for pid in pids]
    per_request = [(a - b) / requests for a, b in zip(after, before, strict=True)]
    # With the copied TLS read path the inbound proxy faulted 1-2 pages per request.
    assert max(per_request) < 0.25, dict(zip(("outbound", "inbound"), per_request, strict=True))
