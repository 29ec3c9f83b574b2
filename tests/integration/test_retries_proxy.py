"""Route retries and timeouts through a real proxy process, with replicas that fail on cue
(``tests/support/retry_upstream.py``: each attempt of a request does the next step of its
``x-script``) and a port nobody listens on.

What is checked is what the client gets, what every replica received (the ledger: how many
times each request was executed, with which body) and the cluster's stats. With
``UBIMESH_IT_SUBJECT=envoy`` the same tests run against Envoy, except the ``ubimesh_only``
ones: ubimesh retries a non-idempotent request only when none of it reached the upstream.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support.bootstrap import FILE, address
from tests.support.procs import free_ports
from tests.support.retry_upstream import Ledger, RetryReplica

_ids = itertools.count(1)
BACKOFF = {"base_interval": "0.01s", "max_interval": "0.02s"}
PREVIOUS_HOSTS = {
    "name": "envoy.retry_host_predicates.previous_hosts",
    "typed_config": {
        "@type": "type.googleapis.com/"
        "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
    },
}


def _endpoint(port: int) -> dict[str, Any]:
    return {"endpoint": {"address": address(port)}}


def _policy(retry_on: str, num_retries: int = 2, **extra: Any) -> dict[str, Any]:
    return {"retry_on": retry_on, "num_retries": num_retries, "retry_back_off": BACKOFF, **extra}


def _route(prefix: str, cluster: str, policy: dict[str, Any] | None, **extra: Any) -> Any:
    action: dict[str, Any] = {"cluster": cluster, "timeout": "5s", **extra}
    if policy is not None:
        action["retry_policy"] = policy
    return {"match": {"prefix": prefix}, "route": action}


@pytest.fixture(scope="module")
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture(scope="module")
def replicas(ledger: Ledger) -> Iterator[dict[str, RetryReplica]]:
    made = {name: RetryReplica(name, ledger) for name in ("a", "b", "c", "d", "m", "h", "i", "j")}
    yield made
    for r in made.values():
        r.stop()


@pytest.fixture(scope="module")
def flags_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("retry-logs") / "flags.log"


@pytest.fixture(scope="module")
def proxy(module_proxy_factory: Any, replicas: dict[str, RetryReplica], flags_log: Path) -> Any:
    (closed,) = free_ports(1)  # free a moment ago, and nobody listens on it
    b = module_proxy_factory.bootstrap()
    b.add_cluster("one", [replicas["a"].port])
    b.add_cluster("trio", [replicas[n].port for n in ("b", "c", "d")], lb_policy="RANDOM")
    b.add_cluster("mixed", [closed, replicas["m"].port])
    b.add_cluster(
        "tight",
        [replicas["a"].port],
        circuit_breakers={"thresholds": [{"max_retries": 0}]},
    )
    b.add_cluster(
        "single",
        [replicas["a"].port],
        circuit_breakers={"thresholds": [{"max_requests": 1}]},
    )
    b.add_cluster(
        "tiers",
        [],
        load_assignment={
            "cluster_name": "tiers",
            "endpoints": [
                {"priority": 0, "lb_endpoints": [_endpoint(replicas[n].port) for n in ("h", "i")]},
                {"priority": 1, "lb_endpoints": [_endpoint(replicas["j"].port)]},
            ],
        },
    )
    routes = [
        _route("/plain", "one", None),
        _route("/r5xx", "one", _policy("5xx")),
        _route("/gw", "one", _policy("gateway-error")),
        _route("/codes", "one", _policy("retriable-status-codes", retriable_status_codes=[418])),
        _route("/reset", "one", _policy("reset", 1)),
        _route("/cf", "mixed", _policy("connect-failure", 3)),
        _route("/pertry", "one", _policy("5xx", 1, per_try_timeout="0.3s")),
        _route("/overall", "one", _policy("5xx", 5, per_try_timeout="0.3s"), timeout="0.5s"),
        # A per-try timeout without any retry_on: timeouts apply, nothing is retried.
        _route(
            "/tryonly", "one", {"per_try_timeout": "0.3s", "num_retries": 3}, timeout="0.5s"
        ),
        _route(
            "/prev",
            "trio",
            _policy(
                "5xx",
                2,
                retry_host_predicate=[PREVIOUS_HOSTS],
                # RANDOM picks: the third attempt misses both tried hosts with probability
                # 1 - (2/3)^(n+1); at 10 the test failed about once in 20 runs.
                host_selection_retry_max_attempts=40,
            ),
        ),
        _route("/tight", "tight", _policy("5xx")),
        _route("/single", "single", _policy("5xx")),
        _route(
            "/tiers",
            "tiers",
            _policy(
                "5xx",
                2,
                retry_host_predicate=[PREVIOUS_HOSTS],
                host_selection_retry_max_attempts=5,
                retry_priority={
                    "name": "envoy.retry_priorities.previous_priorities",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.retry.priority."
                        "previous_priorities.v3.PreviousPrioritiesConfig",
                        "update_frequency": 2,
                    },
                },
            ),
        ),
    ]
    access_log = {
        "name": "flags",
        "typed_config": {
            "@type": FILE,
            "path": str(flags_log),
            "log_format": {
                "text_format_source": {
                    "inline_string": "%REQ(X-TEST-ID)% %RESPONSE_CODE% %RESPONSE_FLAGS%\n"
                }
            },
        },
    }
    b.add_listener("main", routes=routes, access_log=[access_log])
    b.add_listener(
        "small", routes=routes, listener_extra={"per_connection_buffer_limit_bytes": 1024}
    )
    return module_proxy_factory.start(b)


def _send(
    connect: Any,
    proxy: Any,
    path: str,
    script: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    listener: str = "main",
    extra: tuple[tuple[str, str], ...] = (),
) -> tuple[Any, str, float]:
    test_id = f"t{next(_ids)}-{time.monotonic_ns()}"
    headers = [("Host", "retries.test"), ("x-test-id", test_id), ("x-script", script), *extra]
    started = time.monotonic()
    resp = connect(proxy.port(listener)).request(method, path, headers, body=body, timeout=10)
    return resp, test_id, time.monotonic() - started


def _delta(before: dict[str, int], after: dict[str, int], cluster: str) -> dict[str, int]:
    p = f"cluster.{cluster}."
    return {
        k[len(p) :]: after[k] - before.get(k, 0)
        for k in after
        if k.startswith(p) and after[k] != before.get(k, 0)
    }


def test_5xx_is_retried_until_success(proxy: Any, connect: Any, ledger: Ledger) -> None:
    before = proxy.stats()
    resp, tid, _ = _send(connect, proxy, "/r5xx", "503,500,200")
    assert resp.status == 200 and resp.body == b"attempt 3", resp
    assert any(n.lower() == "x-envoy-upstream-service-time" for n, _ in resp.headers)
    assert [a.step for a in ledger.of(tid)] == ["503", "500", "200"]
    delta = _delta(before, proxy.stats(), "one")
    assert delta["upstream_rq_retry"] == 2, delta
    assert delta["upstream_rq_retry_success"] == 1, delta
    assert delta["upstream_rq_retry_backoff_exponential"] == 2, delta
    assert delta["retry.upstream_rq_503"] == 1 and delta["retry.upstream_rq_500"] == 1, delta
    assert delta["upstream_rq_200"] == 1 and "upstream_rq_503" not in delta, delta


def test_retries_run_out_and_the_last_answer_goes_through(
    proxy: Any, connect: Any, ledger: Ledger
) -> None:
    before = proxy.stats()
    resp, tid, _ = _send(connect, proxy, "/r5xx", "503")
    assert resp.status == 503 and resp.body == b"attempt 3", resp
    assert len(ledger.of(tid)) == 3  # num_retries 2: three executions, no more
    delta = _delta(before, proxy.stats(), "one")
    assert delta["upstream_rq_retry_limit_exceeded"] == 1, delta
    assert delta["upstream_rq_retry"] == 2 and "upstream_rq_retry_success" not in delta, delta


@pytest.mark.parametrize(
    ("path", "script", "status", "attempts"),
    [
        ("/gw", "500,200", 500, 1),  # gateway-error is 502, 503, 504 only
        ("/gw", "504,200", 200, 2),
        ("/codes", "418,200", 200, 2),
        ("/codes", "503,200", 503, 1),  # retriable-status-codes alone: not any 5xx
        ("/r5xx", "404,200", 404, 1),
    ],
)
def test_which_statuses_are_retried(
    proxy: Any, connect: Any, ledger: Ledger, path: str, script: str, status: int, attempts: int
) -> None:
    resp, tid, _ = _send(connect, proxy, path, script)
    assert resp.status == status, resp
    assert len(ledger.wait(tid, attempts)) == attempts


def test_reset_before_response_is_retried(proxy: Any, connect: Any, ledger: Ledger) -> None:
    resp, tid, _ = _send(connect, proxy, "/reset", "reset,200")
    assert resp.status == 200 and resp.body == b"attempt 2", resp
    assert len(ledger.of(tid)) == 2


def test_reset_after_retries_says_so(proxy: Any, connect: Any, ledger: Ledger) -> None:
    resp, tid, _ = _send(connect, proxy, "/reset", "reset")
    assert resp.status == 503, resp
    assert resp.body.startswith(
        b"upstream connect error or disconnect/reset before headers. "
        b"retried and the latest reset reason: "
    ), resp.body
    assert len(ledger.of(tid)) == 2


def test_a_started_response_is_never_retried(proxy: Any, connect: Any, ledger: Ledger) -> None:
    resp, tid, _ = _send(connect, proxy, "/r5xx", "partial,200")
    assert resp.status == 200 and resp.error, resp  # the head came, then the connection died
    time.sleep(0.1)
    assert len(ledger.of(tid)) == 1


def test_downstream_retry_headers_are_ignored(proxy: Any, connect: Any, ledger: Ledger) -> None:
    resp, tid, _ = _send(
        connect,
        proxy,
        "/plain",
        "503,200",
        extra=(("x-envoy-retry-on", "5xx"), ("x-envoy-max-retries", "5")),
    )
    assert resp.status == 503, resp
    time.sleep(0.1)
    attempts = ledger.of(tid)
    assert len(attempts) == 1
    assert "x-envoy-retry-on" not in attempts[0].headers
    assert "x-envoy-max-retries" not in attempts[0].headers


def test_per_try_timeout_retries_then_succeeds(proxy: Any, connect: Any, ledger: Ledger) -> None:
    before = proxy.stats()
    resp, tid, elapsed = _send(connect, proxy, "/pertry", "hang,200")
    assert resp.status == 200 and resp.body == b"attempt 2", resp
    assert 0.27 <= elapsed < 2.0, elapsed
    attempts = ledger.of(tid)
    # Envoy tells the upstream the per-try timeout, not the route timeout.
    assert attempts[0].headers["x-envoy-expected-rq-timeout-ms"] == "300"
    assert attempts[1].headers["x-envoy-expected-rq-timeout-ms"] == "300"
    delta = _delta(before, proxy.stats(), "one")
    assert delta["upstream_rq_per_try_timeout"] == 1, delta
    assert delta["upstream_rq_retry"] == 1 and delta["upstream_rq_retry_success"] == 1, delta


def test_per_try_timeout_when_retries_run_out(proxy: Any, connect: Any, ledger: Ledger) -> None:
    resp, tid, elapsed = _send(connect, proxy, "/pertry", "hang")
    assert resp.status == 504 and resp.body == b"upstream request timeout", resp
    assert 0.55 <= elapsed < 2.5, elapsed
    assert len(ledger.of(tid)) == 2


def test_route_timeout_bounds_all_attempts(proxy: Any, connect: Any, ledger: Ledger) -> None:
    before = proxy.stats()
    resp, tid, elapsed = _send(connect, proxy, "/overall", "hang")
    assert resp.status == 504 and resp.body == b"upstream request timeout", resp
    assert 0.45 <= elapsed < 1.5, elapsed  # the 0.5 s route timeout, not 6 x 0.3 s
    assert len(ledger.of(tid)) == 2
    delta = _delta(before, proxy.stats(), "one")
    assert delta["upstream_rq_timeout"] == 1 and delta["upstream_rq_per_try_timeout"] == 1, delta


def test_route_timeout_still_ends_a_response_that_stalls(
    proxy: Any, connect: Any, ledger: Ledger
) -> None:
    """The head comes at once (the per-try timeout no longer applies), then the body stalls:
    the route timeout (0.5 s; the proxy defers arming it behind the shorter per-try timer)
    still ends the stream."""
    before = proxy.stats()
    resp, tid, elapsed = _send(connect, proxy, "/overall", "stall")
    assert resp.status == 200 and resp.error, resp  # the head came, then the stream was reset
    assert 0.45 <= elapsed < 1.5, elapsed
    assert len(ledger.of(tid)) == 1
    delta = _delta(before, proxy.stats(), "one")
    assert delta["upstream_rq_timeout"] == 1, delta
    assert delta.get("upstream_rq_per_try_timeout", 0) == 0, delta


@pytest.mark.parametrize(
    ("script", "status", "low", "high", "stat"),
    [("hang", 504, 0.25, 0.45, "upstream_rq_per_try_timeout"),
     ("stall", 200, 0.45, 1.5, "upstream_rq_timeout")],
)  # fmt: skip
def test_per_try_timeout_without_retry_on(
    proxy: Any,
    connect: Any,
    ledger: Ledger,
    script: str,
    status: int,
    low: float,
    high: float,
    stat: str,
) -> None:
    """A policy with a per-try timeout and no retry_on: a hanging upstream is cut at the
    per-try timeout (0.3 s) and not tried again; a response whose body stalls is ended by the
    route timeout (0.5 s), which the proxy defers behind the per-try timer."""
    before = proxy.stats()
    resp, tid, elapsed = _send(connect, proxy, "/tryonly", script)
    assert resp.status == status, resp
    if status == 504:
        assert resp.body == b"upstream request timeout", resp
    else:
        assert resp.error, resp  # the head came, then the stream was reset
    assert low <= elapsed < high, elapsed
    assert len(ledger.of(tid)) == 1
    delta = _delta(before, proxy.stats(), "one")
    assert delta[stat] == 1, delta
    assert delta.get("upstream_rq_retry", 0) == 0, delta


def test_connect_failure_is_retried_even_for_post(proxy: Any, connect: Any, ledger: Ledger) -> None:
    """Half the cluster refuses connections: every POST still succeeds, executed once."""
    ids = []
    for i in range(4):
        resp, tid, _ = _send(connect, proxy, "/cf", "200", method="POST", body=b"x" * (10 + i))
        assert resp.status == 200, resp
        ids.append(tid)
    assert [len(ledger.of(t)) for t in ids] == [1, 1, 1, 1]


def test_previous_hosts_spreads_attempts(proxy: Any, connect: Any, ledger: Ledger) -> None:
    for _ in range(3):
        resp, tid, _ = _send(connect, proxy, "/prev", "503,503,200")
        assert resp.status == 200, resp
        replicas = [a.replica for a in ledger.of(tid)]
        assert len(replicas) == 3 and len(set(replicas)) == 3, replicas


def test_put_body_is_sent_again_intact(proxy: Any, connect: Any, ledger: Ledger) -> None:
    body = bytes(range(256)) * 12
    resp, tid, _ = _send(connect, proxy, "/r5xx", "503,200", method="PUT", body=body)
    assert resp.status == 200, resp
    digest = hashlib.sha256(body).hexdigest()
    assert [(a.body_length, a.body_sha256) for a in ledger.of(tid)] == [(len(body), digest)] * 2


def test_body_over_the_buffer_limit_turns_retries_off(
    proxy: Any, connect: Any, ledger: Ledger
) -> None:
    before = proxy.stats()
    resp, tid, _ = _send(
        connect, proxy, "/r5xx", "503,200", method="PUT", body=b"y" * 4096, listener="small"
    )
    assert resp.status == 503, resp
    assert len(ledger.of(tid)) == 1
    delta = _delta(before, proxy.stats(), "one")
    assert delta["retry_or_shadow_abandoned"] == 1, delta


def test_retry_overflow(proxy: Any, connect: Any, ledger: Ledger) -> None:
    before = proxy.stats()
    resp, tid, _ = _send(connect, proxy, "/tight", "503,200")
    assert resp.status == 503, resp
    assert len(ledger.of(tid)) == 1
    delta = _delta(before, proxy.stats(), "tight")
    assert delta["upstream_rq_retry_overflow"] == 1, delta


@pytest.mark.ubimesh_only
@pytest.mark.parametrize(("script", "path"), [("503,200", "/r5xx"), ("reset,200", "/reset")])
def test_post_that_reached_the_upstream_is_not_retried(
    proxy: Any, connect: Any, ledger: Ledger, script: str, path: str
) -> None:
    """ubimesh's rule (docs/envoy-compat.md): Envoy would execute these POSTs twice."""
    resp, tid, _ = _send(connect, proxy, path, script, method="POST", body=b"order=1")
    assert resp.status == 503, resp
    time.sleep(0.1)
    assert len(ledger.of(tid)) == 1


def _flags(line: str) -> tuple[str, frozenset[str]]:
    """ "CODE FLAGS" as (code, set of flags): Envoy 1.40 prints flags in the order they were
    set (URX,UT), ubimesh in Envoy's bit order (UT,URX), so the order is not compared."""
    code, _, flags = line.partition(" ")
    return code, frozenset(flags.split(","))


def test_response_flags(proxy: Any, connect: Any, flags_log: Path, subject: str) -> None:
    """URX when retries ran out, UO when the retries circuit breaker refused, UT (with URX
    after retries) for timeouts, no flag for a retried success; as Envoy sets them."""
    sent = {
        _send(connect, proxy, "/r5xx", "503")[1]: "503 URX",
        _send(connect, proxy, "/r5xx", "503,200")[1]: "200 -",
        _send(connect, proxy, "/reset", "reset")[1]: "503 UC,URX",
        _send(connect, proxy, "/pertry", "hang")[1]: "504 UT,URX",
        _send(connect, proxy, "/overall", "hang")[1]: "504 UT",
        _send(connect, proxy, "/tight", "503")[1]: "503 UO",
    }
    # ubimesh flushes access logs every second, Envoy every 10 s by default.
    deadline = time.monotonic() + (4.0 if subject == "ubimesh" else 15.0)
    found: dict[str, tuple[str, frozenset[str]]] = {}
    while time.monotonic() < deadline and len(found) < len(sent):
        time.sleep(0.2)
        if flags_log.exists():
            for line in flags_log.read_text().splitlines():
                tid, _, rest = line.partition(" ")
                if tid in sent:
                    found[tid] = _flags(rest)
    assert found == {tid: _flags(v) for tid, v in sent.items()}


def test_previous_priorities_move_the_third_try_to_the_next_level(
    proxy: Any, connect: Any, ledger: Ledger
) -> None:
    """update_frequency 2: two tries in priority 0 (two hosts, previous_hosts), then P1."""
    for _ in range(3):
        resp, tid, _ = _send(connect, proxy, "/tiers", "503,503,200")
        assert resp.status == 200, resp
        replicas = [a.replica for a in ledger.of(tid)]
        assert sorted(replicas[:2]) == ["h", "i"] and replicas[2:] == ["j"], replicas


def test_max_requests_overflow(proxy: Any, connect: Any, ledger: Ledger) -> None:
    """Each attempt holds the cluster's requests resource: with max_requests 1 and a request
    in flight, the next one gets a fast 503 (flag UO), never retried; once the first one ends
    the next one goes through."""
    before = proxy.stats()
    first = connect(proxy.port())
    tid = f"hold-{time.monotonic_ns()}"
    first.send(
        f"GET /single HTTP/1.1\r\nHost: r.test\r\nx-test-id: {tid}\r\n"
        "x-script: delay400\r\n\r\n".encode()
    )
    assert len(ledger.wait(tid, 1)) == 1
    resp, tid2, elapsed = _send(connect, proxy, "/single", "200")
    assert resp.status == 503, resp
    assert resp.body == (
        b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
    )
    assert ("x-envoy-overloaded", "true") in [(n.lower(), v) for n, v in resp.headers]
    assert elapsed < 0.3 and ledger.of(tid2) == []
    delta = _delta(before, proxy.stats(), "single")
    assert delta["upstream_rq_active_overflow"] == 1 and delta["upstream_rq_503"] == 1, delta
    assert first.read_response().status == 200  # the held request ends: its resource is free
    resp, _, _ = _send(connect, proxy, "/single", "200")
    assert resp.status == 200, resp
