"""Mutual TLS between Envoy 1.40 and the ubimesh proxy, in both directions, each verifying the
other's SPIFFE ID with a URI SAN matcher; a wrong SPIFFE ID is refused in both directions, and
both write the same x-forwarded-client-cert (SANITIZE_SET with the URI).

    client -> envoy (UpstreamTlsContext, client cert) -> ubimesh (mTLS listener) -> echo
    client -> ubimesh (UpstreamTlsContext, client cert) -> envoy (mTLS listener) -> echo
"""

from __future__ import annotations

import hashlib
import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.support.bootstrap import HCM, ROUTER, address, static_cluster
from tests.support.echo_upstream import EchoServerPool
from tests.support.pki import Pki
from tests.support.procs import LOOPBACK, envoy_binary, free_ports, start_envoy, start_ubimesh

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary"),
]

_TLS_V3 = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
ENVOY_ID = "spiffe://example.org/ns/edge/sa/envoy"
UBIMESH_ID = "spiffe://example.org/ns/mesh/sa/ubimesh"
WRONG_ID = "spiffe://example.org/ns/mesh/sa/somebody-else"


def _tls(kind: str, files: dict[str, Path], me: str, peer_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TLS_V3 + kind,
            "common_tls_context": {
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(files[me])},
                        "private_key": {"filename": str(files[me + "_key"])},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": str(files["bundle"])},
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"exact": peer_id}}
                    ],
                },
            },
            **extra,
        },
    }


def _listener(name: str, port: int, cluster: str, tls: dict[str, Any] | None) -> dict[str, Any]:
    hcm = {
        "@type": HCM,
        "stat_prefix": name,
        "forward_client_cert_details": "SANITIZE_SET",
        "set_current_client_cert_details": {"uri": True},
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}],
                }
            ]
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
    }
    chain: dict[str, Any] = {
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    }
    if tls is not None:
        chain["transport_socket"] = tls
    return {"name": name, "address": address(port), "filter_chains": [chain]}


def _cluster(name: str, port: int, tls: dict[str, Any] | None) -> dict[str, Any]:
    cluster = static_cluster(name, [port], connect_timeout="2s")
    if tls is not None:
        cluster["transport_socket"] = tls
    return cluster


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("tls-interop")
    pki = Pki("example.org")
    files: dict[str, Path] = {"bundle": work / "bundle.pem"}
    files["bundle"].write_bytes(pki.bundle_pem)
    for name, sid in (("envoy", ENVOY_ID), ("ubimesh", UBIMESH_ID)):
        files[name], files[name + "_key"] = pki.write_leaf(work, name, pki.leaf(sid))
    echo = EchoServerPool()
    echo_port = echo.port("tls-interop")
    names = ["u_admin", "u_in", "u_in_wrong", "u_out", "u_out_wrong", "u_out_refused",
             "e_admin", "e_in", "e_in_wrong", "e_out", "e_out_wrong", "e_out_refused"]  # fmt: skip
    ports = dict(zip(names, free_ports(len(names)), strict=True))

    def down(me: str, peer: str) -> dict[str, Any]:
        return _tls("DownstreamTlsContext", files, me, peer, require_client_certificate=True)

    def up(me: str, peer: str) -> dict[str, Any]:
        return _tls("UpstreamTlsContext", files, me, peer)

    ubimesh = {
        "admin": {"address": address(ports["u_admin"])},
        "static_resources": {
            "listeners": [
                _listener("in", ports["u_in"], "echo", down("ubimesh", ENVOY_ID)),
                _listener("in_wrong", ports["u_in_wrong"], "echo", down("ubimesh", WRONG_ID)),
                _listener("out", ports["u_out"], "envoy", None),
                _listener("out_wrong", ports["u_out_wrong"], "envoy_wrong", None),
                _listener("out_refused", ports["u_out_refused"], "envoy_refusing", None),
            ],
            "clusters": [
                _cluster("echo", echo_port, None),
                _cluster("envoy", ports["e_in"], up("ubimesh", ENVOY_ID)),
                _cluster("envoy_wrong", ports["e_in"], up("ubimesh", WRONG_ID)),
                _cluster("envoy_refusing", ports["e_in_wrong"], up("ubimesh", ENVOY_ID)),
            ],
        },
    }
    envoy = {
        "admin": {"address": address(ports["e_admin"])},
        "static_resources": {
            "listeners": [
                _listener("in", ports["e_in"], "echo", down("envoy", UBIMESH_ID)),
                _listener("in_wrong", ports["e_in_wrong"], "echo", down("envoy", WRONG_ID)),
                _listener("out", ports["e_out"], "ubimesh", None),
                _listener("out_wrong", ports["e_out_wrong"], "ubimesh_wrong", None),
                _listener("out_refused", ports["e_out_refused"], "ubimesh_refusing", None),
            ],
            "clusters": [
                _cluster("echo", echo_port, None),
                _cluster("ubimesh", ports["u_in"], up("envoy", UBIMESH_ID)),
                _cluster("ubimesh_wrong", ports["u_in"], up("envoy", WRONG_ID)),
                _cluster("ubimesh_refusing", ports["u_in_wrong"], up("envoy", UBIMESH_ID)),
            ],
        },
    }
    (work / "ubimesh.json").write_text(json.dumps(ubimesh))
    (work / "envoy.json").write_text(json.dumps(envoy))
    procs = []
    try:
        u_ports = [ports[n] for n in names if n.startswith("u_") and n != "u_admin"]
        e_ports = [ports[n] for n in names if n.startswith("e_") and n != "e_admin"]
        procs.append(start_ubimesh(work / "ubimesh.json", ports["u_admin"], u_ports, work))
        procs.append(start_envoy(work / "envoy.json", ports["e_admin"], e_ports, work))
        yield {"ports": ports, "echo": echo, "files": files}
    finally:
        for proc in procs:
            proc.stop()
        echo.close()


def _get(port: int) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    try:
        conn.request("GET", "/", headers={"x-forwarded-client-cert": "URI=spiffe://evil/x"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _hash(path: Path) -> str:
    leaf = x509.load_pem_x509_certificates(path.read_bytes())[0]
    return hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()


def _xfcc(record: Any) -> list[str]:
    return [v for k, v in record.headers if k.lower() == "x-forwarded-client-cert"]


def test_envoy_client_to_ubimesh_server(mesh: dict[str, Any]) -> None:
    echo, files = mesh["echo"], mesh["files"]
    cursor = echo.cursor()
    assert _get(mesh["ports"]["e_out"])[0] == 200
    (record,) = echo.records_since(cursor, at_least=1)
    assert _xfcc(record) == [f"By={UBIMESH_ID};Hash={_hash(files['envoy'])};URI={ENVOY_ID}"]


def test_ubimesh_client_to_envoy_server(mesh: dict[str, Any]) -> None:
    echo, files = mesh["echo"], mesh["files"]
    cursor = echo.cursor()
    assert _get(mesh["ports"]["u_out"])[0] == 200
    (record,) = echo.records_since(cursor, at_least=1)
    # Envoy writes the element ubimesh writes in the other direction.
    assert _xfcc(record) == [f"By={ENVOY_ID};Hash={_hash(files['ubimesh'])};URI={UBIMESH_ID}"]


@pytest.mark.parametrize(
    "listener",
    [
        "e_out_wrong",  # Envoy expects another ID from ubimesh
        "e_out_refused",  # ubimesh expects another ID from Envoy
        "u_out_wrong",  # ubimesh expects another ID from Envoy
        "u_out_refused",  # Envoy expects another ID from ubimesh
    ],
)
def test_a_wrong_spiffe_id_is_refused(mesh: dict[str, Any], listener: str) -> None:
    echo = mesh["echo"]
    cursor = echo.cursor()
    status, _ = _get(mesh["ports"][listener])
    assert status == 503
    assert echo.records_since(cursor, timeout=0.3) == []
