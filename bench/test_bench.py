"""Unit tests for the benchmark's parsers and config generators: ``pytest bench``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run
from benchlib import configs, machine_speed, mtls_pair, rbac, resilience, telemetry
from benchlib.loads import parse_h2load, parse_wrk, percentile
from benchlib.report import markdown, summarise

WRK_OUTPUT = """\
Running 5s test @ http://127.0.0.1:1234/1k
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.10ms  300.00us   1.02s    83.50%
    Req/Sec    45.16k     4.59k   67.39k    76.67%
  Latency Distribution
     50%  599.00us
     75%  808.00us
     90%    1.91ms
     99%    1.02s
  164470 requests in 5.00s, 2.53GB read
  Socket errors: connect 1, read 2, write 3, timeout 4
  Non-2xx or 3xx responses: 7
Requests/sec:  32894.00
Transfer/sec:    863.43MB
"""

H2LOAD_OUTPUT = """\
finished in 7.00s, 1000.00 req/s, 1.13MB/s
requests: 5003 total, 5003 started, 5000 done, 4990 succeeded, 10 failed, 2 errored, 1 timeout
status codes: 4995 2xx, 0 3xx, 0 4xx, 5 5xx
"""

# Every key path the ubimesh bootstrap may use ("[]" marks a list element).
UBIMESH_ALLOWED = {
    "admin", "admin.address", "admin.address.socket_address",
    "admin.address.socket_address.address", "admin.address.socket_address.port_value",
    "static_resources", "static_resources.listeners", "static_resources.listeners[]",
    "static_resources.listeners[].address",
    "static_resources.listeners[].address.socket_address",
    "static_resources.listeners[].address.socket_address.address",
    "static_resources.listeners[].address.socket_address.port_value",
    "static_resources.listeners[].filter_chains",
    "static_resources.listeners[].filter_chains[]",
    "static_resources.listeners[].filter_chains[].filters",
    "static_resources.listeners[].filter_chains[].filters[]",
    "static_resources.listeners[].filter_chains[].filters[].name",
    "static_resources.listeners[].filter_chains[].filters[].typed_config",
    "static_resources.clusters", "static_resources.clusters[]",
    "static_resources.clusters[].name", "static_resources.clusters[].type",
    "static_resources.clusters[].connect_timeout", "static_resources.clusters[].load_assignment",
}  # fmt: skip
HCM_ALLOWED = {
    "@type", "stat_prefix", "generate_request_id", "route_config",
    "route_config.virtual_hosts", "route_config.virtual_hosts[]",
    "route_config.virtual_hosts[].name",
    "route_config.virtual_hosts[].domains", "route_config.virtual_hosts[].domains[]",
    "route_config.virtual_hosts[].routes", "route_config.virtual_hosts[].routes[]",
    "route_config.virtual_hosts[].routes[].match",
    "route_config.virtual_hosts[].routes[].match.prefix",
    "route_config.virtual_hosts[].routes[].route",
    "route_config.virtual_hosts[].routes[].route.cluster",
    "http_filters", "http_filters[]", "http_filters[].name", "http_filters[].typed_config",
    "http_filters[].typed_config.@type",
}  # fmt: skip


def key_paths(node: Any, prefix: str = "") -> set[str]:
    paths: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            paths.add(path)
            if key not in ("typed_config", "load_assignment") or "http_filters" in prefix:
                paths |= key_paths(value, path)
    elif isinstance(node, list):
        for item in node:
            paths.add(f"{prefix}[]")
            paths |= key_paths(item, f"{prefix}[]")
    return paths


def test_parse_wrk() -> None:
    parsed = parse_wrk(WRK_OUTPUT)
    assert parsed["completed"] == 164470
    assert parsed["rps"] == 32894.0
    assert parsed["p50_ms"] == 0.599
    assert parsed["p90_ms"] == 1.91
    assert parsed["p99_ms"] == 1020.0
    assert parsed["socket_errors"] == 10
    assert parsed["non2xx"] == 7


def test_parse_h2load(tmp_path: Path) -> None:
    log = tmp_path / "log.tsv"
    log.write_text("".join(f"1700000000000000\t200\t{us}\n" for us in range(1000, 0, -1)))
    parsed = parse_h2load(H2LOAD_OUTPUT, log, duration=5)
    assert parsed["completed"] == 5000
    assert parsed["rps"] == 1000.0
    assert parsed["non2xx"] == 5
    assert parsed["socket_errors"] == 3
    assert parsed["p50_ms"] == 0.5
    assert parsed["p99_ms"] == 0.99


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([1.0], 99) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0


def test_ubimesh_bootstrap_uses_only_the_subset() -> None:
    cfg = configs.ubimesh_bootstrap(10000, 10001, 10002)
    assert key_paths(cfg) <= UBIMESH_ALLOWED
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    assert hcm["name"] == "envoy.filters.network.http_connection_manager"
    assert key_paths(hcm["typed_config"]) <= HCM_ALLOWED
    assert hcm["typed_config"]["generate_request_id"] is False
    cluster = cfg["static_resources"]["clusters"][0]
    assert set(cluster) == {"name", "type", "connect_timeout", "load_assignment"}
    assert "127.0.0.1" in configs.dump_yaml(cfg)


def test_envoy_bare_adds_only_envoy_fields() -> None:
    common = configs.ubimesh_bootstrap(10000, 10001, 10002)
    envoy = configs.envoy_bare_bootstrap(10000, 10001, 10002)
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    router = hcm["typed_config"]["http_filters"][0]["typed_config"]
    assert router["dynamic_stats"] is False
    assert envoy["static_resources"]["clusters"][0]["circuit_breakers"]["thresholds"]
    # the common generator's output is not modified by the Envoy one
    assert common == configs.ubimesh_bootstrap(10000, 10001, 10002)


def test_nginx_bodies_have_exact_sizes(tmp_path: Path) -> None:
    conf = configs.nginx_upstream_conf(tmp_path, 10002, {"1k": 1024, "16k": 16384})
    assert configs.body_bytes(1024) in conf
    assert all(len(token) < 4000 for token in conf.split())
    assert conf.count("set $b") == 16384 // 2048


def test_summary_and_markdown() -> None:
    base = {"kind": "fixed", "conns": 16, "requested_rps": 1000.0, "non2xx": 0,
            "socket_errors": 0, "size": "1k", "load": "h2load 1000 rps", "rps": 1000.0}  # fmt: skip
    runs = [
        {**base, "target": "direct", "p50_ms": 0.5, "p99_ms": 1.0},
        {**base, "target": "envoy", "p50_ms": 0.7, "p99_ms": 1.5, "cpu_us_per_req": 100.0},
        {**base, "target": "nginx", "p50_ms": 0.6, "p99_ms": 1.2, "cpu_us_per_req": 40.0},
    ]
    rows = summarise(runs)
    envoy = next(r for r in rows if r["target"] == "envoy")
    assert abs(envoy["added_p99_ms"] - 0.5) < 1e-9
    text = markdown(rows, {"versions": {}}, ["direct", "envoy", "nginx"], ["1k"], "envoy")
    assert "| 1k | h2load 1000 rps | 1.00 | 2.50 |" in text


# --------------------------------------------------------------------------------------
# Scenario mtls-pair
# --------------------------------------------------------------------------------------


def _tls_of(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    res = cfg["static_resources"]
    if where == "listener":
        return res["listeners"][0]["filter_chains"][0]["transport_socket"]["typed_config"]
    return res["clusters"][0]["transport_socket"]["typed_config"]


def test_mtls_pair_bootstraps_are_the_same_for_both_products(tmp_path: Path) -> None:
    certs = mtls_pair.mint_certs(tmp_path)
    assert oct(certs.client_key.stat().st_mode & 0o777) == "0o600"
    for product in mtls_pair.PRODUCTS:
        out = mtls_pair.outbound_bootstrap(product, 10000, 10001, 10002, certs)
        inb = mtls_pair.inbound_bootstrap(product, 10002, 10003, 10004, certs)
        up, down = _tls_of(out, "cluster"), _tls_of(inb, "listener")
        assert up["@type"].endswith("UpstreamTlsContext")
        assert down["@type"].endswith("DownstreamTlsContext")
        assert down["require_client_certificate"] is True
        assert "require_client_certificate" not in up
        sans = {
            "up": up["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"],
            "down": down["common_tls_context"]["validation_context"][
                "match_typed_subject_alt_names"
            ],
        }
        assert sans["up"] == [{"san_type": "URI", "matcher": {"exact": mtls_pair.SERVER_ID}}]
        assert sans["down"] == [{"san_type": "URI", "matcher": {"exact": mtls_pair.CLIENT_ID}}]
        port = out["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]
        assert port["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] == (
            10002
        )
        hcm = inb["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        assert hcm["typed_config"]["forward_client_cert_details"] == "SANITIZE_SET"
    # Apart from Envoy's "bare" additions, both products get the same TLS documents.
    u = mtls_pair.inbound_bootstrap("ubimesh", 1, 2, 3, certs)
    e = mtls_pair.inbound_bootstrap("envoy", 1, 2, 3, certs)
    assert _tls_of(u, "listener") == _tls_of(e, "listener")


def test_mtls_pair_leaves_carry_the_ids(tmp_path: Path) -> None:
    from cryptography import x509

    certs = mtls_pair.mint_certs(tmp_path)
    for path, sid in ((certs.client_chain, mtls_pair.CLIENT_ID),
                      (certs.server_chain, mtls_pair.SERVER_ID)):  # fmt: skip
        leaf = x509.load_pem_x509_certificates(path.read_bytes())[0]
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [sid]


def test_mtls_pair_verdict_and_section() -> None:
    base = {"kind": "fixed", "conns": 16, "requested_rps": 1000.0, "non2xx": 0,
            "socket_errors": 0, "size": "1k", "load": "h2load 1000 rps", "rps": 1000.0}  # fmt: skip
    parts = {"outbound": {"max_rss_mb": 40.0, "idle_rss_mb": 30.0},
             "inbound": {"max_rss_mb": 41.0, "idle_rss_mb": 31.0}}  # fmt: skip
    runs = [
        {**base, "target": "direct", "p50_ms": 0.5, "p99_ms": 1.0},
        {**base, "target": "ubimesh-pair", "p50_ms": 0.9, "p99_ms": 1.8, "cpu_us_per_req": 90.0,
         "parts": parts, "tls_handshakes": 0},
        {**base, "target": "envoy-pair", "p50_ms": 0.8, "p99_ms": 2.0, "cpu_us_per_req": 60.0,
         "parts": parts, "tls_handshakes": 0},
    ]  # fmt: skip
    rows = summarise(runs)
    text = mtls_pair.pair_section(rows, runs)
    assert "PASS (+0.800 ms vs +1.000 ms)" in text
    assert "| 40.0 | 41.0 | 30.0 | 31.0 | 0 |" in text
    runs[1]["p99_ms"] = 2.5
    assert "FAIL (+1.500 ms vs +1.000 ms)" in mtls_pair.pair_section(summarise(runs), runs)
    assert mtls_pair.verdict(None, rows[2]) == "n/a (both pairs must run)"


def test_scenario_defaults() -> None:
    s1 = run.parse_args([])
    assert s1.scenario == "s1" and s1.proxies == ["ubimesh", "envoy", "nginx", "haproxy"]
    assert s1.sizes == {"1k": 1024, "16k": 16384} and s1.wrk_conns == [50]
    assert s1.rates == [1000.0, 5000.0]
    pair = run.parse_args(["--scenario", "mtls-pair", "--quick"])
    assert pair.proxies == ["ubimesh", "envoy"] and pair.wrk_conns == []
    assert pair.sizes == {"1k": 1024} and pair.rates == [1000.0] and pair.duration == 5
    assert [step[1] for step in run.plan(pair)] == ["fixed"]
    with pytest.raises(SystemExit):
        run.parse_args(["--scenario", "mtls-pair", "--proxies", "nginx"])


# --------------------------------------------------------------------------------------
# Scenario rbac


def test_rbac_scenario_defaults() -> None:
    args = run.parse_args(["--scenario", "rbac", "--quick"])
    assert args.proxies == ["ubimesh"] and args.rates == [] and args.wrk_conns == [50]
    with pytest.raises(SystemExit):
        run.parse_args(["--scenario", "rbac", "--proxies", "envoy"])


def test_rbac_bootstrap_has_100_policies_and_the_request_matches_the_last() -> None:
    from ubimesh.policy.rbac import RbacInput, evaluate, for_connection, no_headers
    from ubimesh.proxy.xds import load_bootstrap_dict

    cfg = rbac.rbac_bootstrap(10000, 10001, 10002, ["1k", "16k"])
    plain = configs.ubimesh_bootstrap(10000, 10001, 10002)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    assert [f["name"] for f in hcm["typed_config"]["http_filters"]] == [
        "envoy.filters.http.rbac",
        "envoy.filters.http.router",
    ]
    hcm["typed_config"]["http_filters"].pop(0)
    assert cfg == plain  # the RBAC filter is the only difference
    snapshot = load_bootstrap_dict(rbac.rbac_bootstrap(10000, 10001, 10002, ["1k"]))
    http = snapshot.listeners[0].filter_chains[0].filters[0]
    rules = http.http_filters[0].config.rules  # type: ignore[union-attr]
    assert len(rules.policies) == 100

    def request(path: str) -> RbacInput:
        def values(name: str) -> tuple[str, ...]:
            return {":method": ("GET",), ":path": (path,)}.get(name, ())

        return RbacInput("GET", path, values, "127.0.0.1", 10000, "127.0.0.1", "127.0.0.1", ())

    assert evaluate(rules, request("/1k")).policy == "p099"
    assert not evaluate(rules, request("/2k")).allowed
    cut = for_connection(rules, RbacInput("", "", no_headers, "127.0.0.1", 1, "127.0.0.1", "", ()))
    assert len(cut.policies) == 50  # the identity policies are settled per connection


def test_rbac_bar_section() -> None:
    runs = [
        {"target": t, "size": "1k", "load": "wrk c50", "kind": "closed", "rps": rps,
         "cpu_us_per_req": cpu, "rep": 1}
        for t, rps, cpu in (("ubimesh", 10000.0, 90.0), ("ubimesh-rbac", 9500.0, 95.0))
    ]  # fmt: skip
    text = rbac.bar_section([*runs])
    assert "| 1k | wrk c50 | 10,000 | 9,500 | 0.950 | 90.0 | 95.0 | PASS |" in text
    runs[1]["rps"] = 8000.0
    assert "FAIL" in rbac.bar_section(runs)


# --------------------------------------------------------------------------------------
# Scenario telemetry


def test_telemetry_scenario_defaults() -> None:
    args = run.parse_args(["--scenario", "telemetry", "--quick"])
    assert args.proxies == ["ubimesh"] and args.rates == [] and args.wrk_conns == [50]
    with pytest.raises(SystemExit):
        run.parse_args(["--scenario", "telemetry", "--proxies", "envoy"])


def test_telemetry_bootstraps_differ_from_s1_only_by_telemetry(tmp_path: Path) -> None:
    from ubimesh.proxy.xds import load_bootstrap_dict

    plain = telemetry.bootstrap("ubimesh", 10000, 10001, 10002, tmp_path)
    s1 = configs.ubimesh_bootstrap(10000, 10001, 10002)
    s1_hcm = s1["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    s1_hcm["typed_config"]["generate_request_id"] = True
    assert plain == s1  # all off: S1 with the HCM's default request ids
    for target, (sampling, _) in telemetry.BARS.items():
        cfg = telemetry.bootstrap(target, 10000, 10001, 10002, tmp_path)
        listener = cfg["static_resources"]["listeners"][0]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        assert hcm["tracing"]["random_sampling"] == {"value": sampling}
        assert hcm["access_log"][0]["typed_config"]["path"] == str(
            tmp_path / f"{target}.access.log"
        )
        # The proxy takes it (this fails while a piece of telemetry is refused as unsupported).
        load_bootstrap_dict(cfg)
        del listener["metadata"], hcm["tracing"], hcm["access_log"]
        cfg["static_resources"]["clusters"].pop()
        assert cfg == plain


def _sequential_runs() -> list[dict[str, Any]]:
    # Two repetitions, the machine twice as fast in the second. 100 %: the ratio of medians
    # is 11,450 / 15,000; the paired ratio the median of 0.75 and 0.77. 1 %: measured in
    # repetition 1 only, so its median (8,500) meets an all-off median of both moments
    # (0.567), while its paired ratio uses repetition 1 alone (0.850).
    measured = {
        1: (("ubimesh", 10000.0), ("ubimesh-telemetry", 7500.0),
            ("ubimesh-telemetry-1pct", 8500.0)),
        2: (("ubimesh", 20000.0), ("ubimesh-telemetry", 15400.0)),
    }  # fmt: skip
    return [
        {"target": t, "size": "1k", "load": "wrk c50", "kind": "closed", "rps": rps,
         "cpu_us_per_req": 100.0, "rep": rep, "conns": 50, "requested_rps": None}
        for rep, got in measured.items() for t, rps in got
    ]  # fmt: skip


def _pairs(rounds: dict[str, list[tuple[float, float]]]) -> list[dict[str, Any]]:
    """Co-run records as run.py's ``corun`` makes them: per target, (all off, with) rps."""
    return [
        {"target": t, "round": i + 1, "plain": {"rps": off, "cpu_share": 0.5},
         "with": {"rps": on, "cpu_share": 0.5}}
        for t, got in rounds.items() for i, (off, on) in enumerate(got)
    ]  # fmt: skip


def test_telemetry_bar_section_judges_the_corun_and_shows_the_sequential() -> None:
    from benchlib.report import summarise

    runs = _sequential_runs()
    pairs = _pairs({
        "ubimesh-control": [(9000.0, 9090.0), (8000.0, 7960.0), (10000.0, 10000.0)],
        # 100 %: ratios 0.80, 0.76, 0.78 -> median 0.78, meets 0.75.
        "ubimesh-telemetry": [(9000.0, 7200.0), (8000.0, 6080.0), (10000.0, 7800.0)],
        # 1 %: ratios 0.87, 0.875, 0.90 -> median 0.875, below 0.88.
        "ubimesh-telemetry-1pct": [(9000.0, 7830.0), (8000.0, 7000.0), (10000.0, 9000.0)],
    })  # fmt: skip
    text = telemetry.bar_section(summarise(runs), runs, pairs)
    assert "| ubimesh-control (A/A control) | - | 3 | 9,000 | 9,090 | 50% / 50% | 1.000 |" in text
    assert (
        "| ubimesh-telemetry | 100 % | 3 | 9,000 | 7,200 | 50% / 50% | 0.780 | 0.760..0.800 | "
        "PASS (≥ 0.75) |" in text
    )
    assert "| ubimesh-telemetry-1pct | 1 % | 3 | 9,000 | 7,830 | 50% / 50% | 0.875 |" in text
    assert "0.870..0.900 | FAIL (≥ 0.88) |" in text
    # The sequential ratios are shown, marked against the bar, and judge nothing.
    assert "| ubimesh-telemetry | 100 % | 15,000 | 11,450 | 0.763 | 0.760 |" in text
    assert "| ubimesh-telemetry-1pct | 1 % | 15,000 | 8,500 | 0.567 | 0.850 |" in text
    assert text.count("| meets 0.75 |") == 1 and text.count("| below 0.88 |") == 1
    assert text.count("PASS") == 1 and text.count("FAIL") == 1


def test_telemetry_bar_section_withholds_the_verdict_without_a_fair_corun() -> None:
    from benchlib.report import summarise

    runs = _sequential_runs()
    good = {"ubimesh-telemetry": [(9000.0, 8100.0)], "ubimesh-telemetry-1pct": [(9000.0, 8100.0)]}
    # A control 4 % off 1: pairing favoured one side, so no ratio of this co-run counts.
    skewed = _pairs({**good, "ubimesh-control": [(9000.0, 9360.0)]})
    text = telemetry.bar_section(summarise(runs), runs, skewed)
    assert text.count("n/a (A/A control 1.040, more than 3% from 1)") == 2
    assert "PASS" not in text and "FAIL" not in text
    text = telemetry.bar_section(summarise(runs), runs, _pairs(good))
    assert text.count("n/a (no A/A control round)") == 2
    text = telemetry.bar_section(summarise(runs), runs, [])
    assert text.count("n/a (no co-run rounds: --corun-rounds 0)") == 2
    # Within the tolerance the verdict stands: 1.029 is still fair.
    fair = _pairs({**good, "ubimesh-control": [(9000.0, 9261.0)]})
    assert telemetry.bar_section(summarise(runs), runs, fair).count("PASS") == 2


def test_telemetry_control_is_all_off(tmp_path: Path) -> None:
    args = run.parse_args(["--scenario", "telemetry", "--quick"])
    assert telemetry.CONTROL in run.UBIMESH_TARGETS
    assert run.target_bootstrap(
        "telemetry", telemetry.CONTROL, 10000, 10001, 10002, list(args.sizes), tmp_path
    ) == telemetry.bootstrap(telemetry.PLAIN, 10000, 10001, 10002, tmp_path)


# --------------------------------------------------------------------------------------
# Machine speed


def test_machine_speed_probe_and_line() -> None:
    times = machine_speed.probe(0, tries=2, gap=0.0, steps=20_000)
    assert len(times) == 2 and all(0.0 < t < 5_000.0 for t in times)
    text = machine_speed.line(1, [60.0, 120.0, 90.0])
    assert text == (
        "a fixed loop (2,000,000 additions) on cpu 1, 3 tries: median 90.0 ms, "
        "60.0..120.0 (slowest/fastest 2.00)"
    )
    assert machine_speed.line(1, []) == ""
    with pytest.raises(ValueError, match="tries must be at least 1, got 0"):
        machine_speed.probe(0, tries=0)
    args = run.parse_args(["--quick"])
    assert args.speed_tries == 5
    with pytest.raises(SystemExit):
        run.parse_args(["--speed-tries", "-1"])


# --------------------------------------------------------------------------------------
# Scenario resilience


def test_resilience_scenario_defaults_and_bootstrap() -> None:
    from ubimesh.proxy.xds import load_bootstrap_dict

    args = run.parse_args(["--scenario", "resilience", "--quick"])
    assert args.proxies == ["ubimesh"] and args.rates == [] and args.wrk_conns == [50]
    snapshot = load_bootstrap_dict(resilience.resilience_bootstrap(10000, 10001, 10002))
    (cluster,) = snapshot.clusters.values()
    assert cluster.outlier_detection is not None
    assert cluster.circuit_breakers.default.max_requests == 10000
    http = snapshot.listeners[0].filter_chains[0].filters[0]
    route = http.route_config.virtual_hosts[0].routes[0]  # type: ignore[union-attr]
    assert route.action.retry_policy is not None and route.action.retry_policy.num_retries == 2
    plain = load_bootstrap_dict(resilience.bootstrap("ubimesh", 10000, 10001, 10002))
    assert next(iter(plain.clusters.values())).outlier_detection is None


def test_resilience_bar_section() -> None:
    rows = [
        {"target": t, "size": "1k", "load": "wrk c50", "kind": "closed", "rps": rps,
         "cpu_us_per_req": cpu, "rep": 1}
        for t, rps, cpu in (("ubimesh", 10000.0, 90.0), ("ubimesh-resilience", 9400.0, 95.0))
    ]  # fmt: skip
    text = resilience.bar_section(rows)
    assert "| 1k | wrk c50 | 10,000 | 9,400 | 0.940 | 90.0 | 95.0 | FAIL |" in text
