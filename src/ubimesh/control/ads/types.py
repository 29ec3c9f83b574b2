"""Type URLs, the push order and the shape of what the ADS server serves.

The compiler's ``XdsSet`` (docs/control-plane.md section 3) is what a node's snapshot holds; the
ADS package only needs its two attributes, so it accepts anything shaped like it
(:class:`XdsLike`) and never imports the compiler.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

__all__ = [
    "CDS",
    "COMPLETE_SET_TYPES",
    "EDS",
    "LDS",
    "PUSH_ORDER",
    "RDS",
    "SDS",
    "TYPE_PREFIX",
    "XdsLike",
    "ordered_types",
    "short_name",
]

TYPE_PREFIX = "type.googleapis.com/"
LDS = TYPE_PREFIX + "envoy.config.listener.v3.Listener"
RDS = TYPE_PREFIX + "envoy.config.route.v3.RouteConfiguration"
CDS = TYPE_PREFIX + "envoy.config.cluster.v3.Cluster"
EDS = TYPE_PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
#: Secrets (SDS over ADS): requested by name, as EDS is; the control plane serves ``ROOTCA``.
SDS = TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

# Make-before-break (specs.md 4.4): clusters, then their endpoints, then the secrets that the
# clusters' and listeners' TLS contexts name (a changed trust bundle is in place before a
# listener or cluster that relies on it), then the listeners, then the routes that refer to the
# clusters.  Any other type follows, in name order.
PUSH_ORDER: tuple[str, ...] = (CDS, EDS, SDS, LDS, RDS)
_RANK = {type_url: rank for rank, type_url in enumerate(PUSH_ORDER)}

# Types whose every response is the complete set: a resource left out is deleted by the client.
COMPLETE_SET_TYPES = frozenset({LDS, CDS})


class XdsLike(Protocol):
    """What a snapshot must offer: ``ubimesh.control.compiler.XdsSet`` satisfies it.

    ``resources`` maps a type URL to the resources of that type by name (protobuf messages);
    ``versions`` maps a type URL to the version of that type (a content hash): it must change
    whenever the resources of that type change, and only then.
    """

    @property
    def resources(self) -> Mapping[str, Mapping[str, Any]]: ...

    @property
    def versions(self) -> Mapping[str, str]: ...


def ordered_types(type_urls: Iterable[str]) -> list[str]:
    """``type_urls`` in push order: CDS, EDS, SDS, LDS, RDS, then the others by name."""
    return sorted(type_urls, key=lambda t: (_RANK.get(t, len(_RANK)), t))


def short_name(type_url: str) -> str:
    """``Cluster`` for the CDS type URL, for log lines."""
    return type_url.rsplit(".", 1)[-1]
