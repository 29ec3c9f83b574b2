"""Fault injection and local rate limiting against Envoy 1.40: the same bootstrap run by the real
``envoy`` and by ``ubimesh proxy``; the same request sequence to both; the answers, whether
the upstream saw the request, and the filters' stats must be equal.

Only deterministic cases: 100 % and 0 % aborts, header-controlled aborts and delays (status
from the header, invalid status, the percentage header lowering the configured percentage),
fault ``headers`` matching, and rate limits after N requests (status, body, the configured and
x-ratelimit-* headers, per-route override, descriptors from the filter's ``rate_limits``, the
not-enforced mode), and the filters' order with RBAC filters around a fault. Each rate limit
bucket holds a few tokens and refills once an hour, so the sequence decides every answer.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.bootstrap import (
    HCM,
    ROUTER,
    Proxy,
    address,
    listener,
    proxy_pair,
    static_cluster,
)
from tests.support.echo_upstream import EchoServerPool
from tests.support.procs import LOOPBACK, admin_get, envoy_binary, ubimesh_available

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary"),
]

FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
LRL = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
HRBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
LISTENERS = ("abort", "noabort", "hdr", "match", "rl", "desc", "shadow", "order")
HOUR = "3600s"
ALL = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}


def _fault(**config: Any) -> dict[str, Any]:
    return {"name": "envoy.filters.http.fault", "typed_config": {"@type": FAULT, **config}}


def _lrl(**config: Any) -> dict[str, Any]:
    return {"name": "envoy.filters.http.local_ratelimit", "typed_config": {"@type": LRL, **config}}


def _rbac_deny(prefix: str) -> dict[str, Any]:
    policy = {
        "permissions": [{"url_path": {"path": {"prefix": prefix}}}],
        "principals": [{"any": True}],
    }
    rules = {"action": "DENY", "policies": {prefix.strip("/"): policy}}
    return {"name": "envoy.filters.http.rbac", "typed_config": {"@type": HRBAC, "rules": rules}}


def _bucket(tokens: int) -> dict[str, Any]:
    return {"max_tokens": tokens, "tokens_per_fill": 1, "fill_interval": HOUR}


def _hcm(prefix: str, filters: list[dict[str, Any]], routes: list[dict[str, Any]] | None = None):
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM,
            "stat_prefix": prefix,
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "shop",
                        "domains": ["*"],
                        "routes": routes
                        or [{"match": {"prefix": "/"}, "route": {"cluster": "echo"}}],
                    }
                ]
            },
            "http_filters": [
                *filters,
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}},
            ],
        },
    }


def bootstrap(ports: dict[str, int], echo_port: int) -> dict[str, Any]:
    per_route_lrl = {
        "@type": LRL,
        "stat_prefix": "special",
        "token_bucket": _bucket(1),
        "filter_enabled": ALL,
        "filter_enforced": ALL,
        "status": {"code": 503},
    }
    rl_routes = [
        {
            "match": {"prefix": "/special"},
            "route": {"cluster": "echo"},
            "typed_per_filter_config": {"envoy.filters.http.local_ratelimit": per_route_lrl},
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "echo"}},
    ]
    filters = {
        "abort": _hcm(
            "abort",
            [_fault(abort={"http_status": 503, "percentage": {"numerator": 100}})],
        ),
        "noabort": _hcm(
            "noabort",
            [
                _fault(
                    abort={"http_status": 503, "percentage": {"numerator": 0}},
                    delay={"fixed_delay": "5s", "percentage": {"numerator": 0}},
                )
            ],
        ),
        "hdr": _hcm(
            "hdr",
            [
                _fault(
                    abort={"header_abort": {}, "percentage": {"numerator": 100}},
                    delay={"header_delay": {}, "percentage": {"numerator": 100}},
                )
            ],
        ),
        "match": _hcm(
            "match",
            [
                _fault(
                    abort={
                        "http_status": 418,
                        "percentage": {"numerator": 1000000, "denominator": "MILLION"},
                    },
                    headers=[{"name": "x-fault", "string_match": {"exact": "yes"}}],
                )
            ],
        ),
        "rl": _hcm(
            "rl",
            [
                _lrl(
                    stat_prefix="rl",
                    token_bucket=_bucket(2),
                    filter_enabled=ALL,
                    filter_enforced=ALL,
                    enable_x_ratelimit_headers="DRAFT_VERSION_03",
                    response_headers_to_add=[
                        {"header": {"key": "x-local-rate-limit", "value": "true"}}
                    ],
                )
            ],
            rl_routes,
        ),
        "desc": _hcm(
            "desc",
            [
                _lrl(
                    stat_prefix="desc",
                    token_bucket=_bucket(100),
                    filter_enabled=ALL,
                    filter_enforced=ALL,
                    descriptors=[
                        {"entries": [{"key": "user", "value": "alice"}], "token_bucket": _bucket(1)}
                    ],
                    rate_limits=[
                        {
                            "actions": [
                                {
                                    "request_headers": {
                                        "header_name": "x-user",
                                        "descriptor_key": "user",
                                    }
                                }
                            ]
                        }
                    ],
                )
            ],
        ),
        # RBAC, a fault, RBAC again: each answers in its place in http_filters.
        "order": _hcm(
            "order",
            [
                _rbac_deny("/first"),
                _fault(
                    abort={"http_status": 502, "percentage": {"numerator": 100}},
                    headers=[{"name": "x-fault", "present_match": True}],
                ),
                _rbac_deny("/second"),
            ],
        ),
        "shadow": _hcm(
            "shadow",
            [
                _lrl(
                    stat_prefix="shadow",
                    token_bucket=_bucket(1),
                    filter_enabled=ALL,
                    request_headers_to_add_when_not_enforced=[
                        {"header": {"key": "x-would-limit", "value": "1"}}
                    ],
                )
            ],
        ),
    }
    return {
        "admin": {"address": address(ports["admin"])},
        "static_resources": {
            "listeners": [listener(n, ports[n], f) for n, f in filters.items()],
            "clusters": [static_cluster("echo", [echo_port], connect_timeout="2s")],
        },
    }


@dataclass
class Farm:
    echo: EchoServerPool
    proxies: list[Proxy]


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    ok, why = ubimesh_available()
    if not ok:
        pytest.skip(f"ubimesh proxy does not run: {why}")
    work = tmp_path_factory.mktemp("fault-rl-differential")
    echo = EchoServerPool()
    try:
        with proxy_pair(
            work, LISTENERS, lambda _name, ports: bootstrap(ports, echo.port("echo"))
        ) as proxies:
            yield Farm(echo, proxies)
    finally:
        echo.close()


#: Response headers compared (the others are dates, lengths, server names).
SHOWN = (
    "content-type",
    "x-envoy-ratelimited",
    "x-local-rate-limit",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
)


def send(farm: Farm, proxy: Proxy, listener: str, path: str, *headers: str) -> dict[str, Any]:
    """One request on a new connection: what the client and the upstream saw."""
    cursor = farm.echo.cursor()
    head = [f"GET {path} HTTP/1.1", "Host: shop.example", "Connection: close"]
    head += [f"{headers[i]}: {headers[i + 1]}" for i in range(0, len(headers), 2)]
    raw = b""
    with socket.create_connection((LOOPBACK, proxy.ports[listener]), timeout=5) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        for _ in range(1000):  # bounded; stop at the body's end (Envoy delays its close)
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
            head_end = raw.find(b"\r\n\r\n")
            if head_end >= 0:
                length = re.search(rb"(?im)^content-length: *(\d+)", raw[:head_end])
                if length and len(raw) >= head_end + 4 + int(length.group(1)):
                    break
    reached = farm.echo.records_since(cursor, timeout=0.05)
    head_bytes, _, body = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    got = dict(line.lower().split(": ", 1) for line in lines[1:])
    seen: dict[str, Any] = {"status": int(lines[0].split()[1]), "upstream": len(reached)}
    seen.update({k: got.get(k) for k in SHOWN})
    seen["has_reset"] = "x-ratelimit-reset" in got
    if reached:
        seen["would_limit"] = [v for k, v in reached[0].headers if k.lower() == "x-would-limit"]
    if seen["status"] != 200:
        seen["body"] = body.decode("latin-1")
    return seen


#: (listener, path, request headers...) in order: the rate limit answers depend on it.
SEQUENCE: list[tuple[str, ...]] = [
    ("abort", "/"),
    ("abort", "/x"),
    ("noabort", "/"),
    ("hdr", "/"),
    ("hdr", "/", "x-envoy-fault-abort-request", "418"),
    ("hdr", "/", "x-envoy-fault-abort-request", "700"),
    ("hdr", "/", "x-envoy-fault-abort-request", "abc"),
    (
        "hdr",
        "/",
        "x-envoy-fault-abort-request",
        "503",
        "x-envoy-fault-abort-request-percentage",
        "0",
    ),
    ("hdr", "/", "x-envoy-fault-delay-request", "20"),
    ("hdr", "/", "x-envoy-fault-delay-request", "20", "x-envoy-fault-abort-request", "429"),
    ("match", "/"),
    ("match", "/", "x-fault", "yes"),
    ("match", "/", "x-fault", "no"),
    ("rl", "/a"),
    ("rl", "/b"),
    ("rl", "/c"),
    ("rl", "/d"),
    ("rl", "/special"),
    ("rl", "/special"),
    ("desc", "/", "x-user", "alice"),
    ("desc", "/", "x-user", "alice"),
    ("desc", "/", "x-user", "bob"),
    ("desc", "/"),
    ("shadow", "/"),
    ("shadow", "/"),
    ("order", "/first", "x-fault", "1"),
    ("order", "/second", "x-fault", "1"),
    ("order", "/second"),
    ("order", "/other"),
]

_STAT = re.compile(r"^(\S*(?:\.fault\.|http_local_rate_limit)\S*): (\d+)$", re.M)


def filter_stats(proxy: Proxy) -> dict[str, int]:
    status, body = admin_get(proxy.ports["admin"], "/stats", timeout=5)
    assert status == 200
    return {name: int(value) for name, value in _STAT.findall(body.decode())}


def test_same_answers_and_stats_as_envoy(farm: Farm) -> None:
    envoy, subject = farm.proxies
    answers: dict[str, list[dict[str, Any]]] = {}
    for proxy in farm.proxies:
        answers[proxy.name] = [send(farm, proxy, *step) for step in SEQUENCE]
    diffs = [
        f"{step}\n  envoy:   {e}\n  ubimesh: {u}"
        for step, e, u in zip(SEQUENCE, answers["envoy"], answers["ubimesh"], strict=True)
        if e != u
    ]
    assert not diffs, "\n".join(diffs)
    # The sequence means what it says: Envoy itself aborted, limited and let through.
    statuses = [a["status"] for a in answers["envoy"]]
    assert statuses[:3] == [503, 503, 200]
    assert statuses[13:19] == [200, 200, 429, 429, 200, 503]
    expected, got = filter_stats(envoy), filter_stats(subject)
    assert {k: got.get(k) for k in expected} == expected
    assert expected["http.abort.fault.aborts_injected"] == 2
    assert expected["http.hdr.fault.delays_injected"] == 2
    assert expected["shadow.http_local_rate_limit.rate_limited"] == 1
    assert answers["envoy"][24]["would_limit"] == ["1"]
    assert statuses[-4:] == [403, 502, 403, 200]
