"""A snapshot cache that serves one snapshot to every node (the agent's SDS clients).

The control plane's :class:`SnapshotCache` keys snapshots by node id; an SDS client of the
agent may name itself anything (it is the workload's own Envoy, behind a 0600 socket), so
:class:`SharedSnapshotCache` answers every node with the same snapshot and wakes every stream
when it changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ubimesh.control.ads.cache import Snapshot, SnapshotCache, validate_xds

__all__ = ["SecretSet", "SharedSnapshotCache"]

_SHARED = "*"


@dataclass(frozen=True)
class SecretSet:
    """An ``XdsLike``: type URL -> name -> message, and a version per type URL."""

    resources: Mapping[str, Mapping[str, Any]]
    versions: Mapping[str, str]


class SharedSnapshotCache(SnapshotCache):
    """Every node gets the snapshot set with :meth:`set_shared`."""

    def __init__(self) -> None:
        super().__init__()
        self._shared: Snapshot | None = None
        self._all: set[asyncio.Event] = set()

    def set_shared(self, xds: SecretSet) -> None:
        """Serve ``xds`` to every node and wake every stream."""
        validate_xds(_SHARED, xds)
        self._shared = Snapshot(xds)
        for event in self._all:
            event.set()

    def snapshot(self, node_id: str) -> Snapshot | None:
        return self._shared

    def get(self, node_id: str) -> Any:
        return None if self._shared is None else self._shared.xds

    def watch(self, node_id: str, event: asyncio.Event) -> None:
        self._all.add(event)

    def unwatch(self, node_id: str, event: asyncio.Event) -> None:
        self._all.discard(event)

    def watcher_count(self) -> int:
        return len(self._all)
