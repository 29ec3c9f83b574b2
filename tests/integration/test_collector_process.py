"""``ubimesh collector`` as a real process: ingest (Zipkin v2, OTLP JSON, gzip), every query
endpoint, limits (400, 413, 415), retention by age and count, and the bounded queue (503)."""

from __future__ import annotations

import gzip
import http.client
import json
import sqlite3
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.support.control import wait_for
from tests.support.procs import LOOPBACK, ManagedProcess, ProcessStartError


@dataclass
class Collector:
    proc: ManagedProcess
    data_dir: Path
    port: int

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def post(self, path: str, value: Any, **headers: str) -> tuple[int, dict[str, str], bytes]:
        return self.request("POST", path, json.dumps(value).encode(),
                            {"content-type": "application/json", **headers})

    def get(self, path: str, **query: Any) -> Any:
        if query:
            path += "?" + urllib.parse.urlencode(query)
        status, _, body = self.request("GET", path)
        assert status == 200, (path, status, body)
        return json.loads(body)

    def health(self) -> dict[str, Any]:
        value: dict[str, Any] = self.get("/health")
        return value

    def wait_stored(self, count: int) -> None:
        wait_for(f"{count} spans stored", lambda: self.health()["spans"] == count, timeout=10)


def start_collector(workdir: Path, *flags: str, name: str = "collector") -> Collector:
    data_dir = workdir / name
    argv = [sys.executable, "-m", "ubimesh.cli.main", "collector", "--address", f"{LOOPBACK}:0",
            "--data-dir", str(data_dir), *flags]
    proc = ManagedProcess(name, argv, workdir / f"{name}.log", workdir)
    info = data_dir / "collector.json"
    deadline = time.monotonic() + 20
    try:
        while not info.exists():
            if not proc.alive or time.monotonic() > deadline:
                raise ProcessStartError(f"{name} did not start\n{proc.describe()}")
            time.sleep(0.05)
        address = json.loads(info.read_text())["address"]
    except BaseException:
        proc.stop()
        raise
    return Collector(proc, data_dir, int(address.rsplit(":", 1)[1]))


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    c = start_collector(tmp_path)
    try:
        yield c
    finally:
        c.proc.stop()


NOW_US = int(time.time() * 1_000_000)
NOW_MS = NOW_US // 1000
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def _span(sid: str, service: str, **over: Any) -> dict[str, Any]:
    span = {"traceId": TRACE, "id": sid, "name": "get /", "timestamp": NOW_US - 1000,
            "duration": 800, "localEndpoint": {"serviceName": service, "ipv4": "10.0.0.1"}}
    span.update(over)
    return span


def _otlp_request() -> dict[str, Any]:
    return {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "db"}}]},
        "scopeSpans": [{"scope": {"name": "otel-test"}, "spans": [{
            "traceId": TRACE, "spanId": "00f067aa0ba902b9", "parentSpanId": "b7ad6b7169203331",
            "name": "SELECT", "kind": 2, "startTimeUnixNano": str((NOW_US - 500) * 1000),
            "endTimeUnixNano": str((NOW_US - 300) * 1000),
            "attributes": [{"key": "db.system", "value": {"stringValue": "postgresql"}}],
            "status": {"code": 2, "message": "deadlock"}}]}]}]}


def test_ingest_and_every_query_endpoint(collector: Collector) -> None:
    spans = [
        _span("a3ce929d0e0e4736", "frontend", kind="SERVER", duration=5000,
              tags={"http.method": "GET", "http.status_code": "200"}),
        _span("b7ad6b7169203331", "frontend", kind="CLIENT", parentId="a3ce929d0e0e4736",
              remoteEndpoint={"serviceName": "backend"}, name="get /api"),
        _span("b7ad6b7169203331", "backend", kind="SERVER", parentId="a3ce929d0e0e4736",
              name="get /api", shared=True),
    ]
    status, _, body = collector.post("/api/v2/spans", spans)
    assert (status, body) == (202, b"")
    status, headers, body = collector.post("/v1/traces", _otlp_request())
    assert (status, json.loads(body)) == (200, {})
    assert headers["content-type"].startswith("application/json")
    # an unrelated trace of another service, gzip-encoded
    other = [_span("1111111111111111", "batch", traceId="1" * 16, name="nightly",
                   timestamp=NOW_US - 100)]
    status, _, _ = collector.request(
        "POST", "/api/v2/spans", gzip.compress(json.dumps(other).encode()),
        {"content-type": "application/json", "content-encoding": "gzip"})
    assert status == 202
    collector.wait_stored(5)

    assert collector.get("/api/v2/services") == ["backend", "batch", "db", "frontend"]
    assert collector.get("/api/v2/spans", serviceName="frontend") == ["get /", "get /api"]
    assert collector.get("/api/v2/remoteServices", serviceName="frontend") == ["backend"]
    trace = collector.get(f"/api/v2/trace/{TRACE.upper()}")
    assert [(s["id"], s["localEndpoint"]["serviceName"]) for s in trace] == [
        ("a3ce929d0e0e4736", "frontend"), ("b7ad6b7169203331", "frontend"),
        ("b7ad6b7169203331", "backend"), ("00f067aa0ba902b9", "db")]
    db_span = trace[3]
    assert db_span["kind"] == "SERVER" and db_span["name"] == "select"
    assert db_span["duration"] == 200 and db_span["parentId"] == "b7ad6b7169203331"
    assert db_span["tags"] == {"db.system": "postgresql", "otel.scope.name": "otel-test",
                               "otel.status_code": "ERROR", "error": "deadlock"}
    assert trace[2]["shared"] is True
    status, _, _ = collector.request("GET", "/api/v2/trace/" + "9" * 32)
    assert status == 404
    status, _, _ = collector.request("GET", "/api/v2/trace/nothex")
    assert status == 400

    def trace_ids(**query: Any) -> list[str]:
        return [t[0]["traceId"] for t in collector.get("/api/v2/traces", **query)]

    assert trace_ids() == ["1111111111111111", TRACE]  # newest first
    assert trace_ids(serviceName="db") == [TRACE]
    assert trace_ids(serviceName="frontend", spanName="get /api") == [TRACE]
    assert trace_ids(serviceName="batch", spanName="get /api") == []
    assert trace_ids(minDuration=4000) == [TRACE]
    assert trace_ids(minDuration=100, maxDuration=300) == [TRACE]  # the db span
    assert trace_ids(annotationQuery="http.method=GET and error") == [TRACE]
    assert trace_ids(annotationQuery="http.method=POST") == []
    assert trace_ids(limit=1) == ["1111111111111111"]
    assert trace_ids(endTs=NOW_MS - 60_000, lookback=60_000) == []
    many = collector.get("/api/v2/traceMany", traceIds=f"{TRACE},{'1' * 16}")
    assert [t[0]["traceId"] for t in many] == [TRACE, "1111111111111111"]

    deps = collector.get("/api/v2/dependencies", endTs=NOW_MS + 1000, lookback=3_600_000)
    assert deps == [
        {"parent": "backend", "child": "db", "callCount": 1, "errorCount": 1},
        {"parent": "frontend", "child": "backend", "callCount": 1, "errorCount": 0},
    ]
    assert collector.get("/api/v2/autocompleteKeys") == []
    status, _, body = collector.request("GET", "/api/v2/dependencies")
    assert status == 400 and b"endTs" in body
    status, _, body = collector.request("GET", "/api/v2/spans")
    assert status == 400 and b"serviceName" in body


def test_rejections(collector: Collector) -> None:
    status, _, body = collector.post("/api/v2/spans", [_span("a3ce929d0e0e4736", "x"),
                                                       _span("zz", "x")])
    assert status == 400
    assert b"span 1.id: 'zz' is not 16 hex digits" in body
    bad = _otlp_request()
    del bad["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["endTimeUnixNano"]
    status, _, body = collector.post("/v1/traces", bad)
    assert status == 400
    assert json.loads(body) == {"code": 3, "message": "resourceSpans[0].scopeSpans[0].spans[0]"
                                ".endTimeUnixNano: missing or not an integer (ns)"}
    status, _, body = collector.request("POST", "/v1/traces", b"\x0a\x00",
                                        {"content-type": "application/x-protobuf"})
    assert status == 415 and b"application/json" in body
    status, _, _ = collector.request("POST", "/api/v2/spans", b"[]",
                                     {"content-type": "application/x-thrift"})
    assert status == 415
    huge = b"[" + b" " * (16 * 1024 * 1024) + b"]"
    status, _, _ = collector.request("POST", "/api/v2/spans", huge,
                                     {"content-type": "application/json"})
    assert status == 413
    bomb = gzip.compress(huge)  # small on the wire, over the limit decoded
    status, _, _ = collector.request("POST", "/api/v2/spans", bomb,
                                     {"content-type": "application/json",
                                      "content-encoding": "gzip"})
    assert status == 413
    many = [_span(f"{i + 1:016x}", "x") for i in range(10_001)]
    status, _, body = collector.post("/api/v2/spans", many)
    assert status == 413 and b"10001 spans" in body
    time.sleep(0.2)
    assert collector.health()["spans"] == 0  # nothing from a refused request is stored


def test_retention_by_age_and_count(tmp_path: Path) -> None:
    c = start_collector(tmp_path, "--retention", "1h", "--max-spans", "5",
                        "--sweep-interval", "200ms")
    try:
        old = [_span(f"{i + 1:016x}", "old", traceId="2" * 16, timestamp=NOW_US - 7200_000_000)
               for i in range(3)]
        assert c.post("/api/v2/spans", old)[0] == 202
        wait_for("old spans deleted", lambda: c.health()["deletedSpans"] >= 3)
        assert c.health()["spans"] == 0
        assert c.get("/api/v2/services") == []
        fresh = [_span(f"{i + 1:016x}", "new", traceId=f"{i + 1:016x}",
                       timestamp=NOW_US - 100_000 + i) for i in range(8)]
        assert c.post("/api/v2/spans", fresh)[0] == 202
        wait_for("count limit applied", lambda: c.health()["spans"] == 5
                 and c.health()["deletedSpans"] == 6)
        kept = [t[0]["id"] for t in c.get("/api/v2/traces", limit=100)]
        assert kept == [f"{i + 1:016x}" for i in reversed(range(3, 8))]  # the newest five
    finally:
        c.proc.stop()


def test_full_queue_answers_503_and_keeps_what_it_accepted(tmp_path: Path) -> None:
    c = start_collector(tmp_path, "--max-queued-spans", "6")
    try:
        assert c.post("/api/v2/spans", [_span("0000000000000001", "s")])[0] == 202
        c.wait_stored(1)
        # Another writer holds the database: the collector's writes wait, its queue fills.
        db = sqlite3.connect(c.data_dir / "spans.db", isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        try:
            batch = [_span(f"{i + 2:016x}", "s") for i in range(6)]
            assert c.post("/api/v2/spans", batch)[0] == 202
            status, headers, _ = c.post("/api/v2/spans", batch[:1])
            assert status == 503
            assert headers["retry-after"] == "1"
            status, headers, body = c.post("/v1/traces", _otlp_request())
            assert (status, headers["retry-after"]) == (503, "1")
            assert json.loads(body)["code"] == 14
            assert c.health()["queuedSpans"] == 6
        finally:
            db.execute("ROLLBACK")
            db.close()
        c.wait_stored(7)  # the accepted batch was written once the lock went
        assert c.post("/api/v2/spans", batch)[0] == 202
        c.wait_stored(13)
    finally:
        c.proc.stop()


def test_cli_usage_errors(tmp_path: Path) -> None:
    import subprocess

    for flags, message in [(["--retention", "1y"], "not a duration"),
                           (["--address", "nowhere"], "--address"),
                           (["--max-spans", "-1"], "--max-spans")]:
        done = subprocess.run([sys.executable, "-m", "ubimesh.cli.main", "collector",
                               "--data-dir", str(tmp_path), *flags],
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 2, done
        assert message in done.stderr
