"""RBAC against Envoy 1.40: the same bootstrap, with HTTP and network RBAC filters, run by the
real ``envoy`` and by ``ubimesh proxy``; the same requests to both; the answers, what reached
the upstream, and the RBAC stats must be equal.

The matrix covers ALLOW, DENY, shadow rules, two filters in a row, and/or/not on both sides,
header (repeated values, pseudo-headers), url_path (after path normalization, query ignored),
destination_port permissions; ``authenticated`` exact, prefix, empty, DNS SAN and any-TLS
principals (client certificates from tests/support/pki.py, a TLS client without one), source_ip
and direct_remote_ip (client sockets bound to 127.0.0.x, all of which are loopback on Linux),
remote_ip behind x-forwarded-for with and without use_remote_address, header principals; the
network filter in front of a TCP proxy (plaintext and TLS) and in front of an HCM.

A denial must look the same: 403, ``RBAC: access denied``, ``text/plain``, and the route's
response header rules (Envoy resolves the route before its RBAC filter decides). The upstream
must see nothing of a denied request. ``x-ubimesh-denied-by`` is ubimesh's own and is left out
of the comparison (tests/integration/test_rbac_proxy.py checks it).
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.bootstrap import HCM, ROUTER, Proxy, address, proxy_pair, static_cluster
from tests.support.echo_upstream import EchoServerPool
from tests.support.pki import Pki
from tests.support.procs import LOOPBACK, admin_get, envoy_binary, ubimesh_available

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary"),
]

HRBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
NRBAC = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
TLS_DOWN = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"

WEB = "spiffe://example.org/ns/shop/sa/web"
API = "spiffe://example.org/ns/shop/sa/api"
OPS = "spiffe://example.org/ns/ops/sa/admin"
LISTENERS = ("http", "deny", "edge", "mtls", "tcp", "tcp_tls", "http_net")
ANY: list[dict[str, Any]] = [{"any": True}]

# -- the bootstrap --------------------------------------------------------------------------------


def _path(kind: str, value: str) -> dict[str, Any]:
    return {"url_path": {"path": {kind: value}}}


def _header(name: str, **match: Any) -> dict[str, Any]:
    return {"header": {"name": name, **match}}


def _cidr(ip: str, length: int) -> dict[str, Any]:
    return {"address_prefix": ip, "prefix_len": length}


def _policy(perms: list[dict[str, Any]], ids: list[dict[str, Any]]) -> dict[str, Any]:
    return {"permissions": perms, "principals": ids}


def _auth(**name: Any) -> dict[str, Any]:
    return {"authenticated": {"principal_name": name} if name else {}}


def _hcm(prefix: str, filters: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM,
            "stat_prefix": prefix,
            "normalize_path": True,
            "merge_slashes": True,
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "shop",
                        "domains": ["shop.example"],
                        "response_headers_to_add": [
                            {"header": {"key": "x-vhost", "value": "shop"}}
                        ],
                        "routes": [
                            {
                                "match": {"prefix": "/"},
                                "route": {"cluster": "echo"},
                                "response_headers_to_add": [
                                    {"header": {"key": "x-route", "value": prefix}}
                                ],
                            }
                        ],
                    }
                ]
            },
            "http_filters": [
                *filters,
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}},
            ],
            **extra,
        },
    }


def _http_rbac(name: str, **config: Any) -> dict[str, Any]:
    return {"name": name, "typed_config": {"@type": HRBAC, **config}}


def _network_rbac(prefix: str, **config: Any) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.rbac",
        "typed_config": {"@type": NRBAC, "stat_prefix": prefix, **config},
    }


def _tcp_proxy(prefix: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": TCP, "stat_prefix": prefix, "cluster": "echo"},
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
    main_rules = {
        "action": "ALLOW",
        "policies": {
            "by-header": _policy([_header("x-token", string_match={"exact": "letmein"})], ANY),
            "by-repeated": _policy([_header("x-multi", exact_match="b")], ANY),
            "by-path": _policy([_path("prefix", "/public/")], ANY),
            "by-method-and-path": _policy(
                [{"and_rules": {"rules": [_header(":method", exact_match="POST"),
                                          _path("exact", "/submit")]}}],
                ANY,
            ),
            "by-port": _policy(
                [{"destination_port": ports["http"]}], [_header("x-port-ok", present_match=True)]
            ),
            "by-wrong-port": _policy(
                [{"destination_port": ports["deny"]}], [_header("x-wrong-port", present_match=True)]
            ),
            "by-or": _policy(
                [{"or_rules": {"rules": [_path("exact", "/or-a"), _path("exact", "/or-b")]}}], ANY
            ),
            "by-not": _policy(
                [{"and_rules": {"rules": [_path("prefix", "/not/"),
                                          {"not_rule": _header("x-deny", present_match=True)}]}}],
                ANY,
            ),
            "by-source": _policy(
                [_path("prefix", "/src/")], [{"source_ip": _cidr("127.0.0.2", 32)}]
            ),
            "by-direct": _policy(
                [_path("prefix", "/direct/")], [{"direct_remote_ip": _cidr("127.0.0.0", 30)}]
            ),
            "by-remote": _policy(
                [_path("prefix", "/remote/")], [{"remote_ip": _cidr("10.0.0.0", 8)}]
            ),
            "by-ids": _policy(
                [_path("prefix", "/ids/")],
                [{"or_ids": {"ids": [
                    {"and_ids": {"ids": [_header("x-team", exact_match="a"),
                                         {"not_id": {"source_ip": _cidr("127.0.0.3", 32)}}]}},
                    _header("x-team", exact_match="root"),
                ]}}],
            ),
            "by-authority": _policy([_header(":authority", exact_match="other.example")], ANY),
            "by-scheme": _policy(
                [{"and_rules": {"rules": [_header(":scheme", exact_match="http"),
                                          _header("x-scheme", present_match=True)]}}],
                ANY,
            ),
            "by-query": _policy([_header(":path", exact_match="/q?a=1")], ANY),
            "by-regex": _policy([_path("safe_regex", {"regex": "/re/[0-9]+"})], ANY),
        },
    }  # fmt: skip
    main_filters = [
        _http_rbac(
            "rbac-main",
            rules_stat_prefix="main.",
            shadow_rules_stat_prefix="shadow.",
            track_per_rule_stats=True,
            rules=main_rules,
            shadow_rules={
                "action": "DENY",
                "policies": {"shadow-admin": _policy([_path("prefix", "/admin")], ANY)},
            },
        ),
        _http_rbac(
            "rbac-second",
            rules_stat_prefix="second.",
            rules={
                "action": "DENY",
                "policies": {"no-delete": _policy([_header(":method", exact_match="DELETE")], ANY)},
            },
        ),
    ]
    deny_filters = [
        _http_rbac(
            "rbac-deny",
            rules={
                "action": "DENY",
                "policies": {
                    "deny-admin": _policy([_path("prefix", "/admin")], ANY),
                    "deny-src": _policy(ANY, [{"source_ip": _cidr("127.0.0.3", 32)}]),
                    "deny-header": _policy([_header("x-block", present_match=True)], ANY),
                },
            },
        ),
        # Shadow only: evaluated and counted, never enforced.
        _http_rbac(
            "rbac-shadow",
            shadow_rules={
                "action": "ALLOW",
                "policies": {"get": _policy([_header(":method", exact_match="GET")], ANY)},
            },
        ),
    ]
    edge_filters = [
        _http_rbac(
            "rbac-edge",
            rules={
                "action": "ALLOW",
                "policies": {"trusted": _policy(ANY, [{"remote_ip": _cidr("10.0.0.0", 8)}])},
            },
        )
    ]
    mtls_filters = [
        _http_rbac(
            "rbac-mtls",
            track_per_rule_stats=True,
            rules={
                "action": "ALLOW",
                "policies": {
                    "web-exact": _policy(ANY, [_auth(exact=WEB)]),
                    "shop-prefix": _policy([_path("prefix", "/shop/")], [_auth(prefix="spiffe://example.org/ns/shop/")]),
                    "any-tls": _policy([_header("x-any-tls", present_match=True)], [_auth()]),
                    "dns-name": _policy([_path("prefix", "/dns/")], [_auth(exact="web.example")]),
                    "empty-subject": _policy([_path("prefix", "/subject/")], [_auth(exact="")]),
                    "not-web": _policy(
                        [_path("prefix", "/not-web/")], [{"not_id": _auth(exact=WEB)}]
                    ),
                },
            },
        )
    ]  # fmt: skip
    tcp_rbac = _network_rbac(
        "tcp_rbac",
        shadow_rules_stat_prefix="shadow.",
        rules={
            "action": "ALLOW",
            "policies": {
                "local-only": _policy(
                    [{"destination_port": ports["tcp"]}], [{"source_ip": _cidr("127.0.0.1", 32)}]
                )
            },
        },
        shadow_rules={
            "action": "DENY",
            "policies": {"shadow-2": _policy(ANY, [{"direct_remote_ip": _cidr("127.0.0.2", 32)}])},
        },
    )
    tls_rbac = _network_rbac(
        "tls_rbac",
        rules={"action": "ALLOW", "policies": {"web-only": _policy(ANY, [_auth(exact=WEB)])}},
    )
    net_http_rbac = _network_rbac(
        "net_http",
        rules={
            "action": "DENY",
            "policies": {"deny-4": _policy(ANY, [{"remote_ip": _cidr("127.0.0.4", 32)}])},
        },
    )

    def listener(name: str, filters: list[dict[str, Any]], tls: bool = False) -> dict[str, Any]:
        chain: dict[str, Any] = {"filters": filters}
        if tls:
            chain["transport_socket"] = _tls(files)
        return {"name": name, "address": address(ports[name]), "filter_chains": [chain]}

    return {
        "admin": {"address": address(ports["admin"])},
        "static_resources": {
            "listeners": [
                listener("http", [_hcm("main", main_filters)]),
                listener("deny", [_hcm("deny", deny_filters)]),
                listener(
                    "edge",
                    [_hcm("edge", edge_filters, use_remote_address=True, xff_num_trusted_hops=1)],
                ),
                listener("mtls", [_hcm("mtls", mtls_filters)], tls=True),
                listener("tcp", [tcp_rbac, _tcp_proxy("tcp")]),
                listener("tcp_tls", [tls_rbac, _tcp_proxy("tcp_tls")], tls=True),
                listener("http_net", [net_http_rbac, _hcm("net_http", [])]),
            ],
            "clusters": [static_cluster("echo", [echo_port], connect_timeout="2s")],
        },
    }


# -- the proxies ----------------------------------------------------------------------------------


@dataclass
class Farm:
    echo: EchoServerPool
    files: dict[str, Path]
    proxies: list[Proxy]


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    ok, why = ubimesh_available()
    if not ok:
        pytest.skip(f"ubimesh proxy does not run: {why}")
    work = tmp_path_factory.mktemp("rbac-differential")
    pki = Pki("example.org")
    files: dict[str, Path] = {"bundle": work / "bundle.pem"}
    files["bundle"].write_bytes(pki.bundle_pem)
    leaves = {
        "server": pki.leaf("spiffe://example.org/ns/shop/sa/server"),
        "web": pki.leaf(WEB, dns=["web.example"]),
        "api": pki.leaf(API),
        "ops": pki.leaf(OPS),
    }
    for name, chain_key in leaves.items():
        files[name], files[name + "_key"] = pki.write_leaf(work, name, chain_key)
    echo = EchoServerPool()
    try:
        with proxy_pair(
            work, LISTENERS, lambda _name, ports: bootstrap(ports, echo.port("echo"), files)
        ) as proxies:
            yield Farm(echo, files, proxies)
    finally:
        echo.close()


# -- one request and what was seen ----------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    listener: str
    path: str = "/"
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    host: str = "shop.example"
    source: str = "127.0.0.1"
    cert: str = ""  # TLS listeners: "" for no client certificate, else a leaf's name
    note: str = ""


def _client_context(files: dict[str, Path], cert: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(str(files[cert]), str(files[cert + "_key"]))
    return ctx


def _complete(raw: bytes) -> bool:
    """Whether ``raw`` holds a whole response with a Content-Length body: the client stops
    there instead of waiting for the close, which Envoy delays by its delayed_close_timeout
    (1 s) after a local reply."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def send(farm: Farm, proxy: Proxy, req: Req) -> dict[str, Any]:
    """Send ``req`` to ``proxy`` on a new connection; what the client and the upstream saw."""
    cursor = farm.echo.cursor()
    head = [f"{req.method} {req.path} HTTP/1.1", f"Host: {req.host}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in req.headers]
    data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
    raw = b""
    sock = socket.create_connection(
        (LOOPBACK, proxy.ports[req.listener]), timeout=5, source_address=(req.source, 0)
    )
    try:
        if req.listener in ("mtls", "tcp_tls"):
            sock = _client_context(farm.files, req.cert).wrap_socket(sock)
        sock.sendall(data)
        while not _complete(raw):
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    except OSError:
        pass  # reset or refused handshake: what matters is that no answer came
    finally:
        sock.close()
    reached = farm.echo.records_since(cursor, timeout=0.05)
    seen: dict[str, Any] = {"upstream": [(r.method, r.target) for r in reached]}
    if not raw:
        seen["status"] = "closed"  # the error (reset or EOF) is timing, not behaviour
        return seen
    head_bytes, _, body = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    seen["status"] = status
    for name in ("content-type", "x-route", "x-vhost"):
        seen[name] = headers.get(name)
    if status != 200:
        seen["body"] = body.decode("latin-1")
    return seen


def _h(*pairs: str) -> tuple[tuple[str, str], ...]:
    return tuple((pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2))


CASES: list[Req] = [
    # ALLOW on the main listener: nothing matches -> 403
    Req("http", "/", note="no policy"),
    Req("http", "/", headers=_h("x-token", "letmein")),
    Req("http", "/", headers=_h("x-token", "LETMEIN"), note="exact is case sensitive"),
    Req("http", "/", headers=_h("x-multi", "a", "x-multi", "b"), note="one of the values"),
    Req("http", "/", headers=_h("x-multi", "a,b"), note="one value a,b"),
    Req("http", "/public/x?y=1"),
    Req("http", "//public//x", note="merged slashes"),
    Req("http", "/public/../admin", note="normalized out of /public/"),
    Req("http", "/%70ublic/x", note="decoded unreserved escape"),
    Req("http", "/submit", method="POST"),
    Req("http", "/submit", method="GET"),
    Req("http", "/submit?x", method="POST", note="query ignored by url_path"),
    Req("http", "/", headers=_h("x-port-ok", "1"), note="destination port"),
    Req("http", "/", headers=_h("x-wrong-port", "1"), note="another port"),
    Req("http", "/or-a"),
    Req("http", "/or-b"),
    Req("http", "/or-c"),
    Req("http", "/not/x"),
    Req("http", "/not/x", headers=_h("x-deny", "1")),
    Req("http", "/src/", source="127.0.0.2"),
    Req("http", "/src/", source="127.0.0.1"),
    Req("http", "/src/", source="127.0.0.2", headers=_h("x-forwarded-for", "10.9.9.9")),
    Req("http", "/direct/", source="127.0.0.3"),
    Req("http", "/direct/", source="127.0.0.5"),
    Req("http", "/remote/", headers=_h("x-forwarded-for", "10.1.2.3")),
    Req("http", "/remote/", headers=_h("x-forwarded-for", "10.1.2.3, 192.168.0.1")),
    Req("http", "/remote/", headers=_h("x-forwarded-for", "192.168.0.1,10.1.2.3")),
    Req("http", "/remote/", headers=_h("x-forwarded-for", "not-an-ip")),
    Req(
        "http", "/remote/", headers=_h("x-forwarded-for", "10.1.2.3", "x-forwarded-for", "1.1.1.1")
    ),
    Req("http", "/remote/", note="no x-forwarded-for"),
    Req("http", "/ids/", headers=_h("x-team", "a")),
    Req("http", "/ids/", headers=_h("x-team", "a"), source="127.0.0.3"),
    Req("http", "/ids/", headers=_h("x-team", "root"), source="127.0.0.3"),
    Req("http", "/ids/", headers=_h("x-team", "b")),
    Req("http", "/", host="other.example", note="allowed, then no virtual host: 404"),
    Req("http", "/", host="nowhere.example", note="denied before routing: 403, no route headers"),
    Req("http", "/", headers=_h("x-scheme", "1")),
    Req("http", "/q?a=1", note=":path carries the query"),
    Req("http", "/q?a=2"),
    Req("http", "/re/123"),
    Req("http", "/re/12a"),
    Req(
        "http",
        "/public/x",
        method="DELETE",
        note="allowed by the first filter, denied by the second",
    ),
    Req("http", "/admin", headers=_h("x-token", "letmein"), note="shadow denial is not enforced"),
    # DENY listener (and a shadow-only filter after it)
    Req("deny", "/"),
    Req("deny", "/admin"),
    Req("deny", "/ADMIN", note="case matters"),
    Req("deny", "//admin", note="merged to /admin"),
    Req("deny", "/x/../admin/", note="normalized to /admin/"),
    Req("deny", "/%61dmin", note="decoded to /admin"),
    Req("deny", "/admin?x", note="query ignored"),
    Req("deny", "/", source="127.0.0.3"),
    Req("deny", "/", headers=_h("x-block", "")),
    Req("deny", "/", method="POST"),
    # use_remote_address with one trusted hop
    Req("edge", "/", note="no XFF: the client's address"),
    Req("edge", "/", headers=_h("x-forwarded-for", "10.0.0.7")),
    Req("edge", "/", headers=_h("x-forwarded-for", "10.0.0.7, 192.168.1.1")),
    Req("edge", "/", headers=_h("x-forwarded-for", "192.168.1.1, 10.0.0.7")),
    # authenticated principals (TLS without client certificate requirement)
    Req("mtls", "/", cert="web"),
    Req("mtls", "/", cert="api"),
    Req("mtls", "/", cert=""),
    Req("mtls", "/shop/x", cert="api"),
    Req("mtls", "/shop/x", cert="ops"),
    Req("mtls", "/", cert="", headers=_h("x-any-tls", "1"), note="TLS without a certificate"),
    Req("mtls", "/", cert="ops", headers=_h("x-any-tls", "1")),
    Req("mtls", "/dns/", cert="web"),
    Req("mtls", "/dns/", cert="api"),
    Req("mtls", "/subject/", cert="api", note="empty subject"),
    Req("mtls", "/subject/", cert="", note="no certificate: empty subject"),
    Req("mtls", "/not-web/", cert="api"),
    Req("mtls", "/not-web/", cert=""),
    Req("mtls", "/not-web/x", cert="web"),
    # network filter in front of a TCP proxy
    Req("tcp", "/", source="127.0.0.1"),
    Req("tcp", "/", source="127.0.0.2"),
    Req("tcp_tls", "/", cert="web"),
    Req("tcp_tls", "/", cert="api"),
    Req("tcp_tls", "/", cert=""),
    # network filter in front of an HCM
    Req("http_net", "/", source="127.0.0.1"),
    Req("http_net", "/", source="127.0.0.4"),
]


def _case_id(req: Req) -> str:
    extra = f"{req.method} {req.path} " + " ".join(f"{k}={v}" for k, v in req.headers)
    who = f" from {req.source}" if req.source != "127.0.0.1" else ""
    cert = f" cert={req.cert or 'none'}" if req.listener in ("mtls", "tcp_tls") else ""
    return f"{req.listener}: {extra.strip()}{who}{cert}"


@pytest.mark.parametrize("req", CASES, ids=[_case_id(c) for c in CASES])
def test_same_answer_as_envoy(farm: Farm, req: Req) -> None:
    envoy, subject = farm.proxies
    expected = send(farm, envoy, req)
    got = send(farm, subject, req)
    assert got == expected, f"{req.note or _case_id(req)}\nenvoy:   {expected}\nubimesh: {got}"


SANITY = [
    (Req("http", "/"), 403),
    (Req("http", "/public/x"), 200),
    (Req("deny", "/admin"), 403),
    (Req("mtls", "/", cert="web"), 200),
    (Req("mtls", "/", cert="api"), 403),
    (Req("tcp", "/", source="127.0.0.2"), "closed"),
    (Req("tcp_tls", "/", cert="web"), 200),
]


def test_the_cases_mean_what_they_say(farm: Farm) -> None:
    """The matrix is worth something only if Envoy itself allows and denies as intended (a
    bootstrap that allowed everything would make every comparison pass)."""
    assert {c.listener for c in CASES} == set(LISTENERS)
    envoy, subject = farm.proxies
    for req, status in SANITY:
        seen = send(farm, envoy, req)
        assert seen["status"] == status, (req, seen)
        assert (seen["upstream"] != []) is (status == 200), (req, seen)
        assert send(farm, subject, req) == seen, req


_RBAC_STAT = re.compile(r"^(\S*\.rbac\.\S*): (\d+)$", re.M)


def rbac_stats(proxy: Proxy) -> dict[str, int]:
    status, body = admin_get(proxy.ports["admin"], "/stats", timeout=5)
    assert status == 200
    return {name: int(value) for name, value in _RBAC_STAT.findall(body.decode())}


def test_rbac_stats_as_envoy(farm: Farm) -> None:
    """The whole matrix once more: every RBAC counter Envoy keeps moves by the same amount in
    ubimesh, and ubimesh's only extra counters are its per-policy denials. (Deltas: a client
    that connects and closes without a byte, as the start-up probes do, is judged by ubimesh
    at accept and by Envoy only sometimes.)"""
    envoy, subject = farm.proxies
    before = {p.name: rbac_stats(p) for p in farm.proxies}
    for req in CASES:
        for proxy in farm.proxies:
            send(farm, proxy, req)

    def deltas(proxy: Proxy) -> dict[str, int]:
        now = rbac_stats(proxy)
        return {k: v - before[proxy.name].get(k, 0) for k, v in now.items()}

    deadline = time.monotonic() + 5
    while True:  # Envoy's network filter counts when the client's close arrives
        expected, got = deltas(envoy), deltas(subject)
        if {k: got.get(k) for k in expected} == expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {k: got.get(k) for k in expected} == expected
    extra = sorted(set(got) - set(expected))
    assert extra and all(re.search(r"\.policy\.[\w-]+\.denied$", name) for name in extra), extra
    assert got["http.main.rbac.main.policy.none.denied"] > 0
    assert expected["http.main.rbac.main.denied"] > 0
    assert expected["tcp_rbac.rbac.shadow.shadow_denied"] > 0
