"""What ubimesh adds to Envoy's RBAC, on a running proxy: ``x-ubimesh-denied-by`` per the
listener's ``ubimesh.rbac`` metadata, the ``ubimesh.rbac`` log lines (rate-limited), the
per-policy denial counter and its Prometheus label, and a network denial that the HCM never
sees. (Envoy's own behaviour is checked in tests/interop/test_rbac_differential.py.)"""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.support.bootstrap import HCM, ROUTER, address, static_cluster
from tests.support.echo_upstream import EchoServerPool
from tests.support.pki import Pki
from tests.support.procs import (
    LOOPBACK,
    ManagedProcess,
    admin_get,
    free_ports,
    start_ubimesh,
)

HRBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
NRBAC = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
TLS_DOWN = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
WEB = "spiffe://example.org/ns/shop/sa/web"
LISTENERS = ("internal", "always", "never", "mtls", "gated")
POLICY = "shop/web-to-api/0"  # a name with characters a stat name cannot carry


def _rbac() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": HRBAC,
            "rules": {
                "action": "DENY",
                "policies": {
                    POLICY: {
                        "permissions": [{"url_path": {"path": {"prefix": "/admin"}}}],
                        "principals": [{"any": True}],
                    },
                    "z-secret-plaintext": {
                        "permissions": [{"url_path": {"path": {"prefix": "/secret"}}}],
                        "principals": [{"not_id": {"authenticated": {}}}],
                    },
                },
            },
        },
    }


def _hcm(prefix: str) -> dict[str, Any]:
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
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "echo"}}],
                    }
                ]
            },
            "http_filters": [
                _rbac(),
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}},
            ],
        },
    }


def _tls(files: dict[str, Path]) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TLS_DOWN,
            "require_client_certificate": False,
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


def bootstrap(ports: dict[str, int], echo_port: int, files: dict[str, Path]) -> dict[str, Any]:
    def listener(name: str, mode: str | None, *filters: dict[str, Any], tls: bool = False) -> Any:
        chain: dict[str, Any] = {"filters": list(filters)}
        if tls:
            chain["transport_socket"] = _tls(files)
        out: dict[str, Any] = {
            "name": name,
            "address": address(ports[name]),
            "filter_chains": [chain],
        }
        if mode is not None:
            out["metadata"] = {"filter_metadata": {"ubimesh.rbac": {"denial_header": mode}}}
        return out

    gate = {
        "name": "envoy.filters.network.rbac",
        "typed_config": {
            "@type": NRBAC,
            "stat_prefix": "gate",
            "rules": {
                "action": "ALLOW",
                "policies": {
                    "web/only": {
                        "permissions": [{"any": True}],
                        "principals": [{"authenticated": {"principal_name": {"exact": WEB}}}],
                    }
                },
            },
        },
    }
    return {
        "admin": {"address": address(ports["admin"])},
        "static_resources": {
            "listeners": [
                listener("internal", None, _hcm("internal")),
                listener("always", "always", _hcm("always")),
                listener("never", "never", _hcm("never"), tls=True),
                listener("mtls", "internal", _hcm("mtls"), tls=True),
                listener("gated", None, gate, _hcm("gated"), tls=True),
            ],
            "clusters": [static_cluster("echo", [echo_port], connect_timeout="2s")],
        },
    }


@dataclass
class Running:
    ports: dict[str, int]
    proc: ManagedProcess
    files: dict[str, Path]
    echo: EchoServerPool
    log: Path


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    work = tmp_path_factory.mktemp("rbac-proxy")
    pki = Pki("example.org")
    files: dict[str, Path] = {"bundle": work / "bundle.pem"}
    files["bundle"].write_bytes(pki.bundle_pem)
    for name, sid in (("server", "spiffe://example.org/ns/shop/sa/api"), ("web", WEB),
                      ("other", "spiffe://example.org/ns/shop/sa/other")):  # fmt: skip
        files[name], files[name + "_key"] = pki.write_leaf(work, name, pki.leaf(sid))
    echo = EchoServerPool()
    ports = dict(zip(("admin", *LISTENERS), free_ports(len(LISTENERS) + 1), strict=True))
    path = work / "ubimesh.json"
    path.write_text(json.dumps(bootstrap(ports, echo.port("echo"), files)))
    proc = start_ubimesh(path, ports["admin"], [ports[n] for n in LISTENERS], work)
    try:
        yield Running(ports, proc, files, echo, work / "ubimesh.log")
    finally:
        proc.stop()
        echo.close()


def _request(path: str, host: str = "api.shop") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def _read_responses(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` responses (each with a content-length) from a keep-alive connection."""
    buf = b""
    out: list[tuple[int, dict[str, str], bytes]] = []
    while len(out) < count:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} responses")
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        length = int(headers.get("content-length", "0"))
        while len(buf) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed in a body")
            buf += chunk
        out.append((int(lines[0].split()[1]), headers, buf[:length]))
        buf = buf[length:]
    return out


def get(
    run: Running, listener: str, path: str, cert: str | None = None, count: int = 1
) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` GETs of ``path`` on one connection (TLS when ``cert`` is not None: "" is TLS
    without a client certificate)."""
    sock = socket.create_connection((LOOPBACK, run.ports[listener]), timeout=5)
    try:
        if cert is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            if cert:
                ctx.load_cert_chain(str(run.files[cert]), str(run.files[cert + "_key"]))
            sock = ctx.wrap_socket(sock)
        sock.sendall(_request(path) * count)
        return _read_responses(sock, count)
    finally:
        sock.close()


def denied_by(run: Running, listener: str, path: str, cert: str | None = None) -> str | None:
    ((status, headers, body),) = get(run, listener, path, cert)
    assert status == 403 and body == b"RBAC: access denied"
    return headers.get("x-ubimesh-denied-by")


def stats(run: Running, path: str = "/stats") -> str:
    status, body = admin_get(run.ports["admin"], path, timeout=5)
    assert status == 200
    return body.decode()


def counter(run: Running, name: str) -> int:
    found = re.search(rf"^{re.escape(name)}: (\d+)$", stats(run), re.M)
    return int(found.group(1)) if found else 0


def test_denied_by_header_follows_the_listener_metadata(proxy: Running) -> None:
    # internal (the default): only a caller with a verified client certificate learns why.
    assert denied_by(proxy, "internal", "/admin") is None
    assert denied_by(proxy, "mtls", "/admin", cert="") is None
    assert denied_by(proxy, "mtls", "/admin", cert="web") == POLICY
    assert denied_by(proxy, "always", "/admin/x") == POLICY
    assert denied_by(proxy, "never", "/admin", cert="web") is None
    # An allowed request carries nothing of the kind.
    ((status, headers, _),) = get(proxy, "always", "/public")
    assert status == 200 and "x-ubimesh-denied-by" not in headers


def test_the_header_names_the_matching_policy(proxy: Running) -> None:
    # DENY rules name the policy that matched ("none" is for ALLOW rules that match nothing,
    # which the network gate below shows).
    assert denied_by(proxy, "always", "/secret") == "z-secret-plaintext"


def test_per_policy_denials_are_counted_and_labelled(proxy: Running) -> None:
    name = "http.always.rbac.policy.shop_web-to-api_0.denied"
    before = counter(proxy, name)
    get(proxy, "always", "/admin", count=3)
    assert counter(proxy, name) == before + 3
    prom = stats(proxy, "/stats/prometheus")
    assert re.search(
        r'^envoy_http_rbac_policy_denied\{envoy_rbac_policy_name="shop_web-to-api_0",'
        r'envoy_http_conn_manager_prefix="always"\} \d+$',
        prom,
        re.M,
    ), prom


def test_denials_are_logged_and_rate_limited(proxy: Running) -> None:
    time.sleep(1.1)  # a fresh second of the log's budget
    mark = proxy.log.stat().st_size
    answers = get(proxy, "internal", "/admin/burst?token=secret", count=60)
    assert [status for status, _, _ in answers] == [403] * 60
    deadline = time.monotonic() + 5
    while True:  # the count of the lines left out is written when their second is over
        text = proxy.log.read_bytes()[mark:].decode()
        lines = [line for line in text.splitlines() if "ubimesh.rbac" in line]
        denials = [line for line in lines if "path=/admin/burst" in line]
        summaries = [line for line in lines if "were not logged" in line]
        left_out = sum(int(re.search(r"(\d+) more denials", x).group(1)) for x in summaries)  # type: ignore[union-attr]
        if len(denials) + left_out >= 60 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(denials) + left_out == 60, lines
    assert summaries, "60 denials in a burst must exceed 20 lines a second"
    assert len(denials) <= 20 * len(summaries), lines  # at most 20 in each second
    assert re.search(
        rf"listener=internal source=127\.0\.0\.1:\d+ principal=- method=GET authority=api\.shop "
        rf"path=/admin/burst destination_port={proxy.ports['internal']} "
        rf"policy={re.escape(POLICY)}$",
        denials[0],
    ), denials[0]
    assert "token=secret" not in text  # the query is not logged


def test_a_network_denial_never_reaches_the_http_connection_manager(proxy: Running) -> None:
    mark = proxy.log.stat().st_size
    before = counter(proxy, "http.gated.downstream_cx_total")
    ((status, _, _),) = get(proxy, "gated", "/", cert="web")
    assert status == 200
    for cert in ("other", ""):
        with pytest.raises((ConnectionError, OSError)):
            get(proxy, "gated", "/", cert=cert)
    assert counter(proxy, "http.gated.downstream_cx_total") == before + 1
    assert counter(proxy, "gate.rbac.denied") >= 2
    assert re.search(
        r'^envoy_rbac_policy_denied\{envoy_rbac_policy_name="none",envoy_rbac_prefix="gate"\} \d+$',
        stats(proxy, "/stats/prometheus"),
        re.M,
    )
    time.sleep(0.2)
    text = proxy.log.read_bytes()[mark:].decode()
    assert re.search(
        r"listener=gated source=127\.0\.0\.1:\d+ principal=spiffe://example\.org/ns/shop/sa/other "
        r"method=- authority=- path=- destination_port=\d+ policy=none",
        text,
    ), text
