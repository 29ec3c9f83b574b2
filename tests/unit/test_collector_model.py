"""The collector's span decoding: OTLP -> Zipkin mapping, normalization, validation errors."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from ubimesh.collector.model import IngestError, otlp_rows, zipkin_rows
from ubimesh.collector.server import parse_duration

NOW = 1_714_564_900_000_000
TRACE = "5af7183fb1d4cf5f5af7183fb1d4cf5f"


def _otlp(spans: list[dict[str, Any]], service: str = "Ledger") -> bytes:
    return json.dumps({"resourceSpans": [{
        "resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": service}},
            {"key": "host.name", "value": {"stringValue": "node-1"}}]},
        "scopeSpans": [{"scope": {"name": "ubimesh.proxy", "version": "0.1.0"},
                        "spans": spans}]}]}).encode()


def _otlp_span(**over: Any) -> dict[str, Any]:
    span: dict[str, Any] = {
        "traceId": TRACE.upper(), "spanId": "6b221d5bc9e6496c", "parentSpanId": "352bff9a74ca9ad2",
        "name": "GET /v1/balances", "kind": 2,
        "startTimeUnixNano": "1714564800123456000", "endTimeUnixNano": "1714564800125606001",
        "flags": 769,
        "attributes": [
            {"key": "http.response.status_code", "value": {"intValue": "200"}},
            {"key": "retry", "value": {"boolValue": False}},
            {"key": "ratio", "value": {"doubleValue": 0.5}},
            {"key": "list", "value": {"arrayValue": {"values": [{"stringValue": "a"},
                                                                {"intValue": 3}]}}},
            {"key": "peer.service", "value": {"stringValue": "Payments"}},
            {"key": "net.peer.ip", "value": {"stringValue": "10.1.9.7"}},
            {"key": "net.peer.port", "value": {"intValue": 51544}},
        ],
        "events": [{"timeUnixNano": 1714564800124000000, "name": "retry"}],
        "status": {"code": 0},
    }
    span.update(over)
    return span


def _stored(row: Any) -> dict[str, Any]:
    value: dict[str, Any] = orjson.loads(row[-1])
    return value


def test_otlp_span_maps_onto_zipkin() -> None:
    (row,) = otlp_rows(_otlp([_otlp_span()]), NOW, 100)
    span = _stored(row)
    assert span == {
        "traceId": TRACE,  # lowercased
        "id": "6b221d5bc9e6496c",
        "parentId": "352bff9a74ca9ad2",
        "kind": "SERVER",
        "name": "get /v1/balances",
        "timestamp": 1714564800123456,
        "duration": 2151,  # 2150.001 µs rounded up
        "localEndpoint": {"serviceName": "ledger"},
        "remoteEndpoint": {"serviceName": "payments", "ipv4": "10.1.9.7", "port": 51544},
        "annotations": [{"timestamp": 1714564800124000, "value": "retry"}],
        "tags": {
            "http.response.status_code": "200", "retry": "false", "ratio": "0.5",
            "list": '["a","3"]', "peer.service": "Payments", "net.peer.ip": "10.1.9.7",
            "net.peer.port": "51544", "otel.scope.name": "ubimesh.proxy",
            "otel.scope.version": "0.1.0",
        },
    }
    assert row[:10] == (TRACE, "6b221d5bc9e6496c", "352bff9a74ca9ad2", "ledger",
                        "get /v1/balances", "SERVER", 1714564800123456, 2151, "payments", 0)


@pytest.mark.parametrize(("kind", "zipkin"), [
    (0, None), (1, None), (2, "SERVER"), (3, "CLIENT"), (4, "PRODUCER"), (5, "CONSUMER"),
    ("SPAN_KIND_CLIENT", "CLIENT"),
])
def test_otlp_kinds(kind: Any, zipkin: str | None) -> None:
    (row,) = otlp_rows(_otlp([_otlp_span(kind=kind)]), NOW, 100)
    assert _stored(row).get("kind") == zipkin
    assert row[5] == (zipkin or "")


def test_otlp_status_error_becomes_the_error_tag() -> None:
    (row,) = otlp_rows(_otlp([_otlp_span(status={"code": 2, "message": "upstream reset"})]),
                       NOW, 100)
    tags = _stored(row)["tags"]
    assert tags["error"] == "upstream reset"
    assert tags["otel.status_code"] == "ERROR"
    assert row[9] == 1
    (ok,) = otlp_rows(_otlp([_otlp_span(status={"code": 1})]), NOW, 100)
    assert _stored(ok)["tags"]["otel.status_code"] == "OK"
    assert "error" not in _stored(ok)["tags"]


def test_otlp_root_span_and_numeric_times_and_padded_64_bit_trace_id() -> None:
    span = _otlp_span(parentSpanId="", traceId="0" * 16 + "463ac35c9f6413ad",
                      startTimeUnixNano=1_000_000_000, endTimeUnixNano=1_000_000_000)
    (row,) = otlp_rows(_otlp([span]), NOW, 100)
    stored = _stored(row)
    assert "parentId" not in stored
    assert stored["traceId"] == "463ac35c9f6413ad"  # the 64-bit Zipkin id it came from
    assert stored["timestamp"] == 1_000_000 and stored["duration"] == 1  # at least 1 µs


@pytest.mark.parametrize(("over", "message"), [
    ({"traceId": "abc"}, "resourceSpans[0].scopeSpans[0].spans[1].traceId: 'abc' is not 16"),
    ({"traceId": "0" * 32}, "spans[1].traceId: all zeros"),
    ({"spanId": "6b221d5bc9e6496"}, "spans[1].spanId: '6b221d5bc9e6496' is not 16 hex"),
    ({"spanId": None}, "spans[1].spanId: missing"),
    ({"parentSpanId": "zz"}, "spans[1].parentSpanId"),
    ({"name": ""}, "spans[1].name: missing or empty"),
    ({"kind": 9}, "spans[1].kind: 9 is not a SpanKind"),
    ({"startTimeUnixNano": "soon"}, "spans[1].startTimeUnixNano: missing or not an integer"),
    ({"endTimeUnixNano": "1"}, "spans[1].endTimeUnixNano: before startTimeUnixNano"),
    ({"status": {"code": 7}}, "spans[1].status.code"),
    ({"attributes": [{"value": {}}]}, "spans[1].attributes[0]: needs a string key"),
])
def test_otlp_errors_name_the_span_and_field(over: dict[str, Any], message: str) -> None:
    body = _otlp([_otlp_span(), _otlp_span(**over)])
    with pytest.raises(IngestError) as info:
        otlp_rows(body, NOW, 100)
    assert info.value.status == 400
    assert message in str(info.value)


def test_otlp_document_errors() -> None:
    for body, message in [(b"{", "malformed JSON"), (b"[]", "ExportTraceServiceRequest"),
                          (b'{"resourceSpans": 3}', "resourceSpans: not an array")]:
        with pytest.raises(IngestError, match=message):
            otlp_rows(body, NOW, 100)
    assert otlp_rows(b"{}", NOW, 100) == []  # nothing to store is fine
    with pytest.raises(IngestError) as info:
        otlp_rows(_otlp([_otlp_span()] * 3), NOW, 2)
    assert info.value.status == 413


ZIPKIN = {
    "traceId": "5AF7183FB1D4CF5F", "id": "6B221D5BC9E6496C", "parentId": "352bff9a74ca9ad2",
    "name": "GET /x", "kind": "CLIENT", "timestamp": 1502787600000000, "duration": 207000,
    "localEndpoint": {"serviceName": "Frontend", "ipv4": "192.168.99.1", "port": 8080},
    "remoteEndpoint": {"serviceName": "Backend", "ipv4": "172.19.0.2"},
    "annotations": [{"timestamp": 1502787600000001, "value": "ws"}],
    "tags": {"http.path": "/x", "error": "500"}, "shared": False, "debug": True,
}


def test_zipkin_span_is_normalized_and_kept_whole() -> None:
    (row,) = zipkin_rows(json.dumps([ZIPKIN]).encode(), NOW, 100)
    assert row[:10] == ("5af7183fb1d4cf5f", "6b221d5bc9e6496c", "352bff9a74ca9ad2",
                        "frontend", "get /x", "CLIENT", 1502787600000000, 207000, "backend", 1)
    stored = _stored(row)
    assert stored["localEndpoint"]["serviceName"] == "frontend"
    assert stored["debug"] is True and stored["annotations"] == ZIPKIN["annotations"]


def test_zipkin_span_without_timestamp_is_indexed_at_arrival() -> None:
    span = {"traceId": "5af7183fb1d4cf5f", "id": "6b221d5bc9e6496c"}
    (row,) = zipkin_rows(json.dumps([span]).encode(), NOW, 100)
    assert row[6] == NOW and row[3] == "" and row[7] == 0
    assert _stored(row) == span  # and stored as sent


@pytest.mark.parametrize(("over", "message"), [
    ({"traceId": None}, "span 1.traceId: missing"),
    ({"traceId": "5af7183fb1d4cf5f5"}, "span 1.traceId: '5af7183fb1d4cf5f5' is not 16 or 32"),
    ({"id": "5af7183fb1d4cf5f5af7183fb1d4cf5f"}, "span 1.id:"),
    ({"id": "0000000000000000"}, "span 1.id: all zeros"),
    ({"parentId": 12}, "span 1.parentId: missing or not a string"),
    ({"kind": "server"}, "span 1.kind: 'server' is not one of"),
    ({"timestamp": -1}, "span 1.timestamp"),
    ({"timestamp": "1502787600000000"}, "span 1.timestamp"),
    ({"duration": 1.5}, "span 1.duration"),
    ({"tags": {"http.status_code": 200}}, "span 1.tags.http.status_code: value 200"),
    ({"localEndpoint": {"serviceName": 3}}, "span 1.localEndpoint.serviceName"),
    ({"remoteEndpoint": {"port": 70000}}, "span 1.remoteEndpoint.port"),
    ({"annotations": [{"value": "x"}]}, "span 1.annotations[0].timestamp"),
])
def test_zipkin_errors_name_the_span_and_field(over: dict[str, Any], message: str) -> None:
    bad = {**ZIPKIN, **over}
    with pytest.raises(IngestError) as info:
        zipkin_rows(json.dumps([ZIPKIN, bad]).encode(), NOW, 100)
    assert info.value.status == 400
    assert message in str(info.value)


def test_zipkin_body_errors() -> None:
    with pytest.raises(IngestError, match="malformed JSON"):
        zipkin_rows(b"[{", NOW, 100)
    with pytest.raises(IngestError, match="expected a JSON array"):
        zipkin_rows(b"{}", NOW, 100)
    with pytest.raises(IngestError, match="span 0: not a JSON object"):
        zipkin_rows(b"[1]", NOW, 100)
    with pytest.raises(IngestError) as info:
        zipkin_rows(json.dumps([ZIPKIN] * 3).encode(), NOW, 2)
    assert info.value.status == 413


@pytest.mark.parametrize(("text", "seconds"), [
    ("24h", 86400.0), ("30m", 1800.0), ("1h30m", 5400.0), ("2.5s", 2.5), ("500ms", 0.5),
    ("7d", 604800.0), ("0", 0.0),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "24", "h", "1x", "1h 2m", "-1h"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)
