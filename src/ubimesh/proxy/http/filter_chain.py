"""The HTTP decoder filters between the connection manager's request rules and the router.

An HCM whose ``http_filters`` hold only RBAC filters keeps the RBAC fast path (``HttpRbac``
called straight from ``ActiveStream.begin``). As soon as a fault or local rate limit filter is
configured, the HCM builds a ``DecoderFilter`` chain in ``http_filters`` order (consecutive RBAC
filters become one ``RbacStage``) and the stream runs it with ``ActiveStream.run_filters``.

Each filter's ``decode`` answers one of:

* ``CONTINUE``: the next filter runs (then the router);
* ``STOP``: the filter answered the request (a local reply); nothing else runs;
* ``PAUSE``: the filter will resume the chain itself, later, with
  ``stream.run_filters(index + 1)`` (the fault filter's delay), unless the stream is done by
  then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ubimesh.proxy.http.rbac import HttpRbac
    from ubimesh.proxy.network.http_manager import ActiveStream, HttpConnection

CONTINUE = 0
STOP = 1
PAUSE = 2


class DecoderFilter:
    """One HTTP filter (or a run of RBAC filters) of an HCM's decoder chain."""

    def decode(self, stream: ActiveStream, conn: HttpConnection, index: int) -> int:
        """Process ``stream``'s request headers; ``index`` is this filter's place in the
        chain (for resuming after a PAUSE). Returns CONTINUE, STOP or PAUSE."""
        raise NotImplementedError

    def routes_changed(self) -> None:
        """The HCM routes with a new route configuration (RDS): drop whatever was kept per
        route of the old one."""


class RbacStage(DecoderFilter):
    """The RBAC filters ``first`` to ``stop`` (exclusive) of the HCM's ``HttpRbac``: one
    HttpRbac keeps every RBAC filter's per-connection state, so a stage is a slice of it."""

    __slots__ = ("first", "rbac", "stop")

    def __init__(self, rbac: HttpRbac, first: int, stop: int) -> None:
        self.rbac = rbac
        self.first = first
        self.stop = stop

    def decode(self, stream: ActiveStream, conn: HttpConnection, index: int) -> int:
        return CONTINUE if self.rbac.allow(stream, conn, self.first, self.stop) else STOP
