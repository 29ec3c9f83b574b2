"""Dynamic resources: the ADS part of a bootstrap, and the resources an ADS stream delivers.

``ads_settings`` checks ``Bootstrap.dynamic_resources`` (one aggregated gRPC stream, to a static
cluster, for LDS and CDS) and ``config_source`` checks the ``ConfigSource`` that an HCM's
``rds`` and a cluster's ``eds_cluster_config`` carry: always ``{ads: {}}``, the proxy's one
stream. ``Resources`` holds what the stream delivered, by type URL and resource name;
``translate.translate_dynamic`` builds one Snapshot from the bootstrap plus a ``Resources``.
Errors inside a delivered resource carry paths like ``lds[listener_name].filter_chains[0]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ubimesh.proxy.xds.context import Ctx, item, join

_NOT_YET = "not implemented yet"

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
#: The types an ADS client subscribes to, in make-before-break order (secrets before the
#: listeners whose TLS contexts name them).
TYPE_URLS = (CLUSTER_TYPE, ENDPOINT_TYPE, SECRET_TYPE, LISTENER_TYPE, ROUTE_TYPE)
#: Type URL -> the short name used in error paths (``lds[name]...``) and logs.
SHORT_NAMES = {
    LISTENER_TYPE: "lds",
    ROUTE_TYPE: "rds",
    CLUSTER_TYPE: "cds",
    ENDPOINT_TYPE: "eds",
    SECRET_TYPE: "sds",
}
#: The SDS secret of the proxy's own certificate and key: never asked of the control plane,
#: made by the ADS child itself (docs/identity.md) and put among the secrets it translates.
LOCAL_CERTIFICATE = "default"


def resource_path(type_url: str, name: str) -> str:
    """The error path of a delivered resource: ``lds[name]``, ``cds[name]``, ..."""
    return f"{SHORT_NAMES[type_url]}[{name}]"


@dataclass
class Resources:
    """The resources an ADS stream delivered: type URL -> resource name -> protobuf message,
    and the version of each type (``version_info`` of its last accepted response).

    Secrets (``SECRET_TYPE``) are those delivered over ADS (``ROOTCA``) plus, when the proxy has
    its own identity, the local ``default`` (see :func:`certificate_secret`); SDS references
    with ``sds_config: {ads: {}}`` resolve against them.
    """

    by_type: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {t: {} for t in TYPE_URLS}
    )
    versions: dict[str, str] = field(default_factory=dict)

    def of(self, type_url: str) -> dict[str, Any]:
        return self.by_type.setdefault(type_url, {})

    def copy(self) -> Resources:
        return Resources({t: dict(v) for t, v in self.by_type.items()}, dict(self.versions))


# ---------------------------------------------------------------------------------------------
# Bootstrap.dynamic_resources

_DYNAMIC_RESOURCES = {"ads_config", "lds_config", "cds_config"}
_DYNAMIC_RESOURCES_HINTS = {
    "lds_resources_locator": "xDS-TP resource locators are " + _NOT_YET,
    "cds_resources_locator": "xDS-TP resource locators are " + _NOT_YET,
}
_API_CONFIG_SOURCE = {"api_type", "transport_api_version", "grpc_services"}
_API_CONFIG_SOURCE_HINTS = {
    "cluster_names": "cluster_names is for REST; use grpc_services with envoy_grpc",
    "refresh_delay": "refresh_delay is for REST",
    "request_timeout": "request_timeout is for REST",
    "rate_limit_settings": "xDS rate limiting is " + _NOT_YET,
    "set_node_on_first_message_only": "the node is sent on the first message of each stream",
    "config_validators": "config validators are " + _NOT_YET,
}
_GRPC_SERVICE = {"envoy_grpc"}
_GRPC_SERVICE_HINTS = {
    "google_grpc": "use envoy_grpc with cluster_name naming a static cluster",
    "timeout": "per-call timeouts do not apply to the ADS stream",
    "initial_metadata": "gRPC initial metadata is " + _NOT_YET,
    "retry_policy": "the ADS stream reconnects with exponential backoff (0.25 s to 10 s)",
}
_ENVOY_GRPC = {"cluster_name"}
_ENVOY_GRPC_HINTS = {
    "authority": "the :authority is the cluster's endpoint",
    "retry_policy": "the ADS stream reconnects with exponential backoff (0.25 s to 10 s)",
    "max_receive_message_length": "the limit is fixed (64 MiB)",
    "skip_envoy_headers": "no x-envoy headers are sent on the ADS stream",
}
_CONFIG_SOURCE = {"ads", "resource_api_version"}
_CONFIG_SOURCE_HINT = (
    "only ads: {} is supported: every resource comes over the proxy's one ADS stream"
)
_CONFIG_SOURCE_HINTS = {
    "initial_fetch_timeout": "the proxy waits for every resource before it applies a "
    "configuration",
    "authorities": "xDS-TP authorities are " + _NOT_YET,
}

#: ApiConfigSource.ApiType: GRPC = 2; the others, for the message.
_API_TYPES = {
    0: "DEPRECATED_AND_UNAVAILABLE_DO_NOT_USE",
    1: "REST",
    3: "DELTA_GRPC",
    5: "AGGREGATED_GRPC",
    6: "AGGREGATED_DELTA_GRPC",
}
_GRPC = 2
#: ApiVersion: AUTO (0) means V3 in Envoy 1.40; V2 (1) is gone.
_V2 = 1


def ads_settings(ctx: Ctx, msg: Any, path: str) -> str:
    """Bootstrap.dynamic_resources: returns the name of the static cluster the ADS stream goes
    to ("" after an error) and records it as ``ctx.ads_cluster``. ``lds_config`` and
    ``cds_config`` must be ``{ads: {}}``, so both come over that stream; with neither the proxy
    would have no dynamic listeners or clusters, which is refused as a likely mistake."""
    ctx.fields(msg, path, _DYNAMIC_RESOURCES, _DYNAMIC_RESOURCES_HINTS)
    cluster = ""
    apath = join(path, "ads_config")
    if msg.HasField("ads_config"):
        cluster = _api_config_source(ctx, msg.ads_config, apath)
        ctx.ads_cluster = cluster
    else:
        ctx.unsupported(
            path,
            "dynamic resources without ads_config; ubimesh takes them over ADS only: set "
            "ads_config with api_type GRPC and grpc_services[0].envoy_grpc.cluster_name "
            "naming a static cluster",
        )
        return cluster
    for name in ("lds_config", "cds_config"):
        if msg.HasField(name):
            config_source(ctx, getattr(msg, name), join(path, name))
    if not msg.HasField("lds_config") and not msg.HasField("cds_config"):
        ctx.error(
            path, "set lds_config and/or cds_config to {ads: {}, resource_api_version: V3}"
        )
    return cluster


def _api_config_source(ctx: Ctx, msg: Any, path: str) -> str:
    ctx.fields(msg, path, _API_CONFIG_SOURCE, _API_CONFIG_SOURCE_HINTS)
    if msg.api_type != _GRPC:
        name = _API_TYPES.get(msg.api_type, str(msg.api_type))
        ctx.unsupported(
            join(path, "api_type"),
            f"api_type {name}; only GRPC (state-of-the-world ADS) is implemented",
        )
    _api_version(ctx, msg, "transport_api_version", path)
    services = msg.grpc_services
    spath = join(path, "grpc_services")
    if not services:
        ctx.error(spath, "is required: one envoy_grpc service naming a static cluster")
        return ""
    if len(services) > 1:
        ctx.unsupported(item(spath, 1), "more than one gRPC service; give exactly one")
    gpath = item(spath, 0)
    service = services[0]
    ctx.fields(service, gpath, _GRPC_SERVICE, _GRPC_SERVICE_HINTS)
    if not service.HasField("envoy_grpc"):
        if not service.HasField("google_grpc"):
            ctx.error(join(gpath, "envoy_grpc"), "is required")
        return ""
    epath = join(gpath, "envoy_grpc")
    ctx.fields(service.envoy_grpc, epath, _ENVOY_GRPC, _ENVOY_GRPC_HINTS)
    cluster: str = service.envoy_grpc.cluster_name
    if not cluster:
        ctx.error(join(epath, "cluster_name"), "is required: the static cluster of the xDS server")
    return cluster


def _api_version(ctx: Ctx, msg: Any, name: str, path: str) -> None:
    if getattr(msg, name) == _V2:
        ctx.error(join(path, name), "V2 is not supported (as in Envoy 1.40); use V3")


def config_source(ctx: Ctx, msg: Any, path: str) -> None:
    """A ConfigSource inside the configuration (LDS/CDS in the bootstrap, RDS in an HCM, EDS in
    a cluster): it must be ``{ads: {}}`` and the bootstrap must configure ADS."""
    ctx.fields(msg, path, _CONFIG_SOURCE, _CONFIG_SOURCE_HINTS, default_hint=_CONFIG_SOURCE_HINT)
    _api_version(ctx, msg, "resource_api_version", path)
    if not msg.HasField("ads"):
        if not ctx.is_refused(path) and not any(
            ctx.is_refused(join(path, fd.name)) for fd, _ in msg.ListFields()
        ):
            ctx.error(join(path, "ads"), "is required: " + _CONFIG_SOURCE_HINT)
        return
    ctx.fields(msg.ads, join(path, "ads"), ())
    if ctx.ads_cluster is None:
        ctx.error(
            join(path, "ads"),
            "needs an ADS stream: configure dynamic_resources.ads_config in the bootstrap",
        )


# ---------------------------------------------------------------------------------------------
# Local secrets


def certificate_secret(name: str, chain_pem: bytes, key_pem: bytes) -> Any:
    """An SDS ``Secret`` with ``tls_certificate``: the chain (leaf first) and the private key,
    both inline.  Held in memory only: never cached on disk, never sent to the control plane."""
    from envoy.config.core.v3 import base_pb2
    from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

    return secret_pb2.Secret(
        name=name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=chain_pem),
            private_key=base_pb2.DataSource(inline_bytes=key_pem),
        ),
    )
