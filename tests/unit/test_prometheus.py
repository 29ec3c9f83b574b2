"""Prometheus exposition and /stats rendering of a StatsSnapshot.

The exposition is checked with a strict parser of the text format 0.0.4 written here (stricter
than Prometheus itself: it also rejects blank lines, families split in two, duplicate series and
inconsistent histograms), and the names and labels against what Envoy 1.40 prints for the same
stat names (the expected values below were taken from a running Envoy).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import pytest

from ubimesh.telemetry.prometheus import escape_label_value, extract_tags, render, sanitize_name
from ubimesh.telemetry.render import (
    HistogramBuckets,
    HistogramView,
    StatsQuery,
    StatType,
    render_json,
    render_text,
)
from ubimesh.telemetry.stats import DEFAULT_BUCKETS_MS, StatsSnapshot, Store, merge_snapshots

# ---------------------------------------------------------------------------------------------
# A strict parser of the text exposition format


@dataclass
class Family:
    name: str
    type: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_FLOAT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?Inf|NaN")
_SUFFIXES = {
    "counter": ("",),
    "gauge": ("",),
    "untyped": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


class ExpositionError(AssertionError):
    pass


def _parse_labels(text: str, pos: int, lineno: int) -> tuple[dict[str, str], int]:
    labels: dict[str, str] = {}
    assert text[pos] == "{"
    pos += 1
    while True:
        if text[pos] == "}":
            return labels, pos + 1
        m = _LABEL_NAME.match(text, pos)
        if m is None:
            raise ExpositionError(f"line {lineno}: bad label name at {text[pos:]!r}")
        name = m.group(0)
        pos = m.end()
        if text[pos : pos + 2] != '="':
            raise ExpositionError(f'line {lineno}: expected =" after label {name}')
        pos += 2
        value = []
        while True:
            ch = text[pos]
            if ch == "\\":
                nxt = text[pos + 1]
                if nxt not in '\\"n':
                    raise ExpositionError(f"line {lineno}: bad escape \\{nxt}")
                value.append("\n" if nxt == "n" else nxt)
                pos += 2
            elif ch == '"':
                pos += 1
                break
            elif ch == "\n":
                raise ExpositionError(f"line {lineno}: raw newline in label value")
            else:
                value.append(ch)
                pos += 1
        if name in labels:
            raise ExpositionError(f"line {lineno}: label {name} repeated")
        labels[name] = "".join(value)
        if text[pos] == ",":
            pos += 1
        elif text[pos] != "}":
            raise ExpositionError(f"line {lineno}: expected , or }} in labels")


def parse_exposition(text: str) -> dict[str, Family]:
    if text and not text.endswith("\n"):
        raise ExpositionError("the exposition must end with a newline")
    families: dict[str, Family] = {}
    closed: set[str] = set()
    current: Family | None = None
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line:
            raise ExpositionError(f"line {lineno}: blank line")
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 2 and parts[1] == "TYPE":
                if len(parts) != 4 or parts[3] not in _SUFFIXES:
                    raise ExpositionError(f"line {lineno}: bad TYPE line {line!r}")
                name = parts[2]
                if not _METRIC_NAME.fullmatch(name):
                    raise ExpositionError(f"line {lineno}: bad metric name {name!r}")
                if name in families:
                    raise ExpositionError(f"line {lineno}: second TYPE for {name}")
                if current is not None:
                    closed.add(current.name)
                current = families[name] = Family(name, parts[3])
            continue
        m = _METRIC_NAME.match(line)
        if m is None:
            raise ExpositionError(f"line {lineno}: no metric name in {line!r}")
        sample_name = m.group(0)
        pos = m.end()
        labels: dict[str, str] = {}
        if pos < len(line) and line[pos] == "{":
            labels, pos = _parse_labels(line + "\n", pos, lineno)
        rest = line[pos:]
        if not rest.startswith(" "):
            raise ExpositionError(f"line {lineno}: expected a space before the value")
        fields = rest[1:].split(" ")
        if len(fields) not in (1, 2) or not _FLOAT.fullmatch(fields[0]):
            raise ExpositionError(f"line {lineno}: bad value {rest!r}")
        value = float(fields[0].replace("Inf", "inf"))
        if current is None or not any(
            sample_name == current.name + s for s in _SUFFIXES[current.type]
        ):
            owner = next(
                (
                    f
                    for f in families.values()
                    if any(sample_name == f.name + s for s in _SUFFIXES[f.type])
                ),
                None,
            )
            if owner is not None and owner.name in closed:
                raise ExpositionError(f"line {lineno}: family {owner.name} split in two")
            raise ExpositionError(f"line {lineno}: sample {sample_name} outside its TYPE block")
        key = (sample_name, tuple(sorted(labels.items())))
        if key in seen:
            raise ExpositionError(f"line {lineno}: duplicate series {key}")
        seen.add(key)
        current.samples.append((sample_name, labels, value))
    for fam in families.values():
        if fam.type == "histogram":
            _check_histogram(fam)
    return families


def _check_histogram(fam: Family) -> None:
    series: dict[tuple[tuple[str, str], ...], dict[str, object]] = {}
    for name, labels, value in fam.samples:
        base = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        entry = series.setdefault(base, {"buckets": []})
        if name.endswith("_bucket"):
            if "le" not in labels:
                raise ExpositionError(f"{fam.name}: bucket without le")
            buckets = entry["buckets"]
            assert isinstance(buckets, list)
            buckets.append((float(labels["le"].replace("Inf", "inf")), value))
        elif name.endswith("_sum"):
            entry["sum"] = value
        else:
            entry["count"] = value
    for base, entry in series.items():
        buckets = entry["buckets"]
        assert isinstance(buckets, list)
        les = [le for le, _ in buckets]
        counts = [c for _, c in buckets]
        if not les or les[-1] != math.inf:
            raise ExpositionError(f"{fam.name}{base}: no +Inf bucket")
        if les != sorted(les) or len(set(les)) != len(les):
            raise ExpositionError(f"{fam.name}{base}: le not increasing")
        if counts != sorted(counts):
            raise ExpositionError(f"{fam.name}{base}: buckets not cumulative")
        if "sum" not in entry or "count" not in entry:
            raise ExpositionError(f"{fam.name}{base}: _sum or _count missing")
        if entry["count"] != counts[-1]:
            raise ExpositionError(f"{fam.name}{base}: _count differs from the +Inf bucket")


def test_parser_rejects_what_it_should() -> None:
    bad = [
        "a 1",  # no final newline
        "# TYPE a counter\na 1\n\n",  # blank line
        '# TYPE a counter\na{x="1} 1\n',  # unterminated label
        "# TYPE a counter\na 1\n# TYPE b counter\nb 1\na 2\n",  # split family
        "# TYPE a counter\na 1\na 1\n",  # duplicate series
        '# TYPE a histogram\na_bucket{le="1"} 2\na_bucket{le="+Inf"} 1\na_sum 1\na_count 1\n',
        '# TYPE a counter\na{x="\\t"} 1\n',  # bad escape
        "b 1\n",  # no TYPE
    ]
    for text in bad:
        with pytest.raises(ExpositionError):
            parse_exposition(text)
    ok = '# TYPE a histogram\na_bucket{le="1"} 1\na_bucket{le="+Inf"} 2\na_sum 3\na_count 2\n'
    assert parse_exposition(ok)["a"].type == "histogram"


# ---------------------------------------------------------------------------------------------
# Tag extraction: expected values as printed by Envoy 1.40 for these stat names

ENVOY_TAGS = [
    (
        "cluster.backend.upstream_rq_total",
        "cluster.upstream_rq_total",
        [("envoy.cluster_name", "backend")],
    ),
    (
        "cluster.backend.upstream_rq_503",
        "cluster.upstream_rq",
        [("envoy.response_code", "503"), ("envoy.cluster_name", "backend")],
    ),
    (
        "cluster.backend.upstream_rq_5xx",
        "cluster.upstream_rq_xx",
        [("envoy.response_code_class", "5"), ("envoy.cluster_name", "backend")],
    ),
    (
        "cluster.backend.external.upstream_rq_503",
        "cluster.external.upstream_rq",
        [("envoy.response_code", "503"), ("envoy.cluster_name", "backend")],
    ),
    (
        "http.ingress_http.downstream_rq_total",
        "http.downstream_rq_total",
        [("envoy.http_conn_manager_prefix", "ingress_http")],
    ),
    (
        "http.ingress_http.downstream_rq_2xx",
        "http.downstream_rq_xx",
        [("envoy.response_code_class", "2"), ("envoy.http_conn_manager_prefix", "ingress_http")],
    ),
    (
        "listener.127.0.0.1_19080.downstream_cx_total",
        "listener.downstream_cx_total",
        [("envoy.listener_address", "127.0.0.1_19080")],
    ),
    (
        "listener.127.0.0.1_19080.http.ingress_http.downstream_rq_5xx",
        "listener.http.downstream_rq_xx",
        [
            ("envoy.response_code_class", "5"),
            ("envoy.http_conn_manager_prefix", "ingress_http"),
            ("envoy.listener_address", "127.0.0.1_19080"),
        ],
    ),
    (
        "listener.127.0.0.1_19080.worker_0.downstream_cx_active",
        "listener.worker_downstream_cx_active",
        [("envoy.worker_id", "0"), ("envoy.listener_address", "127.0.0.1_19080")],
    ),
    ("listener.admin.downstream_cx_total", "listener.admin.downstream_cx_total", []),
    (
        "listener.admin.http.admin.downstream_rq_2xx",
        "listener.admin.http.downstream_rq_xx",
        [("envoy.response_code_class", "2"), ("envoy.http_conn_manager_prefix", "admin")],
    ),
    (
        "listener.[__1]_8080.downstream_cx_total",
        "listener.downstream_cx_total",
        [("envoy.listener_address", "[__1]_8080")],
    ),
    ("tcp.tcp_st.downstream_cx_total", "tcp.downstream_cx_total", [("envoy.tcp_prefix", "tcp_st")]),
    ("server.worker_0.watchdog_miss", "server.worker_watchdog_miss", [("envoy.worker_id", "0")]),
    (
        "thread_local_cluster_manager.worker_0.clusters_inflated",
        "thread_local_cluster_manager.worker_clusters_inflated",
        [("envoy.worker_id", "0")],
    ),
    ("cluster_manager.active_clusters", "cluster_manager.active_clusters", []),
    ("server.live", "server.live", []),
    (
        "vhost.vh1.vcluster.vc1.upstream_rq_200",
        "vhost.vcluster.upstream_rq",
        [
            ("envoy.response_code", "200"),
            ("envoy.virtual_cluster", "vc1"),
            ("envoy.virtual_host", "vh1"),
        ],
    ),
]


@pytest.mark.parametrize(("stat", "extracted", "tags"), ENVOY_TAGS)
def test_extract_tags_like_envoy(stat: str, extracted: str, tags: list[tuple[str, str]]) -> None:
    assert extract_tags(stat) == (extracted, tuple(tags))


def test_token_extractor_edges() -> None:
    # "**" at the end needs at least one token: a bare "cluster.<name>" is not tagged.
    assert extract_tags("cluster.backend") == ("cluster.backend", ())
    # "$" first ("<prefix>.rbac.**") removes the leading token and its dot.
    assert extract_tags("myprefix.rbac.allowed") == (
        "rbac.allowed",
        (("envoy.rbac_prefix", "myprefix"),),
    )
    # "**" in the middle matches any number of tokens.
    assert extract_tags("mongo.p.collection.c.a.b.query.total")[1] == (
        ("envoy.mongo_collection", "c"),
        ("envoy.mongo_prefix", "p"),
    )


def test_sanitize_and_escape() -> None:
    assert sanitize_name("envoy.cluster-name:x/y") == "envoy_cluster_name_x_y"
    assert escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


# ---------------------------------------------------------------------------------------------
# Rendering


def _sample_store() -> Store:
    s = Store()
    s.counter("cluster.backend.upstream_rq_total").inc(7)
    s.counter("cluster.backend.upstream_rq_200").inc(5)
    s.counter("cluster.backend.upstream_rq_503").inc(2)
    s.counter("cluster.backend.upstream_rq_2xx").inc(5)
    s.counter("cluster.backend.upstream_rq_5xx").inc(2)
    s.counter("cluster.other.upstream_rq_total").inc(1)
    s.counter("http.ingress.downstream_rq_total").inc(9)
    s.counter("http.ingress.downstream_rq_2xx").inc(9)
    s.counter("http.ingress.downstream_rq_4xx")
    s.counter("listener.127.0.0.1_10000.downstream_cx_total").inc(3)
    s.counter("tcp.db.downstream_cx_total").inc(4)
    s.gauge("server.live").set(1)
    s.gauge("cluster.backend.upstream_rq_active").set(2)
    s.gauge("http.ingress.downstream_cx_active").set(1)
    h = s.histogram("http.ingress.downstream_rq_time")
    for v in (0.3, 0.7, 3.0, 40.0, 70_000_000.0):
        h.record(v)
    s.histogram("cluster.backend.upstream_rq_time")
    return s


def test_render_parses_and_has_envoy_names_and_labels() -> None:
    text = render(_sample_store().snapshot())
    fams = parse_exposition(text)
    assert fams["envoy_cluster_upstream_rq_total"].type == "counter"
    assert fams["envoy_cluster_upstream_rq_total"].samples == [
        ("envoy_cluster_upstream_rq_total", {"envoy_cluster_name": "backend"}, 7.0),
        ("envoy_cluster_upstream_rq_total", {"envoy_cluster_name": "other"}, 1.0),
    ]
    assert {
        (labels["envoy_response_code"], v)
        for _, labels, v in fams["envoy_cluster_upstream_rq"].samples
    } == {("200", 5.0), ("503", 2.0)}
    xx = fams["envoy_http_downstream_rq_xx"].samples
    assert [
        (lab["envoy_response_code_class"], lab["envoy_http_conn_manager_prefix"], v)
        for _, lab, v in xx
    ] == [
        ("2", "ingress", 9.0),
        ("4", "ingress", 0.0),
    ]
    assert fams["envoy_listener_downstream_cx_total"].samples == [
        ("envoy_listener_downstream_cx_total", {"envoy_listener_address": "127.0.0.1_10000"}, 3.0)
    ]
    assert fams["envoy_tcp_downstream_cx_total"].samples[0][1] == {"envoy_tcp_prefix": "db"}
    assert fams["envoy_server_live"].type == "gauge"
    assert "envoy_server_live{} 1\n" in text  # Envoy writes empty braces for no labels
    assert fams["envoy_cluster_upstream_rq_active"].type == "gauge"
    # Envoy's layout: counters, then gauges, then histograms; families sorted by the
    # tag-extracted name ("cluster." sorts before "cluster_" and "http.").
    order = [line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE")]
    kinds = [k for _, k in order]
    assert kinds == sorted(kinds, key=["counter", "gauge", "histogram"].index)
    counters = [n for n, k in order if k == "counter"]
    assert counters[0] == "envoy_cluster_upstream_rq"


def test_histogram_exposition() -> None:
    fams = parse_exposition(render(_sample_store().snapshot()))
    fam = fams["envoy_http_downstream_rq_time"]
    assert fam.type == "histogram"
    buckets = [(lab["le"], v) for n, lab, v in fam.samples if n.endswith("_bucket")]
    assert [le for le, _ in buckets] == [
        *("0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000"),
        *("10000", "30000", "60000", "300000", "600000", "1800000", "3600000", "+Inf"),
    ]
    assert dict(buckets)["0.5"] == 1
    assert dict(buckets)["1"] == 2
    assert dict(buckets)["5"] == 3
    assert dict(buckets)["50"] == 4
    assert dict(buckets)["3600000"] == 4  # the 70 000 s sample only in +Inf
    assert dict(buckets)["+Inf"] == 5
    sums = {n: v for n, _, v in fam.samples if not n.endswith("_bucket")}
    assert sums["envoy_http_downstream_rq_time_count"] == 5
    assert sums["envoy_http_downstream_rq_time_sum"] == pytest.approx(70_000_044.0)
    # An empty histogram is still written, with zero buckets.
    empty = fams["envoy_cluster_upstream_rq_time"]
    assert all(v == 0 for _, _, v in empty.samples)


def test_summary_mode() -> None:
    snap = _sample_store().snapshot()
    text = render(snap, histogram_buckets=HistogramBuckets.SUMMARY)
    fams = parse_exposition(text)
    fam = fams["envoy_http_downstream_rq_time"]
    assert fam.type == "summary"
    qs = [lab["quantile"] for n, lab, _ in fam.samples if n == fam.name]
    assert qs == ["0", "0.25", "0.5", "0.75", "0.9", "0.95", "0.99", "0.995", "0.999", "1"]
    empty = fams["envoy_cluster_upstream_rq_time"]
    assert all(math.isnan(v) for n, _, v in empty.samples if n == empty.name)
    with pytest.raises(ValueError):
        render(snap, histogram_buckets=HistogramBuckets.DISJOINT)


def test_label_values_escaped_and_names_sanitised() -> None:
    snap = StatsSnapshot(
        counters={
            'cluster.we"ird\\name.upstream_rq_total': 1,
            "http.in-bound:1.downstream_rq_total": 2,
        },
        gauges={"my-component.some/thing": 3},
    )
    text = render(snap)
    fams = parse_exposition(text)
    assert fams["envoy_cluster_upstream_rq_total"].samples[0][1] == {
        "envoy_cluster_name": 'we"ird\\name'
    }
    assert 'envoy_cluster_name="we\\"ird\\\\name"' in text
    assert fams["envoy_http_downstream_rq_total"].samples[0][1] == {
        "envoy_http_conn_manager_prefix": "in-bound:1"
    }
    assert "envoy_my_component_some_thing" in fams


def test_conflicting_types_keep_the_page_parseable() -> None:
    snap = StatsSnapshot(counters={"a.b": 1}, gauges={"a.b": 2, "a_b": 3})
    fams = parse_exposition(render(snap))
    assert fams["envoy_a_b"].type == "counter"
    assert len(fams["envoy_a_b"].samples) == 1


def test_query_filter_usedonly_type() -> None:
    snap = _sample_store().snapshot()
    only_http = render(snap, query=StatsQuery(filter=re.compile(r"^http\.")))
    assert set(parse_exposition(only_http)) == {
        "envoy_http_downstream_rq_total",
        "envoy_http_downstream_rq_xx",
        "envoy_http_downstream_cx_active",
        "envoy_http_downstream_rq_time",
    }
    inverted = parse_exposition(
        render(snap, query=StatsQuery(filter=re.compile(r"^http\."), invert=True))
    )
    assert not any(n.startswith("envoy_http_") for n in inverted)
    used = parse_exposition(render(snap, query=StatsQuery(used_only=True)))
    classes = [
        lab["envoy_response_code_class"]
        for _, lab, _ in used["envoy_http_downstream_rq_xx"].samples
    ]
    assert classes == ["2"]  # the 4xx counter is zero
    assert "envoy_cluster_upstream_rq_time" not in used  # no samples
    gauges = parse_exposition(render(snap, query=StatsQuery(type=StatType.GAUGES)))
    assert {f.type for f in gauges.values()} == {"gauge"}


def test_merged_worker_snapshots_render() -> None:
    a, b = _sample_store(), _sample_store()
    merged = merge_snapshots([a.snapshot(), b.snapshot()])
    fams = parse_exposition(render(merged))
    assert fams["envoy_cluster_upstream_rq_total"].samples[0][2] == 14
    count = [v for n, _, v in fams["envoy_http_downstream_rq_time"].samples if n.endswith("_count")]
    assert count == [10]


def test_empty_snapshot() -> None:
    assert render(StatsSnapshot()) == ""
    assert render_text(StatsSnapshot()) == ""
    assert json.loads(render_json(StatsSnapshot())) == {"stats": []}


# ---------------------------------------------------------------------------------------------
# /stats text and JSON


def test_text_layout() -> None:
    text = render_text(_sample_store().snapshot())
    lines = text.splitlines()
    scalars = [ln for ln in lines if "P0(" not in ln and "No recorded" not in ln]
    names = [ln.split(": ")[0] for ln in scalars]
    assert names == sorted(names)  # counters and gauges merged and sorted
    assert "cluster.backend.upstream_rq_total: 7" in lines
    assert "server.live: 1" in lines
    # Histograms come last, sorted, as Envoy's P0..P100 summary.
    assert lines[-2] == "cluster.backend.upstream_rq_time: No recorded values"
    assert lines[-1].startswith("http.ingress.downstream_rq_time: P0(nan,")
    labels = re.findall(r"(P[\d.]+)\(nan,[^)]+\)", lines[-1])
    assert labels == ["P0", "P25", "P50", "P75", "P90", "P95", "P99", "P99.5", "P99.9", "P100"]


def test_text_bucket_modes() -> None:
    snap = _sample_store().snapshot()
    cum = render_text(snap, StatsQuery(histogram_buckets=HistogramBuckets.CUMULATIVE))
    line = next(ln for ln in cum.splitlines() if ln.startswith("http.ingress.downstream_rq_time"))
    assert line.startswith("http.ingress.downstream_rq_time: B0.5(0,1) B1(0,2) B5(0,3) B10(0,3)")
    assert line.endswith("B1.8e+06(0,4) B3.6e+06(0,4)")  # Envoy's %g spelling
    dis = render_text(snap, StatsQuery(histogram_buckets=HistogramBuckets.DISJOINT))
    line = next(ln for ln in dis.splitlines() if ln.startswith("http.ingress.downstream_rq_time"))
    assert line.startswith("http.ingress.downstream_rq_time: B0.5(0,1) B1(0,1) B5(0,1) B10(0,0)")
    det = render_text(snap, StatsQuery(histogram_buckets=HistogramBuckets.DETAILED)).splitlines()
    i = det.index("http.ingress.downstream_rq_time:")
    assert det[i + 1] == "  totals=0,0.5:1, 0.5,0.5:1, 1,4:1, 25,25:1, 3600000,0:1"
    assert det[i + 2] == "  intervals="
    assert det[i + 3].startswith("  summary=P0(nan,")
    assert "cluster.backend.upstream_rq_time: No recorded values" in det


def test_json_layout() -> None:
    snap = _sample_store().snapshot()
    doc = json.loads(render_json(snap))
    stats = doc["stats"]
    scalars = stats[:-1]
    assert [s["name"] for s in scalars] == sorted(s["name"] for s in scalars)
    assert {"name": "server.live", "value": 1} in scalars
    hist = stats[-1]["histograms"]
    assert hist["supported_quantiles"] == [0, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 100]
    by_name = {q["name"]: q["values"] for q in hist["computed_quantiles"]}
    assert all(
        v == {"cumulative": None, "interval": None}
        for v in by_name["cluster.backend.upstream_rq_time"]
    )
    assert len(by_name["http.ingress.downstream_rq_time"]) == 10
    cum = json.loads(render_json(snap, StatsQuery(histogram_buckets=HistogramBuckets.CUMULATIVE)))
    buckets = {h["name"]: h["buckets"] for h in cum["stats"][-1]["histograms"]}
    assert buckets["http.ingress.downstream_rq_time"][0] == {
        "upper_bound": 0.5,
        "interval": 0,
        "cumulative": 1,
    }
    assert buckets["http.ingress.downstream_rq_time"][-1]["upper_bound"] == 3600000
    only_counters = json.loads(render_json(snap, StatsQuery(type=StatType.COUNTERS)))
    assert all("histograms" not in s for s in only_counters["stats"])


def test_quantile_estimates() -> None:
    h = HistogramView.of(
        {
            "bounds": list(DEFAULT_BUCKETS_MS),
            "counts": [0, 0, 10, 10] + [0] * 16,
            "sum": 120,
            "count": 20,
        }
    )
    # 10 samples in (1, 5], 10 in (5, 10]: interpolate linearly inside the bucket.
    assert h.quantile(0.0) == pytest.approx(1.0)
    assert h.quantile(0.25) == pytest.approx(3.0)
    assert h.quantile(0.5) == pytest.approx(5.0)
    assert h.quantile(0.75) == pytest.approx(7.5)
    assert h.quantile(1.0) == pytest.approx(10.0)
    one = HistogramView.of({"bounds": [1, 10], "counts": [0, 1, 0], "sum": 4.25, "count": 1})
    assert one.quantile(0.5) == 4.25  # a single sample is known exactly
    empty = HistogramView.of({"bounds": [1, 10], "counts": [0, 0, 0], "sum": 0, "count": 0})
    assert math.isnan(empty.quantile(0.5))
