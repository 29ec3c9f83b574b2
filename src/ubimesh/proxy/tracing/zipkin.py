"""Zipkin v2 JSON (``POST /api/v2/spans``): the body Envoy's Zipkin tracer sends.

The body is exactly what ``orjson.dumps`` makes of the spans as dicts (``span_dict``, with
``Span.tag_dict``'s tags), but a span whose tags come from its record (every span the HCM
makes, unless it has custom tags) is written as JSON text directly: one string build per span
instead of two dicts (about 20 entries) and their serialization, a few thousand instructions
instead of about 25k (bench/telemetry_cpu.py, trace100). Its values go into the text as they
are; they are checked once per batch, and a batch in which any value would need escaping
(a quote, a backslash, a control character) or is not ASCII is encoded from the dicts
instead. tests/unit/test_tracing_zipkin_text.py holds the two ways to the same bytes.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from ubimesh.proxy.http.codec import int_text
from ubimesh.proxy.tracing.local import LOCAL, LocalInfo, local_ipv4
from ubimesh.proxy.tracing.span import Span

#: The upstream tag members (``upstream_cluster``, ``upstream_cluster.name`` and
#: ``upstream_address``) of an upstream address object and its cluster, escaped by orjson once
#: (``str`` of a frozen SocketAddress is interpreted code, about 2k instructions). Keyed by the
#: address object's id; the object is kept so the id stays its own.
_UPSTREAM_MEMBERS: Final[dict[int, tuple[object, str, str]]] = {}
_CLUSTER_MEMBERS: Final[dict[str, str]] = {}
_CACHE_MAX: Final = 1024


def encode(spans: list[Span], local: LocalInfo) -> bytes:
    """A JSON array of Zipkin v2 spans. The local endpoint is this proxy: its service name is
    the node's cluster, as Envoy's; the port is left out (unknown)."""
    endpoint = _endpoint(local)
    # Values that come from the node (configuration) are escaped by orjson, once a batch.
    # The tags name the process's node (LOCAL), as Span.tag_dict does.
    tags_head = (
        ',"localEndpoint":' + orjson.dumps(endpoint).decode()
        + ',"tags":{"node_id":' + orjson.dumps(LOCAL.node_id).decode() + ',"http.url":"'
    )  # fmt: skip
    zone_part = ',"zone":' + orjson.dumps(LOCAL.zone).decode() if LOCAL.zone else ""
    parts = ["["]
    values: list[str] = []
    for s in spans:
        if s.tags is None and s.recorded and s.custom is None:
            parts.append(_span_text(s, tags_head, zone_part, values))
        else:
            parts.append(orjson.dumps(span_dict(s, endpoint)).decode())
        parts.append(",")
    if spans:
        parts.pop()
    parts.append("]")
    raw = "".join(values)
    # orjson's text of a string is the string in quotes unless a character needs escaping.
    if not raw.isascii() or len(orjson.dumps(raw)) != len(raw) + 2:
        return encode_dicts(spans, local)
    return "".join(parts).encode()


def encode_dicts(spans: list[Span], local: LocalInfo) -> bytes:
    """``encode``'s body made from the spans as dicts (the reference the text must equal)."""
    endpoint = _endpoint(local)
    return orjson.dumps([span_dict(s, endpoint) for s in spans])


def _endpoint(local: LocalInfo) -> dict[str, Any]:
    endpoint: dict[str, Any] = {"serviceName": local.service}
    ipv4 = local_ipv4()
    if ipv4:
        endpoint["ipv4"] = ipv4
    return endpoint


def span_dict(s: Span, endpoint: dict[str, Any]) -> dict[str, Any]:
    """One span as Zipkin v2 JSON, before serialization."""
    span: dict[str, Any] = {
        "traceId": s.trace_id,
        "id": s.span_id,
        "kind": "CLIENT" if s.client else "SERVER",
        "timestamp": s.start_us,
        "duration": s.duration_us,
        "localEndpoint": endpoint,
        "tags": s.tag_dict(),
    }
    if s.name:
        span["name"] = s.name
    if s.parent_id:
        span["parentId"] = s.parent_id
    if s.shared:
        span["shared"] = True
    return span


def _cluster_members(cluster: str) -> str:
    found = _CLUSTER_MEMBERS.get(cluster)
    if found is None:
        name = orjson.dumps(cluster).decode()
        found = ',"upstream_cluster":' + name + ',"upstream_cluster.name":' + name
        if len(_CLUSTER_MEMBERS) >= _CACHE_MAX:
            _CLUSTER_MEMBERS.clear()
        _CLUSTER_MEMBERS[cluster] = found
    return found


def _upstream_members(cluster: str, address: object) -> str:
    key = id(address)
    found = _UPSTREAM_MEMBERS.get(key)
    if found is not None and found[0] is address and found[1] == cluster:
        return found[2]
    text = _cluster_members(cluster) + ',"upstream_address":' + orjson.dumps(str(address)).decode()
    if len(_UPSTREAM_MEMBERS) >= _CACHE_MAX:
        _UPSTREAM_MEMBERS.clear()
    _UPSTREAM_MEMBERS[key] = (address, cluster, text)
    return text


def _span_text(s: Span, tags_head: str, zone_part: str, values: list[str]) -> str:
    """``span_dict(s, endpoint)`` as orjson writes it, for a span whose tags come from its
    record and have no custom tags, provided that its values need no escaping: they are
    added to ``values`` for ``encode`` to check. Keys and their order follow ``span_dict`` and
    ``Span.tag_dict`` exactly (the test compares the bytes). Every literal run and value is
    one piece of a single string build, so members are merged into as few pieces as can be."""
    rid = s.request_id
    ctid = s.client_trace_id
    status = s.status
    flags = s.response_flags or "-"
    name = s.name
    parent = s.parent_id
    # Optional members: a key (or "") and a value (or ""), so that one build makes the text.
    rid_key = ',"guid:x-request-id":"' if rid else ""
    rid_end = '"' if rid else ""
    ctid_key = ',"guid:x-client-trace-id":"' if ctid else ""
    ctid_end = '"' if ctid else ""
    upstream = ""
    cluster = s.cluster
    if cluster is not None:
        address = s.upstream_address
        if address is None:
            upstream = _cluster_members(cluster)
        else:
            upstream = _upstream_members(cluster, address)
    error_part = ',"error":"true"' if status >= 500 or status == 0 else ""
    name_key = ',"name":"' if name else ""
    name_end = '"' if name else ""
    parent_key = ',"parentId":"' if parent else ""
    parent_end = '"' if parent else ""
    shared_part = ',"shared":true' if s.shared else ""
    kind = '","kind":"CLIENT","timestamp":' if s.client else '","kind":"SERVER","timestamp":'
    protocol = (
        '","http.protocol":"HTTP/1.0","peer.address":"'
        if s.http10
        else '","http.protocol":"HTTP/1.1","peer.address":"'
    )
    values.append(
        f"{s.trace_id}{s.span_id}{parent}{name}{s.proto}{s.host}{s.path}{s.method}"
        f"{s.downstream_cluster}{s.user_agent}{s.peer}{rid}{ctid}{flags}"
    )
    return (
        f'{{"traceId":"{s.trace_id}","id":"{s.span_id}{kind}{s.start_us},'
        f'"duration":{s.duration_us}{tags_head}{s.proto}://{s.host}{s.path}",'
        f'"http.method":"{s.method}","downstream_cluster":"{s.downstream_cluster}",'
        f'"user_agent":"{s.user_agent}{protocol}{s.peer}"{zone_part}'
        f"{rid_key}{rid}{rid_end}{ctid_key}{ctid}{ctid_end}"
        f',"request_size":"{int_text(s.request_size)}",'
        f'"response_size":"{int_text(s.response_size)}",'
        f'"component":"proxy"{upstream},"http.status_code":"{int_text(status)}",'
        f'"response_flags":"{flags}"{error_part}}}'
        f"{name_key}{name}{name_end}{parent_key}{parent}{parent_end}{shared_part}}}"
    )
