"""``ubimesh top``'s arithmetic (ubimesh.telemetry.scrape): the exposition parser, increases
across resets, Prometheus's histogram_quantile, and the per-service rows."""

from __future__ import annotations

import math
import re

import pytest

from ubimesh.telemetry.scrape import (
    MeshMetrics,
    ParseError,
    ProxyInterval,
    Sample,
    aggregate,
    buckets_increase,
    counter_increase,
    format_ms,
    histogram_quantile,
    parse_line,
    parse_text,
    read_mesh_metrics,
    render_table,
    sort_rows,
)

INF = math.inf
BOUNDS = (1, 5, 10, 25, 50, 100, 250, 500, 1000)


def page(
    service: str = "web.default.svc.cluster.local",
    ok: int = 0,
    failed: int = 0,
    buckets: dict[float, int] | None = None,
    reporter: str = "destination",
    extra: str = "",
) -> str:
    """A proxy's page as Istio's metrics look: requests by code, the duration histogram."""
    common = (
        f'reporter="{reporter}",source_workload="edge",destination_workload="web-1",'
        f'destination_service="{service}",request_protocol="http",response_flags="-",'
        'connection_security_policy="mutual_tls"'
    )
    lines = [
        "# HELP istio_requests_total Total requests.",
        "# TYPE istio_requests_total counter",
        f'istio_requests_total{{response_code="200",{common}}} {ok}',
    ]
    if failed:
        lines.append(f'istio_requests_total{{{common},response_code="503"}} {failed}')
    lines.append("# TYPE istio_request_duration_milliseconds histogram")
    cumulative = 0
    counts = buckets or {}
    for b in BOUNDS:
        cumulative += counts.get(b, 0)
        lines.append(
            f'istio_request_duration_milliseconds_bucket{{{common},le="{b}"}} {cumulative}'
        )
    cumulative += counts.get(INF, 0)
    lines.append(f'istio_request_duration_milliseconds_bucket{{{common},le="+Inf"}} {cumulative}')
    lines.append(f"istio_request_duration_milliseconds_sum{{{common}}} 1234.5")
    lines.append(f"istio_request_duration_milliseconds_count{{{common}}} {cumulative}")
    lines.append('envoy_cluster_upstream_rq_total{envoy_cluster_name="x"} 99')
    return "\n".join(lines) + "\n" + extra


# -- parsing --------------------------------------------------------------------------------


def test_a_line_with_escaped_labels_in_any_order_and_a_timestamp() -> None:
    line = r'm{b="x\"y",a="1\\2\n", } 3.5 1700000000000'
    assert parse_line(line) == Sample("m", (("a", "1\\2\n"), ("b", 'x"y')), 3.5)


@pytest.mark.parametrize(
    ("text", "value"), [("NaN", None), ("+Inf", INF), ("-Inf", -INF), ("1e3", 1000.0)]
)
def test_special_values(text: str, value: float | None) -> None:
    sample = parse_line(f"m {text}")
    assert sample is not None
    if value is None:
        assert math.isnan(sample.value)
    else:
        assert sample.value == value


def test_comments_and_blank_lines_are_skipped_and_prefixes_filter() -> None:
    text = '# TYPE a counter\n\n  \na 1\nb{x="1"} 2\n'
    assert [s.name for s in parse_text(text)] == ["a", "b"]
    assert [s.name for s in parse_text(text, prefixes=("b",))] == ["b"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("m{a=1} 1", "line 7: malformed labels"),
        ('m{a="1"', "line 7: expected ',' or '}'"),
        ('m{a="1" b="2"} 1', "expected ',' or '}'"),
        ("m one", "'one' is not a number"),
        ('m{a="1",a="2"} 1', "a label appears twice"),
        (r'm{a="\t"} 1', r"unknown escape \t"),
        ('{a="1"} 1', "no metric name"),
        ("m 1 2 3", "expected a value and an optional timestamp"),
    ],
)
def test_a_malformed_line_names_its_number(line: str, message: str) -> None:
    with pytest.raises(ParseError, match=re.escape(message)):
        parse_line(line, 7)


def test_only_destination_series_of_the_two_metrics_are_kept() -> None:
    text = page(ok=3, buckets={5: 3}) + page(ok=9, reporter="source").split("\n", 3)[3]
    metrics = read_mesh_metrics(text)
    assert list(metrics.requests.values()) == [3.0]
    ((labels, buckets),) = metrics.durations.items()
    assert ("le", "5") not in labels and ("reporter", "destination") in labels
    assert buckets[5.0] == 3 and buckets[INF] == 3 and len(buckets) == len(BOUNDS) + 1


def test_a_bucket_bound_that_is_no_number_is_refused() -> None:
    text = 'istio_request_duration_milliseconds_bucket{reporter="destination",le="x"} 1\n'
    with pytest.raises(ParseError, match="le='x'"):
        read_mesh_metrics(text)


# -- increases ------------------------------------------------------------------------------


def test_counter_increase_handles_new_series_and_resets() -> None:
    assert counter_increase(None, 7) == 7
    assert counter_increase(10, 25) == 15
    assert counter_increase(100, 4) == 4  # the proxy restarted: all 4 are new


def test_buckets_increase_resets_the_whole_series() -> None:
    before = {10.0: 5.0, INF: 8.0}
    assert buckets_increase(before, {10.0: 7.0, INF: 12.0}) == {10.0: 2.0, INF: 4.0}
    assert buckets_increase(before, {10.0: 1.0, INF: 2.0}) == {10.0: 1.0, INF: 2.0}
    assert buckets_increase(before, {10.0: 6.0, 20.0: 7.0, INF: 9.0}) == {
        10.0: 6.0,
        20.0: 7.0,
        INF: 9.0,
    }
    assert buckets_increase(None, {INF: 3.0}) == {INF: 3.0}


# -- histogram_quantile ---------------------------------------------------------------------


def test_quantile_interpolates_linearly_within_the_bucket() -> None:
    # 10 observations in (0, 10], 30 in (10, 20], 60 in (20, 40]
    buckets = {10.0: 10.0, 20.0: 40.0, 40.0: 100.0, INF: 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(20 + 20 * (10 / 60))
    assert histogram_quantile(0.05, buckets) == pytest.approx(5.0)
    assert histogram_quantile(0.25, buckets) == pytest.approx(15.0)
    assert histogram_quantile(1.0, buckets) == pytest.approx(40.0)


def test_quantile_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    assert histogram_quantile(0.99, {10.0: 1.0, 20.0: 2.0, INF: 10.0}) == 20.0


def test_quantile_is_none_without_inf_bucket_or_observations() -> None:
    assert histogram_quantile(0.5, {10.0: 5.0, 20.0: 6.0}) is None
    assert histogram_quantile(0.5, {10.0: 0.0, INF: 0.0}) is None
    assert histogram_quantile(0.5, {INF: 4.0}) is None
    assert histogram_quantile(0.5, {}) is None


def test_quantile_outside_0_1_and_nonpositive_first_bucket() -> None:
    assert histogram_quantile(-1, {1.0: 1.0, INF: 1.0}) == -INF
    assert histogram_quantile(2, {1.0: 1.0, INF: 1.0}) == INF
    assert histogram_quantile(0.5, {-1.0: 5.0, 0.0: 8.0, INF: 10.0}) == -1.0


def test_quantile_with_a_missing_bucket_is_made_monotonic() -> None:
    # Two proxies merged, one without le=20: the summed count at 20 is below the one at 10.
    merged = {10.0: 6.0, 20.0: 4.0, 40.0: 10.0, INF: 10.0}
    # Monotonic: 10 -> 6, 20 -> 6, 40 -> 10; the median (rank 5) lies in (0, 10].
    assert histogram_quantile(0.5, merged) == pytest.approx(10 * 5 / 6)
    assert histogram_quantile(0.9, merged) == pytest.approx(20 + 20 * (3 / 4))


# -- rows -----------------------------------------------------------------------------------


def _iv(before: str, after: str, seconds: float) -> ProxyInterval:
    return ProxyInterval(read_mesh_metrics(before), read_mesh_metrics(after), seconds)


def test_rows_from_two_scrapes_rate_success_and_quantiles() -> None:
    before = page(ok=100, failed=10, buckets={5: 100, 10: 10})
    # + 40 OK and 10 x 503 over 2 s: the new requests took 25 < d <= 50 ms.
    after = page(ok=140, failed=20, buckets={5: 100, 10: 10, 50: 50})
    (row,) = aggregate([_iv(before, after, 2.0)])
    assert row.service == "web.default.svc.cluster.local"
    assert row.requests == 50 and row.errors == 10
    assert row.rps == pytest.approx(25.0)
    assert row.success_rate == pytest.approx(0.8)
    assert row.p50_ms == pytest.approx(25 + 25 * 0.5)
    assert row.p99_ms == pytest.approx(25 + 25 * 0.99)
    assert row.proxies == 1


def test_a_restarted_proxy_counts_what_it_served_since() -> None:
    before = page(ok=1000, failed=100, buckets={5: 1100})
    after = page(ok=8, failed=2, buckets={10: 10})  # counters went down: a reset
    (row,) = aggregate([_iv(before, after, 1.0)])
    assert row.requests == 10 and row.errors == 2
    assert row.success_rate == pytest.approx(0.8)
    assert row.p50_ms == pytest.approx(5 + 5 * 0.5)


def test_a_series_new_since_the_last_scrape_counts_whole() -> None:
    before = page(ok=10, buckets={5: 10})
    after = page(ok=10, failed=4, buckets={5: 10, 10: 4})  # the first 503s
    (row,) = aggregate([_iv(before, after, 2.0)])
    assert row.requests == 4 and row.errors == 4 and row.success_rate == 0.0
    assert row.rps == pytest.approx(2.0)


def test_proxies_of_one_service_add_up_each_over_its_own_interval() -> None:
    a = _iv(page(ok=0), page(ok=10, buckets={5: 10}), 1.0)
    b = _iv(page(ok=0), page(ok=10, failed=10, buckets={50: 20}), 2.0)
    other = _iv(page(service="api", ok=5), page(service="api", ok=5), 1.0)
    rows = aggregate([a, b, other])
    assert [r.service for r in rows] == ["api", "web.default.svc.cluster.local"]
    api, web = rows
    assert api.requests == 0 and api.rps == 0 and api.success_rate is None
    assert api.p50_ms is None and api.proxies == 1
    assert web.rps == pytest.approx(10 + 10) and web.proxies == 2
    assert web.success_rate == pytest.approx(20 / 30)
    # merged histogram: 10 in (1, 5], 20 in (25, 50]; rank 15 is 5 into the 20
    assert web.p50_ms == pytest.approx(25 + 25 * 5 / 20)


def test_a_nonpositive_interval_is_a_bug() -> None:
    with pytest.raises(ValueError, match="positive"):
        aggregate([ProxyInterval(MeshMetrics(), MeshMetrics(), 0.0)])


def test_series_without_destination_service_are_unknown() -> None:
    text = 'istio_requests_total{reporter="destination",response_code="500"} 3\n'
    (row,) = aggregate([ProxyInterval(MeshMetrics(), read_mesh_metrics(text), 1.0)])
    assert row.service == "unknown" and row.errors == 3


def test_sorting() -> None:
    rows = aggregate(
        [
            _iv(page(service="busy"), page(service="busy", ok=100, buckets={5: 100}), 1.0),
            _iv(page(service="slow"), page(service="slow", ok=2, buckets={1000: 2}), 1.0),
            _iv(page(service="bad"), page(service="bad", ok=1, failed=3, buckets={5: 4}), 1.0),
            _iv(page(service="idle"), page(service="idle"), 1.0),
        ]
    )
    assert [r.service for r in sort_rows(rows, "rps")] == ["busy", "bad", "slow", "idle"]
    assert [r.service for r in sort_rows(rows, "p99")] == ["slow", "bad", "busy", "idle"]
    assert [r.service for r in sort_rows(rows, "errors")] == ["bad", "busy", "slow", "idle"]
    assert [r.service for r in sort_rows(rows, "name")] == ["bad", "busy", "idle", "slow"]
    with pytest.raises(ValueError, match="not one of"):
        sort_rows(rows, "fast")


def test_table_text() -> None:
    (row,) = aggregate([_iv(page(ok=0), page(ok=8, failed=2, buckets={10: 10}), 2.0)])
    text = render_table([row])
    header, line = text.splitlines()
    assert header.split() == ["SERVICE", "RPS", "SUCCESS", "P50", "P99", "PROXIES"]
    assert line.split() == [
        "web.default.svc.cluster.local",
        "5.00",
        "80.0%",
        "7.50ms",
        "9.95ms",
        "1",
    ]
    assert [format_ms(v) for v in (None, 0.4, 12.34, 250.4, 1250.0, INF)] == [
        "-",
        "0.40ms",
        "12.3ms",
        "250ms",
        "1.25s",
        "+Inf",
    ]
