"""The name of the last route or cluster asked, remembered by identity (request path)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ubimesh.proxy.snapshot.types import Route
    from ubimesh.proxy.upstream.cluster_manager import UpstreamCluster


class NameMemo:
    """The ``name`` of the last object asked (a route, or a cluster), cached by identity:
    consecutive streams usually share their route and cluster, and ``name`` on these
    non-compiled objects is a generic attribute lookup (about 170 instructions from compiled
    code). Their names never change (a ``Route`` is frozen; a cluster is built with its
    name), and the memo holds the object, so its id cannot be reused by another while it is
    remembered. One memo per kind of object and per user; event loop only."""

    __slots__ = ("name", "of")

    def __init__(self) -> None:
        self.of: object = None
        self.name = ""

    def name_of(self, of: Route | UpstreamCluster) -> str:
        if of is not self.of:
            self.name = of.name
            self.of = of
        return self.name
