"""Zipkin v2 JSON (``POST /api/v2/spans``): the body Envoy's Zipkin tracer sends.

Contract: ``encode`` returns exactly what ``orjson.dumps`` makes of the spans as dicts
(``encode_dicts``: ``span_dict``, with ``Span.tag_dict``'s tags). A span whose tags come from
its record (every span the HCM makes, unless it has custom tags) is written as JSON text
directly instead (``_span_text``): one string build per span instead of two dicts (about 20
entries) and their serialization. Its values go into the text as they are, so each must need
no escaping; a batch in which any value would need escaping (a quote, a backslash, a control
character) or is not ASCII is encoded from the dicts instead.

Cache rules: most members repeat from span to span in steady traffic (same route, client,
upstream, status), so the text of the two runs of such members is kept from the last span
(``_Runs``: one entry per run, compared value by value, reused only when all are equal) and
a span's build has 13 pieces instead of about 50. A run's values are checked when it is
rendered and a run that fails the check is never kept; the ids, the request id and the
parent id, new in each span, are checked once per batch. The upstream members are kept per
address object (``_UPSTREAM_MEMBERS``, bounded). bench/telemetry_cpu.py --callgrind measures
it (trace100); tests/unit/test_tracing_zipkin_text.py holds the two ways to the same bytes.
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
    runs = _RUNS
    runs.start_batch(tags_head, zone_part)
    parts = ["["]
    values: list[str] = []
    first = True
    for s in spans:
        if s.tags is None and s.recorded and s.custom is None:
            # The text brings its own separator.
            text = _span_text(s, runs, first, values)
            if text is None:
                return encode_dicts(spans, local)
            parts.append(text)
        else:
            if not first:
                parts.append(",")
            parts.append(orjson.dumps(span_dict(s, endpoint)).decode())
        first = False
    parts.append("]")
    if not _plain("".join(values)):
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


def _plain(text: str) -> bool:
    """Whether orjson writes ``text`` as itself between quotes: ASCII, and no quote, backslash
    or control character (each of those makes its text longer)."""
    return text.isascii() and len(orjson.dumps(text)) == len(text) + 2


#: What ends a span after its parent id (present or not), and whether it is ``shared``.
_TAIL: Final = "}"
_TAIL_SHARED: Final = ',"shared":true}'
_TAIL_PARENT: Final = '"}'
_TAIL_PARENT_SHARED: Final = '","shared":true}'


class _Runs:
    """The text of two runs of members that repeat from span to span, each with the span it
    was rendered from (its key), so that a span equal to that one in the run's members
    reuses the text: one piece in its build instead of about twenty, and no values to check
    (they were checked when the run was rendered).

    * The request run: from the tags' head (``encode``'s, of the batch) up to the value of
      ``guid:x-request-id``, keyed on proto, host, path, method, downstream_cluster,
      user_agent, http10, peer and whether there is a request id; the batch's head and zone
      are part of it, so ``start_batch`` drops it when they change.
    * The response run: from the request id's closing quote up to the value of ``parentId``,
      keyed on whether there are a request id and a parent id, the client trace id,
      request_size, response_size, the upstream cluster and address (the very object),
      status, response_flags and name.

    One text per run (the last one, not a table): bounded, and a run that changes from span
    to span costs one key comparison more than no cache. The key spans are finished (their
    record no longer changes), and holding them keeps their values (and upstream address)
    alive, so comparing with them is comparing with the values the text was made of. A run
    is only kept when its values need no escaping; otherwise the span is not written as text
    at all (``encode`` falls back to the dicts), so a kept run never needs checking again.
    ``encode`` runs on the event loop only (one thread).
    """

    def __init__(self) -> None:
        self.tags_head = ""
        self.zone_part = ""
        self.request_key: Span | None = None
        """The span the request run was rendered from; None: no run kept."""
        self.request_text = ""
        self.response_key: Span | None = None
        """The span the response run was rendered from; None: no run kept."""
        self.response_text = ""

    def start_batch(self, tags_head: str, zone_part: str) -> None:
        """The batch's head of the tags and zone member: the request run holds them."""
        if tags_head != self.tags_head or zone_part != self.zone_part:
            self.tags_head = tags_head
            self.zone_part = zone_part
            self.request_key = None

    def request(self, s: Span) -> str | None:
        """The request run of ``s``; None when one of its values needs escaping."""
        k = self.request_key
        # The path first: the value most likely to differ from the last span's.
        if (
            k is not None
            and s.path == k.path
            and s.host == k.host
            and (s.request_id != "") == (k.request_id != "")
            and s.http10 == k.http10
            and s.peer == k.peer
            and s.user_agent == k.user_agent
            and s.method == k.method
            and s.downstream_cluster == k.downstream_cluster
            and s.proto == k.proto
        ):
            return self.request_text
        proto, host, path, method = s.proto, s.host, s.path, s.method
        downstream, agent, peer = s.downstream_cluster, s.user_agent, s.peer
        if not _plain(f"{proto}{host}{path}{method}{downstream}{agent}{peer}"):
            return None
        protocol = (
            '","http.protocol":"HTTP/1.0","peer.address":"'
            if s.http10
            else '","http.protocol":"HTTP/1.1","peer.address":"'
        )
        rid_key = ',"guid:x-request-id":"' if s.request_id else ""
        text = (
            f'{self.tags_head}{proto}://{host}{path}","http.method":"{method}",'
            f'"downstream_cluster":"{downstream}","user_agent":"{agent}{protocol}{peer}"'
            f"{self.zone_part}{rid_key}"
        )
        self.request_key = s
        self.request_text = text
        return text

    def response(self, s: Span) -> str | None:
        """The response run of ``s``; None when one of its values needs escaping."""
        k = self.response_key
        if (
            k is not None
            and s.response_size == k.response_size
            and s.request_size == k.request_size
            and s.status == k.status
            and s.upstream_address is k.upstream_address
            and s.cluster == k.cluster
            and s.response_flags == k.response_flags
            and s.name == k.name
            and (s.request_id != "") == (k.request_id != "")
            and (s.parent_id != "") == (k.parent_id != "")
            and s.client_trace_id == k.client_trace_id
        ):
            return self.response_text
        ctid = s.client_trace_id
        status = s.status
        flags = s.response_flags or "-"
        name = s.name
        if not _plain(f"{ctid}{flags}{name}"):
            return None
        upstream = ""
        cluster = s.cluster
        if cluster is not None:
            address = s.upstream_address
            if address is None:
                upstream = _cluster_members(cluster)
            else:
                upstream = _upstream_members(cluster, address)
        rid_end = '"' if s.request_id else ""
        ctid_key = ',"guid:x-client-trace-id":"' if ctid else ""
        ctid_end = '"' if ctid else ""
        error_part = ',"error":"true"' if status >= 500 or status == 0 else ""
        name_key = ',"name":"' if name else ""
        name_end = '"' if name else ""
        parent_key = ',"parentId":"' if s.parent_id else ""
        text = (
            f"{rid_end}{ctid_key}{ctid}{ctid_end}"
            f',"request_size":"{int_text(s.request_size)}",'
            f'"response_size":"{int_text(s.response_size)}",'
            f'"component":"proxy"{upstream},"http.status_code":"{int_text(status)}",'
            f'"response_flags":"{flags}"{error_part}}}'
            f"{name_key}{name}{name_end}{parent_key}"
        )
        self.response_key = s
        self.response_text = text
        return text


_RUNS: Final = _Runs()


def _span_text(s: Span, runs: _Runs, first: bool, values: list[str]) -> str | None:
    """``span_dict(s, endpoint)`` as orjson writes it (after a comma unless ``first``), for a
    span whose tags come from its record and have no custom tags; None when one of its
    values needs escaping (then the batch is written from the dicts). Keys and their order
    follow ``span_dict`` and ``Span.tag_dict`` exactly (the test compares the bytes).

    The text is one string build of 13 pieces: the ids and times, which differ in each span,
    the runs of members that usually repeat (``_Runs``) and constant tails. The ids and the
    request id are not checked here: they go to ``values``, which ``encode`` checks once a
    batch (a request id may come from the client; the ids are hex when the HCM made the
    span, but that is another module's rule, so they are checked all the same)."""
    rid = s.request_id
    parent = s.parent_id
    has_rid = rid != ""
    has_parent = parent != ""
    request = runs.request(s)
    if request is None:
        return None
    response = runs.response(s)
    if response is None:
        return None
    trace_id = s.trace_id
    span_id = s.span_id
    # To be checked by encode: appended one by one (a list append costs less than a string
    # build); a root span's trace id is its span id, the very string.
    values.append(span_id)
    if trace_id is not span_id:
        values.append(trace_id)
    if has_parent:
        values.append(parent)
    if has_rid:
        values.append(rid)
    lead = '{"traceId":"' if first else ',{"traceId":"'
    kind = '","kind":"CLIENT","timestamp":' if s.client else '","kind":"SERVER","timestamp":'
    if s.shared:
        tail = _TAIL_PARENT_SHARED if has_parent else _TAIL_SHARED
    else:
        tail = _TAIL_PARENT if has_parent else _TAIL
    return (
        f'{lead}{trace_id}","id":"{span_id}{kind}{s.start_us},'
        f'"duration":{int_text(s.duration_us)}'
        f"{request}{rid}{response}{parent}{tail}"
    )
