"""envoy.config.listener.v3: Listener, FilterChain, FilterChainMatch, listener filters."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from ubimesh.proxy.snapshot.types import (
    FilterChain,
    FilterChainMatch,
    HttpConnectionManagerConfig,
    Listener,
    SocketAddress,
    TcpProxyConfig,
    TelemetryMeta,
)
from ubimesh.proxy.xds import common, extensions, tls
from ubimesh.proxy.xds.access_log import access_logs
from ubimesh.proxy.xds.context import Ctx, entry, item, join, wrapped
from ubimesh.proxy.xds.filters import network_filters
from ubimesh.proxy.xds.tracing import with_direction

_NOT_YET = "not implemented yet"

_LISTENER = {
    "name",
    "address",
    "filter_chains",
    "default_filter_chain",
    "per_connection_buffer_limit_bytes",
    "listener_filters",
    "metadata",
    "access_log",
    "traffic_direction",
}
_LISTENER_HINTS = {
    "additional_addresses": "one address per listener; add another listener",
    "use_original_dst": "original destination is " + _NOT_YET,
    "filter_chain_matcher": "use filter_chain_match on each filter chain",
    "socket_options": "socket options are " + _NOT_YET,
    "transparent": "transparent proxying is " + _NOT_YET,
    "api_listener": "API listeners are not implemented",
    "udp_listener_config": "UDP is not implemented",
}
_FILTER_CHAIN = {
    "name",
    "filter_chain_match",
    "filters",
    "transport_socket",
    "transport_socket_connect_timeout",
}
_FILTER_CHAIN_MATCH = {
    "destination_port",
    "server_names",
    "transport_protocol",
    "application_protocols",
}
_FILTER_CHAIN_MATCH_HINTS = {
    "prefix_ranges": "matching on the destination IP is " + _NOT_YET,
    "source_prefix_ranges": "matching on the source IP is " + _NOT_YET,
    "direct_source_prefix_ranges": "matching on the source IP is " + _NOT_YET,
    "source_type": "matching on the source type is " + _NOT_YET,
    "source_ports": "matching on the source port is " + _NOT_YET,
}
_LISTENER_FILTER = {"name", "typed_config"}
_LISTENER_FILTER_HINTS = {
    "config_discovery": "filter config discovery (ECDS) is " + _NOT_YET,
    "filter_disabled": "conditionally disabled listener filters are " + _NOT_YET,
}
_TLS_INSPECTOR_HINT = "TLS inspector options are " + _NOT_YET

_LISTENER_IP_ONLY = "a listener binds an IP address"

_METADATA = {"filter_metadata"}
_METADATA_HINTS = {"typed_filter_metadata": "use filter_metadata"}
#: ubimesh's own listener metadata namespace: Envoy ignores it, so the same listener runs on both.
RBAC_METADATA = "ubimesh.rbac"
_DENIAL_HEADER_MODES = ("internal", "always", "never")
#: ubimesh's mesh telemetry namespace, on listeners and clusters (docs/telemetry.md "Metrics").
TELEMETRY_METADATA = "ubimesh.telemetry"
_REPORTERS = ("source", "destination")
_TELEMETRY_KEYS = ("workload", "namespace", "principal", "app", "version", "cluster",
                   "service", "service_name", "service_namespace")  # fmt: skip


def listener(ctx: Ctx, msg: Any, path: str) -> Listener:
    """envoy.config.listener.v3.Listener. A listener without a name is named after its address
    (Envoy makes up a UUID)."""
    ctx.fields(msg, path, _LISTENER, _LISTENER_HINTS)
    apath = join(path, "address")
    if msg.HasField("address"):
        address = common.socket_address(ctx, msg.address, apath, ip_only=_LISTENER_IP_ONLY)
    else:
        ctx.error(apath, "is required")
        address = SocketAddress("", 0)

    inspector = False
    lf_path = join(path, "listener_filters")
    for i, lf in enumerate(msg.listener_filters):
        inspector |= _listener_filter(ctx, lf, item(lf_path, i))

    chains_path = join(path, "filter_chains")
    chains = tuple(
        filter_chain(ctx, fc, item(chains_path, i)) for i, fc in enumerate(msg.filter_chains)
    )
    _check_overlaps(ctx, chains, chains_path)
    # traffic_direction only tells tracing whether the HCM's spans are egress (OUTBOUND).
    outbound = msg.traffic_direction == 2
    chains = with_direction(chains, outbound)
    default = None
    if msg.HasField("default_filter_chain"):
        dpath = join(path, "default_filter_chain")
        if msg.default_filter_chain.HasField("filter_chain_match"):
            ctx.error(
                join(dpath, "filter_chain_match"),
                "the default filter chain takes every "
                "connection that no other chain matches; Envoy ignores its "
                "filter_chain_match, remove it",
            )
        default = with_direction((filter_chain(ctx, msg.default_filter_chain, dpath),), outbound)[0]
    if not chains and default is None:
        ctx.error(
            chains_path, "no filter chains specified (set filter_chains or default_filter_chain)"
        )

    denial_header = "internal"
    if msg.HasField("metadata"):
        denial_header = _rbac_metadata(ctx, msg.metadata, join(path, "metadata"))
        meta = msg.metadata.filter_metadata
        if TELEMETRY_METADATA in meta:
            mpath = entry(join(join(path, "metadata"), "filter_metadata"), TELEMETRY_METADATA)
            telemetry = telemetry_metadata(ctx, meta[TELEMETRY_METADATA], mpath, listener=True)
            chains = tuple(_with_telemetry(c, telemetry) for c in chains)
            if default is not None:
                default = _with_telemetry(default, telemetry)

    needs_inspector = inspector or any(
        _needs_inspection(chain.match) for chain in (*chains, *([default] if default else []))
    )
    return Listener(
        name=msg.name or str(address),
        address=address,
        filter_chains=chains,
        default_filter_chain=default,
        per_connection_buffer_limit_bytes=wrapped(
            msg, "per_connection_buffer_limit_bytes", 1024 * 1024
        ),
        needs_tls_inspector=needs_inspector,
        rbac_denial_header=denial_header,
        access_log=access_logs(ctx, msg.access_log, join(path, "access_log")),
    )


def _rbac_metadata(ctx: Ctx, msg: Any, path: str) -> str:
    """Listener.metadata: other namespaces are accepted and ignored, as Envoy does;
    ``ubimesh.rbac`` may hold ``denial_header`` (who gets x-ubimesh-denied-by on an RBAC
    denial), which is validated. Returns that mode ("internal" by default)."""
    ctx.fields(msg, path, _METADATA, _METADATA_HINTS)
    if RBAC_METADATA not in msg.filter_metadata:
        return "internal"
    npath = entry(join(path, "filter_metadata"), RBAC_METADATA)
    mode = "internal"
    for key, value in msg.filter_metadata[RBAC_METADATA].fields.items():
        kpath = entry(npath, key)
        if key != "denial_header":
            ctx.error(
                kpath, f"unknown key {key!r} (the {RBAC_METADATA} namespace has denial_header)"
            )
            continue
        text = value.string_value if value.WhichOneof("kind") == "string_value" else None
        if text not in _DENIAL_HEADER_MODES:
            ctx.error(kpath, f"must be one of {', '.join(_DENIAL_HEADER_MODES)}")
            continue
        mode = text
    return mode


def telemetry_metadata(ctx: Ctx, struct: Any, path: str, *, listener: bool) -> TelemetryMeta:
    """``filter_metadata["ubimesh.telemetry"]`` (a Struct of strings) of a listener or a
    cluster. On a listener ``reporter`` ("source" or "destination") is required and ``peers``
    (SPIFFE ID -> workload name) is allowed; a cluster has neither. Any other key, or a value
    that is not a string, is an error naming its path."""
    values: dict[str, str] = {}
    peers: list[tuple[str, str]] = []
    allowed = (*_TELEMETRY_KEYS, "reporter", "peers") if listener else _TELEMETRY_KEYS
    for key, value in struct.fields.items():
        kpath = entry(path, key)
        if key not in allowed:
            where = "listener" if listener else "cluster"
            ctx.error(
                kpath,
                f"unknown key {key!r} (a {where}'s {TELEMETRY_METADATA} has {', '.join(allowed)})",
            )
            continue
        kind = value.WhichOneof("kind")
        if key == "peers":
            if kind != "struct_value":
                ctx.error(kpath, "must be a struct of SPIFFE ID -> workload name")
                continue
            for peer, name in value.struct_value.fields.items():
                if name.WhichOneof("kind") != "string_value":
                    ctx.error(entry(kpath, peer), "must be a string (a workload name)")
                    continue
                peers.append((peer, name.string_value))
            continue
        if kind != "string_value":
            ctx.error(kpath, "must be a string")
            continue
        values[key] = value.string_value
    reporter = values.pop("reporter", "")
    if listener and reporter not in _REPORTERS:
        ctx.error(
            entry(path, "reporter"),
            f"is required: {' or '.join(_REPORTERS)} (who reports the mesh metrics)",
        )
    return TelemetryMeta(reporter=reporter, peers=tuple(sorted(peers)), **values)


def _with_telemetry(chain: FilterChain, telemetry: TelemetryMeta) -> FilterChain:
    """``chain`` with the listener's telemetry metadata on its terminal filter, whose runtime
    counts the mesh metrics."""
    if not chain.filters:
        return chain
    terminal = chain.filters[-1]
    if not isinstance(terminal, HttpConnectionManagerConfig | TcpProxyConfig):
        return chain
    terminal = dataclasses.replace(terminal, mesh_telemetry=telemetry)
    return dataclasses.replace(chain, filters=(*chain.filters[:-1], terminal))


def _needs_inspection(match: FilterChainMatch) -> bool:
    """Whether matching needs the TLS ClientHello: SNI, ALPN, or telling TLS from plaintext."""
    return bool(match.server_names or match.application_protocols or match.transport_protocol)


def _listener_filter(ctx: Ctx, msg: Any, path: str) -> bool:
    """One listener filter; returns whether it is the TLS inspector."""
    ctx.fields(msg, path, _LISTENER_FILTER, _LISTENER_FILTER_HINTS)
    tpath = join(path, "typed_config")
    if not msg.HasField("typed_config"):
        ctx.error(tpath, f"is required (no typed_config for listener filter {msg.name!r})")
        return False
    config = extensions.unpack(
        ctx, msg.typed_config, tpath, extensions.LISTENER_FILTERS, "as a listener filter"
    )
    if config is None:
        return False
    ctx.fields(config, tpath, (), default_hint=_TLS_INSPECTOR_HINT)
    return True


def filter_chain(ctx: Ctx, msg: Any, path: str) -> FilterChain:
    ctx.fields(msg, path, _FILTER_CHAIN)
    match = FilterChainMatch()
    if msg.HasField("filter_chain_match"):
        match = filter_chain_match(ctx, msg.filter_chain_match, join(path, "filter_chain_match"))
    filters = network_filters(ctx, msg.filters, join(path, "filters"))
    context = None
    if msg.HasField("transport_socket"):
        context = tls.transport_socket(
            ctx, msg.transport_socket, join(path, "transport_socket"), server=True
        )
    elif msg.HasField("transport_socket_connect_timeout"):
        ctx.error(
            join(path, "transport_socket_connect_timeout"),
            "has no effect without a transport_socket (TLS)",
        )
    if context is not None and match.transport_protocol == "raw_buffer":
        ctx.error(
            join(join(path, "filter_chain_match"), "transport_protocol"),
            "raw_buffer (plaintext) cannot match a chain with a TLS transport_socket; use tls",
        )
    return FilterChain(
        name=msg.name,
        match=match,
        filters=filters,
        transport_socket=context,
        transport_socket_connect_timeout=tls.handshake_timeout(msg),
    )


def filter_chain_match(ctx: Ctx, msg: Any, path: str) -> FilterChainMatch:
    ctx.fields(msg, path, _FILTER_CHAIN_MATCH, _FILTER_CHAIN_MATCH_HINTS)
    names_path = join(path, "server_names")
    names = []
    for i, name in enumerate(msg.server_names):
        lowered = name.lower()
        if "*" in lowered and not lowered.startswith("*."):
            ctx.error(
                item(names_path, i),
                f"partial wildcards are not supported in server_names: "
                f"{name!r} (a wildcard is a leading '*.')",
            )
        names.append(lowered)
    return FilterChainMatch(
        destination_port=wrapped(msg, "destination_port", None),
        server_names=tuple(names),
        transport_protocol=msg.transport_protocol,
        application_protocols=tuple(msg.application_protocols),
    )


def _check_overlaps(ctx: Ctx, chains: tuple[FilterChain, ...], path: str) -> None:
    """Envoy refuses two filter chains that a connection could match equally well: a chain
    matches a set of (destination port, server name, transport protocol, application protocol)
    combinations, and no combination may belong to two chains."""
    owner: dict[tuple[Any, ...], int] = {}
    for i, chain in enumerate(chains):
        m = chain.match
        combos = itertools.product(
            (m.destination_port,),
            m.server_names or (None,),
            (m.transport_protocol or None,),
            m.application_protocols or (None,),
        )
        clash = None
        for combo in combos:
            previous = owner.setdefault(combo, i)
            if previous != i and clash is None:
                clash = previous
        if clash is not None:
            ctx.error(
                join(item(path, i), "filter_chain_match"),
                "multiple filter chains with "
                f"the same or overlapping matching rules: {item(path, clash)} matches the "
                "same connections",
            )
