"""The collector's SQLite store: Zipkin query semantics, dependency links, retention."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson

from ubimesh.collector.model import zipkin_rows
from ubimesh.collector.store import SpanStore, TraceQuery, link_dependencies

T0 = 1_714_564_800_000_000  # µs
T0_MS = T0 // 1000


def _span(trace: str, sid: str, service: str, *, parent: str | None = None,
          kind: str | None = None, ts: int = T0, duration: int = 100, name: str = "op",
          remote: str | None = None, tags: dict[str, str] | None = None) -> dict[str, Any]:
    span: dict[str, Any] = {"traceId": trace, "id": sid, "name": name, "timestamp": ts,
                            "duration": duration, "localEndpoint": {"serviceName": service}}
    if parent:
        span["parentId"] = parent
    if kind:
        span["kind"] = kind
    if remote:
        span["remoteEndpoint"] = {"serviceName": remote}
    if tags:
        span["tags"] = tags
    return span


def _store(tmp_path: Path, spans: list[dict[str, Any]]) -> SpanStore:
    store = SpanStore(tmp_path)
    store.insert(zipkin_rows(json.dumps(spans).encode(), T0, 10_000))
    return store


def _ids(body: bytes) -> list[list[str]]:
    return [[s["id"] for s in trace] for trace in orjson.loads(body)]


TA, TB, TC = "a" * 16, "b" * 16, "c" * 16


def _mesh(tmp_path: Path) -> SpanStore:
    return _store(tmp_path, [
        # trace A: frontend -> backend (shared span ids, as Envoy reports), backend -> db
        _span(TA, "0000000000000001", "frontend", kind="SERVER", duration=900, name="get /"),
        _span(TA, "0000000000000002", "frontend", parent="0000000000000001", kind="CLIENT",
              remote="backend", ts=T0 + 10, duration=500),
        _span(TA, "0000000000000002", "backend", parent="0000000000000001", kind="SERVER",
              ts=T0 + 20, duration=400, name="get /api", tags={"http.method": "GET"}),
        _span(TA, "0000000000000003", "backend", parent="0000000000000002", kind="CLIENT",
              remote="db", ts=T0 + 30, duration=100, tags={"error": "timeout"}),
        # trace B, a minute later: frontend alone, slow
        _span(TB, "0000000000000004", "frontend", kind="SERVER", ts=T0 + 60_000_000,
              duration=5000, name="get /slow", tags={"http.method": "POST"}),
        # trace C, two hours earlier
        _span(TC, "0000000000000005", "backend", kind="SERVER", ts=T0 - 7200_000_000),
    ])


def test_lookups(tmp_path: Path) -> None:
    store = _mesh(tmp_path)
    assert store.services() == ["backend", "frontend"]
    assert store.span_names("frontend") == ["get /", "get /slow", "op"]
    assert store.remote_services("backend") == ["db"]
    assert store.remote_services("nobody") == []
    trace = orjson.loads(store.trace(TA) or b"")
    assert [s["id"] for s in trace] == ["0000000000000001", "0000000000000002",
                                        "0000000000000002", "0000000000000003"]
    assert store.trace("d" * 16) is None


def test_find_traces(tmp_path: Path) -> None:
    store = _mesh(tmp_path)
    hour = 3_600_000
    end = T0_MS + 120_000

    def find(**kw: Any) -> list[list[str]]:
        q = TraceQuery(end_ts_ms=kw.pop("end", end), lookback_ms=kw.pop("lookback", hour), **kw)
        return [ids[:1] for ids in _ids(store.find_traces(q))]

    assert find() == [["0000000000000004"], ["0000000000000001"]]  # newest first, not C
    assert find(limit=1) == [["0000000000000004"]]
    assert find(lookback=3 * hour) == [["0000000000000004"], ["0000000000000001"],
                                            ["0000000000000005"]]
    assert find(service="backend") == [["0000000000000001"]]
    assert find(span_name="get /api") == [["0000000000000001"]]
    assert find(service="frontend", span_name="get /api") == []  # the name is backend's
    assert find(remote_service="db") == [["0000000000000001"]]
    assert find(min_duration=1000) == [["0000000000000004"]]
    assert find(service="backend", min_duration=150, max_duration=450) == [["0000000000000001"]]
    assert find(service="backend", min_duration=450) == []
    assert find(annotation_query={"error": ""}) == [["0000000000000001"]]
    assert find(annotation_query={"http.method": "POST"}) == [["0000000000000004"]]
    assert find(annotation_query={"http.method": "GET", "error": "timeout"}) == [
        ["0000000000000001"]]
    assert find(annotation_query={"http.method": "PUT"}) == []


def test_dependencies_count_each_call_once(tmp_path: Path) -> None:
    store = _mesh(tmp_path)
    assert store.dependencies(T0_MS + 120_000, 86_400_000) == [
        {"parent": "backend", "child": "db", "callCount": 1, "errorCount": 1},
        {"parent": "frontend", "child": "backend", "callCount": 1, "errorCount": 0},
    ]
    assert store.dependencies(T0_MS - 3600_000, 1000) == []


def test_link_dependencies_unshared_and_local_spans() -> None:
    rows = [
        # client span with a server child span (no shared ids)
        ("t1", "c1", "", "web", "CLIENT", "api", 0),
        ("t1", "s1", "c1", "api", "SERVER", "", 1),
        # a server span with only a remote endpoint (uninstrumented caller)
        ("t2", "s2", "", "api", "SERVER", "mobile", 0),
        # local spans across services
        ("t3", "l1", "", "batch", "", "", 0),
        ("t3", "l2", "l1", "worker", "", "", 0),
    ]
    assert link_dependencies(rows) == [
        {"parent": "batch", "child": "worker", "callCount": 1, "errorCount": 0},
        {"parent": "mobile", "child": "api", "callCount": 1, "errorCount": 0},
        {"parent": "web", "child": "api", "callCount": 1, "errorCount": 1},
    ]


def test_sweep_by_age_then_by_count(tmp_path: Path) -> None:
    store = _mesh(tmp_path)
    assert store.count() == 6
    # 1 h retention at T0 + 2 min: trace C (2 h old) goes
    assert store.sweep(T0 + 120_000_000, 3600_000_000, 0) == 1
    assert store.trace(TC) is None
    # at most 2 spans: the oldest go (trace A's first spans), the newest stay
    assert store.sweep(T0 + 120_000_000, 0, 2) == 3
    assert store.count() == 2
    assert _ids(store.traces_by_id([TA, TB])) == [["0000000000000003"], ["0000000000000004"]]
