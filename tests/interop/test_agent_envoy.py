"""Envoy 1.40 joins the mesh through ``ubimesh agent``: mTLS both ways with a ubimesh proxy.

- ``ubimesh control`` (with its CA) issues two join tokens: ``sa/edge`` for the Envoy's agent and
  ``sa/web`` for the ubimesh proxy;
- ``ubimesh agent`` gets the ``edge`` certificate and serves ``default`` and ``ROOTCA`` over SDS on
  a 0600 Unix socket; Envoy's bootstrap reaches it with a static cluster ``sds-grpc``
  (``pipe: {path}``, HTTP/2) and ``SdsSecretConfig`` with ``api_config_source`` GRPC;
- the ubimesh proxy gets the ``web`` certificate itself and ``ROOTCA`` over ADS.

Envoy -> ubimesh: Envoy's upstream TLS presents ``edge`` and accepts only ``web``; the ubimesh
listener requires a client certificate and accepts only ``edge`` (a second ubimesh listener
that accepts only ``sa/other`` refuses Envoy: 503).  ubimesh -> Envoy: the ubimesh cluster
presents ``web`` and accepts only ``edge``; the Envoy listener requires a client certificate,
accepts only ``web`` and echoes the peer's URI SAN in a header.  Every certificate comes from
ubimesh's CA through SDS; none is on disk.
"""

from __future__ import annotations

import http.client
import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.bootstrap import HCM, ROUTER, address, static_cluster
from tests.support.control import ControlReplica, control_plane, wait_for
from tests.support.procs import (
    LOOPBACK,
    ManagedProcess,
    envoy_binary,
    free_ports,
    launch_envoy,
    wait_ready,
)
from ubimesh.control.bootstrap import build_bootstrap, parse_address

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary on PATH"),
]

TD = "cluster.local"
EDGE = f"spiffe://{TD}/ns/default/sa/edge"
WEB = f"spiffe://{TD}/ns/default/sa/web"
OTHER = f"spiffe://{TD}/ns/default/sa/other"
TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
HTTP2 = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}
ADS = {"ads": {}, "resource_api_version": "V3"}
AGENT_SDS = {
    "api_config_source": {
        "api_type": "GRPC",
        "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}],
    },
    "resource_api_version": "V3",
}


def common_tls(sds: dict[str, Any], peer: str) -> dict[str, Any]:
    """``default`` as our certificate, ``ROOTCA`` plus a URI SAN matcher for the peer."""
    return {
        "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": sds}],
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": peer}}]
            },
            "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": sds},
        },
    }


def downstream_tls(sds: dict[str, Any], peer: str) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TLS + "DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": common_tls(sds, peer),
        },
    }


def upstream_tls(sds: dict[str, Any], peer: str) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TLS + "UpstreamTlsContext",
            "common_tls_context": common_tls(sds, peer),
        },
    }


def hcm(name: str, routes: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM,
            "stat_prefix": name,
            "route_config": {
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]
            },
            "http_filters": [
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
            ],
        },
    }


def listener(name: str, port: int, routes: list[dict[str, Any]],
             tls: dict[str, Any] | None = None) -> dict[str, Any]:
    chain: dict[str, Any] = {"filters": [hcm(name, routes)]}
    if tls is not None:
        chain["transport_socket"] = tls
    return {"name": name, "address": address(port), "filter_chains": [chain]}


def cluster(name: str, port: int, tls: dict[str, Any]) -> dict[str, Any]:
    return static_cluster(name, [port], connect_timeout="1s", transport_socket=tls)


def to_cluster(name: str, prefix: str = "/") -> dict[str, Any]:
    return {"match": {"prefix": prefix}, "route": {"cluster": name}}


def answer(body: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    route: dict[str, Any] = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": body}},
    }
    if headers:
        route["response_headers_to_add"] = [
            {"header": {"key": k, "value": v}} for k, v in headers.items()
        ]
    return route


def get(port: int, path: str = "/") -> tuple[int, str, dict[str, str]]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5.0)
    try:
        conn.request("GET", path, headers={"Host": "mesh"})
        response = conn.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, response.read().decode("latin-1"), headers
    finally:
        conn.close()


def admin_json(port: int, path: str) -> Any:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5.0)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def edge_serials(admin: int) -> set[str]:
    """The serial numbers of the certificates Envoy serves (its /certs)."""
    certs = admin_json(admin, "/certs")
    return {
        str(c["serial_number"])
        for entry in certs["certificates"]
        for c in entry["cert_chain"]
        if any(san.get("uri") == EDGE for san in c.get("subject_alt_names", []))
    }



@pytest.fixture
def control(tmp_path: Path) -> Iterator[ControlReplica]:
    with control_plane(tmp_path) as replica:
        yield replica


def test_envoy_with_ubimesh_agent_and_ubimesh_proxy_speak_mtls_both_ways(
    tmp_path: Path, control: ControlReplica
) -> None:
    procs: list[ManagedProcess] = []
    e_admin, e_in, e_out, u_admin, u_in, u_wrong, u_out = free_ports(7)
    try:
        # -- the agent, for Envoy's identity -------------------------------------------------
        edge_token = tmp_path / "edge.token"
        edge_token.write_text(control.join_token(EDGE))
        sock = tmp_path / "sds.sock"
        agent_argv = [sys.executable, "-m", "ubimesh.cli.main", "agent", "--control",
                      control.api, "--join-token-file", str(edge_token), "--identity", EDGE,
                      "--socket", str(sock), "--state-dir", str(tmp_path / "agent-state")]
        agent = ManagedProcess("agent", agent_argv, tmp_path / "agent.log", tmp_path)
        procs.append(agent)
        wait_for("the agent's socket", lambda: sock.exists() or not agent.alive, timeout=15)
        assert agent.alive, agent.describe()
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600

        # -- Envoy: SDS from the agent ------------------------------------------------------
        envoy_config = {
            "node": {"id": "edge.default", "cluster": "edge"},
            "admin": {"address": address(e_admin)},
            "static_resources": {
                "clusters": [
                    {
                        "name": "sds-grpc",
                        "type": "STATIC",
                        "connect_timeout": "1s",
                        "typed_extension_protocol_options": HTTP2,
                        "load_assignment": {
                            "cluster_name": "sds-grpc",
                            "endpoints": [{"lb_endpoints": [
                                {"endpoint": {"address": {"pipe": {"path": str(sock)}}}}
                            ]}],
                        },
                    },
                    cluster("to-web", u_in, upstream_tls(AGENT_SDS, WEB)),
                    cluster("to-web-wrong", u_wrong, upstream_tls(AGENT_SDS, WEB)),
                ],
                "listeners": [
                    listener("edge_in", e_in,
                             [answer("from envoy",
                                     {"x-peer": "%DOWNSTREAM_PEER_URI_SAN%"})],
                             downstream_tls(AGENT_SDS, WEB)),
                    listener("edge_out", e_out,
                             [to_cluster("to-web-wrong", "/wrong"), to_cluster("to-web")]),
                ],
            },
        }
        envoy_path = tmp_path / "envoy.yaml"
        envoy_path.write_text(yaml.safe_dump(envoy_config, sort_keys=False))
        envoy = launch_envoy(envoy_path, tmp_path, log_level="info")
        procs.append(envoy)

        # -- the ubimesh proxy: its own certificate, ROOTCA over ADS ------------------------
        web_token = tmp_path / "web.token"
        web_token.write_text(control.join_token(WEB))
        bootstrap = build_bootstrap(
            node_id="web.default", role="sidecar", admin_port=u_admin,
            xds=[parse_address(control.xds, what="xds")],
            identity=WEB, control_api=control.api, join_token_file=str(web_token),
        )
        static = bootstrap["static_resources"]
        static["clusters"].append(cluster("to-edge", e_in, upstream_tls(ADS, EDGE)))
        static["listeners"] = [
            listener("web_in", u_in, [answer("from ubimesh")], downstream_tls(ADS, EDGE)),
            listener("web_wrong", u_wrong, [answer("must not be reached")],
                     downstream_tls(ADS, OTHER)),
            listener("web_out", u_out, [to_cluster("to-edge")]),
        ]
        web_path = tmp_path / "web.yaml"
        web_path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        web = ManagedProcess(
            "web",
            [sys.executable, "-m", "ubimesh.cli.main", "proxy", "-c", str(web_path), "-l",
             "info", "--drain-time-s", "0", "--xds-cache-dir", str(tmp_path / "xds-cache")],
            tmp_path / "web.log", tmp_path,
        )
        procs.append(web)

        # Envoy's TLS listener warms until the agent's secrets arrive; ubimesh waits for its
        # certificate and ROOTCA before it applies any configuration.
        wait_ready(envoy, e_admin, [e_in, e_out], 30.0)
        wait_ready(web, u_admin, [u_in, u_wrong, u_out], 30.0)

        # Envoy -> ubimesh: each side verified the other's SPIFFE ID.
        deadline = time.monotonic() + 10
        while True:  # Envoy's cluster may still be warming its secrets right after /ready
            status, body, _ = get(e_out)
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (status, body) == (200, "from ubimesh"), (status, body, web.log_tail())
        # ubimesh refuses Envoy where only sa/other is allowed: Envoy sees a handshake failure.
        status, body, _ = get(e_out, "/wrong")
        assert status == 503, (status, body)

        # ubimesh -> Envoy: Envoy saw the ubimesh proxy's certificate with the web identity.
        status, body, headers = get(u_out)
        assert (status, body) == (200, "from envoy"), (status, body, web.log_tail())
        assert headers.get("x-peer") == WEB

        served = edge_serials(e_admin)
        # Envoy's certificate and trust bundle are the agent's, from ubimesh's CA.
        certs = admin_json(e_admin, "/certs")
        chains = [c for entry in certs["certificates"] for c in entry["cert_chain"]]
        uris = {
            san["uri"]
            for c in chains
            for san in c.get("subject_alt_names", [])
            if "uri" in san
        }
        assert uris == {EDGE}, uris
        log = (tmp_path / "agent.log").read_text()
        assert "certificate for " + EDGE in log and "obtained" in log

        # A restarted agent keeps the identity with the same, used, token: it renews with the
        # credential in its --state-dir, and Envoy's SDS stream picks the new certificate up.
        agent.stop()
        agent = ManagedProcess("agent-again", agent_argv, tmp_path / "agent-again.log", tmp_path)
        procs.append(agent)
        wait_for("the renewed certificate in Envoy", lambda: edge_serials(e_admin) - served
                 != set() or not agent.alive, timeout=30, interval=0.3)
        assert agent.alive, agent.describe()
        log = (tmp_path / "agent-again.log").read_text()
        assert "restored from" in log and "renewed" in log, log[-2000:]
        status, body, _ = get(e_out)
        assert (status, body) == (200, "from ubimesh"), (status, body)
    finally:
        for proc in reversed(procs):
            proc.stop()
