"""The snapshot cache: the xDS each node should have, and a wake-up for that node's streams.

``set`` is cheap and never waits for a stream: it stores the snapshot and sets one
``asyncio.Event`` per stream watching the node.  A stream wakes up, reads the newest snapshot and
works out what to send itself, so a slow stream costs nothing but its own memory, and many quick
``set`` calls in a row collapse into one wake-up (a stream only ever needs the newest snapshot).

Not thread-safe: call every method on the event loop that runs the ADS server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.message import Message

from ubimesh.control.ads.types import CDS, EDS, LDS, RDS, SDS, TYPE_PREFIX, XdsLike

__all__ = ["EMPTY_VERSION", "Snapshot", "SnapshotCache"]

# The version of a type the snapshot has nothing of (and no version for).  Sending it for LDS or
# CDS deletes every listener or cluster, which is what an empty set means.
EMPTY_VERSION = "empty"

# The field that carries a resource's own name, for the types whose name we check.
_NAME_FIELD = {LDS: "name", CDS: "name", RDS: "name", EDS: "cluster_name", SDS: "name"}


class Snapshot:
    """One node's validated ``XdsSet``; each resource is packed into an ``Any`` at most once.

    The packing is shared by every stream of the node, so a push to many streams serializes each
    resource once.
    """

    __slots__ = ("_packed", "xds")

    def __init__(self, xds: XdsLike) -> None:
        self.xds = xds
        self._packed: dict[tuple[str, str], Any] = {}

    def version(self, type_url: str) -> str:
        return self.xds.versions.get(type_url, EMPTY_VERSION)

    def names(self, type_url: str) -> Iterable[str]:
        return self.xds.resources.get(type_url, {}).keys()

    def has(self, type_url: str, name: str) -> bool:
        return name in self.xds.resources.get(type_url, {})

    def packed(self, type_url: str, names: Iterable[str]) -> list[Any]:
        """The named resources (which must exist) as ``Any`` messages, in the order given."""
        of_type = self.xds.resources[type_url]
        out = []
        for name in names:
            key = (type_url, name)
            packed = self._packed.get(key)
            if packed is None:
                packed = any_pb2.Any()
                packed.Pack(of_type[name])
                self._packed[key] = packed
            out.append(packed)
        return out


def validate_xds(node_id: str, xds: XdsLike) -> None:
    """Refuse a snapshot the server could not serve, with the field, the value and the fix."""
    resources = getattr(xds, "resources", None)
    versions = getattr(xds, "versions", None)
    if not isinstance(resources, Mapping) or not isinstance(versions, Mapping):
        raise TypeError(
            f"snapshot for node {node_id!r}: expected an XdsSet (attributes `resources` and "
            f"`versions`, both mappings keyed by type URL); got {type(xds).__name__}"
        )
    for type_url, version in versions.items():
        if not isinstance(version, str) or not version:
            raise ValueError(
                f"snapshot for node {node_id!r}: versions[{type_url!r}] is {version!r}; "
                "expected a non-empty string (the content hash of that type)"
            )
    for type_url, of_type in resources.items():
        if not isinstance(type_url, str) or not type_url.startswith(TYPE_PREFIX):
            raise ValueError(
                f"snapshot for node {node_id!r}: resource type {type_url!r} is not a type URL; "
                f"expected {TYPE_PREFIX}<proto message name>"
            )
        if of_type and type_url not in versions:
            raise ValueError(
                f"snapshot for node {node_id!r}: resources of {type_url} have no version; "
                f"set versions[{type_url!r}] (clients only apply what changes version)"
            )
        expected_message = type_url[len(TYPE_PREFIX) :]
        name_field = _NAME_FIELD.get(type_url)
        for name, message in of_type.items():
            where = f"snapshot for node {node_id!r}: resources[{type_url!r}][{name!r}]"
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: the resource name must be a non-empty string")
            if not isinstance(message, Message):
                raise TypeError(f"{where}: expected a protobuf message, got {type(message)}")
            full_name = message.DESCRIPTOR.full_name
            if full_name != expected_message:
                raise ValueError(
                    f"{where}: is a {full_name}; resources of this type URL must be "
                    f"{expected_message}"
                )
            if name_field is not None and getattr(message, name_field) != name:
                raise ValueError(
                    f"{where}: its {name_field} is {getattr(message, name_field)!r}; "
                    "it must equal the name it is stored under"
                )


class SnapshotCache:
    """Node id -> :class:`Snapshot`, plus the streams waiting for each node's changes."""

    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._watchers: dict[str, set[asyncio.Event]] = {}

    def set(self, node_id: str, xds: XdsLike) -> None:
        """Store ``xds`` as the node's snapshot and wake the node's streams.

        Raises ``ValueError``/``TypeError`` (naming the node, the type and the resource) for a
        snapshot that could not be served; the previous snapshot then stays.
        """
        if not isinstance(node_id, str) or not node_id:
            raise ValueError(f"node id {node_id!r}: expected a non-empty string")
        validate_xds(node_id, xds)
        self._snapshots[node_id] = Snapshot(xds)
        self._wake(node_id)

    def get(self, node_id: str) -> XdsLike | None:
        snapshot = self._snapshots.get(node_id)
        return None if snapshot is None else snapshot.xds

    def snapshot(self, node_id: str) -> Snapshot | None:
        """The node's snapshot with its packing cache (what streams read)."""
        return self._snapshots.get(node_id)

    def remove(self, node_id: str) -> bool:
        """Forget the node's snapshot.  Its streams keep what they were sent and get no more
        pushes until a new snapshot is set.  Returns whether there was one."""
        return self._snapshots.pop(node_id, None) is not None

    def nodes(self) -> list[str]:
        """Ids of the nodes that have a snapshot, sorted."""
        return sorted(self._snapshots)

    def watch(self, node_id: str, event: asyncio.Event) -> None:
        """Set ``event`` whenever the node's snapshot is set (until :meth:`unwatch`)."""
        self._watchers.setdefault(node_id, set()).add(event)

    def unwatch(self, node_id: str, event: asyncio.Event) -> None:
        watchers = self._watchers.get(node_id)
        if watchers is None:
            return
        watchers.discard(event)
        if not watchers:
            del self._watchers[node_id]

    def watcher_count(self) -> int:
        return sum(len(w) for w in self._watchers.values())

    def _wake(self, node_id: str) -> None:
        for event in self._watchers.get(node_id, ()):
            event.set()
