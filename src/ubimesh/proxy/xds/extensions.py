"""The typed-config extensions ubimesh implements, and unpacking of ``typed_config`` Anys.

Importing this module registers every supported extension's message type in protobuf's default
descriptor pool, which ``json_format.ParseDict`` needs to parse an ``Any`` with that ``@type``.
A type that is not registered is one ubimesh does not implement.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import (
    previous_priorities_config_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import symbol_database

from ubimesh.proxy.xds.context import Ctx

Bootstrap = bootstrap_pb2.Bootstrap
HttpConnectionManager = http_connection_manager_pb2.HttpConnectionManager
TcpProxy = tcp_proxy_pb2.TcpProxy
Router = router_pb2.Router
HttpRbac = http_rbac_pb2.RBAC
HttpFault = fault_pb2.HTTPFault
LocalRateLimit = local_rate_limit_pb2.LocalRateLimit
NetworkRbac = network_rbac_pb2.RBAC
TlsInspector = tls_inspector_pb2.TlsInspector
UpstreamHttpProtocolOptions = http_protocol_options_pb2.HttpProtocolOptions
FileAccessLog = file_pb2.FileAccessLog
DownstreamTlsContext = tls_pb2.DownstreamTlsContext
UpstreamTlsContext = tls_pb2.UpstreamTlsContext

TYPE_URL_PREFIX = "type.googleapis.com/"

HCM_TYPE = HttpConnectionManager.DESCRIPTOR.full_name
TCP_PROXY_TYPE = TcpProxy.DESCRIPTOR.full_name
ROUTER_TYPE = Router.DESCRIPTOR.full_name
HTTP_RBAC_TYPE = HttpRbac.DESCRIPTOR.full_name
HTTP_FAULT_TYPE = HttpFault.DESCRIPTOR.full_name
LOCAL_RATELIMIT_TYPE = LocalRateLimit.DESCRIPTOR.full_name
NETWORK_RBAC_TYPE = NetworkRbac.DESCRIPTOR.full_name
TLS_INSPECTOR_TYPE = TlsInspector.DESCRIPTOR.full_name
UPSTREAM_HTTP_OPTIONS_TYPE = UpstreamHttpProtocolOptions.DESCRIPTOR.full_name
FILE_ACCESS_LOG_TYPE = FileAccessLog.DESCRIPTOR.full_name
DOWNSTREAM_TLS_TYPE = DownstreamTlsContext.DESCRIPTOR.full_name
UPSTREAM_TLS_TYPE = UpstreamTlsContext.DESCRIPTOR.full_name

#: Message types (by full name) that may appear in a typed_config, per place.
NETWORK_FILTERS: Mapping[str, Any] = {
    HCM_TYPE: HttpConnectionManager,
    TCP_PROXY_TYPE: TcpProxy,
    NETWORK_RBAC_TYPE: NetworkRbac,
}
#: The network filters that end a chain (the others go before them).
TERMINAL_NETWORK_FILTERS = frozenset({HCM_TYPE, TCP_PROXY_TYPE})
HTTP_FILTERS: Mapping[str, Any] = {
    ROUTER_TYPE: Router,
    HTTP_RBAC_TYPE: HttpRbac,
    HTTP_FAULT_TYPE: HttpFault,
    LOCAL_RATELIMIT_TYPE: LocalRateLimit,
}
LISTENER_FILTERS: Mapping[str, Any] = {TLS_INSPECTOR_TYPE: TlsInspector}
ACCESS_LOGGERS: Mapping[str, Any] = {FILE_ACCESS_LOG_TYPE: FileAccessLog}
DOWNSTREAM_TRANSPORT_SOCKETS: Mapping[str, Any] = {DOWNSTREAM_TLS_TYPE: DownstreamTlsContext}
UPSTREAM_TRANSPORT_SOCKETS: Mapping[str, Any] = {UPSTREAM_TLS_TYPE: UpstreamTlsContext}
CLUSTER_PROTOCOL_OPTIONS: Mapping[str, Any] = {
    UPSTREAM_HTTP_OPTIONS_TYPE: UpstreamHttpProtocolOptions
}
PreviousHostsPredicate = previous_hosts_pb2.PreviousHostsPredicate
#: Route retry policies' retry_host_predicate types (the router's previous_hosts).
RETRY_HOST_PREDICATES: Mapping[str, Any] = {
    PreviousHostsPredicate.DESCRIPTOR.full_name: PreviousHostsPredicate
}
PreviousPrioritiesConfig = previous_priorities_config_pb2.PreviousPrioritiesConfig
#: Route retry policies' retry_priority types (the router's previous_priorities).
RETRY_PRIORITIES: Mapping[str, Any] = {
    PreviousPrioritiesConfig.DESCRIPTOR.full_name: PreviousPrioritiesConfig
}


def type_name(type_url: str) -> str:
    """The message's full name from a type URL (the part after the last "/")."""
    return type_url.rsplit("/", 1)[-1]


def is_registered(type_url: str) -> bool:
    """Whether the descriptor pool knows the message type of ``type_url``."""
    try:
        symbol_database.Default().pool.FindMessageTypeByName(type_name(type_url))
    except KeyError:
        return False
    return True


def unpack(ctx: Ctx, msg: Any, path: str, handlers: Mapping[str, Any], place: str) -> Any | None:
    """Unpack the Any ``msg`` if its type is one of ``handlers``; otherwise report the type as
    not supported in ``place`` (e.g. "as an HTTP filter") and return None."""
    name = type_name(msg.type_url)
    cls = handlers.get(name)
    if cls is None:
        supported = ", ".join(sorted(handlers))
        ctx.unsupported(path, f"type {name or '(none)'} {place}; supported: {supported}")
        return None
    out = cls()
    if not msg.Unpack(out):  # pragma: no cover - the type was checked above
        ctx.error(path, f"cannot unpack {name}")
        return None
    return out
