"""What the compiler hands out: ``ProxyRef`` (who asks), ``XdsSet`` (what it gets), type URLs.

An ``XdsSet`` maps each of the four xDS type URLs to its resources by name, and carries one
content hash per type URL. The hash depends on the resources only (names and deterministic
protobuf bytes), so the ADS server can use it as ``version_info``: same content, same version,
whatever order the input came in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: The xDS type URLs, in the make-before-break push order of docs/control-plane.md section 4.
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
TYPE_URLS: tuple[str, ...] = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE)

#: Node metadata key that names the proxy's role.
ROLE_METADATA_KEY = "ubimesh.role"
ROLES = ("sidecar", "gateway")

#: A generated protobuf message (xds-protos carries no type information).
Message = Any

#: Hex digits kept from the sha256 of a type's resources.
VERSION_DIGITS = 16


@dataclass(frozen=True)
class CompileOptions:
    """What the compiler takes from the control plane running it rather than from the
    resources."""

    #: ``HOST:PORT`` of the control plane's built-in trace collector, where Mesh
    #: ``spec.tracing.provider: builtin`` sends spans ("": no collector, so no tracing).
    collector: str = ""


class CompileError(ValueError):
    """The resources cannot be compiled; the message names the resource, field and value."""


@dataclass(frozen=True)
class ProxyRef:
    """Which proxy a set of resources is compiled for.

    ``node_id`` is ``<workload>.<namespace>`` for a sidecar and ``<gateway>.<namespace>`` for a
    gateway (the Envoy ``node.id``); ``name`` and ``namespace`` are its two halves.
    """

    node_id: str
    role: str
    name: str
    namespace: str


def proxy_ref(node_id: str, metadata: Mapping[str, Any]) -> ProxyRef:
    """The ``ProxyRef`` of a connecting node, from its id and metadata alone.

    The role is metadata ``ubimesh.role`` (``sidecar`` or ``gateway``), ``sidecar`` when absent.
    The id is split at its last dot: ``ledger-1.payments`` is workload ``ledger-1`` of namespace
    ``payments`` (names may hold dots, namespaces may not). Raises ``CompileError`` for an id
    without a dot or an unknown role.
    """
    role = metadata.get(ROLE_METADATA_KEY, "sidecar")
    if role not in ROLES:
        raise CompileError(
            f"node {node_id!r}: metadata {ROLE_METADATA_KEY!r} is {role!r}; "
            f"expected one of: {', '.join(ROLES)}"
        )
    name, dot, namespace = node_id.rpartition(".")
    if not dot or not name or not namespace:
        raise CompileError(
            f"node id {node_id!r} is not '<name>.<namespace>'; set node.id to "
            "'<workload>.<namespace>' (sidecar) or '<gateway>.<namespace>' (gateway)"
        )
    return ProxyRef(node_id=node_id, role=str(role), name=name, namespace=namespace)


@dataclass(frozen=True)
class XdsSet:
    """One proxy's resources: type URL -> resource name -> message, and a version per type URL.

    Every type URL of ``TYPE_URLS`` is present, possibly with no resources. The messages may be
    shared with other proxies' sets: treat them as read-only.
    """

    resources: Mapping[str, Mapping[str, Message]]
    versions: Mapping[str, str]


def message_digest(message: Message) -> bytes:
    """sha256 of the message's deterministic serialization."""
    return hashlib.sha256(message.SerializeToString(deterministic=True)).digest()


def version_entry(name: str, digest: bytes) -> bytes:
    """One resource's part of its type's version: the name (length-prefixed) and its digest."""
    encoded = name.encode()
    return len(encoded).to_bytes(4, "big") + encoded + digest


def version_of_entries(entries: Iterable[bytes]) -> str:
    """The version of a type from ``version_entry`` parts in resource-name order."""
    return hashlib.sha256(b"".join(entries)).hexdigest()[:VERSION_DIGITS]


def version_of(named: Mapping[str, bytes]) -> str:
    """The version of one type's resources from their per-resource digests (name -> digest)."""
    return version_of_entries(version_entry(n, named[n]) for n in sorted(named))
