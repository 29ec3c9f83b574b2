"""The registry of resource kinds: apiVersion, scope and the names ``ubimesh get`` accepts.

This module holds names only (no schemas), so the CLI can import it cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

UBIMESH_V1ALPHA1 = "ubimesh.io/v1alpha1"
SMI_ACCESS_V1ALPHA3 = "access.smi-spec.io/v1alpha3"
SMI_SPECS_V1ALPHA4 = "specs.smi-spec.io/v1alpha4"
SMI_SPLIT_V1ALPHA4 = "split.smi-spec.io/v1alpha4"
GATEWAY_V1 = "gateway.networking.k8s.io/v1"


@dataclass(frozen=True)
class KindInfo:
    """One kind: its ``apiVersion``, whether it lives in a namespace (all but Mesh), and the
    names a user may type for it (plural, singular, short names; all lower case)."""

    kind: str
    api_version: str
    namespaced: bool
    plural: str
    singular: str
    short_names: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.plural, self.singular, *self.short_names)


_ALL = (
    KindInfo("Mesh", UBIMESH_V1ALPHA1, False, "meshes", "mesh"),
    KindInfo("Service", UBIMESH_V1ALPHA1, True, "services", "service", ("svc",)),
    KindInfo("Workload", UBIMESH_V1ALPHA1, True, "workloads", "workload", ("wl",)),
    KindInfo("Gateway", UBIMESH_V1ALPHA1, True, "gateways", "gateway", ("gw",)),
    KindInfo("ExternalService", UBIMESH_V1ALPHA1, True, "externalservices", "externalservice",
             ("se",)),
    KindInfo("TrafficTarget", SMI_ACCESS_V1ALPHA3, True, "traffictargets", "traffictarget",
             ("tt",)),
    KindInfo("HTTPRouteGroup", SMI_SPECS_V1ALPHA4, True, "httproutegroups", "httproutegroup",
             ("htr",)),
    KindInfo("TCPRoute", SMI_SPECS_V1ALPHA4, True, "tcproutes", "tcproute", ("tr",)),
    KindInfo("TrafficSplit", SMI_SPLIT_V1ALPHA4, True, "trafficsplits", "trafficsplit", ("ts",)),
    KindInfo("HTTPRoute", GATEWAY_V1, True, "httproutes", "httproute"),
)

#: Every kind by its name ("Service"), in the order resources are listed and applied.
KINDS: Mapping[str, KindInfo] = MappingProxyType({info.kind: info for info in _ALL})

_BY_NAME: dict[str, str] = {}
for _info in _ALL:
    for _name in (_info.kind.lower(), *_info.names):
        _BY_NAME[_name] = _info.kind


class UnknownKindError(ValueError):
    """A name that is no kind; the message lists every accepted name."""


def valid_names() -> str:
    """Every kind's names for a message: "meshes (mesh), services (service, svc), ..."."""
    return ", ".join(f"{i.plural} ({', '.join(i.names[1:])})" for i in _ALL)


def resolve_kind(name: str) -> str:
    """The kind ("Service") a user's name for it means: its kind name, plural, singular or
    short name, in any case ("svc", "Services", "service"). Raises ``UnknownKindError``."""
    kind = _BY_NAME.get(name.strip().lower())
    if kind is None:
        raise UnknownKindError(
            f"unknown resource type {name!r}; expected one of: {valid_names()}"
        )
    return kind
