"""Access logs on every proxy of the mesh (docs/telemetry.md, "Access logs"; Mesh
``spec.accessLog`` in docs/resources.md).

:func:`plan` reads the Mesh's ``spec.accessLog`` once per compile call: enabled by default,
written to ``/dev/stdout`` (``ubimesh up`` keeps each proxy's output in
``<data dir>/logs/proxy-<node>.log``), in ``text`` (an Istio-like line) or ``json``.
:func:`decorate` then gives one proxy's listeners their logs, in place:

- every HTTP connection manager and every TCP proxy: one line per request / connection;
- every listener where a connection can be refused before a terminal filter has it (an RBAC
  network filter, or filter chains that may match nothing): the listener access log, where
  ubimesh writes those refusals (Envoy writes every connection there).

Each line says which listener wrote it and who the proxy is (the workload's SPIFFE ID, or the
gateway), besides the peer's SPIFFE ID (%DOWNSTREAM_PEER_URI_SAN%) and the destination, so an
egress refusal shows both ends, and carries %RESPONSE_CODE_DETAILS% (an RBAC denial names its
policy: ``rbac_access_denied_matched_policy[<policy>]``), %CONNECTION_TERMINATION_DETAILS% (a
network denial) and %RESPONSE_FLAGS%.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.core.v3 import substitution_format_string_pb2 as sfs_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import any_pb2, struct_pb2

from ubimesh.control.compiler import envoy
from ubimesh.control.compiler.model import CompileError, Message
from ubimesh.control.resources.model import Resource

FILE_LOGGER = "envoy.access_loggers.file"
NETWORK_RBAC_FILTER = "envoy.filters.network.rbac"
DEFAULT_PATH = "/dev/stdout"
FORMATS = ("text", "json")

#: The HTTP line: Envoy's default format plus what explains a refusal, the upstream, both
#: addresses and the peer's identity (close to Istio's default format).
HTTP_TEXT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% "
    "%BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "
    '"%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" '
    '"%UPSTREAM_HOST%" %UPSTREAM_CLUSTER% %DOWNSTREAM_LOCAL_ADDRESS% '
    "%DOWNSTREAM_REMOTE_ADDRESS% peer=%DOWNSTREAM_PEER_URI_SAN% sni=%REQUESTED_SERVER_NAME% "
    "route=%ROUTE_NAME%"
)
#: The connection line (TCP proxy, listener): the HTTP fields would all be "-".
TCP_TEXT = (
    "[%START_TIME%] tcp %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% "
    "%CONNECTION_TERMINATION_DETAILS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
    '"%UPSTREAM_HOST%" %UPSTREAM_CLUSTER% %DOWNSTREAM_LOCAL_ADDRESS% '
    "%DOWNSTREAM_REMOTE_ADDRESS% peer=%DOWNSTREAM_PEER_URI_SAN% sni=%REQUESTED_SERVER_NAME%"
)
_HTTP_JSON = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "connection_termination_details": "%CONNECTION_TERMINATION_DETAILS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration": "%DURATION%",
    "upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "x_forwarded_for": "%REQ(X-FORWARDED-FOR)%",
    "user_agent": "%REQ(USER-AGENT)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "authority": "%REQ(:AUTHORITY)%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "downstream_local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "downstream_peer_uri_san": "%DOWNSTREAM_PEER_URI_SAN%",
    "requested_server_name": "%REQUESTED_SERVER_NAME%",
    "route_name": "%ROUTE_NAME%",
}
_TCP_JSON = {
    k: v
    for k, v in _HTTP_JSON.items()
    if k
    not in {
        "method", "path", "protocol", "response_code", "upstream_service_time",
        "x_forwarded_for", "user_agent", "request_id", "authority", "route_name",
    }
}  # fmt: skip


@dataclass(frozen=True)
class AccessLogPlan:
    """Where and how every proxy of one compile call logs."""

    path: str = DEFAULT_PATH
    format: str = "text"


#: What a mesh without ``spec.accessLog`` gets.
DEFAULT_PLAN = AccessLogPlan()


def plan(resources: Sequence[Resource]) -> AccessLogPlan | None:
    """The access logs of this compile call from the Mesh's ``spec.accessLog`` (absent fields
    at their defaults), or None when they are off. The Mesh is chosen as compiler/index.py
    does (the one named ``default``, else the first by name). Raises CompileError for a value
    validation would have refused (hand-made resources)."""
    meshes = sorted((r for r in resources if r.kind == "Mesh"), key=lambda r: r.name)
    mesh = next((m for m in meshes if m.name == "default"), meshes[0] if meshes else None)
    spec: Mapping[str, object] = (mesh.spec.get("accessLog") if mesh else None) or {}
    where = f"Mesh {mesh.name}: spec.accessLog" if mesh else "spec.accessLog"
    if spec.get("enabled", True) is False:
        return None
    path = str(spec.get("path") or DEFAULT_PATH)
    if not path.startswith("/"):
        raise CompileError(f"{where}.path is {path!r}; expected an absolute path")
    fmt = str(spec.get("format") or "text")
    if fmt not in FORMATS:
        raise CompileError(f"{where}.format is {fmt!r}; expected one of: text, json")
    return AccessLogPlan(path, fmt)


def _access_log(plan: AccessLogPlan, http: bool, tags: Mapping[str, str]) -> Message:
    """One file access log; ``tags`` (listener, proxy identity) are literal parts of a line."""
    if plan.format == "json":
        fields: dict[str, str] = dict(_HTTP_JSON if http else _TCP_JSON)
        fields.update(tags)
        struct = struct_pb2.Struct()
        struct.update(fields)
        log_format = sfs_pb2.SubstitutionFormatString(json_format=struct)
    else:
        text = (HTTP_TEXT if http else TCP_TEXT) + "".join(
            f" {k}={v.replace('%', '%%')}" for k, v in tags.items()
        )
        log_format = sfs_pb2.SubstitutionFormatString(
            text_format_source=base_pb2.DataSource(inline_string=text + "\n")
        )
    typed = any_pb2.Any()
    typed.Pack(file_pb2.FileAccessLog(path=plan.path, log_format=log_format))
    return accesslog_pb2.AccessLog(name=FILE_LOGGER, typed_config=typed)


def _refusals_possible(listener: Message) -> bool:
    """Whether a connection may be refused before a terminal filter has it: an RBAC network
    filter, or filter chains that can all fail to match (no default chain)."""
    for chain in listener.filter_chains:
        if any(f.name == NETWORK_RBAC_FILTER for f in chain.filters):
            return True
    if listener.HasField("default_filter_chain"):
        return False
    return all(chain.HasField("filter_chain_match") for chain in listener.filter_chains)


def decorate(plan: AccessLogPlan | None, listeners: Mapping[str, Message], proxy: str) -> None:
    """Give every listener of one proxy (``proxy``: its identity, for the lines) its access
    logs (see the module docstring); nothing when ``plan`` is None."""
    if plan is None:
        return
    hcm = hcm_pb2.HttpConnectionManager()
    tcp = tcp_proxy_pb2.TcpProxy()
    for name, listener in listeners.items():
        tags = {"listener": name, "proxy": proxy}
        for chain in listener.filter_chains:
            for flt in chain.filters:
                if flt.name == envoy.HCM_FILTER:
                    message, http = hcm, True
                elif flt.name == envoy.TCP_PROXY_FILTER:
                    message, http = tcp, False
                else:
                    continue
                if not flt.typed_config.Unpack(message):
                    raise CompileError(
                        f"listener {name}: {flt.name} holds {flt.typed_config.type_url}"
                    )
                del message.access_log[:]
                message.access_log.append(_access_log(plan, http, tags))
                flt.typed_config.Pack(message)
        if _refusals_possible(listener):
            del listener.access_log[:]
            listener.access_log.append(_access_log(plan, False, tags))
