"""Envoy v3 bootstraps for proxies that take their configuration from the control plane.

One bootstrap serves a ubimesh proxy and an Envoy alike (docs/control-plane.md, section 5): the
node (id, cluster, metadata ``ubimesh.role`` and, for a proxy that registers its own workload,
``ubimesh.workload``), the admin interface, and ADS over one static cluster ``ubimesh-xds``
that reaches the control plane's xDS address(es) over HTTP/2. Listeners and clusters then come
over ADS. Pure functions: no I/O.

A proxy's identity (docs/identity.md) rides in the node metadata too, all in one place
(``identity_metadata``): ``ubimesh.identity`` (its SPIFFE ID), ``ubimesh.control_api`` (where
it asks for its certificate) and ``ubimesh.join_token_file`` (the file holding its one-time
join token, delivered out of band; the proxy's ``--join-token-file`` overrides it).

With an admin port, ``ubimesh.admin_address`` (HOST:PORT) tells the control plane where the
proxy's admin is, so ``GET /api/v1/proxies`` can report it to ``ubimesh top``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

#: Node metadata keys of a proxy's identity (read by the proxy's ADS client).
IDENTITY_KEY = "ubimesh.identity"
CONTROL_API_KEY = "ubimesh.control_api"
JOIN_TOKEN_FILE_KEY = "ubimesh.join_token_file"
#: Node metadata key of the proxy's admin HOST:PORT, reported by GET /api/v1/proxies so
#: `ubimesh top` can find its metrics (absent without an admin port, or with port 0).
ADMIN_ADDRESS_KEY = "ubimesh.admin_address"
#: The static cluster the ADS stream uses.
XDS_CLUSTER = "ubimesh-xds"
ROLES = ("sidecar", "gateway")
_HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_HTTP_OPTIONS_TYPE = "type.googleapis.com/" + _HTTP_OPTIONS_KEY


def parse_address(text: str, *, what: str = "address") -> tuple[str, int]:
    """``"127.0.0.1:15010"`` -> ``("127.0.0.1", 15010)``; ``[::1]:15010`` for IPv6.

    Raises ValueError naming ``what``, the value and the expected form.
    """
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"{what}: {text!r} is not HOST:PORT; expected e.g. 127.0.0.1:15010")
    host = host.removeprefix("[").removesuffix("]")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(
            f"{what}: {text!r} has no numeric port; expected e.g. 127.0.0.1:15010"
        ) from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{what}: port {port} in {text!r} is out of range; expected 0..65535")
    return host, port


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def identity_metadata(
    identity: str | None, control_api: str | None, join_token_file: str | None
) -> dict[str, str]:
    """The node metadata that lets a proxy get its certificate: all three or none (a proxy
    without them has no identity and serves plaintext only). Raises ValueError naming the
    argument that is missing or malformed."""
    given = {"identity": identity, "control_api": control_api, "join_token_file": join_token_file}
    if not any(given.values()):
        return {}
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise ValueError(
            f"{', '.join(missing)}: missing; a proxy's identity needs identity, control_api "
            "and join_token_file together"
        )
    assert identity and control_api and join_token_file
    if not identity.startswith("spiffe://"):
        raise ValueError(
            f"identity: {identity!r} is not a SPIFFE ID; expected "
            "spiffe://<trust domain>/ns/<namespace>/sa/<service account>"
        )
    if not control_api.startswith(("http://", "https://")):
        raise ValueError(
            f"control_api: {control_api!r} is not an http(s) URL; expected e.g. "
            "http://127.0.0.1:15000"
        )
    return {
        IDENTITY_KEY: identity,
        CONTROL_API_KEY: control_api,
        JOIN_TOKEN_FILE_KEY: join_token_file,
    }


def build_bootstrap(
    *,
    node_id: str,
    xds: Sequence[tuple[str, int]],
    role: str = "sidecar",
    cluster: str = "",
    admin_port: int | None = None,
    admin_address: str = "127.0.0.1",
    workload: Mapping[str, Any] | None = None,
    connect_timeout: str = "1s",
    identity: str | None = None,
    control_api: str | None = None,
    join_token_file: str | None = None,
) -> dict[str, Any]:
    """A bootstrap dict (Envoy v3 JSON form) for the proxy ``node_id``.

    ``node_id`` is ``<workload>.<namespace>`` for a sidecar and ``<gateway>.<namespace>`` for a
    gateway; ``xds`` lists the control plane replicas (IP, port); ``workload`` is a Workload
    spec the control plane registers while this proxy is connected; ``admin_port`` None means
    no admin interface (else its address is also in the node metadata, ``ADMIN_ADDRESS_KEY``,
    for ``ubimesh top``); ``identity``, ``control_api`` and ``join_token_file`` (together) let
    it get its certificate (``identity_metadata``). Raises ValueError on a bad argument,
    naming it.
    """
    if role not in ROLES:
        raise ValueError(f"role: {role!r} is not a proxy role; expected one of: {', '.join(ROLES)}")
    if "." not in node_id.strip(".") or node_id.startswith(".") or node_id.endswith("."):
        raise ValueError(
            f"node id: {node_id!r} is not NAME.NAMESPACE; expected e.g. web-dc.default"
        )
    if not xds:
        raise ValueError("xds: at least one control plane address is needed (HOST:PORT)")
    for host, port in xds:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"xds: {host!r} is not an IP address; expected the control plane's IP "
                "(the xDS cluster is STATIC)"
            ) from None
        if not 0 < port <= 65535:
            raise ValueError(f"xds: port {port} of {host} is out of range; expected 1..65535")
    if workload is not None and role != "sidecar":
        raise ValueError("workload: only a sidecar registers a workload")
    metadata: dict[str, Any] = {"ubimesh.role": role}
    if workload is not None:
        metadata["ubimesh.workload"] = dict(workload)
    metadata.update(identity_metadata(identity, control_api, join_token_file))
    if admin_port:
        host = f"[{admin_address}]" if ":" in admin_address else admin_address
        metadata[ADMIN_ADDRESS_KEY] = f"{host}:{admin_port}"
    bootstrap: dict[str, Any] = {
        "node": {
            "id": node_id,
            "cluster": cluster or node_id.rsplit(".", 1)[0],
            "metadata": metadata,
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
            },
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [
                {
                    "name": XDS_CLUSTER,
                    "type": "STATIC",
                    "connect_timeout": connect_timeout,
                    "typed_extension_protocol_options": {
                        _HTTP_OPTIONS_KEY: {
                            "@type": _HTTP_OPTIONS_TYPE,
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": XDS_CLUSTER,
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {"endpoint": {"address": _socket_address(host, port)}}
                                    for host, port in xds
                                ]
                            }
                        ],
                    },
                }
            ]
        },
    }
    if admin_port is not None:
        bootstrap["admin"] = {"address": _socket_address(admin_address, admin_port)}
    return bootstrap
