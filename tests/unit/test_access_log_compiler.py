"""The compiler's access logs (control/compiler/access_log.py) and Mesh ``spec.accessLog``:
every HTTP connection manager and TCP proxy of every sidecar and gateway logs, listeners that
can refuse a connection get a listener log, the lines name the listener and the proxy, every
format is one the proxy accepts, and ``enabled: false`` removes them all."""

from __future__ import annotations

import json
from typing import Any

import pytest
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import json_format

from ubimesh.control.compiler import LISTENER_TYPE, compile_all
from ubimesh.control.compiler.access_log import plan
from ubimesh.control.compiler.model import CompileError, XdsSet
from ubimesh.control.resources import Resource, ResourceErrors, parse_documents, validate_set
from ubimesh.proxy.access_log.format import compile_format

MESH = """\
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: web}
spec: {ports: [{name: http, port: 80, protocol: http}]}
---
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: db}
spec: {ports: [{name: pg, port: 5432, protocol: tcp}]}
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: web-1}
spec:
  service: web
  address: 127.0.0.1
  ports: {http: 8081}
  sidecar:
    inboundPorts: {http: 15001}
    outboundPort: 15080
    upstreams: [{service: db, localPort: 15432}]
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: db-1}
spec:
  service: db
  address: 127.0.0.1
  ports: {pg: 5432}
  sidecar:
    inboundPorts: {pg: 15002}
---
apiVersion: ubimesh.io/v1alpha1
kind: Gateway
metadata: {name: edge}
spec:
  address: 127.0.0.1
  listeners:
  - {name: web, port: 18080, protocol: HTTP}
"""


def resources(access_log: str | None = None) -> list[Resource]:
    text = MESH
    if access_log is not None:
        text += (
            "---\napiVersion: ubimesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: default}\n"
            f"spec:\n  accessLog: {access_log}\n"
        )
    out = parse_documents(text, "mesh.yaml")
    validate_set(out)
    return out


def logs(xds: XdsSet) -> dict[str, dict[str, list[Any]]]:
    """listener name -> {"hcm" | "tcp" | "listener": [FileAccessLog, ...]}."""
    out: dict[str, dict[str, list[Any]]] = {}
    for name, listener in xds.resources[LISTENER_TYPE].items():
        found: dict[str, list[Any]] = {}
        for chain in listener.filter_chains:
            for flt in chain.filters:
                for kind, message in (
                    ("hcm", hcm_pb2.HttpConnectionManager()),
                    ("tcp", tcp_proxy_pb2.TcpProxy()),
                ):
                    if flt.typed_config.Is(message.DESCRIPTOR):
                        flt.typed_config.Unpack(message)
                        found.setdefault(kind, []).extend(_files(message.access_log))
        if listener.access_log:
            found["listener"] = _files(listener.access_log)
        out[name] = found
    return out


def _files(access_logs: Any) -> list[Any]:
    files = []
    for log in access_logs:
        config = file_pb2.FileAccessLog()
        assert log.typed_config.Unpack(config)
        files.append(config)
    return files


def test_every_proxy_logs_by_default() -> None:
    compiled = compile_all(resources())
    web, db, edge = (logs(compiled[n]) for n in ("web-1.default", "db-1.default", "edge.default"))
    assert {k: sorted(v) for k, v in web.items()} == {
        "inbound_15001": ["hcm"],
        "outbound_http_15080": ["hcm"],
        "upstream_15432": ["tcp"],
    }
    # Default DENY authorization: the TCP inbound listener has an RBAC network filter, whose
    # refusals go to the listener log.
    assert sorted(db["inbound_15002"]) == ["listener", "tcp"]
    assert sorted(edge["gateway_web"]) == ["hcm"]
    inbound = web["inbound_15001"]["hcm"][0]
    assert inbound.path == "/dev/stdout"
    line = inbound.log_format.text_format_source.inline_string
    for part in (
        "%RESPONSE_CODE_DETAILS%",
        "%RESPONSE_FLAGS%",
        "%DOWNSTREAM_PEER_URI_SAN%",
        "listener=inbound_15001",
        "proxy=spiffe://cluster.local/ns/default/sa/web",
    ):
        assert part in line
    assert "proxy=gateway/default/edge" in (
        edge["gateway_web"]["hcm"][0].log_format.text_format_source.inline_string
    )
    denial_log = db["inbound_15002"]["listener"][0].log_format.text_format_source.inline_string
    assert "%CONNECTION_TERMINATION_DETAILS%" in denial_log
    assert "peer=%DOWNSTREAM_PEER_URI_SAN%" in denial_log


def test_formats_are_ones_the_proxy_accepts() -> None:
    for spec in (None, "{format: json, path: /var/log/mesh.json}"):
        for xds in compile_all(resources(spec)).values():
            for by_kind in logs(xds).values():
                for files in by_kind.values():
                    for config in files:
                        fmt = config.log_format
                        if fmt.HasField("json_format"):
                            text = json.dumps(json_format.MessageToDict(fmt.json_format))
                            compile_format(None, text)
                            assert config.path == "/var/log/mesh.json"
                        else:
                            compile_format(fmt.text_format_source.inline_string)


def test_json_format_is_typed() -> None:
    compiled = compile_all(resources("{format: json}"))
    (config,) = logs(compiled["web-1.default"])["inbound_15001"]["hcm"]
    fields = json_format.MessageToDict(config.log_format.json_format)
    assert fields["response_code"] == "%RESPONSE_CODE%"
    assert fields["response_code_details"] == "%RESPONSE_CODE_DETAILS%"
    assert fields["listener"] == "inbound_15001"


def test_disabled_means_no_access_log_anywhere() -> None:
    for xds in compile_all(resources("{enabled: false}")).values():
        for by_kind in logs(xds).values():
            assert all(files == [] for files in by_kind.values())


def test_validation_and_hand_made_values() -> None:
    with pytest.raises(ResourceErrors, match=r"spec\.accessLog\.path"):
        resources("{path: relative.log}")
    with pytest.raises(ResourceErrors, match=r"spec\.accessLog\.format"):
        resources("{format: xml}")
    hand_made = Resource(
        "ubimesh.io/v1alpha1", "Mesh", "default", "", {"accessLog": {"format": "xml"}}
    )
    with pytest.raises(CompileError, match="format is 'xml'"):
        plan([hand_made])
