"""The ADS server over real gRPC: a grpc.aio server on 127.0.0.1:0 and a real ADS client stub.

Each test runs its own event loop (``asyncio.run``) with its own server; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from ubimesh.control.ads import CDS, EDS, LDS, RDS, AdsServer, NodeInfo, SnapshotCache
from ubimesh.control.ads.stream import MAX_TYPES_PER_STREAM
from ubimesh.control.compiler.model import XdsSet, message_digest, version_of

STEP = 5.0  # bound of any single wait for something that must happen
QUIET = 0.3  # how long "nothing arrives" is watched


# -- resources ------------------------------------------------------------------------------


def cluster(name: str) -> Any:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                resource_api_version=config_source_pb2.V3,
            )
        ),
    )


def endpoints(name: str, port: int) -> Any:
    endpoint = endpoint_components_pb2.Endpoint(
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
        )
    )
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[endpoint_components_pb2.LbEndpoint(endpoint=endpoint)]
            )
        ],
    )


def listener(name: str, port: int) -> Any:
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
        ),
    )


def route(name: str, cluster_name: str) -> Any:
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="all",
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=route_components_pb2.RouteAction(cluster=cluster_name),
                    )
                ],
            )
        ],
    )


def xds_set(by_type: Mapping[str, Iterable[Any]]) -> XdsSet:
    """An XdsSet of the given messages, versions computed as the compiler does."""
    resources: dict[str, dict[str, Any]] = {}
    for type_url in (CDS, EDS, LDS, RDS):
        named = {}
        for message in by_type.get(type_url, ()):
            name = message.cluster_name if type_url == EDS else message.name
            named[name] = message
        resources[type_url] = named
    versions = {
        t: version_of({n: message_digest(m) for n, m in named.items()})
        for t, named in resources.items()
    }
    return XdsSet(resources=resources, versions=versions)


def full_set(port: int = 8001, clusters: Iterable[str] = ("a", "b")) -> XdsSet:
    names = list(clusters)
    return xds_set(
        {
            CDS: [cluster(n) for n in names],
            EDS: [endpoints(n, port) for n in names],
            LDS: [listener("l1", 10001)],
            RDS: [route("l1", names[0])],
        }
    )


# -- client ---------------------------------------------------------------------------------


class Client:
    """One ADS stream as a client sees it; each call waits at most ``STEP`` seconds."""

    def __init__(self, port: int, node_id: str, metadata: Mapping[str, Any] | None = None):
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(
            self.channel
        ).StreamAggregatedResources()
        self.node = base_pb2.Node(id=node_id, cluster="c-" + node_id)
        if metadata:
            meta = struct_pb2.Struct()
            meta.update(dict(metadata))
            self.node.metadata.CopyFrom(meta)
        self._node_sent = False
        # Reading happens in a task: cancelling a pending call.read() would cancel the RPC.
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                resp = await self.call.read()
                await self.inbox.put(resp)
                if resp is grpc.aio.EOF:
                    return
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            await self.inbox.put(exc)

    async def next(self, timeout: float = STEP) -> Any:
        """The next response, EOF, or the error that ended the stream (raised)."""
        item = await asyncio.wait_for(self.inbox.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    async def request(
        self,
        type_url: str,
        names: Iterable[str] = (),
        *,
        nonce: str = "",
        version: str = "",
        error: str | None = None,
    ) -> None:
        req = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            resource_names=list(names),
            response_nonce=nonce,
            version_info=version,
        )
        if not self._node_sent:
            req.node.CopyFrom(self.node)
            self._node_sent = True
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await asyncio.wait_for(self.call.write(req), STEP)

    async def ack(self, resp: Any, names: Iterable[str] = ()) -> None:
        await self.request(resp.type_url, names, nonce=resp.nonce, version=resp.version_info)

    async def nack(self, resp: Any, error: str, names: Iterable[str] = (), good: str = "") -> None:
        await self.request(resp.type_url, names, nonce=resp.nonce, version=good, error=error)

    async def recv(self) -> Any:
        resp = await self.next()
        assert resp is not grpc.aio.EOF, "stream ended instead of answering"
        return resp

    async def quiet(self, seconds: float = QUIET) -> None:
        """Assert that no response arrives for ``seconds``."""
        try:
            resp = await self.next(seconds)
        except TimeoutError:
            return
        shown = resp if resp is grpc.aio.EOF else short(resp)
        raise AssertionError(f"unexpected response: {shown}")

    async def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()
        await self.channel.close()


MESSAGE_CLASS = {
    CDS: cluster_pb2.Cluster,
    LDS: listener_pb2.Listener,
    RDS: route_pb2.RouteConfiguration,
}


def names_of(resp: Any) -> list[str]:
    out = []
    for packed in resp.resources:
        assert packed.type_url == resp.type_url
        if resp.type_url == EDS:
            msg = endpoint_pb2.ClusterLoadAssignment()
            packed.Unpack(msg)
            out.append(msg.cluster_name)
        else:
            msg = MESSAGE_CLASS[resp.type_url]()
            packed.Unpack(msg)
            out.append(msg.name)
    return out


def short(resp: Any) -> str:
    return f"{resp.type_url.rsplit('.', 1)[-1]} v{resp.version_info} n{resp.nonce} {names_of(resp)}"


@contextlib.asynccontextmanager
async def serving(
    cache: SnapshotCache,
    on_connect: Callable[[NodeInfo], Awaitable[None]] | None = None,
    on_disconnect: Callable[[NodeInfo], Awaitable[None]] | None = None,
) -> AsyncIterator[tuple[AdsServer, int]]:
    server = AdsServer(cache, on_connect=on_connect, on_disconnect=on_disconnect)
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, port
    finally:
        await server.stop(0.5)


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 30))


# -- tests ----------------------------------------------------------------------------------


def test_first_request_gets_the_version_and_a_nonce_and_an_ack_gets_nothing() -> None:
    async def body() -> None:
        cache = SnapshotCache()
        snap = full_set()
        cache.set("n1.default", snap)
        async with serving(cache) as (server, port):
            client = Client(port, "n1.default")
            await client.request(CDS)
            resp = await client.recv()
            assert resp.type_url == CDS
            assert resp.version_info == snap.versions[CDS]
            assert resp.nonce
            assert resp.control_plane.identifier
            assert names_of(resp) == ["a", "b"]
            await client.ack(resp)
            await client.quiet()
            stats = server.stats()
            assert stats["acks"] == {CDS: 1}
            assert stats["responses_sent"] == {CDS: 1}
            assert stats["streams_connected"] == 1
            assert stats["nodes_connected"] == ["n1.default"]
            await client.close()

    run(body)


def test_nack_is_not_resent_until_the_version_changes() -> None:
    async def body() -> None:
        cache = SnapshotCache()
        cache.set("n1.default", full_set(clusters=["a"]))
        async with serving(cache) as (server, port):
            client = Client(port, "n1.default")
            await client.request(CDS)
            first = await client.recv()
            await client.ack(first)
            cache.set("n1.default", full_set(clusters=["a", "bad"]))
            second = await client.recv()
            assert second.version_info != first.version_info
            await client.nack(second, "cluster bad: no thanks", good=first.version_info)
            await client.quiet()
            # The same snapshot again (same versions): still nothing.
            cache.set("n1.default", full_set(clusters=["a", "bad"]))
            await client.quiet()
            stats = server.stats()
            assert stats["nacks"] == {CDS: 1}
            assert stats["recent_nacks"][-1]["error"] == "cluster bad: no thanks"
            assert stats["recent_nacks"][-1]["version"] == second.version_info
            # A real change is sent.
            cache.set("n1.default", full_set(clusters=["a", "good"]))
            third = await client.recv()
            assert names_of(third) == ["a", "good"]
            assert third.nonce not in (first.nonce, second.nonce)
            await client.close()

    run(body)


def test_stale_nonce_is_ignored() -> None:
    async def body() -> None:
        cache = SnapshotCache()
        snap = full_set(clusters=["a", "b"])
        cache.set("n1.default", snap)
        async with serving(cache) as (server, port):
            client = Client(port, "n1.default")
            await client.request(EDS, ["a"])
            first = await client.recv()
            assert names_of(first) == ["a"]
            await client.ack(first, ["a"])
            cache.set("n1.default", full_set(port=9000, clusters=["a", "b"]))
            second = await client.recv()
            assert names_of(second) == ["a"]
            # A request carrying the older nonce is stale: its new name b is not answered...
            await client.request(EDS, ["a", "b"], nonce=first.nonce, error="late NACK")
            await client.quiet()
            stats = server.stats()
            assert stats["stale_requests"] == {EDS: 1}
            assert stats["nacks"] == {}
            # ...but the same request with the latest nonce is.
            await client.request(EDS, ["a", "b"], nonce=second.nonce, version=second.version_info)
            third = await client.recv()
            assert names_of(third) == ["a", "b"]
            assert third.version_info == second.version_info
            await client.close()

    run(body)


def test_wildcard_lds_cds_get_complete_sets_and_a_removed_resource_disappears() -> None:
    async def body() -> None:
        cache = SnapshotCache()
        cache.set("n1.default", full_set(clusters=["a", "b", "c"]))
        async with serving(cache) as (_server, port):
            client = Client(port, "n1.default")
            await client.request(CDS)
            cds = await client.recv()
            assert names_of(cds) == ["a", "b", "c"]
            await client.request(LDS, ["*"])
            lds = await client.recv()
            assert names_of(lds) == ["l1"]
            await client.ack(cds)
            await client.ack(lds, ["*"])
            cache.set("n1.default", full_set(clusters=["a", "c"]))
            cds2 = await client.recv()
            assert cds2.type_url == CDS
            assert names_of(cds2) == ["a", "c"]
            await client.ack(cds2)
            # Every listener gone: an empty complete set deletes them.
            snap = full_set(clusters=["a", "c"])
            no_listeners = XdsSet(
                resources={**snap.resources, LDS: {}},
                versions={**snap.versions, LDS: version_of({})},
            )
            cache.set("n1.default", no_listeners)
            lds2 = await client.recv()
            assert lds2.type_url == LDS
            assert names_of(lds2) == []
            await client.close()

    run(body)


def test_eds_subscription_gets_only_its_names_and_a_name_that_appears_later() -> None:
    async def body() -> None:
        cache = SnapshotCache()
        cache.set("n1.default", full_set(clusters=["a", "b"]))
        async with serving(cache) as (_server, port):
            client = Client(port, "n1.default")
            await client.request(EDS, ["a", "later"])
            resp = await client.recv()
            assert names_of(resp) == ["a"]
            await client.ack(resp, ["a", "later"])
            await client.quiet()
            cache.set("n1.default", full_set(clusters=["a", "b", "later"]))
            resp2 = await client.recv()
            assert names_of(resp2) == ["a", "later"]
            await client.ack(resp2, ["a", "later"])
            # RDS for a name that does not exist: no (empty, meaningless) response.
            await client.request(RDS, ["nope"])
            await client.quiet()
            await client.close()

    run(body)


def test_a_change_is_pushed_in_make_before_break_order() -> None:
    async def body() -> None:
        cache = SnapshotCache()
        cache.set("n1.default", full_set(clusters=["a"]))
        async with serving(cache) as (_server, port):
            client = Client(port, "n1.default")
            # Subscribe in the "wrong" order; the first answers follow the requests.
            await client.request(RDS, ["l1"])
            await client.request(LDS)
            await client.request(EDS, ["a", "z"])
            await client.request(CDS)
            got = [await client.recv() for _ in range(4)]
            assert sorted(r.type_url for r in got) == sorted([CDS, EDS, LDS, RDS])
            names = {RDS: ["l1"], EDS: ["a", "z"], LDS: [], CDS: []}
            for resp in got:
                await client.ack(resp, names[resp.type_url])
            await client.quiet()
            # One change touching all four types.
            changed = xds_set(
                {
                    CDS: [cluster("a"), cluster("z")],
                    EDS: [endpoints("a", 9001), endpoints("z", 9002)],
                    LDS: [listener("l1", 10002)],
                    RDS: [route("l1", "z")],
                }
            )
            cache.set("n1.default", changed)
            # Each type goes out once the one before it is ACKed: clusters and endpoints are
            # applied before the listeners and routes that may use them.
            pushed = []
            for expected in (CDS, EDS, LDS, RDS):
                resp = await client.recv()
                assert resp.type_url == expected
                assert resp.version_info == changed.versions[expected]
                pushed.append(resp)
                await client.quiet()
                await client.ack(resp, names[expected])
            await client.quiet()
            assert len({r.nonce for r in [*got, *pushed]}) == 8


def test_a_subscription_is_answered_while_an_earlier_type_waits_for_its_ack() -> None:
    async def body() -> None:
        cache = SnapshotCache()
        cache.set("n1.default", full_set(clusters=["a"]))
        async with serving(cache) as (_server, port):
            client = Client(port, "n1.default")
            await client.request(CDS)
            cds = await client.recv()
            await client.ack(cds)
            await client.request(EDS, ["a"])
            eds = await client.recv()
            await client.ack(eds, ["a"])
            cache.set("n1.default", full_set(clusters=["a", "b"]))
            cds2 = await client.recv()
            assert names_of(cds2) == ["a", "b"]
            await client.quiet()  # the EDS push waits for the CDS ACK...
            # ...but a client that asks for the new cluster's endpoints before ACKing CDS
            # (Envoy may) gets them at once.
            await client.request(EDS, ["a", "b"], nonce=eds.nonce, version=eds.version_info)
            eds2 = await client.recv()
            assert names_of(eds2) == ["a", "b"]
            await client.close()
            await client.close()

    run(body)


def test_a_change_waits_for_the_ack_of_the_response_in_flight() -> None:
    async def body() -> None:
        cache = SnapshotCache()
        cache.set("n1.default", full_set(clusters=["a"]))
        async with serving(cache) as (_server, port):
            client = Client(port, "n1.default")
            await client.request(CDS)
            first = await client.recv()
            cache.set("n1.default", full_set(clusters=["a", "b"]))
            cache.set("n1.default", full_set(clusters=["a", "b", "c"]))
            await client.quiet()  # the first response is not answered yet
            await client.ack(first)
            latest = await client.recv()
            assert names_of(latest) == ["a", "b", "c"]  # intermediate states collapsed
            await client.ack(latest)
            await client.quiet()
            await client.close()

    run(body)


def test_two_nodes_are_isolated() -> None:
    async def body() -> None:
        cache = SnapshotCache()
        cache.set("one.default", full_set(clusters=["one"]))
        cache.set("two.default", full_set(clusters=["two"]))
        async with serving(cache) as (_server, port):
            one, two = Client(port, "one.default"), Client(port, "two.default")
            await one.request(CDS)
            await two.request(CDS)
            r1, r2 = await one.recv(), await two.recv()
            assert names_of(r1) == ["one"] and names_of(r2) == ["two"]
            await one.ack(r1)
            await two.ack(r2)
            cache.set("two.default", full_set(clusters=["two", "more"]))
            assert names_of(await two.recv()) == ["more", "two"]
            await one.quiet()
            await one.close()
            await two.close()

    run(body)


def test_hooks_get_the_node_on_connect_and_disconnect() -> None:
    async def body() -> None:
        events: list[tuple[str, NodeInfo]] = []
        gone = asyncio.Event()

        async def on_connect(node: NodeInfo) -> None:
            events.append(("connect", node))

        async def on_disconnect(node: NodeInfo) -> None:
            events.append(("disconnect", node))
            gone.set()

        cache = SnapshotCache()
        cache.set("n1.default", full_set())
        async with serving(cache, on_connect, on_disconnect) as (server, port):
            client = Client(port, "n1.default", {"ubimesh.role": "gateway", "n": 2})
            await client.request(CDS)
            await client.recv()
            assert [kind for kind, _ in events] == ["connect"]
            node = events[0][1]
            assert node.id == "n1.default"
            assert node.cluster == "c-n1.default"
            assert node.metadata == {"ubimesh.role": "gateway", "n": 2.0}
            assert "127.0.0.1" in node.peer
            await client.close()
            await asyncio.wait_for(gone.wait(), STEP)
            assert [kind for kind, _ in events] == ["connect", "disconnect"]
            assert events[1][1] == node
            for _ in range(100):
                if server.stats()["streams_connected"] == 0:
                    break
                await asyncio.sleep(0.01)
            assert server.stats()["streams_connected"] == 0
            assert server.stats()["nodes_connected"] == []

    run(body)


def test_server_stop_ends_streams_and_calls_on_disconnect() -> None:
    async def body() -> None:
        gone: list[str] = []

        async def on_disconnect(node: NodeInfo) -> None:
            gone.append(node.id)

        cache = SnapshotCache()
        cache.set("n1.default", full_set())
        server = AdsServer(cache, on_disconnect=on_disconnect)
        port = await server.start("127.0.0.1", 0)
        client = Client(port, "n1.default")
        await client.request(CDS)
        await client.recv()
        await server.stop(1.0)
        assert gone == ["n1.default"]
        end = await client.next()
        assert end is grpc.aio.EOF
        await client.close()

    run(body)


def test_a_node_without_snapshot_waits_then_receives() -> None:
    async def body() -> None:
        cache = SnapshotCache()
        async with serving(cache) as (_server, port):
            client = Client(port, "late.default")
            await client.request(CDS)
            await client.request(LDS)
            await client.quiet()
            snap = full_set()
            cache.set("late.default", snap)
            got = [await client.recv(), await client.recv()]
            assert [r.type_url for r in got] == [CDS, LDS]
            assert got[0].version_info == snap.versions[CDS]
            await client.close()

    run(body)


@pytest.mark.parametrize("node", [None, ""], ids=["no-node", "empty-id"])
def test_first_request_without_a_node_id_is_invalid_argument(node: str | None) -> None:
    async def body() -> None:
        cache = SnapshotCache()
        async with serving(cache) as (server, port):
            client = Client(port, "x")
            if node is None:
                client._node_sent = True  # send no node at all
            else:
                client.node.id = node
            await client.request(CDS)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.recv()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "node.id" in (info.value.details() or "")
            assert server.stats()["streams_total"] == 1
            await client.close()

    run(body)


def test_request_without_type_url_is_invalid_argument() -> None:
    async def body() -> None:
        cache = SnapshotCache()
        async with serving(cache) as (_server, port):
            client = Client(port, "n1.default")
            await client.request("")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.recv()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "type_url" in (info.value.details() or "")
            await client.close()

    run(body)


def test_delta_is_unimplemented_with_a_clear_message() -> None:
    async def body() -> None:
        cache = SnapshotCache()
        async with serving(cache) as (_server, port):
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources()
            # The server may refuse before it reads anything; then the write itself fails
            # ("RPC already finished"), and the status is what tells.
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS))
            code = await asyncio.wait_for(call.code(), STEP)
            assert code == grpc.StatusCode.UNIMPLEMENTED
            assert "DELTA_GRPC" in (await call.details() or "")
            await channel.close()

    run(body)


def test_cache_refuses_a_snapshot_it_could_not_serve() -> None:
    cache = SnapshotCache()
    good = full_set()
    wrong_type = XdsSet(
        resources={**good.resources, CDS: {"a": listener("a", 1)}}, versions=good.versions
    )
    with pytest.raises(ValueError, match=r"\['a'\]: is a envoy.config.listener.v3.Listener"):
        cache.set("n.default", wrong_type)
    wrong_name = XdsSet(
        resources={**good.resources, CDS: {"x": cluster("y")}}, versions=good.versions
    )
    with pytest.raises(ValueError, match="its name is 'y'"):
        cache.set("n.default", wrong_name)
    no_version = XdsSet(resources=good.resources, versions={})
    with pytest.raises(ValueError, match="have no version"):
        cache.set("n.default", no_version)
    with pytest.raises(ValueError, match="non-empty string"):
        cache.set("", good)
    assert cache.get("n.default") is None
    cache.set("n.default", good)
    assert cache.get("n.default") is good
    assert cache.remove("n.default") and cache.get("n.default") is None


def test_an_empty_list_after_names_unsubscribes() -> None:
    async def body() -> None:
        cache = SnapshotCache()
        cache.set("n1.default", full_set(clusters=["a"]))
        async with serving(cache) as (_server, port):
            client = Client(port, "n1.default")
            await client.request(EDS, ["a"])
            resp = await client.recv()
            await client.request(EDS, [], nonce=resp.nonce, version=resp.version_info)
            cache.set("n1.default", full_set(port=9999, clusters=["a"]))
            await client.quiet()  # not wildcard: nothing subscribed, nothing pushed
            await client.request(EDS, ["a"], nonce=resp.nonce, version=resp.version_info)
            again = await client.recv()
            assert names_of(again) == ["a"]
            assert again.version_info != resp.version_info
            await client.close()

    run(body)


def test_a_stream_may_not_subscribe_to_unbounded_types() -> None:
    async def body() -> None:
        cache = SnapshotCache()
        async with serving(cache) as (_server, port):
            client = Client(port, "n1.default")
            for i in range(MAX_TYPES_PER_STREAM + 1):
                await client.request(f"type.googleapis.com/test.Type{i}")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.recv()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"more than {MAX_TYPES_PER_STREAM} type URLs" in (info.value.details() or "")
            await client.close()

    run(body)


def test_requests_sent_back_to_back_are_all_answered() -> None:
    """A client that queues its CDS and LDS requests before the stream starts (as the ubimesh
    proxy and Envoy do) gets both answered: the second must not wait for a later wake-up."""

    async def body() -> None:
        cache = SnapshotCache()
        cache.set("n1.default", full_set())
        async with serving(cache) as (_server, port):
            node = base_pb2.Node(id="n1.default", cluster="c")
            done = asyncio.Event()

            async def requests() -> AsyncIterator[Any]:
                yield discovery_pb2.DiscoveryRequest(node=node, type_url=CDS)
                yield discovery_pb2.DiscoveryRequest(type_url=LDS)
                await done.wait()

            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
                call = stub.StreamAggregatedResources(requests())
                got = set()
                for _ in range(2):
                    resp = await asyncio.wait_for(call.read(), STEP)
                    got.add(resp.type_url)
                assert got == {CDS, LDS}
                done.set()
                call.cancel()

    for _ in range(5):
        run(body)
