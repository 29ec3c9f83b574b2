"""Bootstrap (protobuf) to runtime Snapshot: the top level of the translator.

``translate_bootstrap`` walks the supported part of the Bootstrap, checks what spans several
resources (cluster references, duplicate names and addresses), and returns a Snapshot, or
raises ``ConfigErrors`` with every problem it found. Given the resources an ADS stream
delivered (``dynamic``), it builds the Snapshot from the bootstrap's static part plus those
(paths ``lds[name]``, ``rds[name]``, ``cds[name]``, ``eds[name]``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable
from typing import Any

from google.protobuf import json_format

from ubimesh.proxy.snapshot.types import Admin, Cluster, Listener, NodeInfo, Snapshot
from ubimesh.proxy.xds import common, dynamic, extensions, tls
from ubimesh.proxy.xds.cluster import cluster as translate_cluster
from ubimesh.proxy.xds.context import Ctx, item, join
from ubimesh.proxy.xds.errors import ConfigError, ConfigErrors
from ubimesh.proxy.xds.listener import listener as translate_listener

_NOT_YET = "not implemented yet"

_BOOTSTRAP = {"node", "static_resources", "admin", "dynamic_resources"}
_BOOTSTRAP_HINTS = {
    "layered_runtime": "ubimesh has no runtime",
    "stats_sinks": "stats sinks are " + _NOT_YET + "; scrape /stats/prometheus",
    "stats_config": "stats tag configuration is " + _NOT_YET,
    "tracing": "the bootstrap's tracing provider (deprecated in Envoy) is not used; set "
    "tracing.provider in each HttpConnectionManager",
    "overload_manager": "the overload manager is " + _NOT_YET,
    "cluster_manager": "cluster manager options are " + _NOT_YET,
}
_STATIC_RESOURCES = {"listeners", "clusters", "secrets"}
_NODE = {"id", "cluster", "metadata"}
_NODE_STATIC = {"id", "cluster"}
_NODE_HINTS = {
    "metadata": "node metadata is sent to the control plane: it needs "
    "dynamic_resources.ads_config",
    "locality": "node locality is " + _NOT_YET,
}
_ADMIN = {"address", "access_log_path", "access_log"}
_ACCESS_LOG = {"name", "typed_config"}
_ACCESS_LOG_HINTS = {"filter": "the admin access log takes no filter (it logs every request)"}
_FILE_ACCESS_LOG = {"path"}
_FILE_ACCESS_LOG_HINTS = {
    name: "the admin access log format is fixed"
    for name in ("format", "json_format", "typed_json_format", "log_format")
}


def translate_bootstrap(
    bootstrap: Any,
    source: dict[str, Any] | None = None,
    *,
    service_node: str | None = None,
    service_cluster: str | None = None,
    quiet: Iterable[str] = (),
    errors: Iterable[ConfigError] = (),
    source_name: str = "",
    ctx: Ctx | None = None,
    dynamic_resources: dynamic.Resources | None = None,
) -> Snapshot:
    """Translate an ``envoy.config.bootstrap.v3.Bootstrap`` into a Snapshot.

    ``source`` is the raw config as a plain dict (kept in ``Snapshot.source``); without it, the
    proto's JSON form is kept. ``service_node``/``service_cluster`` override ``node.id`` and
    ``node.cluster`` like Envoy's --service-node/--service-cluster. ``errors`` are problems
    already found while parsing (reported together with the translator's) and ``quiet`` the
    paths they were about. ``ctx``, for tools, is the context to translate in (its
    ``whitelists`` then tell which fields were supported where). ``dynamic_resources`` are the
    resources an ADS stream delivered; without them a bootstrap with ``dynamic_resources`` gives
    its static part alone (RDS and EDS references checked, not resolved). Raises
    ``ConfigErrors`` (every error found) when the config is not valid for ubimesh.
    """
    if ctx is None:
        ctx = Ctx()
    ctx.quiet = ctx.quiet | frozenset(quiet)
    ctx.fields(bootstrap, "", _BOOTSTRAP, _BOOTSTRAP_HINTS)
    if bootstrap.HasField("dynamic_resources"):
        dynamic.ads_settings(ctx, bootstrap.dynamic_resources, "dynamic_resources")
    elif dynamic_resources is not None:
        ctx.error("dynamic_resources", "is required to take resources from an ADS stream")
    ctx.dynamic = dynamic_resources

    node = NodeInfo()
    if bootstrap.HasField("node"):
        # The metadata is for the control plane: without an ADS stream nothing would read it.
        with_ads = ctx.ads_cluster is not None
        ctx.fields(bootstrap.node, "node", _NODE if with_ads else _NODE_STATIC, _NODE_HINTS)
        node = NodeInfo(bootstrap.node.id, bootstrap.node.cluster)
    if service_node is not None or service_cluster is not None:
        node = NodeInfo(
            service_node if service_node is not None else node.id,
            service_cluster if service_cluster is not None else node.cluster,
        )

    listener_msgs: list[tuple[str, Any]] = []
    cluster_msgs: list[tuple[str, Any]] = []
    if bootstrap.HasField("static_resources"):
        static = bootstrap.static_resources
        ctx.fields(static, "static_resources", _STATIC_RESOURCES)
        ctx.static_secrets = tls.static_secrets(
            ctx, static.secrets, "static_resources.secrets"
        )
        listener_msgs = _indexed(static.listeners, "static_resources.listeners")
        cluster_msgs = _indexed(static.clusters, "static_resources.clusters")
    n_static_clusters = len(cluster_msgs)
    if dynamic_resources is not None:
        listener_msgs += _delivered(ctx, dynamic_resources, dynamic.LISTENER_TYPE)
        cluster_msgs += _delivered(ctx, dynamic_resources, dynamic.CLUSTER_TYPE)
    clusters = _clusters(ctx, cluster_msgs)
    listeners = _listeners(ctx, listener_msgs)

    admin = _admin(ctx, bootstrap.admin, "admin") if bootstrap.HasField("admin") else None

    for ref in ctx.cluster_refs:
        if ref.name and ref.checked and ref.name not in clusters:
            ctx.error(ref.path, f"{ref.what}: unknown cluster {ref.name!r}")
        h2path = ctx.http2_clusters.get(ref.name)
        if h2path is not None:
            ctx.unsupported(
                h2path,
                "HTTP/2 upstreams are " + _NOT_YET + f": {ref.path} sends traffic to "
                f"{ref.name!r}, so it cannot use HTTP/2; http2_protocol_options is accepted "
                "only on a cluster used solely as the ADS cluster",
            )
    if ctx.ads_cluster:
        _check_ads_cluster(ctx, ctx.ads_cluster, cluster_msgs[:n_static_clusters], clusters)

    # A parse error inside a field that is refused anyway (say, an unknown field inside a
    # retry_policy) adds nothing to the refusal.
    found = [e for e in errors if not ctx.is_refused(e.path)] + ctx.errors
    if found:
        raise ConfigErrors(found, source=source_name)

    canonical = json_format.MessageToDict(bootstrap, preserving_proto_field_name=True)
    versioned: dict[str, Any] = canonical
    if dynamic_resources is not None:
        xds = dict(sorted(dynamic_resources.versions.items()))
        versioned = {"bootstrap": canonical, "xds": xds}
    return Snapshot(
        version=config_version(versioned),
        node=node,
        listeners=tuple(listeners),
        clusters=clusters,
        admin=admin,
        source=source if source is not None else canonical,
        secrets={**ctx.static_secrets, **ctx.sds_secrets},
    )


def config_version(canonical: dict[str, Any]) -> str:
    """A short, stable hash of a config's canonical JSON (sorted keys, proto field names)."""
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _indexed(msgs: Any, path: str) -> list[tuple[str, Any]]:
    """(path, message) for each message of a repeated field."""
    return [(item(path, i), msg) for i, msg in enumerate(msgs)]


def _delivered(ctx: Ctx, resources: dynamic.Resources, type_url: str) -> list[tuple[str, Any]]:
    """(path, message) for each delivered resource of ``type_url``, by name; a resource must
    carry the name it was delivered under."""
    out = []
    for name, msg in sorted(resources.of(type_url).items()):
        path = dynamic.resource_path(type_url, name)
        if msg.name != name:
            ctx.error(join(path, "name"), f"{msg.name!r} differs from the resource name {name!r}")
        out.append((path, msg))
    return out


def _check_ads_cluster(
    ctx: Ctx, name: str, static: list[tuple[str, Any]], clusters: dict[str, Cluster]
) -> None:
    """The ADS cluster must be a static cluster with a fixed address or a DNS name."""
    where = "dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name"
    found = [(path, msg) for path, msg in static if msg.name == name]
    if not found:
        ctx.error(where, f"unknown cluster {name!r}: it must be a cluster of static_resources")
        return
    path, _msg = found[0]
    cluster = clusters.get(name)
    if cluster is None:
        return
    if cluster.type.name not in ("STATIC", "STRICT_DNS", "LOGICAL_DNS"):
        ctx.error(
            join(path, "type"),
            f"the ADS cluster {name!r} must be STATIC, STRICT_DNS or LOGICAL_DNS, "
            f"not {cluster.type.name}",
        )
    elif cluster.transport_socket is not None:
        ctx.unsupported(
            join(path, "transport_socket"),
            f"TLS to the control plane is {_NOT_YET}: the ADS cluster {name!r} is plaintext",
        )
    elif not any(le.endpoints for le in cluster.endpoints):
        ctx.error(
            join(path, "load_assignment"),
            f"the ADS cluster {name!r} needs an endpoint (the xDS server's address)",
        )


def _listeners(ctx: Ctx, msgs: list[tuple[str, Any]]) -> list[Listener]:
    out: list[Listener] = []
    names: dict[str, str] = {}
    addresses: dict[tuple[str, int], str] = {}
    for lpath, msg in msgs:
        translated = translate_listener(ctx, msg, lpath)
        if msg.name:
            if msg.name in names:
                ctx.error(
                    join(lpath, "name"),
                    f"duplicate listener name {msg.name!r} (also at {names[msg.name]})",
                )
            names.setdefault(msg.name, lpath)
        address = translated.address
        if address.port != 0 and address.host:
            key = (_normal_ip(address.host), address.port)
            if key in addresses:
                ctx.error(
                    join(lpath, "address"),
                    f"listener {translated.name!r} has duplicate "
                    f"address {address} as the listener at {addresses[key]}",
                )
            addresses.setdefault(key, lpath)
        out.append(translated)
    return out


def _normal_ip(host: str) -> str:
    return str(ipaddress.ip_address(host)) if common.is_ip(host) else host


def _clusters(ctx: Ctx, msgs: list[tuple[str, Any]]) -> dict[str, Cluster]:
    out: dict[str, Cluster] = {}
    where: dict[str, str] = {}
    for cpath, msg in msgs:
        translated = translate_cluster(ctx, msg, cpath)
        if msg.name in out:
            ctx.error(
                join(cpath, "name"), f"duplicate cluster {msg.name!r} (also at {where[msg.name]})"
            )
            continue
        out[msg.name] = translated
        where[msg.name] = cpath
    return out


def _admin(ctx: Ctx, msg: Any, path: str) -> Admin | None:
    """Bootstrap.admin. ubimesh keeps one admin access log path: from access_log_path or from a
    single file access logger."""
    ctx.fields(msg, path, _ADMIN)
    log_paths: list[tuple[str, str]] = []
    if msg.access_log_path:
        log_paths.append((msg.access_log_path, join(path, "access_log_path")))
    logs_path = join(path, "access_log")
    for i, log in enumerate(msg.access_log):
        lpath = item(logs_path, i)
        ctx.fields(log, lpath, _ACCESS_LOG, _ACCESS_LOG_HINTS)
        tpath = join(lpath, "typed_config")
        if not log.HasField("typed_config"):
            ctx.error(tpath, "is required")
            continue
        config = extensions.unpack(
            ctx, log.typed_config, tpath, extensions.ACCESS_LOGGERS, "as an admin access log"
        )
        if config is None:
            continue
        ctx.fields(config, tpath, _FILE_ACCESS_LOG, _FILE_ACCESS_LOG_HINTS)
        log_paths.append((config.path, tpath))
    if len(log_paths) > 1:
        ctx.unsupported(log_paths[1][1], "more than one admin access log")
    if not msg.HasField("address"):
        if log_paths:
            ctx.error(join(path, "address"), "is required with an admin access log")
        return None
    address = common.socket_address(
        ctx, msg.address, join(path, "address"), ip_only="the admin interface binds an IP address"
    )
    return Admin(address, log_paths[0][0] if log_paths else "")
