"""Resource and Key: the control plane's unit of configuration (docs/control-plane.md, section 1).

A ``Resource`` is one kubectl-shaped document after validation: plain JSON types only, so it
serializes to the store and back without loss (``to_dict``/``from_dict`` round-trip).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: The namespace a namespaced resource gets when its metadata names none.
DEFAULT_NAMESPACE = "default"


@dataclass(frozen=True, order=True)
class Key:
    """A resource's identity in the store. ``namespace`` is "" for cluster-scoped kinds."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {where}"


@dataclass(frozen=True)
class Resource:
    """One validated resource. ``spec`` holds plain JSON types with defaults filled in."""

    api_version: str
    kind: str
    name: str
    namespace: str
    spec: Mapping[str, Any]
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    #: Set by the store on every change; opaque to everyone else.
    resource_version: str = ""
    #: Where the resource was read from ("mesh.yaml#2": file and document index), for errors.
    source: str = field(default="", compare=False)

    @property
    def key(self) -> Key:
        return Key(self.kind, self.namespace, self.name)

    def to_dict(self) -> dict[str, Any]:
        """The kubectl-shaped form (what ``from_dict`` reads back)."""
        metadata: dict[str, Any] = {"name": self.name}
        if self.namespace:
            metadata["namespace"] = self.namespace
        if self.labels:
            metadata["labels"] = dict(self.labels)
        if self.annotations:
            metadata["annotations"] = dict(self.annotations)
        if self.resource_version:
            metadata["resourceVersion"] = self.resource_version
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "metadata": metadata,
            "spec": _plain(self.spec),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "") -> Resource:
        """Rebuild a resource from ``to_dict``'s form. Does not validate: use the loader for
        user input."""
        metadata = data.get("metadata") or {}
        return cls(
            api_version=str(data["apiVersion"]),
            kind=str(data["kind"]),
            name=str(metadata["name"]),
            namespace=str(metadata.get("namespace", "")),
            spec=data.get("spec") or {},
            labels=dict(metadata.get("labels") or {}),
            annotations=dict(metadata.get("annotations") or {}),
            resource_version=str(metadata.get("resourceVersion", "")),
            source=source,
        )

    def with_version(self, resource_version: str) -> Resource:
        """A copy carrying ``resource_version`` (what the store returns)."""
        return Resource(
            self.api_version,
            self.kind,
            self.name,
            self.namespace,
            self.spec,
            self.labels,
            self.annotations,
            resource_version,
            self.source,
        )

    def same_content(self, other: Resource) -> bool:
        """True when both describe the same thing, whatever their versions and sources."""
        return self.with_version("").to_dict() == other.with_version("").to_dict()


def _plain(value: Any) -> Any:
    """Deep-copy ``value`` into plain dicts and lists (specs may hold read-only mappings)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
