"""Traffic splitting and mirroring.

Module proxy, listener ``main``:

* ``/weighted``: weighted_clusters ``heavy`` 90 / ``light`` 10;
* ``/mirror``: cluster ``primary``, mirrored to ``shadow`` (echo upstreams);
* ``/mirror-silent``: cluster ``primary``, mirrored to an upstream that never answers.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from typing import Any

import pytest
from tests.support.echo_upstream import EchoServerPool
from tests.support.http_client import Response, build_request
from tests.support.upstreams import SilentUpstream

WEIGHTED_REQUESTS = 10_000
CLIENT_CONNECTIONS = 4


def _header(resp: Response, name: str) -> str | None:
    for n, v in resp.headers:
        if n.lower() == name.lower():
            return v
    return None



@pytest.fixture(scope="module")
def proxy(module_proxy_factory: Any, module_echo: EchoServerPool, silent: SilentUpstream) -> Any:
    b = module_proxy_factory.bootstrap()
    for name in ("heavy", "light", "primary", "shadow"):
        b.add_cluster(name, [module_echo.port(name)])
    b.add_cluster("silent_shadow", [silent.port])
    weighted = {"clusters": [{"name": "heavy", "weight": 90}, {"name": "light", "weight": 10}]}
    routes = [
        {"match": {"prefix": "/weighted"}, "route": {"weighted_clusters": weighted}},
        {
            "match": {"prefix": "/mirror-silent"},
            "route": {
                "cluster": "primary",
                "request_mirror_policies": [{"cluster": "silent_shadow"}],
            },
        },
        {
            "match": {"prefix": "/mirror"},
            "route": {"cluster": "primary", "request_mirror_policies": [{"cluster": "shadow"}]},
        },
    ]
    b.add_listener("main", routes=routes)
    return module_proxy_factory.start(b)


def test_weighted_clusters_split_90_10(
    proxy: Any, module_echo: EchoServerPool, connect: Any
) -> None:
    cursor = module_echo.cursor()
    counts: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    per_connection = WEIGHTED_REQUESTS // CLIENT_CONNECTIONS
    request = build_request("GET", "/weighted", [("Host", "weighted.test")])

    def run(conn: Any) -> None:
        local: Counter[str] = Counter()
        try:
            for _ in range(per_connection):
                conn.send(request)
                resp = conn.read_response("GET", timeout=10)
                if resp.status != 200 or resp.error:
                    with lock:
                        failures.append(f"{resp.status} {resp.error} {resp.body[:100]!r}")
                    return
                local[_header(resp, "x-echo-upstream") or "?"] += 1
        except OSError as exc:
            with lock:
                failures.append(repr(exc))
        finally:
            with lock:
                counts.update(local)

    conns = [connect(proxy.port(), timeout=60) for _ in range(CLIENT_CONNECTIONS)]
    threads = [threading.Thread(target=run, args=(c,), daemon=True) for c in conns]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    elapsed = time.monotonic() - started
    assert not any(t.is_alive() for t in threads), "client threads did not finish in 90 s"
    total = per_connection * CLIENT_CONNECTIONS
    print(f"\n{total} weighted requests through {proxy.subject} in {elapsed:.1f} s: {counts}")
    assert not failures, f"{len(failures)} failed requests, first: {failures[:3]}"
    assert sum(counts.values()) == total and set(counts) <= {"heavy", "light"}, counts
    for name, weight in (("heavy", 90), ("light", 10)):
        share = 100 * counts[name] / total
        assert abs(share - weight) <= 2, f"{name} got {share:.2f} % (weight {weight}): {counts}"
    # The upstreams' own logs agree with what the client saw.
    records = module_echo.records_since(cursor, at_least=total, timeout=10)
    logged = Counter(r.name for r in records)
    assert logged == counts, (logged, counts)


def test_mirror_sends_a_copy_to_the_shadow(
    proxy: Any, module_echo: EchoServerPool, connect: Any
) -> None:
    body = b"mirrored body " * 1000
    cursor = module_echo.cursor()
    resp = connect(proxy.port()).request(
        "POST", "/mirror/copy?x=1", [("Host", "mirror.test"), ("x-tag", "m1")], body=body
    )
    assert resp.status == 200, resp
    assert _header(resp, "x-echo-upstream") == "primary", resp.headers
    primary = json.loads(resp.body)
    assert primary["name"] == "primary"
    assert [v for n, v in primary["headers"] if n.lower() == "host"] == ["mirror.test"]

    records = module_echo.records_since(cursor, at_least=2, timeout=5)
    shadows = [r for r in records if r.name == "shadow"]
    assert len(shadows) == 1, f"shadow received {[(r.name, r.target) for r in records]}"
    shadow = shadows[0]
    assert shadow.method == "POST" and shadow.target == "/mirror/copy?x=1"
    hosts = [v for n, v in shadow.headers if n.lower() == "host"]
    assert hosts == ["mirror.test-shadow"], shadow.headers
    assert ["x-tag", "m1"] in shadow.headers
    assert shadow.body_sha256 == hashlib.sha256(body).hexdigest(), "shadow got another body"


def test_a_shadow_that_never_answers_does_not_delay_the_primary(
    proxy: Any, silent: SilentUpstream, connect: Any
) -> None:
    before = len(silent.requests)
    latencies = []
    conn = connect(proxy.port())
    for i in range(5):
        started = time.monotonic()
        resp = conn.request("GET", f"/mirror-silent/{i}", [("Host", "mirror.test")], timeout=10)
        latencies.append(time.monotonic() - started)
        assert resp.status == 200, resp
        assert _header(resp, "x-echo-upstream") == "primary", resp.headers
    shadowed = silent.wait_requests(before + 5, timeout=5)[before:]
    assert len(shadowed) == 5, f"the silent shadow got {len(shadowed)} of 5 mirrored requests"
    assert all(r.header("host") == "mirror.test-shadow" for r in shadowed), shadowed
    # Coupled to the shadow, the primary would wait for the route timeout (15 s).
    assert max(latencies) < 1.0, (
        "the primary answer waited for a shadow that never answers: latencies "
        + ", ".join(f"{x * 1000:.0f} ms" for x in latencies)
    )
