"""Secrets over real gRPC: the ADS server serves SDS by name and pushes a changed ROOTCA; the
same state machine serves ``SecretDiscoveryService/StreamSecrets`` on a 0600 Unix socket (what
``ubimesh agent`` runs), to any node id.

Each test runs its own event loop and server; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from tests.support.pki import Pki

from ubimesh.agent.cache import SecretSet, SharedSnapshotCache
from ubimesh.control.ads import CDS, SDS, AdsServer, SnapshotCache
from ubimesh.control.ads.secrets import ROOTCA, secrets_version, trust_bundle_secret
from ubimesh.control.ads.types import ordered_types
from ubimesh.proxy.xds.dynamic import certificate_secret

STEP = 5.0
QUIET = 0.3


def secret_set(secrets: dict[str, Any]) -> SecretSet:
    return SecretSet({SDS: secrets, CDS: {}}, {SDS: secrets_version(secrets), CDS: "c1"})


class Stream:
    """One SDS-capable stream (ADS or StreamSecrets) as a client sees it."""

    def __init__(self, call: Any, node_id: str) -> None:
        self.call = call
        self.node = base_pb2.Node(id=node_id)
        self.first = True
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                resp = await self.call.read()
                await self.inbox.put(resp)
                if resp is grpc.aio.EOF:
                    return
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            await self.inbox.put(exc)

    async def request(self, names: list[str], *, nonce: str = "", version: str = "") -> None:
        req = discovery_pb2.DiscoveryRequest(
            type_url=SDS, resource_names=names, response_nonce=nonce, version_info=version
        )
        if self.first:
            req.node.CopyFrom(self.node)
            self.first = False
        await asyncio.wait_for(self.call.write(req), STEP)

    async def recv(self, timeout: float = STEP) -> Any:
        item = await asyncio.wait_for(self.inbox.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        assert item is not grpc.aio.EOF, "the stream ended instead of answering"
        return item

    async def quiet(self) -> None:
        try:
            item = await asyncio.wait_for(self.inbox.get(), QUIET)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected response: {item}")

    def close(self) -> None:
        self.call.cancel()
        self.reader.cancel()


def secrets_of(resp: Any) -> dict[str, Any]:
    out = {}
    for packed in resp.resources:
        assert packed.type_url == SDS
        msg = secret_pb2.Secret()
        assert packed.Unpack(msg)
        out[msg.name] = msg
    return out


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 30))


def test_secret_type_is_pushed_after_clusters_and_endpoints_and_before_listeners() -> None:
    assert ordered_types(
        [
            "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            "type.googleapis.com/envoy.config.listener.v3.Listener",
            SDS,
            "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            CDS,
        ]
    ) == [
        CDS,
        "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        SDS,
        "type.googleapis.com/envoy.config.listener.v3.Listener",
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
    ]


def test_ads_serves_secrets_by_name_and_pushes_a_changed_rootca() -> None:
    old, new = Pki("example.org"), Pki("example.org")

    async def body() -> None:
        cache = SnapshotCache()
        other = trust_bundle_secret(old.bundle_pem, name="OTHER")
        cache.set("p1", secret_set({ROOTCA: trust_bundle_secret(old.bundle_pem), "OTHER": other}))
        server = AdsServer(cache)
        port = await server.start("127.0.0.1", 0)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            ads = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            stream = Stream(ads.StreamAggregatedResources(), "p1")
            # By name, as EDS: only ROOTCA, though the snapshot holds OTHER too; a name the
            # snapshot lacks is not answered (no empty response).
            await stream.request([ROOTCA, "MISSING"])
            first = await stream.recv()
            got = secrets_of(first)
            assert list(got) == [ROOTCA]
            assert got[ROOTCA].validation_context.trusted_ca.inline_bytes == old.bundle_pem
            await stream.request([ROOTCA, "MISSING"], nonce=first.nonce,
                                 version=first.version_info)
            await stream.quiet()

            # Root rotation: the bundle holds both roots; the change is pushed.
            both = old.bundle_pem + new.bundle_pem
            cache.set("p1", secret_set({ROOTCA: trust_bundle_secret(both), "OTHER": other}))
            pushed = await stream.recv()
            assert pushed.version_info != first.version_info
            assert pushed.nonce != first.nonce
            got = secrets_of(pushed)
            assert list(got) == [ROOTCA]
            assert got[ROOTCA].validation_context.trusted_ca.inline_bytes == both
            # An unchanged snapshot set again pushes nothing.
            await stream.request([ROOTCA, "MISSING"], nonce=pushed.nonce,
                                 version=pushed.version_info)
            cache.set("p1", secret_set({ROOTCA: trust_bundle_secret(both), "OTHER": other}))
            await stream.quiet()
            stream.close()
        finally:
            await channel.close()
            await server.stop(0.5)

    run(body)


def test_sds_on_a_private_unix_socket_serves_every_node_and_pushes_renewals(
    tmp_path: Path,
) -> None:
    pki = Pki("example.org")
    chain1, key1 = pki.leaf("spiffe://example.org/ns/default/sa/web")
    chain2, key2 = pki.leaf("spiffe://example.org/ns/default/sa/web")
    path = str(tmp_path / "sds.sock")

    def secrets(chain: bytes, key: bytes) -> SecretSet:
        return secret_set(
            {
                "default": certificate_secret("default", chain, key),
                ROOTCA: trust_bundle_secret(pki.bundle_pem),
            }
        )

    async def body() -> None:
        cache = SharedSnapshotCache()
        server = AdsServer(cache, services=("sds",))
        await server.start_unix(path)
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600, oct(stat.S_IMODE(mode))
        channel = grpc.aio.insecure_channel(f"unix:{path}")
        try:
            sds = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
            a = Stream(sds.StreamSecrets(), "envoy-a")
            b = Stream(sds.StreamSecrets(), "envoy-b")
            await a.request(["default"])
            await b.request([ROOTCA])
            # Nothing until the workload has its certificate: requests wait.
            await a.quiet()
            cache.set_shared(secrets(chain1, key1))
            ra, rb = await a.recv(), await b.recv()
            cert = secrets_of(ra)["default"].tls_certificate
            assert cert.certificate_chain.inline_bytes == chain1
            assert cert.private_key.inline_bytes == key1
            assert list(secrets_of(rb)) == [ROOTCA]
            await a.request(["default"], nonce=ra.nonce, version=ra.version_info)
            await b.request([ROOTCA], nonce=rb.nonce, version=rb.version_info)
            # A renewal: pushed to the stream that asked for default, with a new version.
            cache.set_shared(secrets(chain2, key2))
            renewed = await a.recv()
            assert renewed.version_info != ra.version_info
            cert = secrets_of(renewed)["default"].tls_certificate
            assert cert.certificate_chain.inline_bytes == chain2
            assert cert.private_key.inline_bytes == key2
            a.close()
            b.close()
            # The ADS service is not on the agent's socket.
            ads = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = ads.StreamAggregatedResources()
            try:
                # The refusal may come before the write completes (then write raises it).
                await call.write(discovery_pb2.DiscoveryRequest(type_url=SDS))
                await asyncio.wait_for(call.read(), STEP)
                raise AssertionError("ADS answered on the SDS-only socket")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await channel.close()
            await server.stop(0.5)

    run(body)
