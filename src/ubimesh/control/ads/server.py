"""The ADS gRPC server: state of the world over ``StreamAggregatedResources`` (grpc.aio).

Each stream is one coroutine.  A reader task moves requests into a small bounded queue and sets
the stream's wake-up event; the snapshot cache sets the same event when the node's snapshot
changes.  On every wake-up the stream applies the queued requests to its
:class:`~ubimesh.control.ads.stream.StreamState` and writes whatever responses that state owes,
in push order, each write awaiting gRPC flow control.  Memory per stream is therefore bounded:
the queue, one event, and per type the subscription names (themselves bounded).

Liveness of an idle stream is left to HTTP/2 keepalive pings (a dead peer is dropped within
``KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS``); the first request must come within
``first_request_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import json_format

from ubimesh.control.ads.cache import SnapshotCache
from ubimesh.control.ads.stream import RequestError, RequestKind, StreamState
from ubimesh.control.ads.types import short_name

__all__ = ["AdsServer", "NodeInfo"]

log = logging.getLogger("ubimesh.control.ads")

REQUEST_QUEUE_SIZE = 16
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
RECENT_NACKS = 32
DEFAULT_IDENTIFIER = "ubimesh-control"
#: The gRPC services an :class:`AdsServer` can serve: ADS, and SDS
#: (``SecretDiscoveryService/StreamSecrets``, the same state machine for the Secret type alone,
#: as ``ubimesh agent`` serves it to an Envoy on the same host).
SERVICES = frozenset({"ads", "sds"})


@dataclass(frozen=True)
class NodeInfo:
    """Who is on the other end of a stream, from the ``node`` of its first request."""

    id: str
    cluster: str
    metadata: dict[str, Any]  # node.metadata (a Struct) as plain JSON values
    peer: str  # gRPC peer, e.g. "ipv4:127.0.0.1:53422"


Hook = Callable[[NodeInfo], Awaitable[None]]


class _Counters:
    """The server's counters; :meth:`AdsServer.stats` returns a copy."""

    def __init__(self) -> None:
        self.streams_connected = 0
        self.streams_total = 0
        self.nodes: collections.Counter[str] = collections.Counter()  # node id -> open streams
        self.responses: collections.Counter[str] = collections.Counter()
        self.acks: collections.Counter[str] = collections.Counter()
        self.nacks: collections.Counter[str] = collections.Counter()
        self.stale: collections.Counter[str] = collections.Counter()
        self.recent_nacks: collections.deque[dict[str, str]] = collections.deque(
            maxlen=RECENT_NACKS
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "streams_connected": self.streams_connected,
            "streams_total": self.streams_total,
            "nodes_connected": sorted(self.nodes),
            "responses_sent": dict(self.responses),
            "acks": dict(self.acks),
            "nacks": dict(self.nacks),
            "stale_requests": dict(self.stale),
            "recent_nacks": list(self.recent_nacks),
        }


class _Inbox:
    """Requests read from the client, and how reading ended."""

    def __init__(self, wake: asyncio.Event) -> None:
        self.queue: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue(
            REQUEST_QUEUE_SIZE
        )
        self.wake = wake
        self.ended = False
        self.error: BaseException | None = None

    async def read(self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest]) -> None:
        try:
            async for request in requests:
                await self.queue.put(request)  # waits while full: backpressure to the client
                self.wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the RPC broke; the stream loop ends on it
            self.error = exc
        self.ended = True
        self.wake.set()


class AdsServer:
    """Serves the snapshots of a :class:`SnapshotCache` over ADS (state of the world).

    ``on_connect(node)`` is awaited once the first request of a stream names its node, before
    anything is sent; if it raises, the stream ends (status UNAVAILABLE) and ``on_disconnect``
    is not called.  Otherwise ``on_disconnect(node)`` is awaited when the stream ends, for any
    reason (client gone, error, server stop).  Delta xDS is refused with UNIMPLEMENTED.

    ``services`` chooses the gRPC services: ``"ads"`` (AggregatedDiscoveryService) and/or
    ``"sds"`` (SecretDiscoveryService, whose ``StreamSecrets`` runs the same state of the world
    machine; requests must then name the Secret type URL).
    """

    def __init__(
        self,
        cache: SnapshotCache,
        *,
        on_connect: Hook | None = None,
        on_disconnect: Hook | None = None,
        identifier: str = DEFAULT_IDENTIFIER,
        max_streams: int = 10_000,
        first_request_timeout: float = 30.0,
        services: Collection[str] = ("ads",),
    ) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams is {max_streams}; expected at least 1")
        if first_request_timeout <= 0:
            raise ValueError(
                f"first_request_timeout is {first_request_timeout}; expected seconds > 0"
            )
        unknown = set(services) - SERVICES
        if unknown or not services:
            raise ValueError(
                f"services {sorted(services)}: expected one or more of {sorted(SERVICES)}"
            )
        self._services = frozenset(services)
        self.cache = cache
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._identifier = identifier
        self._max_streams = max_streams
        self._first_request_timeout = first_request_timeout
        self._server: grpc.aio.Server | None = None
        self._closing = False
        self._wakes: set[asyncio.Event] = set()
        self._counters = _Counters()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 = any free port); returns the bound port."""
        if not 0 <= port <= 65535:
            raise ValueError(f"ADS port {port}: expected 0..65535")
        bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host  # IPv6
        return await self._start(f"{bracketed}:{port}")

    async def start_unix(self, path: str, mode: int = 0o600) -> None:
        """Listen on the Unix socket ``path`` (a stale socket there is replaced), made with
        ``mode`` (default 0600: only this user may talk to the server)."""
        try:
            if os.path.exists(path) and not _is_socket(path):
                raise OSError(f"{path} exists and is not a socket; choose another --socket path")
        except OSError as exc:
            raise OSError(f"server cannot listen on unix:{path}: {exc}") from None
        # The socket is created with the umask's mode: make it private from the start, so
        # there is no moment where another user could connect.
        old = os.umask(0o777 & ~mode)
        try:
            await self._start(f"unix:{path}")
        finally:
            os.umask(old)
        os.chmod(path, mode)

    async def _start(self, address: str) -> int:
        if self._server is not None:
            raise RuntimeError("AdsServer.start: already started")
        server = grpc.aio.server(
            maximum_concurrent_rpcs=self._max_streams,
            options=[
                ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
                ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                # Never share the port with another process's server by accident.
                ("grpc.so_reuseport", 0),
            ],
        )
        if "ads" in self._services:
            ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_Servicer(self), server)
        if "sds" in self._services:
            sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(_SdsServicer(self), server)
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"ADS server cannot listen on {address}: {exc}") from exc
        if bound == 0 and not address.startswith("unix:"):
            raise OSError(f"ADS server cannot listen on {address} (in use or not local?)")
        await server.start()
        self._server = server
        self._closing = False
        log.info("%s server listening on %s (port %d)", "/".join(sorted(self._services)).upper(),
                 address, bound)
        return int(bound)

    async def stop(self, grace: float = 1.0) -> None:
        """End every stream (their clients see the stream close and reconnect) and stop."""
        server, self._server = self._server, None
        if server is None:
            return
        self._closing = True
        for wake in list(self._wakes):
            wake.set()
        await server.stop(grace)

    def stats(self) -> dict[str, Any]:
        """Counters for the admin API: streams, and per type URL responses, ACKs and NACKs."""
        return self._counters.snapshot()

    # -- one stream ----------------------------------------------------------------------

    async def _stream(
        self,
        requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        wake = asyncio.Event()
        inbox = _Inbox(wake)
        reader = asyncio.get_running_loop().create_task(inbox.read(requests))
        counters = self._counters
        counters.streams_connected += 1
        counters.streams_total += 1
        self._wakes.add(wake)
        node: NodeInfo | None = None
        connected = False
        try:
            first = await self._first_request(inbox, context)
            if first is None:
                return
            node = await self._node_info(first, context)
            if self._on_connect is not None:
                try:
                    await self._on_connect(node)
                except Exception as exc:
                    log.exception("ADS on_connect failed for node %r", node.id)
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, f"node {node.id!r} refused: {exc}"
                    )
            connected = True
            counters.nodes[node.id] += 1
            log.info("ADS stream opened by node %r (%s)", node.id, node.peer)
            self.cache.watch(node.id, wake)
            state = StreamState(node.id, self._identifier)
            await self._handle(state, first, node, context)
            await self._send(state, node, context)
            while True:
                if self._closing:
                    return
                # Requests may already be queued with the event cleared: a client that sends
                # its CDS and LDS requests back to back has both read before the first one
                # was taken (``_first_request`` clears the event). Wait only when idle.
                if inbox.queue.empty() and not inbox.ended:
                    await wake.wait()
                wake.clear()
                while not inbox.queue.empty():
                    await self._handle(state, inbox.queue.get_nowait(), node, context)
                if inbox.error is not None or inbox.ended:
                    log.info(
                        "ADS stream of node %r ended by the client%s",
                        node.id,
                        f": {inbox.error!r}" if inbox.error is not None else "",
                    )
                    return
                await self._send(state, node, context)
        finally:
            reader.cancel()
            self._wakes.discard(wake)
            counters.streams_connected -= 1
            if node is not None:
                self.cache.unwatch(node.id, wake)
            if node is not None and connected:
                counters.nodes[node.id] -= 1
                if counters.nodes[node.id] <= 0:
                    del counters.nodes[node.id]
                if self._on_disconnect is not None:
                    try:
                        await self._on_disconnect(node)
                    except Exception:
                        log.exception("ADS on_disconnect failed for node %r", node.id)

    async def _first_request(
        self, inbox: _Inbox, context: grpc.aio.ServicerContext
    ) -> discovery_pb2.DiscoveryRequest | None:
        """The first request, or None if the client went away first."""
        try:
            await asyncio.wait_for(inbox.wake.wait(), self._first_request_timeout)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no DiscoveryRequest within {self._first_request_timeout} s of opening the "
                "stream",
            )
        inbox.wake.clear()
        if not inbox.queue.empty():
            return inbox.queue.get_nowait()
        return None

    async def _node_info(
        self, request: discovery_pb2.DiscoveryRequest, context: grpc.aio.ServicerContext
    ) -> NodeInfo:
        if not request.HasField("node") or not request.node.id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the first DiscoveryRequest of an ADS stream must carry node.id (the proxy's "
                "identity, e.g. 'ledger-1.payments'); it "
                + ("has a node without an id" if request.HasField("node") else "has no node"),
            )
        node = request.node
        metadata = json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}
        return NodeInfo(
            id=node.id, cluster=node.cluster, metadata=metadata, peer=str(context.peer())
        )

    async def _handle(
        self,
        state: StreamState,
        request: discovery_pb2.DiscoveryRequest,
        node: NodeInfo,
        context: grpc.aio.ServicerContext,
    ) -> None:
        try:
            outcome = state.on_request(request)
        except RequestError as exc:
            log.warning("ADS stream of node %r refused: %s", node.id, exc.message)
            await context.abort(exc.code, exc.message)
            raise  # unreachable: abort raises
        type_url = outcome.type_url
        kind = outcome.kind
        if kind is RequestKind.ACK:
            self._counters.acks[type_url] += 1
            log.debug("ACK from %r: %s version %s", node.id, short_name(type_url), outcome.version)
        elif kind is RequestKind.NACK:
            self._counters.nacks[type_url] += 1
            self._counters.recent_nacks.append(
                {
                    "node": node.id,
                    "type_url": type_url,
                    "version": outcome.version or "",
                    "error": outcome.error,
                }
            )
            log.warning(
                "NACK from node %r for %s version %s: %s",
                node.id,
                short_name(type_url),
                outcome.version,
                outcome.error,
            )
        elif kind is RequestKind.STALE:
            self._counters.stale[type_url] += 1
            log.debug(
                "stale nonce %r from %r for %s ignored",
                request.response_nonce,
                node.id,
                short_name(type_url),
            )

    async def _send(
        self, state: StreamState, node: NodeInfo, context: grpc.aio.ServicerContext
    ) -> None:
        for response in state.responses(self.cache.snapshot(node.id)):
            await context.write(response)
            self._counters.responses[response.type_url] += 1
            log.debug(
                "sent %s version %s (%d resources, nonce %s) to %r",
                short_name(response.type_url),
                response.version_info,
                len(response.resources),
                response.nonce,
                node.id,
            )


def _is_socket(path: str) -> bool:
    return stat.S_ISSOCK(os.stat(path).st_mode)


class _StateOfTheWorld:
    """One gRPC discovery service whose streaming method runs ``AdsServer._stream`` and whose
    delta method is refused (ubimesh serves state of the world only)."""

    #: (the streaming method's name, how to configure the client) for the refusal's message.
    NAMES: tuple[str, str]

    def __init__(self, server: AdsServer) -> None:
        self._server = server

    async def _serve(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        await self._server._stream(request_iterator, context)

    async def _refuse_delta(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        method, where = self.NAMES
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"ubimesh serves state of the world only ({method}); configure {where} with "
            "api_type: GRPC, not DELTA_GRPC",
        )


class _Servicer(_StateOfTheWorld):
    """The two ADS methods, as ``add_AggregatedDiscoveryServiceServicer_to_server`` wants."""

    NAMES = ("StreamAggregatedResources", "ads_config")
    StreamAggregatedResources = _StateOfTheWorld._serve
    DeltaAggregatedResources = _StateOfTheWorld._refuse_delta


class _SdsServicer(_StateOfTheWorld):
    """``SecretDiscoveryService``: ``StreamSecrets`` is a state of the world stream like ADS."""

    NAMES = ("StreamSecrets", "the SDS api_config_source")
    StreamSecrets = _StateOfTheWorld._serve
    DeltaSecrets = _StateOfTheWorld._refuse_delta

    async def FetchSecrets(
        self, request: discovery_pb2.DiscoveryRequest, context: grpc.aio.ServicerContext
    ) -> discovery_pb2.DiscoveryResponse:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "ubimesh serves SDS as a stream (StreamSecrets); REST-style FetchSecrets is not "
            "served",
        )
        raise AssertionError("unreachable: abort raises")
